import itertools
import math
from pathlib import Path

import numpy as np
import pytest
import tensorly
import torch
from helpers import make_plan, relative_error, seeded_model
from torch import nn

from autocomp.core.errors import AutocompError
from autocomp.core.inventory import build_inventory
from autocomp.methods.apply import apply_plan, count_params
from autocomp.methods.lowrank import (
    LowRankConfig,
    TTLinear,
    balanced_factors,
    cp_full_rank,
    factorise,
    target_rank,
    tt_unfit,
)
from autocomp.methods.registry import config_from_json

SHAPE = (1, 1, 28, 28)
TV_SHAPE = (1, 3, 64, 64)
KINDS = ("svd", "tucker2", "cp", "tt")


def test_the_svd_json_keeps_its_meaning_and_other_kinds_round_trip() -> None:
    config = config_from_json({"method": "lowrank", "rank": 0.5})
    assert config == LowRankConfig(0.5) and config.kind == "svd"
    assert config.to_json() == {"method": "lowrank", "rank": 0.5, "kind": "svd"}
    for data in ({"method": "lowrank", "kind": "tucker2", "rank": 0.25, "rank_out": 0.5},
                 {"method": "lowrank", "kind": "svd", "energy": 0.9},
                 {"method": "lowrank", "kind": "cp", "rank": 0.1},
                 {"method": "lowrank", "kind": "tt", "rank": 0.2, "cores": 2}):
        assert config_from_json(data).to_json() == data


@pytest.mark.parametrize(("choice", "message"), [
    ({"kind": "qr", "rank": 0.5}, "kind 'qr' is not known"),
    ({"kind": "tucker2", "rank": 0.0}, "rank fraction 0.0 is outside"),
    ({"kind": "tucker2", "rank": 0.5, "rank_out": 1.5}, "rank_out fraction 1.5"),
    ({"rank": "half"}, "rank must be a number"),
    ({"rank": 0.5, "energy": 0.9}, "either a rank or an energy"),
    ({"energy": 0.0}, "energy fraction 0.0"),
    ({"kind": "cp", "energy": 0.9}, "energy applies to kind svd only"),
    ({"kind": "svd", "rank": 0.5, "rank_out": 0.5}, "rank_out applies to kind tucker2 only"),
    ({"kind": "tucker2", "rank": 0.5, "cores": 3}, "cores applies to kind tt only"),
    ({"kind": "tt", "rank": 0.5, "cores": 1}, "cores 1 is not an integer"),
    ({"kind": "tt"}, "lowrank tt needs a rank"),
])
def test_bad_configs_name_the_parameter(choice: dict, message: str) -> None:
    with pytest.raises(AutocompError, match=message):
        make_plan({"fc": {"method": "lowrank", **choice}})


def test_eligibility_has_a_reason_per_kind(mobilenet, resnet) -> None:
    _, inv = mobilenet
    reasons = {name: {kind: LowRankConfig.ineligible(inv.layer(name), kind) for kind in KINDS}
               for name in ("features.0.0", "features.2.conv.0.0", "features.2.conv.1.0", "classifier")}
    assert reasons["features.0.0"] == {  # 1 -> 16, 3x3
        "svd": None, "cp": None, "tt": "tt factorises Linear layers; convs take svd, tucker2 or cp",
        "tucker2": "a single input channel leaves nothing to factorise on the input side"}
    pointwise = reasons["features.2.conv.0.0"]
    assert pointwise["svd"] is None and "1x1 conv has no spatial kernel" in pointwise["tucker2"]
    assert "1x1 conv has no spatial kernel" in pointwise["cp"]
    assert all("grouped and depthwise" in reasons["features.2.conv.1.0"][k] for k in KINDS[:3])
    head = reasons["classifier"]  # 128 -> 10
    assert head["svd"] is None and "Linear layer takes svd or tt" in head["cp"]
    assert head["tt"] == "10 out features do not split into 3 factors of at least 2"
    # every kind's layers are svd's too, so the class-level answer covers them all
    for _, inventory in (mobilenet, resnet):
        for layer in inventory.layers:
            if any(LowRankConfig.ineligible(layer, kind) is None for kind in KINDS):
                assert LowRankConfig.ineligible(layer) is None
    # the tt rule: d balanced factors >= 2 each, none above twice the d-th root
    assert balanced_factors(25088, 3) == [32, 28, 28] and balanced_factors(4096, 3) == [16, 16, 16]
    assert tt_unfit(25088, 4096, 3) is None and tt_unfit(64, 10, 2) is None
    assert "unevenly" in tt_unfit(2 * 1031, 4096, 2)


