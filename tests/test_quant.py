"""Quantization methods (quant, binary, ternary) on the trained demo network and real data."""

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import make_plan
from torch import nn

from autocomp.core.errors import AutocompError
from autocomp.core.inventory import build_inventory
from autocomp.intake.data import DataSplits, make_loader, take
from autocomp.intake.models import build_model
from autocomp.methods.apply import apply_plan, size_bytes
from autocomp.methods.plan import CompressionPlan
from autocomp.methods.quant import (
    BinaryConfig,
    IntegerLayer,
    QuantConfig,
    QuantConv2d,
    QuantizedLayer,
    QuantLinear,
    TernaryConfig,
)
from autocomp.training.config import FinetuneConfig
from autocomp.training.distill import finetune
from autocomp.training.train import evaluate

SHAPE = (1, 1, 28, 28)


def _all_layers(inventory, choice: dict) -> CompressionPlan:
    return make_plan({name: choice for name in inventory.names})


def _quantized_layers(model: nn.Module) -> list[QuantizedLayer]:
    return [m for m in model.modules() if isinstance(m, QuantizedLayer)]


@pytest.fixture(scope="module")
def teacher(trained_resnet: Path) -> nn.Module:
    model = build_model("demo-resnet", num_classes=10, in_channels=1)
    model.load_state_dict(torch.load(trained_resnet, weights_only=True))
    return model.eval()


@pytest.fixture(scope="module")
def inventory(teacher: nn.Module):
    return build_inventory(teacher, SHAPE)


@pytest.fixture(scope="module")
def calib(fmnist: DataSplits):
    return make_loader(take(fmnist.train, 512), 64, shuffle=False)


@pytest.fixture(scope="module")
def float_accuracy(teacher: nn.Module, fmnist: DataSplits) -> float:
    return evaluate(teacher, fmnist.test)


@pytest.mark.parametrize("calibration", ["minmax", "percentile"])
def test_int8_post_training_quantization_keeps_accuracy(teacher: nn.Module, inventory, calib,
                                                         fmnist: DataSplits, float_accuracy: float,
                                                         calibration: str) -> None:
    choice = {"method": "quant", "w_bits": 8, "a_bits": 8, "calibration": calibration}
    model = apply_plan(teacher, _all_layers(inventory, choice), inventory, calib=calib)
    layers = _quantized_layers(model)
    assert len(layers) == len(inventory.layers) and all(layer.input_calibrated for layer in layers)
    int8_accuracy = evaluate(model, fmnist.test)
    print(f"test accuracy: float {float_accuracy:.4f}, w8a8 {calibration} {int8_accuracy:.4f}")
    assert float_accuracy > 0.6
    assert int8_accuracy >= float_accuracy - 0.01


def _predictions(model: nn.Module, dataset) -> tuple[torch.Tensor, torch.Tensor]:
    predicted, labels = [], []
    with torch.no_grad():
        for images, targets in make_loader(dataset, 500, shuffle=False):
            predicted.append(model(images).argmax(1))
            labels.append(targets)
    return torch.cat(predicted), torch.cat(labels)


def test_four_bit_weights_lose_more_than_eight_bit(teacher: nn.Module, inventory, calib,
                                                   fmnist: DataSplits) -> None:
    reference, labels = _predictions(teacher, fmnist.test)
    right = reference == labels
    lost = {}
    for bits in (8, 4):
        choice = {"method": "quant", "w_bits": bits, "a_bits": 8}
        model = apply_plan(teacher, _all_layers(inventory, choice), inventory, calib=calib)
        predicted, _ = _predictions(model, fmnist.test)
        # accuracy lost: test images the float model gets right and the quantized one wrong
        lost[bits] = int((right & (predicted != labels)).sum())
        print(f"w{bits}a8: test accuracy {(predicted == labels).float().mean():.4f} "
              f"(float {right.float().mean():.4f}); {lost[bits]} correct answers lost")
    assert lost[4] > 3 * lost[8]


def _finetune_subset(fmnist: DataSplits):
    return take(fmnist.train, 4000), take(fmnist.test, 2000)


