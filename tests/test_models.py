from pathlib import Path

import pytest
import torch

from autocomp.core.errors import AutocompError
from autocomp.intake.models import build_model, load_weights


@pytest.mark.parametrize("spec", ["demo-resnet", "demo-mobilenetv2"])
def test_demo_models_classify_fashion_mnist_shapes(spec: str) -> None:
    model = build_model(spec, num_classes=10, in_channels=1).eval()
    assert model(torch.randn(3, 1, 28, 28)).shape == (3, 10)


def test_demo_models_have_the_structures_compression_must_respect() -> None:
    resnet = build_model("demo-resnet", num_classes=10, in_channels=1)
    mobilenet = build_model("demo-mobilenetv2", num_classes=10, in_channels=1)
    assert any(getattr(m, "residual", False) for m in mobilenet.modules())
    assert any(isinstance(m, torch.nn.Conv2d) and m.groups == m.in_channels > 1
               for m in mobilenet.modules())
    assert any(type(m).__name__ == "BasicBlock" for m in resnet.modules())


def test_torchvision_stem_adapted_for_small_grey_images() -> None:
    model = build_model("torchvision:resnet18", num_classes=10, in_channels=1, input_size=28,
                        adapt_stem=True).eval()
    assert model.conv1.in_channels == 1 and model.conv1.stride == (1, 1)
    assert isinstance(model.maxpool, torch.nn.Identity)
    assert model(torch.randn(2, 1, 28, 28)).shape == (2, 10)


def test_torchvision_models_without_aux_heads() -> None:
    model = build_model("torchvision:googlenet", num_classes=7).train()
    assert model(torch.randn(2, 3, 64, 64)).shape == (2, 7)


def test_factory_file(tmp_path: Path) -> None:
    (tmp_path / "net.py").write_text(
        "import torch\n"
        "def make(num_classes=10):\n"
        "    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(784, num_classes))\n")
    model = build_model(f"{tmp_path / 'net.py'}:make", num_classes=4)
    assert model(torch.randn(1, 1, 28, 28)).shape == (1, 4)
    with pytest.raises(AutocompError, match="no callable"):
        build_model(f"{tmp_path / 'net.py'}:missing", num_classes=4)


def test_weights_round_trip_and_mismatch(tmp_path: Path) -> None:
    model = build_model("demo-resnet", num_classes=10, in_channels=1)
    torch.save(model.state_dict(), tmp_path / "w.pt")
    other = build_model("demo-resnet", num_classes=10, in_channels=1)
    load_weights(other, tmp_path / "w.pt")
    assert torch.equal(other.fc.weight, model.fc.weight)
    with pytest.raises(AutocompError, match="do not fit"):
        load_weights(build_model("demo-mobilenetv2", num_classes=10, in_channels=1),
                     tmp_path / "w.pt")
    with pytest.raises(AutocompError, match="does not exist"):
        load_weights(other, tmp_path / "none.pt")


@pytest.mark.parametrize(("spec", "message"), [
    ("resnet", r"unknown model 'resnet' \(did you mean demo-resnet\?\)"),
    ("torchvision:resnet1800", r"unknown torchvision classifier 'resnet1800' \(did you mean resnet18\?\)"),
    ("nofile.py:make", "model file nofile.py does not exist"),
])
def test_unknown_models(spec: str, message: str) -> None:
    with pytest.raises(AutocompError, match=message):
        build_model(spec, num_classes=10)