def test_a_kind_that_does_not_fit_is_refused_before_any_work(mobilenet) -> None:
    model, inv = mobilenet
    cases = {"classifier": ({"kind": "tucker2", "rank": 0.5}, "tucker2 factorises conv kernels"),
             "features.0.0": ({"kind": "tt", "rank": 0.5}, "tt factorises Linear layers")}
    for name, (choice, message) in cases.items():
        plan = make_plan({name: {"method": "lowrank", **choice}})
        with pytest.raises(AutocompError, match=f"layer '{name}' cannot take lowrank: {message}"):
            plan.validate(inv)
    with pytest.raises(AutocompError, match="10 out features do not split into 3"):
        apply_plan(model, make_plan({"classifier": {"method": "lowrank", "kind": "tt", "rank": 0.5}}), inv)


def _module(kind: str) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(1)
    modules = {
        "svd-conv": (nn.Conv2d(16, 24, 3, stride=2, padding=1), (2, 16, 15, 15)),
        "svd-linear": (nn.Linear(40, 30), (5, 40)),
        "tucker2": (nn.Conv2d(16, 24, 3, stride=2, padding=1), (2, 16, 15, 15)),
        "tucker2-1d": (nn.Conv1d(8, 12, 5, padding=4, dilation=2, padding_mode="reflect"), (2, 8, 30)),
        "tt": (nn.Linear(512, 1000), (3, 512)),
        "tt-2": (nn.Linear(64, 10), (3, 64)),
    }
    module, shape = modules[kind]
    return module.eval(), torch.randn(*shape)


@pytest.mark.parametrize(("case", "config"), [
    ("svd-conv", LowRankConfig(1.0)),
    ("svd-linear", LowRankConfig(energy=1.0)),
    ("tucker2", LowRankConfig(1.0, "tucker2")),
    ("tucker2-1d", LowRankConfig(1.0, "tucker2", rank_out=1.0)),
    ("tt", LowRankConfig(1.0, "tt")),
    ("tt-2", LowRankConfig(1.0, "tt", cores=2)),
])
def test_full_rank_reproduces_the_layer(case: str, config: LowRankConfig) -> None:
    module, x = _module(case)
    with torch.no_grad():
        assert relative_error(factorise(module, config)(x), module(x)) < 1e-4


def test_cp_error_falls_with_rank_and_vanishes_at_the_full_cp_rank() -> None:
    """CP "full rank" is prod(shape) / max(shape): a 6x4x3x3 weight always has an exact
    decomposition with 36 terms (one per input channel and kernel tap). ALS finds it."""
    torch.manual_seed(2)
    conv = nn.Conv2d(4, 6, 3, stride=2, padding=1).eval()
    assert cp_full_rank(conv.weight.shape) == 36
    x = torch.randn(2, 4, 11, 11)
    errors = []
    with torch.no_grad():
        for fraction in (1 / 6, 1 / 3, 1 / 2, 2 / 3, 1.0):
            errors.append(relative_error(factorise(conv, LowRankConfig(fraction, "cp"))(x), conv(x)))
    assert all(a > b for a, b in itertools.pairwise(errors)), errors
    assert errors[-2] > 1e-4 > errors[-1]
    layers = factorise(conv, LowRankConfig(1.0, "cp"))
    assert [tuple(m.kernel_size) for m in layers] == [(1, 1), (3, 1), (1, 3), (1, 1)]
    assert layers[1].groups == layers[2].groups == 36
    again = factorise(conv, LowRankConfig(1 / 3, "cp"))
    first = factorise(conv, LowRankConfig(1 / 3, "cp"))
    assert all(torch.equal(a, b) for a, b in zip(first.parameters(), again.parameters(), strict=True))


