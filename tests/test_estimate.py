"""The per-op cost model: op listing, scaling with compression, dtype and threads, provenance."""

import dataclasses
import math

import pytest
import torch
from helpers import make_plan

from autocomp.core.inventory import build_inventory
from autocomp.hardware.costmodel.estimate import EstimateMeasurer, estimate, list_ops
from autocomp.hardware.profiles import load_profile
from autocomp.intake.models import build_model
from autocomp.methods.apply import apply_plan
from autocomp.methods.prune import PruneConfig

SHAPE = (1, 1, 28, 28)


def _model(spec: str) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model(spec, num_classes=10, in_channels=1).eval()


def _calib() -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(0)
    return [(torch.rand(8, *SHAPE[1:], generator=generator), torch.zeros(8, dtype=torch.long))]


@pytest.fixture(scope="module")
def a53():
    return load_profile("arm-a53")


def test_ops_cover_the_model_macs_and_fuse_elementwise_ops() -> None:
    model = _model("demo-mobilenetv2")
    inventory = build_inventory(model, SHAPE, coupling=False)
    ops = list_ops(model, SHAPE)
    layer_kinds = {"conv", "dwconv", "gconv", "dense"}
    assert sum(op.macs for op in ops if op.kind in layer_kinds) == inventory.macs
    assert sum(op.kind in layer_kinds for op in ops) == len(inventory.layers)
    assert {op.kind for op in ops} >= {"conv", "dwconv", "dense", "pool"}
    # ReLU6 and the residual adds run inside the conv kernels, as TVM fuses them.
    assert not any(op.kind == "elementwise" for op in ops)
    assert any(any("add" in name for name in op.fused) for op in ops)
    assert all(op.bytes > 0 and op.dtype == "float32" for op in ops)


def test_estimate_is_labelled_and_its_breakdown_adds_up(a53) -> None:
    result = estimate(_model("demo-resnet"), SHAPE, a53)
    latency = result.latency
    assert latency.kind == "estimated"
    assert latency.provenance.startswith("estimated (arm-a53 cost model v1, fitted to ")
    assert "anchors/arm-a53.yaml" in latency.provenance
    assert latency.p10_s < latency.median_s < latency.p90_s
    assert latency.samples == int(a53.cost_model.constants["calibration_points"]) > 0
    assert math.isclose(sum(cost.seconds for cost in result.ops), latency.median_s)
    table = result.table()
    assert "layer3.conv2.0" in table and "estimated (arm-a53" in table
    assert EstimateMeasurer(a53).measure(_model("demo-resnet"), SHAPE) == latency


def test_pruned_model_is_estimated_faster(a53) -> None:
    model = _model("demo-resnet")
    inventory = build_inventory(model, SHAPE)
    leaders = [layer.name for layer in inventory.layers if PruneConfig.ineligible(layer) is None]
    pruned = apply_plan(model, make_plan({name: {"method": "prune", "ratio": 0.5} for name in leaders}),
                        inventory, channel_multiple=4)
    original, smaller = estimate(model, SHAPE, a53), estimate(pruned, SHAPE, a53)
    assert smaller.latency.median_s < 0.8 * original.latency.median_s
    assert sum(c.op.macs for c in smaller.ops) < 0.5 * sum(c.op.macs for c in original.ops)


def test_int8_layers_are_estimated_faster_than_fp32(a53) -> None:
    model = _model("demo-resnet")
    inventory = build_inventory(model, SHAPE, coupling=False)
    plan = make_plan({name: {"method": "quant", "w_bits": 8, "a_bits": 8} for name in inventory.names})
    quantized = apply_plan(model, plan, inventory, calib=_calib())
    float_ops, int_ops = list_ops(model, SHAPE), list_ops(quantized, SHAPE)
    assert {op.dtype for op in int_ops if op.kind in ("conv", "dense")} == {"int8"}
    # Same work, fewer bytes: int8 weights are a quarter of fp32.
    assert sum(op.macs for op in int_ops) == sum(op.macs for op in float_ops)
    assert sum(op.bytes for op in int_ops) < sum(op.bytes for op in float_ops)
    int8_s, fp32_s = (estimate(m, SHAPE, a53).latency.median_s for m in (quantized, model))
    assert int8_s < 0.9 * fp32_s
    # Weight-only quantization computes in float: no int8 kernels.
    weight_only = make_plan({name: {"method": "quant", "w_bits": 4} for name in inventory.names})
    assert all(op.dtype == "float32" for op in list_ops(apply_plan(model, weight_only, inventory), SHAPE))


def test_more_threads_are_faster_but_sublinear(a53) -> None:
    model = build_model("torchvision:resnet18", num_classes=10).eval()
    shape = (1, 3, 64, 64)
    one, four = (estimate(model, shape, a53, threads=n).latency.median_s for n in (1, 4))
    assert one / 4 < four < one
    assert "4 threads" in estimate(model, shape, a53, threads=4).latency.provenance


def test_uncalibrated_profile_says_so() -> None:
    profile = load_profile("arm-a53")
    facts = {name: profile.cost_model.constants[name] for name in
             ("clock_hz", "cores", "macs_per_cycle_fp32", "macs_per_cycle_int8", "bandwidth_bytes_per_s")}
    bare = dataclasses.replace(profile, cost_model=dataclasses.replace(profile.cost_model, constants=facts))
    latency = estimate(_model("demo-resnet"), SHAPE, bare).latency
    assert "uncalibrated" in latency.provenance and latency.samples == 0
    assert latency.p90_s / latency.median_s == pytest.approx(2.0 ** 1.2815516)