@pytest.mark.parametrize("method", ["binary", "ternary"])
def test_binary_and_ternary_weights_train_end_to_end(teacher: nn.Module, inventory, calib,
                                                     fmnist: DataSplits, method: str) -> None:
    model = apply_plan(teacher, _all_layers(inventory, {"method": method}), inventory, calib=calib)
    train_set, test_set = _finetune_subset(fmnist)
    layers = _quantized_layers(model)
    start = [layer.integer_form().weight for layer in layers]
    before = evaluate(model, test_set)
    finetune(model, teacher, train_set, FinetuneConfig(steps=150))
    after = evaluate(model, test_set)
    end = [layer.integer_form().weight for layer in layers]
    moved = sum(int((a != b).sum()) for a, b in zip(start, end, strict=True)) / sum(a.numel() for a in start)
    print(f"{method}: accuracy on 2,000 test images {before:.4f} before fine-tuning, {after:.4f} after; "
          f"{moved:.1%} of the weights changed level")
    assert after > 0.5 and after > before + 0.2
    # batch norms and biases alone recover much of the loss: the weights themselves must learn too
    assert moved > 0.005
    allowed = {-1, 1} if method == "binary" else {-1, 0, 1}
    assert all(set(weights.unique().tolist()) <= allowed for weights in end)


def test_admm_training_ends_on_the_grid(teacher: nn.Module, inventory, calib, fmnist: DataSplits) -> None:
    model = apply_plan(teacher, _all_layers(inventory, {"method": "quant", "w_bits": 2, "admm_rho": 0.1}),
                       inventory, calib=calib)
    train_set, test_set = _finetune_subset(fmnist)
    before = evaluate(model, test_set)
    layers = _quantized_layers(model)
    assert all(not torch.equal(layer.weight, layer.quantized_weight()) for layer in layers)
    finetune(model, teacher, train_set, FinetuneConfig(steps=150))
    for layer in layers:
        form = layer.integer_form()
        grid = form.weight.float() * form.weight_scale.view(-1, *[1] * (form.weight.dim() - 1))
        assert torch.equal(layer.weight.detach(), grid)
        assert form.weight.abs().max() <= 1 and not layer.admm_active
    after = evaluate(model, test_set)
    print(f"2-bit ADMM: accuracy on 2,000 test images {before:.4f} before fine-tuning, {after:.4f} after")
    assert after > 0.45 and after > before + 0.2


def _captured_input(model: nn.Module, layer: nn.Module, images: torch.Tensor) -> torch.Tensor:
    seen = []
    handle = layer.register_forward_pre_hook(lambda module, args: seen.append(args[0]))
    with torch.no_grad():
        model(images)
    handle.remove()
    return seen[0]


def _run_integer_form(form: IntegerLayer, x: torch.Tensor) -> torch.Tensor:
    """The layer computed from its integer form alone, by the formula in IntegerLayer's docstring."""
    channel = (-1, *[1] * (form.weight.dim() - 1))
    zero_point, scale = form.weight_zero_point.float().view(channel), form.weight_scale.view(channel)
    weight = (form.weight.float() - zero_point) * scale
    if form.act_bits is not None:
        levels = torch.clamp(torch.round(x / form.act_scale) + form.act_zero_point, 0, 2**form.act_bits - 1)
        x = (levels - form.act_zero_point) * form.act_scale
    if form.op == "linear":
        return F.linear(x, weight, form.bias)
    return F.conv2d(x, weight, form.bias, form.stride, form.padding, form.dilation, form.groups)