def test_energy_keeps_the_fewest_singular_values_that_reach_it() -> None:
    torch.manual_seed(3)
    linear = nn.Linear(48, 32)
    squares = torch.linalg.svdvals(linear.weight.detach().double()) ** 2
    share = (squares.cumsum(0) / squares.sum()).tolist()
    for energy in (0.5, 0.9, 0.99):
        expected = next(i + 1 for i, value in enumerate(share) if value >= energy)
        assert factorise(linear, LowRankConfig(energy=energy))[0].out_features == expected
    assert tensorly.get_backend() == "numpy"  # the pytorch backend did not leak


def test_params_and_macs_fall_as_the_formulas_predict(resnet) -> None:
    model, inv = resnet
    weight = model.layer3.conv2[0].weight.detach().double().reshape(64, -1)
    squares = torch.linalg.svdvals(weight) ** 2
    svd_rank = int((squares.cumsum(0) < 0.9 * squares.sum()).sum()) + 1
    plan = make_plan({
        "layer2.conv2.0": {"method": "lowrank", "kind": "tucker2", "rank": 0.25, "rank_out": 0.5},
        "layer3.conv1.0": {"method": "lowrank", "kind": "cp", "rank": 0.1},
        "layer3.conv2.0": {"method": "lowrank", "energy": 0.9},
        "fc": {"method": "lowrank", "kind": "tt", "rank": 0.5, "cores": 2},
    })
    after = build_inventory(apply_plan(model, plan, inv), SHAPE, coupling=False)
    r_in, r_out = 8, 16  # tucker2: 0.25 of 32 inputs, 0.5 of 32 outputs; 7x7 in and out
    cp = target_rank(cp_full_rank((64, 32, 3, 3)), 0.1)  # 32 -> 64, stride 2: 7x7 in, 4x4 out
    assert (cp, 1 < svd_rank < 64) == (29, True)
    expected = {  # layer: (params, MACs)
        "layer2.conv2.0.0": (32 * r_in, 49 * 32 * r_in),
        "layer2.conv2.0.1": (r_in * r_out * 9, 49 * r_in * r_out * 9),
        "layer2.conv2.0.2": (r_out * 32, 49 * r_out * 32),
        "layer3.conv1.0.0": (32 * cp, 49 * 32 * cp),
        "layer3.conv1.0.1": (3 * cp, 4 * 7 * cp * 3),
        "layer3.conv1.0.2": (3 * cp, 4 * 4 * cp * 3),
        "layer3.conv1.0.3": (cp * 64, 16 * cp * 64),
        "layer3.conv2.0.0": (svd_rank * 64 * 9, 16 * svd_rank * 64 * 9),
        "layer3.conv2.0.1": (64 * svd_rank, 16 * 64 * svd_rank),
        # tt: in 64 = 8x8, out 10 = 5x2, rank 8 (half of min(8*5, 8*2))
        "fc.cores.0": (8 * 5 * 8, 8 * (5 * 8) * 8),  # 8 inputs left x (n r) x (r m)
        "fc.cores.1": (8 * 8 * 2, 5 * 2 * (8 * 8)),
    }
    for name, (params, macs) in expected.items():
        assert (after.layer(name).params, after.layer(name).macs) == (params, macs), name
    replaced = ["layer2.conv2.0", "layer3.conv1.0", "layer3.conv2.0", "fc"]
    assert after.params == (inv.params - sum(inv.layer(n).params for n in replaced)
                            + sum(p for p, _ in expected.values()) + 10)  # tt keeps fc's bias
    assert after.macs == inv.macs - sum(inv.layer(n).macs for n in replaced) + sum(
        m for _, m in expected.values())


def _every_layer(inv, kind: str, rank: float) -> dict:
    extra = {"cores": 2} if kind == "tt" else {}
    layers = {}
    for layer in inv.layers:
        config = LowRankConfig(rank, kind, **extra)
        if config.unfit(layer) is None:
            layers[layer.name] = config.to_json()
    return layers


@pytest.mark.parametrize("kind", KINDS)
def test_each_kind_applies_to_residual_and_depthwise_networks(resnet, mobilenet, kind: str) -> None:
    x = torch.randn(3, 1, 28, 28)
    for model, inv in (resnet, mobilenet):
        rank = 0.1 if kind == "cp" else 1.0  # exact CP of a 64x64x3x3 kernel needs 576 terms
        layers = _every_layer(inv, kind, rank)
        if kind == "tucker2" and model is mobilenet[0]:
            assert not layers  # its only ungrouped KxK conv, the stem, has a single input channel
            continue
        assert layers
        factorised = apply_plan(model, make_plan(layers), inv)
        with torch.no_grad():
            expected, got = model(x), factorised(x)
        if kind == "cp":
            assert torch.isfinite(got).all() and count_params(factorised) != count_params(model)
        else:
            assert relative_error(got, expected) < 1e-4
        torch.export.export(factorised, (torch.randn(*SHAPE),))


