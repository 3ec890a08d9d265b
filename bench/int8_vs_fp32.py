"""int8 vs fp32 TVM on the same model, batch 1 (issue 4's goal: int8 at most 0.67x of fp32).

For each model, the fp32 network and its all-layers w8a8 version (``quant``: 8-bit
per-channel weights, 8-bit activations calibrated on random images) are imported by
``autocomp.hardware.compile.lower.to_relax`` (the w8a8 one as uint8 x int8 -> int32 kernels,
checked to be integer in the IR and against PyTorch), compiled for the host profile
(MetaSchedule-tuned with ``--trials`` per workload into a database under
$AUTOCOMP_CACHE, or plain ``tvm.compile`` with ``--untuned``), and timed each in its own
process (``autocomp.hardware.measure.timer_worker``, TVM_NUM_THREADS=--threads), fp32 and int8
alternating for ``--rounds`` rounds. Weights are random: latency does not depend on them.

    python bench/int8_vs_fp32.py --trials 16 --out docs/bench-int8.md
    python bench/int8_vs_fp32.py --models demo-resnet --size 28 --in-channels 1 --untuned
"""

import argparse
import dataclasses
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from autocomp.core.inventory import build_inventory
from autocomp.hardware.compile.int8 import integer_model
from autocomp.hardware.compile.lower import to_relax
from autocomp.hardware.compile.tune import compile_tuned, last_report, tuning_label
from autocomp.hardware.measure.timer_worker import time_in_fresh_worker
from autocomp.hardware.profiles import load_profile
from autocomp.intake.models import build_model
from autocomp.methods.apply import apply_plan
from autocomp.methods.plan import CompressionPlan

W8A8 = {"method": "quant", "w_bits": 8, "a_bits": 8}


def _w8a8(model: torch.nn.Module, shape: tuple[int, ...]) -> torch.nn.Module:
    inventory = build_inventory(model, shape, coupling=False)
    plan = CompressionPlan.from_json({"version": 1, "layers": {name: W8A8 for name in inventory.names}})
    generator = torch.Generator().manual_seed(1)
    calib = [(torch.randn(4, *shape[1:], generator=generator), torch.zeros(4)) for _ in range(2)]
    return apply_plan(model, plan, inventory, calib=calib).eval()


def _kernel_dtypes(module) -> list[tuple[str, str, str]]:
    """(data, weight, result) dtypes of every conv2d and matmul call in ``main``."""
    import tvm
    from tvm import relax

    found = []
    for block in module["main"].body.blocks:
        for binding in block.bindings:
            value = binding.value
            if (isinstance(value, relax.Call) and isinstance(value.op, tvm.ir.Op)
                    and value.op.name in ("relax.nn.conv2d", "relax.matmul")):
                found.append(tuple(str(dtype) for dtype in (value.args[0].ty.dtype, value.args[1].ty.dtype,
                                                              binding.var.ty.dtype)))
    return found


def _compile(model: torch.nn.Module, shape: tuple[int, ...], profile, untuned: bool,
             library: Path) -> dict:
    import tvm
    from tvm import relax

    module = to_relax(model, shape)
    kernels = _kernel_dtypes(module)
    start = time.perf_counter()
    executable = compile_tuned(module, profile, untuned=untuned)
    compile_s = time.perf_counter() - start
    executable.export_library(str(library))
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(2))
    vm = relax.VirtualMachine(executable, tvm.cpu())
    got = vm["main"](tvm.runtime.tensor(x.numpy(), tvm.cpu()))[0].numpy()
    with torch.no_grad():
        expected = model(x).numpy()
    report = None if untuned else last_report()
    return {"kernels": kernels, "compile_s": compile_s,
            "error": float(np.abs(got - expected).max() / np.abs(expected).max()),
            "tasks": report.tasks_in_model if report else None,
            "tuning": report.summary() if report else "untuned"}


def _time(library: Path, shape: tuple[int, ...], threads: int) -> list[float]:
    """Samples (seconds) from a fresh timing worker process."""
    env = dict(os.environ, TVM_NUM_THREADS=str(threads), OMP_NUM_THREADS=str(threads))
    return time_in_fresh_worker(str(library), list(shape), rounds=15, min_repeat_ms=200, env=env)


