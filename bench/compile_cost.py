"""Compile cost: what a trial pays before its model is timed, from an empty tuning cache.

Measured in one process, each step three times where it repeats within a search:

- tuning one new workload (a small conv) with the target's trials per workload: the
  first call starts MetaSchedule's build and timing workers, later calls reuse them;
- a worker process importing TVM with and without PyTorch importable (TVM's FFI imports
  PyTorch whenever it is installed; the timing workers keep it out);
- compiling demo-resnet pruned to new widths with ``new_workloads="transfer"``: the first
  compile transfers schedules to every new workload, the second finds them stored.

    .venv/bin/python bench/compile_cost.py --out runs/bench/compile-cost.json
"""

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def _seconds(action) -> float:
    start = time.perf_counter()
    action()
    return time.perf_counter() - start


def _import_seconds(block_torch: bool) -> float:
    code = ("import sys\n" + ("sys.modules['torch'] = None\n" if block_torch else "")
            + "import tvm\nfrom tvm.runtime.vm import VirtualMachine\n")
    return _seconds(lambda: subprocess.run([sys.executable, "-c", code], check=True))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    os.environ["AUTOCOMP_CACHE"] = tempfile.mkdtemp(prefix="autocomp-compile-cost-")

    from torch import nn

    from autocomp.cli.common import setup_torch
    from autocomp.hardware.compile import tune
    from autocomp.hardware.compile.lower import compile_model, to_relax
    from autocomp.hardware.profiles import load_target
    from autocomp.intake.models.demo import DemoResNet

    setup_torch()
    profile = load_target("host")
    result: dict = {"machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
                    "target": profile.target_text(), "trials_per_task": profile.latency.trials_per_task}

    tuning = []
    for channels in (8, 12, 20):  # a new workload each time
        layer = nn.Sequential(nn.Conv2d(4, channels, 3, padding=1), nn.ReLU()).eval()
        relax = to_relax(layer, (1, 4, 14, 14))
        tuning.append(_seconds(lambda relax=relax: tune.tune(relax, profile)))
    result["tune_one_workload_s"] = {"first": tuning[0], "later": tuning[1:]}
    print(f"tuning one new workload: first call {tuning[0]:.1f} s, later calls "
          f"{', '.join(f'{s:.1f}' for s in tuning[1:])} s", flush=True)

    imports = {name: [_import_seconds(block) for _ in range(3)]
               for name, block in (("with_torch", False), ("torch_blocked", True))}
    result["worker_import_s"] = imports
    medians = {name: statistics.median(values) for name, values in imports.items()}
    print(f"a worker importing TVM: {medians['with_torch']:.1f} s with PyTorch importable, "
          f"{medians['torch_blocked']:.1f} s without (medians of 3)", flush=True)

    base = DemoResNet().eval()
    shape = (1, 1, 28, 28)
    tune.tune(to_relax(base, shape), profile)  # the neighbours schedules are transferred from
    compiles = []
    for widths in ((12, 24, 44), (12, 24, 44)):
        model = DemoResNet(widths=widths).eval()
        seconds = _seconds(lambda model=model: compile_model(model, shape, profile, new_workloads="transfer"))
        compiles.append({"seconds": seconds, "schedules": tune.last_report().summary()})
    result["pruned_compile"] = compiles
    print(f"demo-resnet pruned to new widths: first compile {compiles[0]['seconds']:.1f} s "
          f"({compiles[0]['schedules']}), again {compiles[1]['seconds']:.1f} s", flush=True)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
