"""Measurement stability: the same compressed model measured again and again between bursts of
fine-tuning (the load a search puts on the machine), on a quiet machine and with a busy loop
holding one of the timing cores.

For each condition it reports the coefficient of variation (CV) of the raw median (what
the timing worker saw) and of the reference-relative figure (``ratio x baseline``, what
autocomp reports), how many figures were marked noisy, and how many were unmarked
outliers (more than ``--outlier`` off the quiet median of the reported figure, without a
noisy mark). The candidate is demo-resnet with 30% of its filters pruned; the reference
is the uncompressed demo-resnet, timed against itself once as the baseline.

    .venv/bin/python bench/measure_stability.py --measurements 30 --out runs/measure-stability.json
"""

import argparse
import json
import multiprocessing
import os
import statistics
import time
from pathlib import Path


def _spin(cpu: int) -> None:
    os.sched_setaffinity(0, {cpu})
    while True:
        pass


def _cv(values: list[float]) -> float:
    return statistics.stdev(values) / statistics.mean(values) if len(values) > 1 else 0.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--measurements", type=int, default=30, help="measurements per condition")
    parser.add_argument("--finetune-steps", type=int, default=20, help="fine-tuning steps between two")
    parser.add_argument("--outlier", type=float, default=0.10,
                        help="relative distance from the quiet median that counts as an outlier")
    parser.add_argument("--target", default="host")
    parser.add_argument("--out", type=Path, help="JSON file for every measurement")
    args = parser.parse_args()

    from autocomp import CompressionPlan, apply_plan, build_inventory, load_data, load_profile
    from autocomp.hardware.measure.local import LocalMeasurer
    from autocomp.hardware.measure.timer_worker import timing_cpus
    from autocomp.intake.data import take
    from autocomp.intake.source import ModelSource
    from autocomp.training.config import FinetuneConfig
    from autocomp.training.distill import finetune

    shape = (1, 1, 28, 28)
    teacher = ModelSource.named("demo-resnet", shape, 10).build().eval()
    inventory = build_inventory(teacher, shape)
    leaders = ("stem.0", "layer1.conv1.0", "layer2.conv1.0")  # layers that lead their channel groups
    plan = CompressionPlan.from_json({"layers": {name: {"method": "prune", "ratio": 0.3}
                                                 for name in leaders}})
    candidate = apply_plan(teacher, plan, inventory, channel_multiple=4)
    train = take(load_data("fashion-mnist").train, 2000, 0)
    profile = load_profile(args.target)
    measurer = LocalMeasurer(profile)
    baseline = measurer.set_reference(teacher, shape)
    print(f"baseline {baseline.median_s * 1e6:.1f} us: {baseline.provenance}", flush=True)

    result: dict = {"baseline": baseline.to_json(), "plan": plan.describe(), "conditions": {}}
    quiet_median = None
    try:
        for condition in ("quiet", "busy loop on one core"):
            loop = None
            if condition != "quiet":
                cpu = timing_cpus(profile.latency.threads)[-1]
                loop = multiprocessing.get_context("spawn").Process(target=_spin, args=(cpu,), daemon=True)
                loop.start()
            rows = []
            started = time.perf_counter()
            try:
                for index in range(args.measurements):
                    student = apply_plan(teacher, plan, inventory, channel_multiple=4)
                    finetune(student, teacher, train, FinetuneConfig(steps=args.finetune_steps), seed=index)
                    latency = measurer.measure(candidate, shape)
                    rows.append(latency.to_json())
                    print(f"{condition} {index + 1:>2}: {latency.median_s * 1e6:7.1f} us (raw "
                          f"{latency.reference['raw_median_s'] * 1e6:7.1f} us, {latency.attempts} attempts)"
                          f"{'  NOISY ' + latency.noisy if latency.noisy else ''}", flush=True)
            finally:
                if loop is not None:
                    loop.terminate()
                    loop.join()
            reported = [row["median_s"] for row in rows]
            raw = [row["reference"]["raw_median_s"] for row in rows]
            if quiet_median is None:
                quiet_median = statistics.median(reported)
            outliers = [row for row in rows if not row["noisy"]
                        and abs(row["median_s"] / quiet_median - 1) > args.outlier]
            summary = {"measurements": len(rows), "seconds": time.perf_counter() - started,
                       "cv_raw": _cv(raw), "cv_reference_relative": _cv(reported),
                       "cv_reference_relative_unmarked": _cv([r["median_s"] for r in rows if not r["noisy"]]),
                       "median_raw_s": statistics.median(raw),
                       "median_reported_s": statistics.median(reported),
                       "noisy": sum(bool(row["noisy"]) for row in rows),
                       "attempts": sum(row["attempts"] for row in rows),
                       "unmarked_outliers": len(outliers)}
            result["conditions"][condition] = {"summary": summary, "measurements": rows}
            print(json.dumps({condition: summary}, indent=1), flush=True)
    finally:
        measurer.close()
    print("\n| condition | CV raw median | CV reference-relative | CV unmarked figures | noisy | attempts | "
          "unmarked outliers |\n|---|---|---|---|---|---|---|")
    for condition, data in result["conditions"].items():
        s = data["summary"]
        print(f"| {condition} | {s['cv_raw']:.1%} | {s['cv_reference_relative']:.1%} | "
              f"{s['cv_reference_relative_unmarked']:.1%} | {s['noisy']} of {s['measurements']} | "
              f"{s['attempts']} | {s['unmarked_outliers']} |")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
