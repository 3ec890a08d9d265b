"""Latency-table accuracy: table-sum prediction vs end-to-end measurement of random
compressed variants of the demo networks, and the table's hit rate.

Variants are sampled from a search space (random per-layer keep / prune / low-rank
choices, the way a search samples them) and built with ``apply_plan``. The table
starts empty (a fresh cache folder). The first ``--calibration`` variants fit the
in-model correction (a scale on the kernel sum and the VM's cost per kernel call);
the next ``--variants`` are the evaluation set, each predicted from the table
(missing kernels are measured then) and then measured end to end with
``LocalMeasurer``. Both sides use the same timing settings.

    .venv/bin/python bench/lut_accuracy.py --variants 50 --calibration 10 --out runs/lut.json
"""

import argparse
import dataclasses
import json
import os
import sys
import tempfile
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", type=int, default=50, help="evaluation variants")
    parser.add_argument("--calibration", type=int, default=10,
                        help="variants that fit the in-model correction")
    parser.add_argument("--target", default="host")
    parser.add_argument("--tuning", choices=("untuned", "metaschedule"), default="untuned")
    parser.add_argument("--repeat", type=int, default=51, help="timed repeats, both sides")
    parser.add_argument("--min-repeat-ms", type=int, default=0,
                        help="0 times single runs (medians shrug off preemption on a shared machine)")
    parser.add_argument("--space", default="default")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cache", help="cache folder (default: a fresh temporary one)")
    parser.add_argument("--out", type=Path, help="JSON file for every variant's figures")
    args = parser.parse_args()
    os.environ["AUTOCOMP_CACHE"] = args.cache or tempfile.mkdtemp(prefix="autocomp-lut-bench-")

    import optuna
    import torch

    from autocomp.core.inventory import build_inventory
    from autocomp.hardware.costmodel.lut import LatencyTable, summarise
    from autocomp.hardware.measure.local import LocalMeasurer
    from autocomp.hardware.profiles import load_profile
    from autocomp.intake.models import build_model
    from autocomp.methods.apply import apply_plan
    from autocomp.search.space.loading import load_space

    base = load_profile(args.target)
    profile = dataclasses.replace(base, latency=dataclasses.replace(
        base.latency, tuning=args.tuning, repeat=args.repeat, min_repeat_ms=args.min_repeat_ms))
    shape = (1, 1, 28, 28)
    space = load_space(args.space)
    nets = {}
    for spec in ("demo-resnet", "demo-mobilenetv2"):
        torch.manual_seed(args.seed)
        model = build_model(spec, num_classes=10, in_channels=1).eval()
        nets[spec] = (model, build_inventory(model, shape))
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=args.seed))

    rows = []
    started = time.time()
    with LatencyTable(profile) as table:
        measurer = LocalMeasurer(profile)
        try:
            for index in range(args.calibration + args.variants):
                phase = "calibration" if index < args.calibration else "evaluation"
                if index == args.calibration:
                    overhead = table.fit_overhead("calibration")
                    print(f"# {overhead.provenance}", flush=True)
                spec = list(nets)[index % len(nets)]
                model, inventory = nets[spec]
                plan = space.suggest_plan(study.ask(), inventory)
                variant = apply_plan(model, plan, inventory, channel_multiple=profile.channel_multiple)
                predicted = table.predict(variant, shape)
                measured = measurer.measure(variant, shape)
                table.record(predicted, measured, f"{phase}:{spec}:{plan.digest()}")
                row = {"phase": phase, "model": spec, "plan": plan.to_json(), "kernels": predicted.kernels,
                       "calls": predicted.calls, "hits": predicted.hits,
                       "kernel_sum_s": predicted.kernel_sum_s, "overhead_s": predicted.overhead_s,
                       "predicted_s": predicted.latency.median_s, "measured_s": measured.median_s,
                       "measured_p10_s": measured.p10_s, "measured_p90_s": measured.p90_s,
                       "error": predicted.latency.median_s / measured.median_s - 1}
                rows.append(row)
                print(f"{index:3d} {phase:11s} {spec:17s} kernels {row['kernels']:3d} "
                      f"hits {row['hits']:3d} predicted {row['predicted_s'] * 1e3:7.3f} ms "
                      f"measured {row['measured_s'] * 1e3:7.3f} ms error {row['error']:+.1%}", flush=True)
        finally:
            measurer.close()
        evaluation = [row for row in rows if row["phase"] == "evaluation"]
        summary = table.error_summary("evaluation")
        assert summary.count == len(evaluation)
        hit_rate = sum(row["hits"] for row in evaluation) / sum(row["kernels"] for row in evaluation)
        overall = sum(row["hits"] for row in rows) / sum(row["kernels"] for row in rows)
        result = {
            "command": " ".join([Path(sys.executable).name, *sys.argv]),
            "profile": profile.how(), "repeat": args.repeat, "min_repeat_ms": args.min_repeat_ms,
            "overhead": dataclasses.asdict(table.overhead()),
            "evaluation": dataclasses.asdict(summary),
            "evaluation_without_overhead": dataclasses.asdict(summarise(
                [row["kernel_sum_s"] / row["measured_s"] - 1 for row in evaluation])),
            "hit_rate_evaluation": hit_rate, "hit_rate_all": overall,
            "wall_s": time.time() - started, "variants": rows,
        }
    print(f"# evaluation: {summary.describe()}")
    print(f"# hit rate (distinct kernels found in the table): evaluation {hit_rate:.1%}, "
          f"all variants from an empty table {overall:.1%}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