def test_integer_form_reproduces_the_layer(teacher: nn.Module, inventory, calib, fmnist: DataSplits) -> None:
    plan = make_plan({"layer2.conv1.0": {"method": "quant", "w_bits": 4, "a_bits": 8},
                      "layer1.conv1.0": {"method": "quant", "w_bits": 8, "a_bits": 4,
                                     "calibration": "percentile"},
                      "layer3.conv2.0": {"method": "ternary"},
                      "fc": {"method": "binary", "a_bits": 8}})
    model = apply_plan(teacher, plan, inventory, calib=calib)
    images = torch.stack([fmnist.test[i][0] for i in range(16)])
    # layer: (weight bits, activation bits)
    bits = {"layer2.conv1.0": (4, 8), "layer1.conv1.0": (8, 4), "layer3.conv2.0": (2, None), "fc": (1, 8)}
    for name, (weight_bits, act_bits) in bits.items():
        layer = model.get_submodule(name)
        float_weight = teacher.get_submodule(name).weight.detach()
        form = layer.integer_form()
        scale = form.weight_scale.view(-1, *[1] * (form.weight.dim() - 1))
        assert form.weight.dtype == torch.int8 and form.weight.shape == float_weight.shape
        assert form.weight_scale.dtype == torch.float32 and not form.weight_zero_point.any()
        assert (form.weight_bits, form.act_bits) == (weight_bits, act_bits)
        assert torch.equal(form.weight.float() * scale, layer.quantized_weight())
        x = _captured_input(model, layer, images)
        with torch.no_grad():
            torch.testing.assert_close(_run_integer_form(form, x), layer(x), rtol=1e-5, atol=1e-6)
        rows = float_weight.reshape(len(float_weight), -1)
        if name == "fc":  # BWN: sign(w), scale mean |w| per output channel
            assert form.op == "linear"
            assert torch.equal(form.weight.reshape_as(rows).float(), torch.where(rows >= 0, 1.0, -1.0))
            torch.testing.assert_close(form.weight_scale, rows.abs().mean(1))
        elif name == "layer3.conv2.0":  # TWN: zero at or below 0.7 mean |w|, scale the mean above it
            assert form.op == "conv2d" and form.act_scale is None and form.act_zero_point is None
            above = rows.abs() > 0.7 * rows.abs().mean(1, keepdim=True)
            assert torch.equal(form.weight.reshape_as(rows) != 0, above)
            torch.testing.assert_close(form.weight_scale, (rows.abs() * above).sum(1) / above.sum(1))
        else:
            top = 2 ** (weight_bits - 1) - 1
            assert form.weight.abs().max() <= top
            assert 0 <= form.act_zero_point <= 2**form.act_bits - 1
            assert (form.stride, form.padding, form.groups) == (layer.stride, layer.padding, 1)
            # the fitted scale does at least as well as the max-abs scale
            peak = rows.abs().amax(1, keepdim=True) / top
            naive = torch.clamp(torch.round(rows / peak), -top, top) * peak
            fitted = form.weight.reshape_as(rows).float() * form.weight_scale[:, None]
            assert (rows - fitted).pow(2).sum() <= (rows - naive).pow(2).sum()


def test_training_passes_gradients_straight_through(teacher: nn.Module, inventory, calib,
                                                   fmnist: DataSplits) -> None:
    plan = make_plan({"layer2.conv1.0": {"method": "quant", "w_bits": 4, "a_bits": 8}})
    model = apply_plan(teacher, plan, inventory, calib=calib)
    layer = model.layer2.conv1[0]
    x = _captured_input(model, layer, torch.stack([fmnist.test[i][0] for i in range(8)]))
    x = (3 * x).requires_grad_()  # scaled so that part of it lies outside the calibrated range
    layer.train()
    out = layer(x)
    grad_out = torch.randn_like(out)
    out.backward(grad_out)
    # the same layer computed from leaves holding the fake-quantized weight and input
    q, scale = layer.config.project(layer.weight)
    weight = (q * scale.view(-1, 1, 1, 1)).requires_grad_()
    levels = torch.round(x.detach() / layer.act_scale) + layer.act_zero_point
    fake = ((torch.clamp(levels, 0, 255) - layer.act_zero_point) * layer.act_scale).requires_grad_()
    expected = F.conv2d(fake, weight, None, layer.stride, layer.padding)
    expected.backward(grad_out)
    assert torch.equal(out, expected)
    torch.testing.assert_close(layer.weight.grad, weight.grad)
    inside = (levels >= 0) & (levels <= 255)
    assert not inside.all()
    torch.testing.assert_close(x.grad, fake.grad * inside)


