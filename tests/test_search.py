"""End to end: a real search on a Fashion-MNIST subset, resumed, then exported."""

import json
import sqlite3
from pathlib import Path

import optuna
import pytest

from autocomp.intake.data import load_data


def _search_args(weights: Path, trials: int) -> list[str]:
    return ["search", "--model", "demo-resnet", "--weights", str(weights), "--data",
            "fashion-mnist", "--target", "host", "--untuned", "--budget", "90%", "--trials", str(trials),
            "--name", "e2e", "--finetune-steps", "15", "--train-subset", "1000",
            "--val-subset", "500"]


def _complete(run: Path) -> list[optuna.trial.FrozenTrial]:
    study = optuna.load_study(study_name="e2e", storage=f"sqlite:///{run / 'study.db'}")
    return study.get_trials(states=(optuna.trial.TrialState.COMPLETE,))


def test_search_resume_and_export(cli, tmp_path: Path, trained_resnet: Path) -> None:
    code, out, err = cli(*_search_args(trained_resnet, 3))
    assert code == 0, err
    run = tmp_path / "runs" / "e2e"
    trials = _complete(run)
    assert len(trials) == 3
    assert trials[0].user_attrs["plan_summary"] == "uncompressed"
    for trial in trials:
        metrics = json.loads((run / "trials" / str(trial.number) / "metrics.json").read_text())
        assert metrics["latency"]["kind"] == "measured"
        assert "untuned" in metrics["latency"]["provenance"]
        assert 0.0 <= metrics["val_acc"] <= 1.0
        assert trial.values[1] == metrics["latency"]["median_s"] * 1e3
    # the uncompressed trial is timed beside the same model: its figure is the baseline's
    baseline = json.loads((run / "run.json").read_text())["baseline"]["latency"]
    first = json.loads((run / "trials" / "0" / "metrics.json").read_text())["latency"]
    assert "reference against itself" in baseline["provenance"]
    assert "reference-relative" in first["provenance"]
    assert first["median_s"] == pytest.approx(baseline["median_s"], rel=0.1)
    assert "Pareto front of 3 finished trials" in out and "untuned" in out
    assert "warm start: uncompressed, uniform int8" in out and "sensitivity:" in out
    assert [t.user_attrs.get("label") for t in trials] == ["uncompressed", "uniform int8",
                                                           "uniform prune 30%"]
    for name in ("front.json", "report.md", "report.html", "sensitivity.json", "layer_shares.json",
                 "method_map.png"):
        assert (run / name).is_file(), name
    front = json.loads((run / "front.json").read_text())
    assert all(row["test_acc"] is not None and "measured" in row["remeasured_latency"]["provenance"]
               for row in front["trials"])
    png = (run / "pareto.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    rows = (run / "pareto.csv").read_text().splitlines()
    assert len(rows) >= 2 and rows[0].startswith("number,val_acc")
    # the budget is stored as an Optuna constraint, not folded into the objectives
    with sqlite3.connect(run / "study.db") as db:
        keys = {row[0] for row in db.execute("select key from trial_system_attributes")}
    assert any(key.startswith("constraints") for key in keys)

    code, out, err = cli(*_search_args(trained_resnet, 4))
    assert code == 0, err
    assert "resuming with 3 finished trials" in out
    assert len(_complete(run)) == 4

    code, out, err = cli("export", "e2e", "--trial", "0")
    assert code == 0, err
    exported = run / "export" / "trial-0"
    assert {p.name for p in exported.iterdir()} == {"plan.json", "model.pt", "model.so", "model.onnx",
                                                    "export.json"}
    record = json.loads((exported / "export.json").read_text())
    assert record["max_abs_diff"] < 1e-3
    assert "max |TVM - PyTorch|" in out

    import torch
    import tvm
    from tvm.runtime.vm import VirtualMachine

    vm = VirtualMachine(tvm.runtime.load_module(str(exported / "model.so")), tvm.cpu())
    image = load_data("fashion-mnist").test[0][0].unsqueeze(0)
    logits = vm["main"](tvm.runtime.tensor(image.numpy(), tvm.cpu()))[0].numpy()
    assert logits.shape == (1, 10) and torch.isfinite(torch.from_numpy(logits)).all()

    code, _, err = cli("export", "e2e", "--trial", "0")
    assert code == 2 and "--force" in err


def test_a_failing_trial_is_recorded_and_the_search_goes_on(cli, tmp_path: Path, trained_resnet: Path,
                                                             monkeypatch) -> None:
    from autocomp.hardware.measure.local import LocalMeasurer

    real_measure = LocalMeasurer.measure
    calls = {"n": 0}

    def flaky_measure(self, model, shape):
        calls["n"] += 1
        if calls["n"] == 2:  # trial 0, then trial 1 fails (the baseline is set_reference)
            raise RuntimeError("device fell off the bus")
        return real_measure(self, model, shape)

    monkeypatch.setattr(LocalMeasurer, "measure", flaky_measure)
    code, out, err = cli(*_search_args(trained_resnet, 2), "--no-sensitivity")
    assert code == 0, err
    assert "trial   1 (uniform int8): failed: RuntimeError: device fell off the bus" in out
    study = optuna.load_study(study_name="e2e", storage=f"sqlite:///{tmp_path / 'runs/e2e/study.db'}")
    states = [t.state for t in study.trials]
    assert states.count(optuna.trial.TrialState.COMPLETE) == 2
    assert study.trials[1].state == optuna.trial.TrialState.FAIL
    assert study.trials[1].user_attrs["fail_reason"] == "RuntimeError: device fell off the bus"
    failed = json.loads((tmp_path / "runs/e2e/trials/1/metrics.json").read_text())
    assert failed["failed"].startswith("RuntimeError")