def test_torchvision_resnet18_and_vgg11_bn() -> None:
    x = torch.randn(2, 3, 64, 64)
    model, inv = seeded_model("torchvision:resnet18", TV_SHAPE)
    plan = make_plan({"layer1.0.conv1": {"method": "lowrank", "kind": "tucker2", "rank": 1.0},
                      "layer2.0.conv1": {"method": "lowrank", "kind": "tucker2", "rank": 1.0},
                      "layer3.0.downsample.0": {"method": "lowrank", "rank": 1.0},
                      "fc": {"method": "lowrank", "kind": "tt", "rank": 1.0, "cores": 2}})
    with torch.no_grad():
        assert relative_error(apply_plan(model, plan, inv)(x), model(x)) < 1e-4
    cp = apply_plan(model, make_plan({"conv1": {"method": "lowrank", "kind": "cp", "rank": 0.25}}), inv)
    assert count_params(model) - count_params(cp) == 64 * 3 * 49 - 37 * (3 + 7 + 7 + 64)

    model, inv = seeded_model("torchvision:vgg11_bn", TV_SHAPE)
    assert LowRankConfig.ineligible(inv.layer("classifier.0"), "tt") is None  # 25088 = 32x28x28
    plan = make_plan({"features.4": {"method": "lowrank", "kind": "tucker2", "rank": 1.0},  # 64 -> 128
                      "classifier.3": {"method": "lowrank", "kind": "tt", "rank": 0.25}})  # 4096 -> 4096
    factorised = apply_plan(model, plan, inv)
    with torch.no_grad():
        assert relative_error(factorised.features(x), model.features(x)) < 1e-4
    train = factorised.classifier[3]
    assert isinstance(train, TTLinear) and train.ranks == [1, 64, 64, 1]  # 0.25 of 16*16=256
    assert count_params(train) == 16 * 16 * 64 + 64 * 16 * 16 * 64 + 64 * 16 * 16 + 4096
    tt_saved = 4096 * 4096 - (math.prod([64, 256, 64]) + 2 * 64 * 256)
    tucker_added = 64 * 64 + 128 * 128  # the two 1x1s at full rank; the core keeps the 3x3 size
    assert count_params(model) - count_params(factorised) == tt_saved - tucker_added


def test_compiled_factorised_model_matches_pytorch(resnet, tmp_path: Path) -> None:
    import tvm
    from tvm.runtime.vm import VirtualMachine

    from autocomp.hardware.compile.lower import compile_model, export_library
    from autocomp.hardware.profiles import load_target

    model, inv = resnet
    plan = make_plan({"layer1.conv1.0": {"method": "lowrank", "kind": "tucker2", "rank": 0.5,
                                         "rank_out": 0.75},
                      "layer2.conv1.0": {"method": "lowrank", "kind": "cp", "rank": 0.2},
                      "layer3.conv2.0": {"method": "lowrank", "energy": 0.8},
                      "fc": {"method": "lowrank", "kind": "tt", "rank": 0.5, "cores": 2}})
    factorised = apply_plan(model, plan, inv)
    # untuned: this checks the graph TVM imports; tuned schedules are checked in test_tune
    profile = load_target("host", untuned=True)
    library = export_library(compile_model(factorised, SHAPE, profile), tmp_path / "m.so")
    vm = VirtualMachine(tvm.runtime.load_module(str(library)), tvm.cpu())
    x = torch.randn(*SHAPE)
    got = vm["main"](tvm.runtime.tensor(x.numpy(), tvm.cpu()))[0].numpy()
    with torch.no_grad():
        expected = factorised(x).numpy()
    np.testing.assert_allclose(got, expected, atol=1e-4)
    assert np.abs(expected - model(x).detach().numpy()).max() > 1e-3  # the factorisation did change it