def test_storage_bytes_count_packed_weights_scales_and_bias(teacher: nn.Module, inventory) -> None:
    plan = make_plan({"layer2.conv1.0": {"method": "quant", "w_bits": 4},
                      "fc": {"method": "binary"}, "layer3.conv2.0": {"method": "ternary"}})
    model = apply_plan(teacher, plan, inventory)
    conv = model.layer2.conv1[0]  # 3x3, 16 -> 32, no bias
    assert isinstance(conv, QuantConv2d) and conv.bias is None
    assert conv.storage_bytes() == 32 * 16 * 9 * 4 // 8 + 32 * 4 == 2432
    assert isinstance(model.fc, QuantLinear)  # 64 -> 10 with bias
    assert model.fc.storage_bytes() == 64 * 10 // 8 + 10 * 4 + 10 * 4
    assert model.layer3.conv2[0].storage_bytes() == 64 * 64 * 9 * 2 // 8 + 64 * 4
    float_bytes = sum(4 * teacher.get_submodule(name).weight.numel() for name in plan.layers) + 4 * 10
    quant_bytes = 2432 + 160 + 9216 + 256
    assert size_bytes(model) == size_bytes(teacher) - float_bytes + quant_bytes
    # 45 binary weights take 6 bytes, not 5.625
    conv1d = nn.Sequential(nn.Conv1d(3, 5, 3))
    layer = apply_plan(conv1d, make_plan({"0": {"method": "binary"}}),
                       build_inventory(conv1d, (1, 3, 8), coupling=False))[0]
    assert layer.storage_bytes() == 6 + 5 * 4 + 5 * 4 and layer.integer_form().op == "conv1d"


def test_quantization_combines_with_pruning_and_factorisation(teacher: nn.Module, inventory, calib,
                                                              fmnist: DataSplits) -> None:
    plan = make_plan({
        "layer1.conv1.0": [{"method": "prune", "ratio": 0.5}, {"method": "quant", "w_bits": 4, "a_bits": 8}],
        "layer3.conv2.0": [{"method": "lowrank", "rank": 0.25}, {"method": "ternary", "a_bits": 8}],
    })
    model = apply_plan(teacher, plan, inventory, calib=calib)
    pruned = model.layer1.conv1[0]
    assert isinstance(pruned, QuantConv2d) and pruned.out_channels == 8 and pruned.input_calibrated
    pair = model.layer3.conv2[0]
    assert [type(m) for m in pair] == [QuantConv2d, QuantConv2d] and pair[0].out_channels == 16
    assert all(m.input_calibrated and m.integer_form().weight_bits == 2 for m in pair)
    assert model(torch.randn(2, *SHAPE[1:])).shape == (2, 10)
    assert evaluate(model, take(fmnist.test, 1000)) > 0.3
    assert build_inventory(model, SHAPE, coupling=False).macs < inventory.macs


@pytest.mark.parametrize(("choice", "message"), [
    ({"method": "quant", "w_bits": 3}, "'layer2.conv1.0': quant w_bits 3 is not one of 8, 4, 2"),
    ({"method": "quant", "w_bits": 8, "a_bits": 8, "calibration": "entropy"}, "calibration 'entropy'"),
    ({"method": "quant", "w_bits": 8, "a_bits": 2}, "a_bits 2"),
    ({"method": "quant", "w_bits": 8, "percentile": 20.0}, "percentile 20.0"),
    ({"method": "quant"}, "w_bits"),
    ({"method": "binary", "admm_rho": -1.0}, "admm_rho -1.0"),
    ({"method": "ternary", "threshold": 1.5}, "threshold 1.5"),
    ([{"method": "quant", "w_bits": 8}, {"method": "binary"}], "cannot take quant and binary"),
])
def test_bad_quantization_plans_are_rejected(choice, message: str) -> None:
    with pytest.raises(AutocompError, match=message):
        make_plan({"layer2.conv1.0": choice})


def test_plans_round_trip_through_json() -> None:
    plan = make_plan({"a": {"method": "quant", "w_bits": 4, "a_bits": 8, "calibration": "percentile"},
                      "b": [{"method": "prune", "ratio": 0.5}, {"method": "binary", "admm_rho": 0.1}],
                      "c": {"method": "ternary", "threshold": 0.5}})
    assert plan.to_json()["layers"]["a"] == {"method": "quant", "w_bits": 4, "a_bits": 8,
                                             "calibration": "percentile", "percentile": 99.99,
                                             "admm_rho": 0.0}
    again = CompressionPlan.from_json(json.loads(json.dumps(plan.to_json())))
    assert again == plan and again.digest() == plan.digest()
    assert [cfg.method for cfg in plan.layers["b"]] == ["prune", "binary"]


