"""Reference architectures that published latency figures use but torchvision lacks.

Only the architecture matters here (latency does not depend on weight values), so the
models are built untrained. ``mobilenet_v1`` is MobileNet-v1 (Howard et al. 2017,
width 1.0): a 3x3 stem and 13 depthwise-separable blocks, about 4.2M parameters and
569M multiply-accumulates at 224x224 with 1000 classes, as the paper reports.
"""

from collections.abc import Callable

from torch import Tensor, nn

# (output channels, stride) of the 13 depthwise-separable blocks, as in the paper's Table 1.
_MOBILENET_V1_BLOCKS = ((64, 1), (128, 2), (128, 1), (256, 2), (256, 1), (512, 2), (512, 1), (512, 1),
                        (512, 1), (512, 1), (512, 1), (1024, 2), (1024, 1))


def _conv_bn_relu(c_in: int, c_out: int, kernel: int, stride: int, groups: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, kernel, stride, kernel // 2, groups=groups, bias=False),
                         nn.BatchNorm2d(c_out), nn.ReLU(inplace=True))


class MobileNetV1(nn.Module):
    """MobileNet-v1 (width multiplier 1.0) for 224x224 images."""

    def __init__(self, num_classes: int = 1000, in_channels: int = 3) -> None:
        super().__init__()
        layers = [_conv_bn_relu(in_channels, 32, 3, 2)]
        c_in = 32
        for c_out, stride in _MOBILENET_V1_BLOCKS:
            layers.append(nn.Sequential(_conv_bn_relu(c_in, c_in, 3, stride, groups=c_in),
                                        _conv_bn_relu(c_in, c_out, 1, 1)))
            c_in = c_out
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(c_in, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.pool(self.features(x)).flatten(1))


def mobilenet_v1(num_classes: int = 1000, in_channels: int = 3) -> nn.Module:
    return MobileNetV1(num_classes=num_classes, in_channels=in_channels)


REFERENCE_MODELS: dict[str, Callable[..., nn.Module]] = {"mobilenet_v1": mobilenet_v1}
