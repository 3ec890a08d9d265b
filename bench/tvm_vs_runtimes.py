"""TVM (MetaSchedule-tuned) vs ONNX Runtime vs PyTorch eager on this machine, batch 1.

Each runtime is timed in its own process with the same thread count: with torch,
ONNX Runtime and TVM in one process, their OpenMP spin threads slowed TVM by up
to 2x. Tuning runs in this (parent) process into the host profile's database
under $AUTOCOMP_CACHE, so a second run reuses it and only times.

    python bench/tvm_vs_runtimes.py --trials 8 --out docs/bench-runtimes.md
    python bench/tvm_vs_runtimes.py --models demo-resnet --input-size 28 --in-channels 1 --untuned
"""

import argparse
import dataclasses
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPEATS = 15


def _time_loop(run, min_repeat_s: float) -> list[float]:
    """Median-ready samples: each sample averages enough calls to last ``min_repeat_s``."""
    for _ in range(3):
        run()
    start, calls = time.perf_counter(), 0
    while time.perf_counter() - start < min_repeat_s or calls < 2:
        run()
        calls += 1
    per_sample = max(1, calls)
    samples = []
    for _ in range(REPEATS):
        start = time.perf_counter()
        for _ in range(per_sample):
            run()
        samples.append((time.perf_counter() - start) / per_sample)
    return samples


def worker(kind: str, path: str, shape: list[int], threads: int, min_repeat_s: float) -> list[float]:
    """Time one runtime in a child process. ``path``: the TVM library, the ONNX file, or
    for PyTorch the JSON ``[spec, num_classes, in_channels]`` of the model to build (eager,
    as users run it: batch norm not folded)."""
    import numpy as np

    x = np.random.default_rng(0).standard_normal(shape).astype("float32")
    if kind.startswith("tvm"):
        import tvm
        from tvm.runtime.vm import VirtualMachine

        vm = VirtualMachine(tvm.runtime.load_module(path), tvm.cpu())
        tensor = tvm.runtime.tensor(x, tvm.cpu())
        vm["main"](tensor)
        evaluator = vm.time_evaluator("main", tvm.cpu(), number=1, repeat=REPEATS,
                                      min_repeat_ms=int(min_repeat_s * 1000))
        return list(evaluator(tensor).results)
    if kind == "onnxruntime":
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
        name = session.get_inputs()[0].name
        return _time_loop(lambda: session.run(None, {name: x}), min_repeat_s)
    import torch

    from autocomp.intake.models import build_model

    torch.set_num_threads(threads)
    spec, num_classes, in_channels = json.loads(path)
    torch.manual_seed(0)
    model = build_model(spec, num_classes=num_classes, in_channels=in_channels).eval()
    tensor = torch.from_numpy(x)
    with torch.inference_mode():
        return _time_loop(lambda: model(tensor), min_repeat_s)


def _run_worker(kind: str, path: str, shape: tuple[int, ...], threads: int,
                min_repeat_s: float) -> list[float]:
    env = dict(os.environ, TVM_NUM_THREADS=str(threads), OMP_NUM_THREADS=str(threads))
    request = json.dumps([kind, path, list(shape), threads, min_repeat_s])
    done = subprocess.run([sys.executable, __file__, "--worker", request], capture_output=True,
                          text=True, env=env, timeout=1800)
    if done.returncode != 0:
        raise RuntimeError(done.stderr.strip().splitlines()[-1] if done.stderr.strip() else "failed")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _time_all(paths: dict[str, str], shape: tuple[int, ...], args: argparse.Namespace) -> dict:
    """Time every runtime in ``args.rounds`` interleaved rounds, a fresh process each time,
    so that a burst of load from other processes hits all runtimes alike."""
    samples: dict[str, list[float]] = {kind: [] for kind in paths}
    errors: dict[str, str] = {}
    for _ in range(args.rounds):
        for kind, path in paths.items():
            if kind not in errors:
                try:
                    samples[kind] += _run_worker(kind, path, shape, args.threads, args.min_repeat_ms / 1000)
                except (RuntimeError, subprocess.TimeoutExpired) as err:
                    errors[kind] = str(err)
    result = {}
    for kind, seconds in samples.items():
        if kind in errors:
            result[kind] = {"error": errors[kind]}
            continue
        deciles = statistics.quantiles(seconds, n=10)
        result[kind] = {"median_ms": statistics.median(seconds) * 1e3, "p10_ms": deciles[0] * 1e3,
                        "p90_ms": deciles[-1] * 1e3, "samples": len(seconds)}
        print(f"{kind}: {result[kind]}", file=sys.stderr, flush=True)
    return result


