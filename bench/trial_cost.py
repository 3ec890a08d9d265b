"""Trial cost: seconds per tuned demo trial when each trial tunes the workloads it brings
(``--trial-schedules tune``, the behaviour before transferred schedules) and when it
replays tuned neighbours' schedules (``transfer``, the default).

Each arm runs the demo search (demo-resnet on Fashion-MNIST, host, 70% budget) from
its own fresh cache, so both start with an empty tuning database; the baseline trained
by the first arm is copied to the second. Per-trial seconds are Optuna's start and
completion times. For the transfer arm it also compares each front trial's search
latency (transferred schedules) with its re-measurement after the front was tuned.

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
    versus = [row["search_latency"]["median_s"] / row["remeasured_latency"]["median_s"]
              for row in front["trials"] if row.get("remeasured_latency")]
    return {"command": " ".join(command), "search_seconds": seconds, "trials": len(durations),
            "trial_seconds": durations, "median_trial_s": statistics.median(durations),
            "mean_trial_s": statistics.mean(durations),
            "front_search_over_tuned": versus, "log_tail": done.stdout[-4000:]}


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
              f"{arm['mean_trial_s']:.1f} s; search {arm['search_seconds']:.0f} s; front search/tuned "
              f"latency {[round(v, 3) for v in arm['front_search_over_tuned']]}", flush=True)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1))
    shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
