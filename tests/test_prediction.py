"""Latency predicted before paying: features of real compressed models, the in-run fit and its
leave-one-out error, and a trial predicted over the budget skipped without being compiled."""

import json
from pathlib import Path

import optuna
import pytest
import torch
from helpers import make_plan

from autocomp.core.inventory import build_inventory
from autocomp.hardware.measure.base import Latency
from autocomp.hardware.measure.local import LocalMeasurer
from autocomp.hardware.profiles import load_target
from autocomp.intake.data import calibration_loader, take
from autocomp.intake.models import build_model
from autocomp.methods.apply import apply_plan
from autocomp.search.measurers import MeasurerPool
from autocomp.search.objective import Budgets, TrialContext, TrialObjective
from autocomp.search.prediction import (
    FEATURES_KEY,
    MIN_POINTS,
    PREDICTION_KEY,
    Features,
    Point,
    features,
    fit,
    measured_points,
    predictions_summary,
)
from autocomp.search.space.loading import load_space
from autocomp.search.workers import NOT_COUNTED, counts, run_trials

SHAPE = (1, 1, 28, 28)
optuna.logging.set_verbosity(optuna.logging.ERROR)


@pytest.fixture(scope="module")
def host():
    return load_target("host", untuned=True)


@pytest.fixture(scope="module")
def variants(fmnist, host):
    """demo-resnet uncompressed, pruned 30% and 50%, low-rank 50% and uniform w8a8, with their
    features."""
    torch.manual_seed(0)
    model = build_model("demo-resnet", num_classes=10, in_channels=1).eval()
    inventory = build_inventory(model, SHAPE)
    leaders = inventory.prune_leaders()
    plans = {"prune 30%": {name: {"method": "prune", "ratio": 0.3} for name in leaders},
             "prune 50%": {name: {"method": "prune", "ratio": 0.5} for name in leaders},
             "rank 50%": {name: {"method": "lowrank", "rank": 0.5} for name in inventory.names
                          if name != "fc"},
             "int8": {name: {"method": "quant", "w_bits": 8, "a_bits": 8} for name in inventory.names}}
    calib = calibration_loader(take(fmnist.train, 64), seed=0)
    models = {"uncompressed": model}
    for label, layers in plans.items():
        models[label] = apply_plan(model, make_plan(layers), inventory, channel_multiple=4, calib=calib)
    return model, inventory, {label: features(m, SHAPE, host) for label, m in models.items()}


def test_features_split_the_cost_model_time_by_compute_dtype(variants) -> None:
    _, _, found = variants
    assert found["uncompressed"].int8_s == 0 and found["uncompressed"].float_s > 0
    assert found["prune 50%"].float_s < found["prune 30%"].float_s < found["uncompressed"].float_s
    assert found["int8"].int8_share > 0.5
    assert Features.from_json(found["int8"].to_json()) == found["int8"]


def test_the_fit_recovers_scales_and_reports_its_leave_one_out_error(variants) -> None:
    _, _, found = variants
    floats = [found[label] for label in ("uncompressed", "prune 30%", "prune 50%", "rank 50%")]
    exact = [Point(f, 0.05 * f.float_s) for f in floats]
    assert fit(exact[:MIN_POINTS - 1]) is None  # too few measured models to trust
    fitted = fit(exact)
    assert fitted.float_scale == pytest.approx(0.05) and fitted.p90_error == pytest.approx(0, abs=1e-9)
    assert fitted.int8_scale is None and fitted.predict(found["int8"]) is None  # no int8 model measured
    # A second int8 model measured: the int8 scale is fitted and checked by leave-one-out too.
    half = Features(found["int8"].float_s, found["int8"].int8_s / 2)
    with_int8 = exact + [Point(f, 0.05 * f.float_s + 0.2 * f.int8_s) for f in (found["int8"], half)]
    fitted = fit(with_int8)
    assert fitted.int8_scale == pytest.approx(0.2) and len(fitted.errors) == len(with_int8)
    assert fitted.predict(found["int8"]) == pytest.approx(0.05 * found["int8"].float_s
                                                          + 0.2 * found["int8"].int8_s)
    # Measurements the cost model does not explain widen the error the skips are judged by.
    noisy = [Point(p.features, p.measured_s * factor) for p, factor in zip(exact, (1.0, 1.3, 0.8, 1.1),
                                                                             strict=True)]
    assert fit(noisy).p90_error > 0.2


