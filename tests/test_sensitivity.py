"""Sensitivity pre-pass: per-layer accuracy drops on a trained demo-resnet, exclusion, seeds."""

import json
from pathlib import Path

import optuna
import pytest
import torch

from autocomp.core.inventory import build_inventory
from autocomp.intake.data import DataSplits, calibration_loader
from autocomp.intake.models import build_model
from autocomp.methods.plan import CompressionPlan
from autocomp.methods.registry import METHODS
from autocomp.search import sensitivity as sens
from autocomp.search.sensitivity import Sensitivity, measure_sensitivity
from autocomp.search.space.loading import load_space
from autocomp.search.space.sampling import KEEP, Range


@pytest.fixture(scope="module")
def measured(fmnist: DataSplits, trained_resnet: Path):
    model = build_model("demo-resnet", num_classes=10, in_channels=1)
    model.load_state_dict(torch.load(trained_resnet, weights_only=True))
    inventory = build_inventory(model.eval(), (1, 1, 28, 28))
    space = load_space("default")
    calls: list[tuple[int, int]] = []
    result = measure_sensitivity(model, inventory, space, fmnist.val,
                                 calibration_loader(fmnist.train, 256), images=500,
                                 progress=lambda done, total: calls.append((done, total)))
    return model, inventory, space, result, calls


def test_each_offered_layer_and_method_is_measured_at_both_ends_of_the_grid(measured) -> None:
    _, inventory, space, result, calls = measured
    assert result.images == 500 and result.base_accuracy > 0.6 and result.seconds > 0
    assert calls[-1][0] == calls[-1][1] and [d for d, _ in calls] == sorted(d for d, _ in calls)
    offered = {(layer.name, method) for layer in inventory.layers
               for method in space.layer_options(layer) if method != KEEP}
    assert {(r.layer, r.method) for r in result.rows} == offered
    assert result.layers == [name for name in inventory.names if name in result.layers]
    ratio = next(v for v in space.methods if v.method == "prune").params["ratio"]
    assert isinstance(ratio, Range)
    for row in result.rows:
        assert row.ok, row.error
        assert row.drop == pytest.approx(result.reference_accuracy - row.accuracy)
        if row.method == "prune":
            assert row.values["ratio"] == pytest.approx(ratio.low if row.strength == "mild" else ratio.high)
            assert row.params[f"{row.layer}.prune.ratio"] == row.values["ratio"]
    # Pruning a layer at the space's strongest ratio costs more than at its mildest.
    prune = {(r.layer, r.strength): r.drop for r in result.rows if r.method == "prune"}
    gaps = [prune[layer, "strong"] - prune[layer, "mild"] for layer, _ in prune]
    assert max(gaps) > 0.03
    table = result.table()
    assert all(f"| {layer} |" in table for layer in result.layers)
    assert result.describe().startswith("At the strongest setting")
    ranked = result.rank_layers()
    means = [sum(d.values()) / len(d) for _, d in ranked]
    assert means == sorted(means) and {layer for layer, _ in ranked} == set(result.layers)


def test_json_round_trip_and_exclusion_threshold(measured) -> None:
    _, inventory, space, result, _ = measured
    assert Sensitivity.from_json(json.loads(json.dumps(result.to_json()))) == result
    mild = {}
    for row in result.rows:
        if row.strength == "mild":
            mild[row.layer, row.method] = min(mild.get((row.layer, row.method), 1.0), row.drop)
    threshold = sorted(mild.values())[len(mild) // 2]
    excluded = result.excluded(threshold)
    for (layer, method), drop in mild.items():
        assert (method in excluded.get(layer, set())) == (drop > threshold)
    assert any(excluded.values()) and all(KEEP not in methods for methods in excluded.values())
    narrowed = space.narrowed(excluded)
    for layer in inventory.layers:
        assert not excluded.get(layer.name, set()) & set(narrowed.layer_choices(layer))
    # The default threshold only drops what is clearly destructive: nothing on this model.
    assert result.excluded() == {}


@pytest.mark.parametrize("narrow", [False, True])
def test_seed_params_reproduce_the_seed_plans(measured, narrow: bool) -> None:
    _, inventory, space, result, _ = measured
    if narrow:
        space = space.narrowed({name: {"quant"} for name in inventory.names})
    seeds = result.seed_params(space, inventory)
    choices = result.seed_choices(space, inventory)
    assert [label for label, _ in seeds] == [label for label, _ in choices]
    assert seeds and seeds[0][0] == "sensitivity seed: least sensitive"
    for (label, params), (_, rows) in zip(seeds, choices, strict=True):
        assert rows and all(row.drop < sens.SEED_MAX_DROP for row in rows.values())
        if narrow:
            assert all(row.method != "quant" for row in rows.values())
        expected = CompressionPlan({layer: METHODS[row.method](**row.values) for layer, row in rows.items()})
        study = optuna.create_study(directions=["maximize", "minimize"])
        study.enqueue_trial(params)
        trial = study.ask()
        plan = space.suggest_plan(trial, inventory)
        assert plan.to_json() == expected.to_json(), label
        global_knobs = ("deploy", "finetune")
        assert {k: v for k, v in trial.params.items() if k.split(".")[0] not in global_knobs} == params


@pytest.fixture
def prune_only(trained_resnet: Path, tmp_path: Path):
    """The trained demo-resnet, its inventory, and a space of pruning alone (two settings)."""
    model = build_model("demo-resnet", num_classes=10, in_channels=1)
    model.load_state_dict(torch.load(trained_resnet, weights_only=True))
    inventory = build_inventory(model.eval(), (1, 1, 28, 28))
    path = tmp_path / "prune.yaml"
    path.write_text("name: p\nmethods:\n  prune: {ratio: {low: 0.25, high: 0.5, step: 0.25}}\n"
                    "finetune: {steps: 0}\n")
    return model, inventory, load_space(str(path))


def test_a_failing_compression_is_recorded_not_raised(fmnist: DataSplits, prune_only,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    model, inventory, space = prune_only
    apply = sens.apply_plan

    def broken(teacher, plan, *args, **kwargs):
        if "layer2.conv1.0" in plan.layers:
            raise RuntimeError("surgery failed\nsecond line")
        return apply(teacher, plan, *args, **kwargs)

    monkeypatch.setattr(sens, "apply_plan", broken)
    result = measure_sensitivity(model, inventory, space, fmnist.val, None, images=200)
    failed = [row for row in result.rows if not row.ok]
    assert {row.layer for row in failed} == {"layer2.conv1.0"}
    assert failed[0].error == "RuntimeError: surgery failed" and failed[0].accuracy is None
    assert "prune" in result.excluded()["layer2.conv1.0"]
    assert "failed" in result.table()


def test_a_programming_error_in_a_compression_is_raised(fmnist: DataSplits, prune_only,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    model, inventory, space = prune_only

    def buggy(teacher, plan, *args, **kwargs):
        return plan.layers.no_such_attribute

    monkeypatch.setattr(sens, "apply_plan", buggy)
    with pytest.raises(AttributeError, match="no_such_attribute"):
        measure_sensitivity(model, inventory, space, fmnist.val, None, images=200)
