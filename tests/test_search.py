"""End to end: a real search on a Fashion-MNIST subset, resumed, then exported."""

import json
import re
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


def test_search_over_every_method_family(cli, tmp_path: Path, trained_resnet: Path) -> None:
    args = _search_args(trained_resnet, 5)
    args[args.index("--name") + 1] = "mixed"
    code, _, err = cli(*args, "--space", "all-methods", "--no-warm-start", "--no-sensitivity")
    assert code == 0, err
    study = optuna.load_study(study_name="mixed", storage=f"sqlite:///{tmp_path / 'runs/mixed/study.db'}")
    trials = study.get_trials(states=(optuna.trial.TrialState.COMPLETE,))
    assert len(trials) == 5 and len(study.trials) == 5  # no trial failed
    methods = {config["method"] for trial in trials for choice in trial.user_attrs["plan"]["layers"].values()
               for config in (choice if isinstance(choice, list) else [choice])}
    assert len(methods) >= 4, methods
    quantized = [t for t in trials if "quant" in t.user_attrs["plan_summary"]
                 or "binary" in t.user_attrs["plan_summary"] or "ternary" in t.user_attrs["plan_summary"]]
    assert quantized and all(t.user_attrs["size_bytes"] < 4 * t.user_attrs["params"] for t in quantized)
    # a trial with calibrated activations rebuilds and exports
    code, _, err = cli("export", "mixed", "--trial", str(quantized[0].number))
    assert code == 0, err


def test_the_study_opens_in_optuna_dashboard(small_run: Path) -> None:
    from wsgiref.util import setup_testing_defaults

    from optuna_dashboard import wsgi

    app = wsgi(f"sqlite:///{small_run / 'r' / 'study.db'}")

    def get(path: str) -> dict:
        environ: dict = {"PATH_INFO": path}
        setup_testing_defaults(environ)
        status = []
        body = b"".join(app(environ, lambda code, *_: status.append(code)))
        assert status[0].startswith("200"), (status, environ["wsgi.errors"].getvalue()[-500:])
        return json.loads(body)

    studies = get("/api/studies")["study_summaries"]
    assert [s["study_name"] for s in studies] == ["r"]
    detail = get(f"/api/studies/{studies[0]['study_id']}")
    assert [t["state"] for t in detail["trials"]].count("Complete") == 3
    assert {attr["key"] for attr in detail["trials"][0]["user_attrs"]} >= {"plan_summary", "val_acc"}


def test_data_free_mcu_search_with_an_impossible_sram_budget_shows_the_closest(
        cli, tmp_path: Path, trained_resnet: Path) -> None:
    code, out, err = cli("search", "--model", "demo-resnet", "--weights", str(trained_resnet), "--data",
                         "fashion-mnist", "--target", "cortex-m7", "--space", "mcu", "--no-finetune",
                         "--sram", "4KB", "--trials", "2", "--val-subset", "300", "--no-sensitivity",
                         "--name", "m7")
    assert code == 0, err
    assert "data-free (no fine-tuning)" in out
    assert "no trial meets the budgets" in out and "the closest 2" in out
    run = tmp_path / "runs" / "m7"
    front = json.loads((run / "front.json").read_text())
    assert front["feasible"] is False and len(front["trials"]) == 2
    assert all("estimated (cortex-m7" in row["search_latency"]["provenance"] for row in front["trials"])
    # Nothing was measured, so nothing may say so: stdout, front.json, the report, `pareto`.
    assert front["obtained"] == "estimated again by the cost model"
    assert not re.search(r"\b(re-)?measured\b", front["provenance"])
    assert all(row["remeasured_latency"]["kind"] == "estimated" for row in front["trials"])
    code, shown, _ = cli("pareto", "m7", "--runs-dir", str(tmp_path / "runs"))
    assert code == 0
    report = (run / "report.md").read_text()
    # (what the profiles' cost models were fitted to may say "measured": it is about them)
    from autocomp.hardware.profiles import available_profiles, load_profile

    fits = [load_profile(name).cost_model.fitted_to for name in available_profiles()]
    for text in (out, shown, report):
        for fit in fits:
            text = text.replace(fit, "")
        assert not re.search(r"\b(re-)?measured\b", text, re.IGNORECASE), text
    for number in (0, 1):
        metrics = json.loads((run / "trials" / str(number) / "metrics.json").read_text())
        assert metrics["finetune"]["steps"] == 0
        assert metrics["constraints"]["sram_over_limit"] > 0 and not metrics["feasible"]
        assert metrics["memory"]["sram_bytes"] > 4 * 1024
    code, _, err = cli("search", "--model", "demo-resnet", "--data", "fashion-mnist", "--sram", "4KB")
    assert code == 2 and "--sram and --flash apply to microcontroller profiles" in err
