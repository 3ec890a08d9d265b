import json

import pytest
import torch
from helpers import make_plan

from autocomp.core.errors import AutocompError
from autocomp.core.inventory import build_inventory
from autocomp.intake.models import build_model
from autocomp.methods.apply import apply_plan, count_params
from autocomp.methods.lowrank import full_rank, target_rank
from autocomp.methods.plan import CompressionPlan
from autocomp.methods.prune import PruneConfig, kept_channels

SHAPE = (1, 1, 28, 28)


def _model_and_inventory(spec: str):
    torch.manual_seed(0)
    model = build_model(spec, num_classes=10, in_channels=1).eval()
    return model, build_inventory(model, SHAPE)


def test_plan_json_round_trip_and_digest() -> None:
    plan = make_plan({"a": {"method": "prune", "ratio": 0.5}, "b": {"method": "lowrank", "rank": 0.25},
                      "c": {"method": "keep"}})
    again = CompressionPlan.from_json(json.loads(json.dumps(plan.to_json())))
    assert again == plan and again.digest() == plan.digest()
    assert set(plan.layers) == {"a", "b"}
    assert plan.to_json()["layers"]["a"] == {"method": "prune", "ratio": 0.5, "criterion": "l1"}


@pytest.mark.parametrize(("layers", "message"), [
    ({"a": {"method": "prune", "ratio": 1.5}}, "outside"),
    ({"a": {"method": "prune", "ratio": 0.5, "criterion": "magic"}}, "criterion"),
    ({"a": {"method": "shrink"}}, "unknown method"),
    ({"a": {"method": "lowrank", "rank": 0.5, "colour": "red"}}, "no parameter"),
    ({"a": {"method": "lowrank"}}, "lowrank"),
])
def test_bad_plans_are_rejected_when_read(layers: dict, message: str) -> None:
    with pytest.raises(AutocompError, match=message):
        make_plan(layers)


def test_plans_that_do_not_fit_the_model_are_rejected_before_any_work() -> None:
    model, inv = _model_and_inventory("demo-mobilenetv2")
    cases = {
        "features.99.conv": ({"method": "prune", "ratio": 0.5}, "does not have"),
        "features.2.conv.1.0": ({"method": "lowrank", "rank": 0.5}, "depthwise"),
        "features.2.conv.1.0 ": ({"method": "prune", "ratio": 0.5}, "does not have"),
        "classifier": ({"method": "prune", "ratio": 0.5}, "model's outputs"),
        "features.3.conv.2.0": ({"method": "prune", "ratio": 0.5}, "coupled to features.2.conv.2.0"),
    }
    for name, (choice, message) in cases.items():
        with pytest.raises(AutocompError, match=message):
            apply_plan(model, make_plan({name: choice}), inv)


def _demo_resnet_params(stem: int, inner: int) -> int:
    """demo-resnet's parameter count as a function of its stem and layer1 inner widths."""
    conv_bn = lambda c_in, c_out, k: c_out * c_in * k * k + 2 * c_out  # noqa: E731
    return (conv_bn(1, stem, 3) + conv_bn(stem, inner, 3) + conv_bn(inner, stem, 3)
            + conv_bn(stem, 32, 3) + conv_bn(32, 32, 3) + conv_bn(stem, 32, 1)
            + conv_bn(32, 64, 3) + conv_bn(64, 64, 3) + conv_bn(32, 64, 1) + 64 * 10 + 10)


