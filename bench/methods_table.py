"""Each compression method applied uniformly at two strengths to the trained demo networks.

For every eligible layer of demo-resnet and demo-mobilenetv2 (baselines trained
on Fashion-MNIST for 4 epochs and cached like the demo's), the method is
applied at a low and a high strength; the table gives params, MACs and
storage size, and test accuracy right after compression and after a short
KD fine-tuning. Prints a Markdown table.

    .venv/bin/python bench/methods_table.py [--steps 300] > docs/methods-table.md
"""

import argparse
import os

import torch

from autocomp.core.inventory import build_inventory
from autocomp.core.units import format_bytes, format_count
from autocomp.intake.data import calibration_loader, load_data, take
from autocomp.intake.source import ModelSource
from autocomp.methods.apply import apply_plan, count_params, size_bytes
from autocomp.methods.plan import CompressionPlan
from autocomp.training.baseline import cached_baseline
from autocomp.training.config import FinetuneConfig
from autocomp.training.distill import finetune
from autocomp.training.train import evaluate

# (label, method, [low strength, high strength]); every eligible layer takes the choice.
METHODS = [
    ("prune l1", "prune", [{"ratio": 0.25}, {"ratio": 0.5}]),
    ("prune taylor", "prune", [{"ratio": 0.25, "criterion": "taylor"},
                               {"ratio": 0.5, "criterion": "taylor"}]),
    ("svd", "lowrank", [{"rank": 0.5}, {"rank": 0.25}]),
    ("tucker2", "lowrank", [{"kind": "tucker2", "rank": 0.5}, {"kind": "tucker2", "rank": 0.25}]),
    ("cp", "lowrank", [{"kind": "cp", "rank": 0.25}, {"kind": "cp", "rank": 0.1}]),
    ("dwsep", "substitute", [{"kind": "dwsep"}]),
    ("shuffle", "substitute", [{"kind": "shuffle", "groups": 2}, {"kind": "shuffle", "groups": 4}]),
    ("sparsity", "sparsity", [{"sparsity": 0.5}, {"sparsity": 0.8}]),
    ("quant", "quant", [{"w_bits": 8, "a_bits": 8}, {"w_bits": 4, "a_bits": 8}]),
    ("quant 2-bit", "quant", [{"w_bits": 2}]),
    ("ternary", "ternary", [{}]),
    ("binary", "binary", [{}]),
]
MODELS = ["demo-resnet", "demo-mobilenetv2"]


def uniform_plan(inventory, method: str, params: dict) -> CompressionPlan | None:
    """The method on every layer it fits (prune: every group leader)."""
    layers = {}
    for layer in inventory.layers:
        plan = CompressionPlan.from_json({"layers": {layer.name: {"method": method, **params}}})
        config = plan.layers[layer.name][0]
        if config.unfit(layer) is None:
            layers[layer.name] = {"method": method, **params}
    return CompressionPlan.from_json({"layers": layers}) if layers else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300, help="KD fine-tuning steps per row")
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    data = load_data("fashion-mnist")
    calib = calibration_loader(data.train)
    finetune_config = FinetuneConfig(steps=args.steps)
    print(f"Fashion-MNIST test split (10,000 images); fine-tuning: {args.steps} steps of batch 64, "
          "KD (T=4, alpha=0.9) from the uncompressed model; size counts weights as stored "
          "(fp32 unless the method stores fewer bits).\n")
    print("| model | method | strength | layers | params | MACs | size | test acc compressed "
          "| test acc fine-tuned |")
    print("|---|---|---|---|---|---|---|---|---|")
    for spec in MODELS:
        source, _ = cached_baseline(ModelSource(spec, 10, 1, 28), data, epochs=4)
        teacher = source.build()
        shape = (1, 1, 28, 28)
        inventory = build_inventory(teacher, shape)
        base_acc = evaluate(teacher, data.test)
        print(f"| {spec} | none | - | - | {format_count(count_params(teacher))} | "
              f"{format_count(inventory.macs)} | {format_bytes(size_bytes(teacher))} | {base_acc:.2%} | - |")
        for label, method, strengths in METHODS:
            for params in strengths:
                plan = uniform_plan(inventory, method, params)
                strength = ", ".join(f"{k}={v}" for k, v in params.items()) or "-"
                if plan is None:
                    print(f"| {spec} | {label} | {strength} | 0 | no eligible layer | | | | |")
                    continue
                student = apply_plan(teacher, plan, inventory, channel_multiple=4, calib=calib)
                macs = build_inventory(student, shape, coupling=False).macs
                compressed_acc = evaluate(student, data.test)
                finetune(student, teacher, take(data.train, 20000), finetune_config)
                tuned_acc = evaluate(student, data.test)
                print(f"| {spec} | {label} | {strength} | {len(plan.layers)} | "
                      f"{format_count(count_params(student))} | {format_count(macs)} | "
                      f"{format_bytes(size_bytes(student))} | {compressed_acc:.2%} | {tuned_acc:.2%} |",
                      flush=True)


if __name__ == "__main__":
    main()