def bench_model(spec: str, args: argparse.Namespace, profile, folder: Path) -> dict:
    torch.manual_seed(0)
    shape = (1, args.in_channels, args.size, args.size)
    fp32 = build_model(spec, num_classes=args.classes, in_channels=args.in_channels).eval()
    variants = {"fp32": fp32, "int8": _w8a8(fp32, shape)}
    layers = integer_model(variants["int8"]).layers
    result: dict = {"model": spec, "integer_layers": sum(layer.integer for layer in layers),
                    "quantized_layers": len(layers)}
    libraries = {}
    for name, model in variants.items():
        libraries[name] = folder / f"{spec.replace(':', '_')}-{name}.so"
        print(f"{spec} {name}: compiling", file=sys.stderr, flush=True)
        result[name] = _compile(model, shape, profile, args.untuned, libraries[name])
    samples: dict[str, list[float]] = {"fp32": [], "int8": []}
    for _ in range(args.rounds):
        for name in samples:
            samples[name] += _time(libraries[name], shape, args.threads)
    for name, values in samples.items():
        result[name]["median_ms"] = statistics.median(values) * 1e3
        result[name]["samples"] = len(values)
    result["ratio"] = result["int8"]["median_ms"] / result["fp32"]["median_ms"]
    return result


def markdown(results: list[dict], args: argparse.Namespace, label: str, command: str) -> str:
    lines = [
        f"Command: `{command}`",
        "",
        f"Measured on this machine ({platform.machine()}, {os.cpu_count()} cores visible, CPU "
        f"shared with other jobs), TVM llvm `{args.mcpu}`, {label}, TVM_NUM_THREADS={args.threads}, "
        f"batch 1 at {args.size}x{args.size}, each module timed in its own process, fp32 and int8 "
        f"alternating for {args.rounds} rounds (median of all samples).",
        "",
        "| model | fp32 ms | int8 ms | int8 / fp32 | integer layers | int8 kernels (data x weight -> acc) "
        "| max abs err / max logit (int8 vs PyTorch) | tuned tasks fp32 / int8 |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in results:
        kinds = sorted({" x ".join(k[:2]) + " -> " + k[2] for k in r["int8"]["kernels"]})
        tasks = f"{r['fp32']['tasks']} / {r['int8']['tasks']}" if r["fp32"]["tasks"] is not None else "-"
        lines.append(f"| {r['model']} | {r['fp32']['median_ms']:.2f} | {r['int8']['median_ms']:.2f} "
                     f"| {r['ratio']:.2f} | {r['integer_layers']}/{r['quantized_layers']} "
                     f"| {', '.join(kinds)} | {r['int8']['error']:.1e} | {tasks} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="torchvision:resnet18,torchvision:mobilenet_v2")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--in-channels", type=int, default=3)
    parser.add_argument("--classes", type=int, default=1000)
    parser.add_argument("--trials", type=int, default=16, help="MetaSchedule trials per workload")
    parser.add_argument("--untuned", action="store_true", help="plain tvm.compile (labelled untuned)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path, help="also write the markdown table here")
    args = parser.parse_args()
    profile = load_profile("host")
    latency = dataclasses.replace(profile.latency, threads=args.threads, trials_per_task=args.trials)
    profile = dataclasses.replace(profile, latency=latency,
                                  tvm_target=dict(profile.tvm_target, **{"num-cores": args.threads}))
    args.mcpu = profile.tvm_target.get("mcpu", "")
    command = "python " + " ".join(sys.argv)
    results = []
    with tempfile.TemporaryDirectory(prefix="autocomp-int8-") as tmp:
        for spec in args.models.split(","):
            results.append(bench_model(spec, args, profile, Path(tmp)))
            print(json.dumps(results[-1], default=str), file=sys.stderr, flush=True)
    table = markdown(results, args, tuning_label(profile, args.untuned), command)
    print(table)
    if args.out:
        args.out.write_text(table)


if __name__ == "__main__":
    main()
