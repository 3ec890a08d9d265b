"""Integer lowering: quantized layers compile to uint8 x int8 -> int32 kernels that match PyTorch."""

import copy
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import make_plan, seeded_model
from torch import nn

from autocomp.core.inventory import build_inventory
from autocomp.hardware.compile.int8 import IntegerConv, IntegerLinear, integer_model, lowering_report
from autocomp.hardware.compile.lower import to_relax
from autocomp.intake.data import DataSplits, make_loader, take
from autocomp.intake.models import build_model
from autocomp.methods.apply import apply_plan
from autocomp.methods.quant import QuantConfig, QuantizedLayer, calibrate, quantized_copy

SHAPE = (1, 1, 28, 28)
W8A8 = {"method": "quant", "w_bits": 8, "a_bits": 8}
# One layer of each kind the lowering distinguishes on demo-resnet.
MIXED = {
    "stem.0": W8A8,
    "layer1.conv1.0": {"method": "quant", "w_bits": 4, "a_bits": 8},
    "layer1.conv2.0": {"method": "ternary", "a_bits": 8},
    "layer2.conv1.0": {"method": "binary", "a_bits": 8},
    "layer2.conv2.0": {"method": "quant", "w_bits": 8, "a_bits": 4},
    "layer2.shortcut.0": {"method": "quant", "w_bits": 4},
    "layer3.conv1.0": W8A8,
    "layer3.conv2.0": W8A8,
    "layer3.shortcut.0": W8A8,
    "fc": {"method": "quant", "w_bits": 2, "a_bits": 8},
}


def _random_batchnorms(model: nn.Module) -> nn.Module:
    """Non-trivial batch-norm statistics, so that folding them is tested."""
    generator = torch.Generator().manual_seed(1)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            channels = module.num_features
            module.running_mean.copy_(torch.rand(channels, generator=generator) - 0.5)
            module.running_var.copy_(torch.rand(channels, generator=generator) + 0.5)
            module.weight.data.copy_(torch.rand(channels, generator=generator) + 0.5)
            module.bias.data.copy_(torch.rand(channels, generator=generator) - 0.5)
    return model


def _quantized(model: nn.Module, inventory, layers: dict, calib) -> nn.Module:
    return apply_plan(model, make_plan(layers), inventory, calib=calib).eval()


@pytest.fixture(scope="module")
def w8a8_resnet() -> nn.Module:
    model, inventory = seeded_model("demo-resnet", SHAPE, in_channels=1)
    _random_batchnorms(model)
    torch.manual_seed(2)
    calib = [(torch.randn(16, *SHAPE[1:]), torch.zeros(16, dtype=torch.long)) for _ in range(2)]
    return _quantized(model, inventory, {name: W8A8 for name in inventory.names}, calib)


def _calls(module) -> list:
    """(op name, argument dtypes, result dtype) of every Relax call in ``main``."""
    import tvm
    from tvm import relax

    found = []
    for block in module["main"].body.blocks:
        for binding in block.bindings:
            value = binding.value
            if isinstance(value, relax.Call) and isinstance(value.op, tvm.ir.Op):
                dtypes = [getattr(arg.ty, "dtype", None) for arg in value.args]
                found.append((value.op.name, dtypes, binding.var.ty.dtype))
    return found


def test_relax_ir_computes_in_integers(w8a8_resnet: nn.Module) -> None:
    calls = _calls(to_relax(w8a8_resnet, SHAPE))
    kernels = [call for call in calls if call[0] in ("relax.nn.conv2d", "relax.matmul", "relax.linear")]
    quantized = [m for m in w8a8_resnet.modules() if isinstance(m, QuantizedLayer)]
    assert len(kernels) == len(quantized) == 10
    for name, dtypes, result in kernels:
        assert dtypes == ["uint8", "int8"], name
        assert result == "int32", name
    # every batch norm went into a per-channel requantization scale; nothing else computes in float
    names = {call[0] for call in calls}
    assert "relax.nn.batch_norm" not in names
    assert not any(call[0] == "relax.nn.conv2d" and call[2] == "float32" for call in calls)