def test_depthwise_grouped_and_linear_layers_are_eligible(calib) -> None:
    torch.manual_seed(0)
    model = build_model("demo-mobilenetv2", num_classes=10, in_channels=1).eval()
    inventory = build_inventory(model, SHAPE)
    assert {layer.kind for layer in inventory.layers} == {"conv", "dwconv", "linear"}
    for cls in (QuantConfig, BinaryConfig, TernaryConfig):
        assert all(cls.ineligible(layer) is None for layer in inventory.layers)
    assert "conv3d" in QuantConfig.ineligible(replace(inventory.layers[0], kind="conv3d"))
    quantized = apply_plan(model, _all_layers(inventory, {"method": "ternary", "a_bits": 8}), inventory,
                           calib=calib)
    depthwise = quantized.get_submodule("features.2.conv.1.0")
    assert isinstance(depthwise, QuantConv2d) and depthwise.groups == depthwise.in_channels > 1
    assert len(_quantized_layers(quantized)) == len(inventory.layers)
    assert quantized(torch.randn(2, *SHAPE[1:])).shape == (2, 10)


class _ScaledConv(nn.Conv2d):
    """A conv with its own forward, which a quantized replacement would silently drop."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 2 * super().forward(x)


def test_conv_subclasses_are_refused() -> None:
    model = nn.Sequential(_ScaledConv(1, 4, 3), nn.Flatten(), nn.Linear(4 * 26 * 26, 10)).eval()
    inventory = build_inventory(model, SHAPE, coupling=False)
    with pytest.raises(AutocompError, match="layer '0': 0 is a _ScaledConv"):
        apply_plan(model, make_plan({"0": {"method": "quant", "w_bits": 8}}), inventory)


def test_activation_quantization_needs_calibration_data(teacher: nn.Module, inventory) -> None:
    plan = make_plan({"layer1.conv1.0": {"method": "quant", "w_bits": 8},
                      "fc": {"method": "binary", "a_bits": 8}})
    with pytest.raises(AutocompError, match=r"^layer 'fc': binary with a_bits=8 needs calibration"):
        apply_plan(teacher, plan, inventory)


def test_compiled_quantized_network_matches_pytorch(teacher: nn.Module, inventory, calib,
                                                    fmnist: DataSplits, tmp_path: Path) -> None:
    import tvm
    from tvm.runtime.vm import VirtualMachine

    from autocomp.hardware.compile.lower import compile_model, export_library
    from autocomp.hardware.profiles import load_profile

    choices = [{"method": "quant", "w_bits": 8, "a_bits": 8},
               {"method": "quant", "w_bits": 4, "a_bits": 8, "calibration": "percentile"},
               {"method": "ternary", "a_bits": 4}, {"method": "binary"}]
    plan = make_plan({name: choices[i % len(choices)] for i, name in enumerate(inventory.names)})
    model = apply_plan(teacher, plan, inventory, calib=calib)
    library = export_library(compile_model(model, SHAPE, load_profile("host")), tmp_path / "q.so")
    vm = VirtualMachine(tvm.runtime.load_module(str(library)), tvm.cpu())
    for index in range(8):
        x = fmnist.test[index][0].unsqueeze(0)
        got = vm["main"](tvm.runtime.tensor(x.numpy(), tvm.cpu()))[0].numpy()
        with torch.no_grad():
            expected, float_logits = model(x).numpy(), teacher(x).numpy()
        scale = np.abs(expected).max()
        np.testing.assert_allclose(got, expected, atol=1e-3 * scale)
        assert np.abs(got - float_logits).max() > 1e-2 * scale  # the quantization reached TVM


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v2"])
def test_every_layer_of_torchvision_models_quantizes(fmnist: DataSplits, name: str) -> None:
    torch.manual_seed(0)
    model = build_model(f"torchvision:{name}", num_classes=10).eval()
    inventory = build_inventory(model, (1, 3, 64, 64), coupling=False)
    images = torch.stack([fmnist.train[i][0] for i in range(34)])
    images = F.interpolate(images, size=64).repeat(1, 3, 1, 1)
    batches = [(images[:16], None), (images[16:32], None)]
    quantized = apply_plan(model, _all_layers(inventory, {"method": "quant", "w_bits": 8, "a_bits": 8}),
                           inventory, calib=batches)
    layers = _quantized_layers(quantized)
    assert len(layers) == len(inventory.layers) and all(layer.input_calibrated for layer in layers)
    with torch.no_grad():
        expected, got = model(images[32:]), quantized(images[32:])
    assert got.shape == (2, 10) and torch.isfinite(got).all()
    assert ((got - expected).norm() / expected.norm()).item() < 0.1
    assert size_bytes(quantized) < 0.3 * size_bytes(model)