def bench_model(spec: str, args: argparse.Namespace, profile, folder: Path) -> dict:
    import torch

    from autocomp.hardware.compile import tune
    from autocomp.hardware.compile.lower import to_relax
    from autocomp.intake.models import build_model

    torch.manual_seed(0)
    name = spec if ":" in spec or spec.startswith("demo-") else f"torchvision:{spec}"
    model = build_model(name, num_classes=args.num_classes, in_channels=args.in_channels).eval()
    shape = (1, args.in_channels, args.input_size, args.input_size)
    x = torch.zeros(*shape)
    stem = folder / spec.replace(":", "_")
    torch.onnx.export(model, (x,), f"{stem}.onnx", dynamo=True, optimize=True, verbose=False)

    result: dict = {"model": spec, "input": "x".join(map(str, shape))}
    paths = {"onnxruntime": f"{stem}.onnx", "pytorch": json.dumps([name, args.num_classes, args.in_channels])}
    start = time.perf_counter()
    tune.compile_tuned(to_relax(model, shape), profile).export_library(f"{stem}.tuned.so")
    result["compile_s"] = time.perf_counter() - start
    result["tuning"] = dataclasses.asdict(tune.last_report())
    paths["tvm-tuned"] = f"{stem}.tuned.so"
    if args.untuned:
        tune.compile_tuned(to_relax(model, shape), profile, untuned=True).export_library(f"{stem}.untuned.so")
        paths["tvm-untuned"] = f"{stem}.untuned.so"
    result.update(_time_all(paths, shape, args))
    return result


def _cell(entry: dict) -> str:
    if "error" in entry:
        return f"failed ({entry['error'][:60]})"
    return f"{entry['median_ms']:.2f} ({entry['p10_ms']:.2f}-{entry['p90_ms']:.2f})"


def markdown(results: list[dict], args: argparse.Namespace, profile, command: str, wall_s: float) -> str:
    kinds = ["tvm-tuned", "onnxruntime", "pytorch"] + (["tvm-untuned"] if args.untuned else [])
    lines = [f"### `{command}`", "",
             f"{time.strftime('%Y-%m-%d %H:%M')}; {platform.processor() or platform.machine()}, "
             f"TVM target `{json.dumps(profile.tvm_target)}`, {args.threads} threads for every runtime "
             f"(TVM_NUM_THREADS, ORT intra-op threads, torch.set_num_threads), batch 1, each runtime in "
             f"its own process, {args.rounds} interleaved rounds of {REPEATS} samples; milliseconds, median "
             f"(p10-p90). "
             f"MetaSchedule: {args.trials} trials per workload. Whole run: {wall_s / 60:.1f} min.", "",
             "| model | input | " + " | ".join(kinds) + " | TVM / ORT | tuning |",
             "| --- | --- | " + " | ".join("---" for _ in kinds) + " | --- | --- |"]
    for r in results:
        t = r["tuning"]
        tuning = (f"{t['tasks_in_model']} workloads: {t['tasks_tuned']} tuned in {t['seconds']:.0f} s"
                  + (f" ({t['seconds'] / t['tasks_tuned']:.1f} s each)" if t["tasks_tuned"] else "")
                  + f", {t['tasks_reused']} reused")
        ratio = ("" if "error" in r["tvm-tuned"] or "error" in r["onnxruntime"]
                 else f"{r['tvm-tuned']['median_ms'] / r['onnxruntime']['median_ms']:.2f}x")
        lines.append(f"| {r['model']} | {r['input']} | " + " | ".join(_cell(r[k]) for k in kinds)
                     + f" | {ratio} | {tuning} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--models", nargs="+", default=["resnet18", "mobilenet_v2"],
                        help="torchvision names, demo networks or model specs")
    parser.add_argument("--input-size", type=int, default=224)
    parser.add_argument("--in-channels", type=int, default=3)
    parser.add_argument("--num-classes", type=int, default=1000)
    parser.add_argument("--trials", type=int, default=8, help="MetaSchedule trials per workload")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--min-repeat-ms", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=3, help="interleaved timing rounds per runtime")
    parser.add_argument("--untuned", action="store_true", help="also time plain tvm.compile")
    parser.add_argument("--out", type=Path, help="append the results table to this markdown file")
    parser.add_argument("--json", type=Path, help="write the raw results here")
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(*json.loads(args.worker))))
        return

    from autocomp.hardware.profiles import load_profile

    profile = load_profile("host")
    profile = dataclasses.replace(profile, latency=dataclasses.replace(
        profile.latency, trials_per_task=args.trials, threads=args.threads, tuning="metaschedule"))
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench-runtimes-") as tmp:
        results = [bench_model(spec, args, profile, Path(tmp)) for spec in args.models]
    command = "python " + " ".join([os.path.relpath(__file__), *sys.argv[1:]])
    text = markdown(results, args, profile, command, time.perf_counter() - start)
    print(text)
    if args.out:
        with args.out.open("a") as handle:
            handle.write("\n" + text)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
