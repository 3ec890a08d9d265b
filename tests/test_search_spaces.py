"""Searches over the other bundled spaces: every method family on the host, and the
data-free microcontroller space under an SRAM budget no plan meets."""

import json
import re
from pathlib import Path

import optuna


def test_search_over_every_method_family(cli, tmp_path: Path, trained_resnet: Path) -> None:
    code, _, err = cli("search", "--model", "demo-resnet", "--weights", str(trained_resnet), "--data",
                       "fashion-mnist", "--untuned", "--budget", "90%", "--trials", "5", "--name", "mixed",
                       "--finetune-steps", "15", "--train-subset", "1000", "--val-subset", "500",
                       "--space", "all-methods", "--no-warm-start", "--no-sensitivity")
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


def test_data_free_mcu_search_with_an_impossible_sram_budget_shows_the_closest(
        cli, tmp_path: Path, trained_resnet: Path) -> None:
    code, out, err = cli("search", "--model", "demo-resnet", "--weights", str(trained_resnet), "--data",
                         "fashion-mnist", "--target", "cortex-m7", "--space", "mcu", "--no-finetune",
                         "--sram", "4KB", "--budget", "10s", "--trials", "2", "--val-subset", "300",
                         "--no-sensitivity", "--name", "m7")
    assert code == 0, err
    assert "data-free (no fine-tuning)" in out
    # a latency budget the uncompressed model meets is said to rule nothing out
    assert "budget: the uncompressed model already meets the latency budget" in out
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
    assert "Note: the uncompressed model already meets the latency budget" in report
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