def test_lowering_keeps_the_model_and_folds_batchnorm(w8a8_resnet: nn.Module) -> None:
    lowered = integer_model(w8a8_resnet)
    assert any(isinstance(m, QuantizedLayer) for m in w8a8_resnet.modules())  # input untouched
    integer = [m for m in lowered.module.modules() if isinstance(m, IntegerConv | IntegerLinear)]
    assert len(integer) == 10
    assert not any(isinstance(m, nn.BatchNorm2d) for m in lowered.module.modules())
    x = torch.randn(4, *SHAPE[1:], generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected, got = w8a8_resnet(x), lowered.module(x)
    # Folding batch norms into the requantization scale changes float rounding, so now and then
    # an activation at a rounding tie lands one quantization step the other way (seen: 7e-4 of
    # the largest logit, in a random test order that drew other inputs); every other output
    # is the same to float precision.
    difference = (got - expected).abs()
    assert difference.median() <= 1e-5 * expected.abs().max()
    assert difference.max() <= 1e-2 * expected.abs().max()


@pytest.fixture(scope="module")
def mixed(trained_resnet: Path, fmnist: DataSplits) -> nn.Module:
    model = build_model("demo-resnet", num_classes=10, in_channels=1)
    model.load_state_dict(torch.load(trained_resnet, weights_only=True))
    inventory = build_inventory(model.eval(), SHAPE, coupling=False)
    calib = make_loader(take(fmnist.train, 256), 64, shuffle=False)
    return _quantized(model, inventory, MIXED, calib)


def test_report_says_what_each_layer_computes(mixed: nn.Module) -> None:
    report = {layer.name: layer for layer in lowering_report(mixed)}
    quantized = {name: m for name, m in mixed.named_modules() if isinstance(m, QuantizedLayer)}
    assert set(report) == set(quantized)
    for name, layer in report.items():
        assert layer.storage_bytes == quantized[name].storage_bytes()
        assert layer.integer == (layer.act_bits is not None), name
    assert report["stem.0"].describe().startswith("uint8 x int8 -> int32 conv2d")
    assert report["stem.0"].folded_batchnorm == "stem.1"
    assert "4-bit packed" in report["layer1.conv1.0"].describe()
    assert "held as int8" in report["layer1.conv1.0"].describe()
    assert report["layer1.conv2.0"].weight_bits == 2 and report["layer2.conv1.0"].weight_bits == 1
    assert "4-bit activations held in uint8" in report["layer2.conv2.0"].compute
    assert report["fc"].compute.startswith("uint8 x int8 -> int32 matmul")
    shortcut = report["layer2.shortcut.0"]
    assert not shortcut.integer and shortcut.compute == "fp32 conv2d" and "weight-only" in shortcut.reason


def test_compiled_module_matches_pytorch_fake_quantization(mixed: nn.Module, fmnist: DataSplits) -> None:
    import tvm
    from tvm import relax

    images = torch.stack([fmnist.test[i][0] for i in range(32)])
    executable = tvm.compile(to_relax(mixed, tuple(images.shape)), target=tvm.target.Target({"kind": "llvm"}))
    vm = relax.VirtualMachine(executable, tvm.cpu())
    got = vm["main"](tvm.runtime.tensor(images.numpy(), tvm.cpu()))[0].numpy()
    with torch.no_grad():
        expected = mixed(images).numpy()
        reference = integer_model(mixed).module(images).numpy()
    scale = np.abs(expected).max()
    # The integer ops' own PyTorch reference: the same integers, so equal up to fp32 rounding.
    assert np.abs(got - reference).max() <= 1e-5 * scale
    # Against fake quantization, batch norm folded into the scale rounds differently in the
    # last bit, which moves an activation lying that close to a rounding midpoint by one
    # level: most images agree to fp32 rounding, the others by a fraction of a level.
    errors = np.abs(got - expected).max(1) / scale
    print(f"int8 TVM vs PyTorch fake quantization, max |diff| / max |logit| per image: "
          f"median {np.median(errors):.1e}, max {errors.max():.1e}")
    assert np.median(errors) < 1e-5 and errors.max() < 1e-2
    assert (got.argmax(1) == expected.argmax(1)).all()


class _Sequence(nn.Module):
    """Conv1d with asymmetric 'same' padding and dilation, batch norm, and a 3-D linear."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv1d(3, 8, 4, padding="same", dilation=3)  # pads 4 before, 5 after
        self.bn = nn.BatchNorm1d(8)
        self.head = nn.Linear(20, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.bn(self.conv(x))))


@pytest.mark.filterwarnings("ignore:Using padding='same'")
def test_conv1d_same_padding_and_linear_on_3d_inputs() -> None:
    import tvm
    from tvm import relax

    torch.manual_seed(0)
    model = _random_batchnorms(_Sequence()).eval()
    model.bn.running_mean.uniform_(-0.5, 0.5)
    # built by hand: the inventory does not list convs with string padding (aten.conv1d.padding)
    quantized = copy.deepcopy(model)
    layers = [(name, quantized_copy(getattr(model, name), QuantConfig(w_bits=8, a_bits=8)))
              for name in ("conv", "head")]
    for name, layer in layers:
        setattr(quantized, name, layer.eval())
    calibrate(quantized, layers, [(torch.randn(8, 3, 20) + 1.0, torch.zeros(8))])
    report = lowering_report(quantized)
    assert [layer.integer for layer in report] == [True, True]
    assert report[0].folded_batchnorm == "bn"
    calls = _calls(to_relax(quantized, (2, 3, 20)))
    assert [(n, d, r) for n, d, r in calls if n == "relax.nn.conv1d"] == [
        ("relax.nn.conv1d", ["uint8", "int8"], "int32")]
    x = torch.randn(2, 3, 20) + 1.0
    executable = tvm.compile(to_relax(quantized, (2, 3, 20)), target=tvm.target.Target({"kind": "llvm"}))
    got = relax.VirtualMachine(executable, tvm.cpu())["main"](tvm.runtime.tensor(x.numpy()))[0].numpy()
    with torch.no_grad():
        expected = quantized(x).numpy()
    assert np.abs(got - expected).max() <= 1e-4 * np.abs(expected).max()