def _trial(features: Features, median_s: float, deploy: dict, **latency) -> optuna.trial.FrozenTrial:
    figure = Latency(median_s, median_s, median_s, 15, "measured", "timed here").to_json() | latency
    return optuna.trial.create_trial(
        values=[0.9, median_s * 1e3, 1000.0], params={}, distributions={},
        user_attrs={"latency": figure, FEATURES_KEY: features.to_json(), "deploy": deploy})


def test_measured_points_count_each_model_once_and_only_measured_figures(variants) -> None:
    _, _, found = variants
    deploy = {"threads": 2}
    trials = [_trial(found["uncompressed"], 1e-4, deploy), _trial(found["prune 30%"], 7e-5, deploy),
              _trial(found["prune 30%"], 9e-5, deploy),
              _trial(found["prune 50%"], 5e-5, deploy, noisy="machine busy"),
              _trial(found["rank 50%"], 6e-5, {"threads": 1}),
              _trial(found["int8"], 5e-5, deploy, kind="estimated")]
    points = measured_points(trials, Point(found["uncompressed"], 1.2e-4))
    assert [(p.features, p.measured_s) for p in points] == [
        (found["uncompressed"], pytest.approx(1.1e-4)), (found["prune 30%"], pytest.approx(8e-5)),
        (found["prune 50%"], pytest.approx(5e-5)), (found["rank 50%"], pytest.approx(6e-5))]


def test_a_plan_predicted_far_over_the_budget_is_not_compiled_and_not_counted(
        variants, fmnist, host, tmp_path: Path, monkeypatch) -> None:
    model, inventory, found = variants
    deploy = {"threads": host.latency.threads}
    space = load_space("default")
    measured = []

    def measure(self, candidate, shape):
        measured.append(candidate)
        return Latency(1e-4, 9e-5, 1.1e-4, 15, "measured", "timed here (test)")

    monkeypatch.setattr(LocalMeasurer, "measure", measure)
    study = optuna.create_study(directions=["maximize", "minimize", "minimize"],
                                sampler=optuna.samplers.RandomSampler(seed=0))
    for label in ("prune 30%", "prune 50%", "rank 50%"):
        study.add_trial(_trial(found[label], 0.05 * found[label].float_s, deploy))
    uncompressed = dict(space.uniform_baselines(inventory))["uncompressed"]
    ctx = TrialContext(teacher=model, inventory=inventory, space=space, measurers=MeasurerPool(host),
                       train=take(fmnist.train, 64), val=take(fmnist.val, 64),
                       budgets=Budgets(latency_s=0.01 * found["uncompressed"].float_s), run_dir=tmp_path,
                       calib=calibration_loader(take(fmnist.train, 64), seed=0), finetune=False,
                       baseline_s=0.05 * found["uncompressed"].float_s, max_skipped=1)
    objective = TrialObjective(ctx)
    params = {**uncompressed, **{f"deploy.{k}": v for k, v in deploy.items()}}
    study.enqueue_trial(params)
    study.enqueue_trial(params)
    run_trials(study, objective, 4, heartbeat_s=1, grace_s=5)

    skipped, kept = study.trials[3], study.trials[4]
    assert skipped.state == optuna.trial.TrialState.PRUNED and skipped.user_attrs[NOT_COUNTED]
    assert not counts(skipped) and counts(kept)
    prediction = skipped.user_attrs[PREDICTION_KEY]
    assert prediction["predicted_s"] == pytest.approx(0.05 * found["uncompressed"].float_s)
    assert prediction["skipped"] and prediction["p90_error"] == pytest.approx(0, abs=1e-9)
    assert "latency" not in skipped.user_attrs
    assert skipped.constraints["latency_over_budget"] == pytest.approx(4.0)
    assert skipped.user_attrs["pruned_reason"].startswith("not compiled: predicted ")
    metrics = json.loads((tmp_path / "trials" / "3" / "metrics.json").read_text())
    assert metrics["prediction"]["skipped"] and metrics["pruned"].startswith("not compiled")
    # The run's skips are used up: the same plan is compiled and timed, its prediction checked.
    assert len(measured) == 1 and kept.state == optuna.trial.TrialState.COMPLETE
    checked = kept.user_attrs[PREDICTION_KEY]
    assert checked["measured_because"] == "the run's 1 skips are used up"
    assert checked["measured_over_budget"] and checked["error"] == pytest.approx(
        0.05 * found["uncompressed"].float_s / 1e-4 - 1)
    assert predictions_summary(study.trials).startswith(
        "1 plan predicted over the latency budget not compiled; of 1 such plans measured all the "
        "same, 1 were over it; on 1 measured plan the prediction was off by ")
