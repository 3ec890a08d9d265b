"""Trial cost: seconds per tuned demo trial when each trial tunes the workloads it brings
(``--trial-schedules tune``, the behaviour before transferred schedules) and when it
replays tuned neighbours' schedules (``transfer``, the default).

Each arm runs the demo search (demo-resnet on Fashion-MNIST, host, 70% budget) from
its own fresh cache, so both start with an empty tuning database; the baseline trained
by the first arm is copied to the second. Per-trial seconds are Optuna's start and
completion times. Each arm's front is re-measured at the end of its search with the
schedules its trials ran (``front_search_over_remeasured``). For the transfer arm,
each front trial is then timed again with the transferred schedules it ran and after
its workloads are tuned (``profile.latency.trials_per_task`` MetaSchedule trials
each), both reference-relative in this process (``front_transferred_vs_tuned``).

    .venv/bin/python bench/trial_cost.py --trials 20 --out runs/trial-cost.json
"""

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def _arm(schedules: str, trials: int, cache: Path, runs: Path) -> dict:
    import optuna

    command = [str(Path(sys.executable).parent / "autocomp"), "search", "--model", "demo-resnet", "--data",
               "fashion-mnist", "--budget", "70%", "--trials", str(trials), "--name", schedules,
               "--trial-schedules", schedules, "--runs-dir", str(runs)]
    started = time.perf_counter()
    done = subprocess.run(command, env={**os.environ, "AUTOCOMP_CACHE": str(cache)},
                          capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"{schedules} arm failed:\n{done.stderr[-3000:]}")
    study = optuna.load_study(study_name=schedules, storage=f"sqlite:///{runs / schedules / 'study.db'}")
    finished = [t for t in study.get_trials(deepcopy=False) if t.datetime_complete is not None]
    durations = [(t.datetime_complete - t.datetime_start).total_seconds() for t in finished]
    front = json.loads((runs / schedules / "front.json").read_text())
    remeasured = [row["search_latency"]["median_s"] / row["remeasured_latency"]["median_s"]
              for row in front["trials"] if row.get("remeasured_latency")]
    return {"command": " ".join(command), "search_seconds": seconds, "trials": len(durations),
            "trial_seconds": durations, "median_trial_s": statistics.median(durations),
            "mean_trial_s": statistics.mean(durations),
            "front_search_over_remeasured": remeasured, "log_tail": done.stdout[-4000:]}


def _transferred_vs_tuned(run_dir: Path, cache: Path) -> list[dict]:
    """The front of a transfer-arm run timed with the transferred schedules its trials ran,
    then with its new workloads tuned, both against the run's reference in this process."""
    os.environ["AUTOCOMP_CACHE"] = str(cache)
    from autocomp.hardware.profiles import load_target
    from autocomp.intake.data import load_data
    from autocomp.search.measurers import MeasurerPool
    from autocomp.search.results.trials import load_trial_model
    from autocomp.search.settings import load_settings

    settings = load_settings(run_dir)
    data = load_data(settings.data)
    rows = json.loads((run_dir / "front.json").read_text())["trials"]
    models = {row["number"]: load_trial_model(run_dir, settings, row["number"], data) for row in rows}
    figures: dict[str, dict[int, float]] = {}
    for mode in ("transfer", "tune"):  # tuned records then take precedence over transferred ones
        pool = MeasurerPool(load_target(settings.target), settings.model.build(), settings.input_shape,
                            new_workloads=mode)
        try:
            pool.anchor(settings.baseline["latency"]["median_s"])
            figures[mode] = {row["number"]: pool.get(row["deploy"])[1].measure(
                models[row["number"]], settings.input_shape).median_s for row in rows}
        finally:
            pool.close()
    transferred, tuned = figures["transfer"], figures["tune"]
    return [{"trial": number, "transferred_s": transferred[number], "tuned_s": tuned[number],
             "transferred_over_tuned": transferred[number] / tuned[number]} for number in models]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--out", type=Path, help="JSON file for both arms")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="autocomp-trial-cost-"))
    result = {}
    for schedules in ("tune", "transfer"):
        cache = root / f"cache-{schedules}"
        if schedules == "transfer":
            shutil.copytree(root / "cache-tune" / "baselines", cache / "baselines")
        result[schedules] = _arm(schedules, args.trials, cache, root / "runs")
        arm = result[schedules]
        print(f"{schedules}: {arm['trials']} trials, median {arm['median_trial_s']:.1f} s per trial, mean "
              f"{arm['mean_trial_s']:.1f} s; search {arm['search_seconds']:.0f} s; front search/re-measured "
              f"latency {[round(v, 3) for v in arm['front_search_over_remeasured']]}", flush=True)
    versus = result["front_transferred_vs_tuned"] = _transferred_vs_tuned(root / "runs" / "transfer",
                                                                          root / "cache-transfer")
    print("front, transferred / tuned latency: " + ", ".join(
        f"trial {row['trial']} {row['transferred_over_tuned']:.3f}" for row in versus))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1))
    shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
