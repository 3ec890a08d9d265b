"""Built-in demo networks sized for 28x28 Fashion-MNIST.

Small enough to train in a minute or two on two CPU cores, but built from the
structures compression has to respect: residual adds and 1x1 shortcuts
(``demo-resnet``), inverted residuals with depthwise convs (``demo-mobilenetv2``).
"""

from torch import Tensor, nn


def _conv_bn(c_in: int, c_out: int, kernel: int, stride: int = 1, groups: int = 1,
             act: type[nn.Module] | None = nn.ReLU) -> nn.Sequential:
    layers: list[nn.Module] = [
        nn.Conv2d(c_in, c_out, kernel, stride, kernel // 2, groups=groups, bias=False),
        nn.BatchNorm2d(c_out),
    ]
    if act is not None:
        layers.append(act())
    return nn.Sequential(*layers)


class BasicBlock(nn.Module):
    """ResNet basic block: two 3x3 convs and a residual add (1x1 conv shortcut on change)."""

    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.conv1 = _conv_bn(c_in, c_out, 3, stride)
        self.conv2 = _conv_bn(c_out, c_out, 3, act=None)
        self.shortcut = (
            _conv_bn(c_in, c_out, 1, stride, act=None)
            if stride != 1 or c_in != c_out else nn.Identity()
        )
        self.relu = nn.ReLU()

    def forward(self, x: Tensor) -> Tensor:
        return self.relu(self.conv2(self.conv1(x)) + self.shortcut(x))


class DemoResNet(nn.Module):
    """A ResNet-style classifier: stem, three stages of basic blocks, pooled linear head."""

    def __init__(self, num_classes: int = 10, in_channels: int = 1,
                 widths: tuple[int, int, int] = (16, 32, 64)) -> None:
        super().__init__()
        self.stem = _conv_bn(in_channels, widths[0], 3, stride=2)
        self.layer1 = BasicBlock(widths[0], widths[0], 1)
        self.layer2 = BasicBlock(widths[0], widths[1], 2)
        self.layer3 = BasicBlock(widths[1], widths[2], 2)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(widths[2], num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.layer3(self.layer2(self.layer1(self.stem(x))))
        return self.fc(self.pool(x).flatten(1))


class InvertedResidual(nn.Module):
    """MobileNetV2 block: 1x1 expand, 3x3 depthwise, 1x1 linear project, add when shapes match."""

    def __init__(self, c_in: int, c_out: int, stride: int, expand: int) -> None:
        super().__init__()
        hidden = c_in * expand
        layers: list[nn.Module] = []
        if expand != 1:
            layers.append(_conv_bn(c_in, hidden, 1, act=nn.ReLU6))
        layers.append(_conv_bn(hidden, hidden, 3, stride, groups=hidden, act=nn.ReLU6))
        layers.append(_conv_bn(hidden, c_out, 1, act=None))
        self.conv = nn.Sequential(*layers)
        self.residual = stride == 1 and c_in == c_out

    def forward(self, x: Tensor) -> Tensor:
        out = self.conv(x)
        return x + out if self.residual else out


class DemoMobileNetV2(nn.Module):
    """A MobileNetV2-style classifier with depthwise convs and residual inverted blocks."""

    # (expansion, output channels, repeats, first stride), as in the MobileNetV2 paper.
    SETTINGS = ((1, 16, 1, 1), (4, 24, 2, 2), (4, 32, 2, 2), (4, 64, 1, 1))

    def __init__(self, num_classes: int = 10, in_channels: int = 1, last_channels: int = 128) -> None:
        super().__init__()
        blocks: list[nn.Module] = [_conv_bn(in_channels, 16, 3, stride=2, act=nn.ReLU6)]
        c_in = 16
        for expand, c_out, repeats, stride in self.SETTINGS:
            for i in range(repeats):
                blocks.append(InvertedResidual(c_in, c_out, stride if i == 0 else 1, expand))
                c_in = c_out
        blocks.append(_conv_bn(c_in, last_channels, 1, act=nn.ReLU6))
        self.features = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(last_channels, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.pool(self.features(x)).flatten(1))


DEMO_MODELS = {"demo-resnet": DemoResNet, "demo-mobilenetv2": DemoMobileNetV2}