def test_pruning_keeps_rounded_channels_and_shrinks_params_and_macs_as_predicted() -> None:
    model, inv = _model_and_inventory("demo-resnet")
    before = [p.clone() for p in model.parameters()]
    plan = make_plan({"layer1.conv1.0": {"method": "prune", "ratio": 0.5},
                      "stem.0": {"method": "prune", "ratio": 0.25}})
    pruned = apply_plan(model, plan, inv, channel_multiple=4)
    kept_inner, kept_stem = kept_channels(16, 0.5, 4), kept_channels(16, 0.25, 4)
    assert (kept_inner, kept_stem) == (8, 12)
    assert pruned.layer1.conv1[0].out_channels == kept_inner
    assert pruned.layer1.conv2[0].in_channels == kept_inner
    # the residual stream: stem, layer1's second conv and layer2's inputs all shrink together
    assert pruned.stem[0].out_channels == pruned.layer1.conv2[0].out_channels == kept_stem
    assert pruned.layer2.conv1[0].in_channels == pruned.layer2.shortcut[0].in_channels == kept_stem
    assert count_params(model) == _demo_resnet_params(stem=16, inner=16)
    assert count_params(pruned) == _demo_resnet_params(stem=kept_stem, inner=kept_inner)
    after = build_inventory(pruned, SHAPE)
    conv1 = inv.layer("layer1.conv1.0")
    assert after.layer("layer1.conv1.0").macs == conv1.macs * kept_inner * kept_stem // (16 * 16)
    assert after.macs < inv.macs
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
    torch.export.export(pruned, (torch.randn(*SHAPE),))


def test_pruning_depthwise_blocks_stays_valid() -> None:
    model, inv = _model_and_inventory("demo-mobilenetv2")
    plan = make_plan({name: {"method": "prune", "ratio": 0.5} for name in inv.prune_leaders()})
    pruned = apply_plan(model, plan, inv, channel_multiple=4)
    for module in pruned.modules():
        if isinstance(module, torch.nn.Conv2d) and module.groups > 1:
            assert module.groups == module.in_channels == module.out_channels
    assert pruned(torch.randn(2, 1, 28, 28)).shape == (2, 10)
    assert count_params(pruned) < 0.4 * count_params(model)
    # pruning by L1 importance removes the smallest filters: pruned output stays correlated
    assert pruned.features[2].conv[0][0].out_channels == kept_channels(64, 0.5, 4)


def test_pruning_is_deterministic() -> None:
    model, inv = _model_and_inventory("demo-resnet")
    plan = make_plan({"layer2.conv1.0": PruneConfig(0.5).to_json()})
    a, b = apply_plan(model, plan, inv), apply_plan(model, plan, inv)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(),
                                                  strict=True))


def test_svd_at_full_rank_reproduces_the_layer() -> None:
    model, inv = _model_and_inventory("demo-resnet")
    names = [layer.name for layer in inv.layers if layer.groups == 1]
    factorised = apply_plan(model, make_plan({n: {"method": "lowrank", "rank": 1.0} for n in names}), inv)
    x = torch.randn(4, 1, 28, 28)
    with torch.no_grad():
        expected, got = model(x), factorised(x)
    assert ((got - expected).norm() / expected.norm()).item() < 1e-4


def test_svd_params_and_macs_follow_the_rank() -> None:
    model, inv = _model_and_inventory("demo-resnet")
    layer = inv.layer("layer3.conv2.0")  # 64 -> 64, 3x3, no bias
    rank = target_rank(full_rank(64, 64, [3, 3]), 0.25)
    assert rank == 16
    factorised = apply_plan(model, make_plan({layer.name: {"method": "lowrank", "rank": 0.25}}), inv)
    pair = factorised.layer3.conv2[0]
    assert sum(p.numel() for p in pair.parameters()) == 64 * 9 * rank + rank * 64
    after = build_inventory(factorised, SHAPE)
    spatial = layer.out_shape[2] * layer.out_shape[3]
    assert after.layer("layer3.conv2.0.0").macs + after.layer("layer3.conv2.0.1").macs == (
        spatial * rank * 64 * 9 + spatial * 64 * rank)
    linear = apply_plan(model, make_plan({"fc": {"method": "lowrank", "rank": 0.5}}), inv).fc
    assert [m.out_features for m in linear] == [5, 10]
