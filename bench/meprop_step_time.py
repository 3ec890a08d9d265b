"""Fine-tuning step time with meProp top-k back-propagation against dense back-propagation.

Times forward + backward + optimizer step on one fixed batch, interleaving the
keep fractions round by round so that machine noise hits them alike, and
reports medians and ratios to dense within this one run.

    .venv/bin/python bench/meprop_step_time.py [--rounds 7] [--steps 10]
"""

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from autocomp.intake.models import build_model
from autocomp.training.meprop import meprop

MODELS = [("demo-resnet", (64, 1, 28, 28)), ("demo-mobilenetv2", (64, 1, 28, 28)),
          ("torchvision:vgg11_bn", (16, 3, 64, 64)), ("torchvision:resnet18", (16, 3, 64, 64))]
KEEPS = [1.0, 0.5, 0.25, 0.1]


def step_seconds(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, keep: float,
                 steps: int) -> float:
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)

    def run() -> None:
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    if keep < 1.0:
        with meprop(model, keep):
            run()
            start = time.perf_counter()
            for _ in range(steps):
                run()
    else:
        run()
        start = time.perf_counter()
        for _ in range(steps):
            run()
    return (time.perf_counter() - start) / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--steps", type=int, default=10)
    args = parser.parse_args()
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; median of {args.rounds} rounds "
          f"of {args.steps} steps\n")
    print("| model | batch | " + " | ".join(f"keep {k:g}" for k in KEEPS) + " |")
    print("|---|---|" + "---|" * len(KEEPS))
    for spec, shape in MODELS:
        model = build_model(spec, num_classes=10, in_channels=shape[1]).train()
        x, y = torch.randn(*shape), torch.randint(0, 10, (shape[0],))
        times: dict[float, list[float]] = {k: [] for k in KEEPS}
        for _ in range(args.rounds):
            for keep in KEEPS:
                times[keep].append(step_seconds(model, x, y, keep, args.steps))
        dense = statistics.median(times[1.0])
        cells = [f"{statistics.median(times[k]) * 1e3:.1f} ms ({statistics.median(times[k]) / dense:.2f}x)"
                 for k in KEEPS]
        print(f"| {spec} | {shape[0]} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
