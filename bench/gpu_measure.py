"""GPU latency of the gpu profile: TVM CUDA modules (DLight default schedules) vs PyTorch eager.

Compiling needs no GPU, measuring does, so the benchmark has two steps that
can run on different machines:

    python bench/gpu_measure.py build DIR      # compile + export here (full TVM, CUDA toolkit)
    python bench/gpu_measure.py time DIR --out results.json   # on the GPU machine

``build`` compiles demo-resnet (1x1x28x28) and torchvision mobilenet_v2
(1x3x224x224, random weights) for the gpu profile, each plain and with CUDA
graphs, checks that the kernels compile with NVRTC for the profile's arch, and
saves each library with an input and PyTorch's (CPU, fp32) output for it.
``time`` times each library with ``CudaMeasurer`` (TVM's runtime is enough:
``TVM_USE_RUNTIME_LIB=1`` works), checks its output against PyTorch's, and times
the same networks in PyTorch eager on the GPU, each in its own process.
"""

import argparse
import json
import pickle
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

MODELS = {
    "demo-resnet": (1, 1, 28, 28),
    "torchvision:mobilenet_v2": (1, 3, 224, 224),
}


def _network(spec: str, shape: tuple[int, ...]):
    import torch

    torch.manual_seed(0)
    if spec.startswith("torchvision:"):
        import torchvision

        return getattr(torchvision.models, spec.split(":", 1)[1])(weights=None).eval()
    from autocomp.intake.models import build_model

    return build_model(spec, num_classes=10, in_channels=shape[1]).eval()


def _slug(spec: str) -> str:
    return spec.replace("torchvision:", "tv-").replace(":", "-")


def build(directory: Path) -> None:
    import torch

    from autocomp.hardware.compile.cuda import compile_cuda, compile_kernels, cuda_source, export_cuda
    from autocomp.hardware.profiles import load_profile

    profile = load_profile("gpu")
    directory.mkdir(parents=True, exist_ok=True)
    manifest = {"profile": profile.name, "target": profile.tvm_target, "models": []}
    for spec, shape in MODELS.items():
        model = _network(spec, shape)
        data = np.random.default_rng(0).standard_normal(shape).astype("float32")
        with torch.no_grad():
            expected = model(torch.from_numpy(data)).numpy()
        slug = _slug(spec)
        np.save(directory / f"{slug}.input.npy", data)
        np.save(directory / f"{slug}.expected.npy", expected)
        for graph in (False, True):
            start = time.perf_counter()
            executable = compile_cuda(model, shape, profile, cuda_graph=graph)
            compile_s = time.perf_counter() - start
            name = f"{slug}{'.graph' if graph else ''}.so"
            export_cuda(executable, directory / name)
            start = time.perf_counter()
            cubin = compile_kernels(executable, profile.tvm_target["arch"])
            nvrtc_s = time.perf_counter() - start
            entry = {"model": spec, "shape": list(shape), "cuda_graph": graph, "library": name,
                     "input": f"{slug}.input.npy", "expected": f"{slug}.expected.npy",
                     "kernels": cuda_source(executable).count('extern "C" __global__'),
                     "compile_s": round(compile_s, 1), "nvrtc_s": round(nvrtc_s, 1),
                     "cubin_bytes": len(cubin)}
            manifest["models"].append(entry)
            print(json.dumps(entry), flush=True)
    (directory / "manifest.json").write_text(json.dumps(manifest, indent=1))
    # load_profile validates the target with TVM's compiler, which a runtime-only TVM lacks
    (directory / "profile.pkl").write_bytes(pickle.dumps(profile))


def _torch_eager(spec: str, shape: list[int], repeat: int = 30, min_repeat_ms: float = 20) -> dict:
    """PyTorch eager on the GPU: median over repeats of the mean time per call (CUDA events)."""
    import torch

    model = _network(spec, tuple(shape)).cuda()
    data = torch.randn(*shape, device="cuda")
    with torch.no_grad():
        for _ in range(10):
            model(data)
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        model(data)
        end.record()
        torch.cuda.synchronize()
        number = max(1, int(min_repeat_ms / max(start.elapsed_time(end), 1e-3)))
        results = []
        for _ in range(repeat):
            start.record()
            for _ in range(number):
                model(data)
            end.record()
            torch.cuda.synchronize()
            results.append(start.elapsed_time(end) / 1e3 / number)
    return {"median_s": float(np.median(results)), "p10_s": float(np.percentile(results, 10)),
            "p90_s": float(np.percentile(results, 90)), "samples": repeat, "calls_per_sample": number,
            "torch": torch.__version__, "cudnn": torch.backends.cudnn.version(),
            "device": torch.cuda.get_device_name()}


def time_all(directory: Path, out: Path) -> None:
    from autocomp.hardware.measure.cuda import CudaMeasurer

    manifest = json.loads((directory / "manifest.json").read_text())
    profile = pickle.loads((directory / "profile.pkl").read_bytes())
    results = {"manifest": manifest, "tvm": [], "torch_eager": [], "command": " ".join(sys.argv)}
    measurer = CudaMeasurer(profile)
    try:
        for entry in manifest["models"]:
            what = "DLight default schedules" + (", CUDA graph" if entry["cuda_graph"] else "")
            row = {"model": entry["model"], "cuda_graph": entry["cuda_graph"]}
            try:
                start = time.perf_counter()
                latency = measurer.time_library(directory / entry["library"], tuple(entry["shape"]), what)
                row["load_and_time_s"] = round(time.perf_counter() - start, 1)
                row.update(latency.to_json())
                output = measurer.run_library(directory / entry["library"],
                                              np.load(directory / entry["input"]))
                expected = np.load(directory / entry["expected"])
                row["max_abs_error_vs_pytorch_cpu"] = float(np.abs(output - expected).max())
                row["max_abs_expected"] = float(np.abs(expected).max())
            except Exception as err:
                row["error"] = f"{type(err).__name__}: {err}"
            results["tvm"].append(row)
            print(json.dumps(row), flush=True)
    finally:
        measurer.close()
    for spec, shape in MODELS.items():
        reply = subprocess.run([sys.executable, __file__, "torch-eager", spec, *map(str, shape)],
                               capture_output=True, text=True, check=False)
        row = {"model": spec}
        try:
            row.update(json.loads(reply.stdout.strip().splitlines()[-1]))
        except (IndexError, ValueError):
            row["error"] = reply.stderr.strip()[-2000:]
        results["torch_eager"].append(row)
        print(json.dumps(row), flush=True)
    out.write_text(json.dumps(results, indent=1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("build").add_argument("directory", type=Path)
    timing = sub.add_parser("time")
    timing.add_argument("directory", type=Path)
    timing.add_argument("--out", type=Path, required=True)
    eager = sub.add_parser("torch-eager")
    eager.add_argument("model")
    eager.add_argument("shape", type=int, nargs="+")
    args = parser.parse_args()
    if args.command == "build":
        build(args.directory)
    elif args.command == "time":
        time_all(args.directory, args.out)
    else:
        print(json.dumps(_torch_eager(args.model, args.shape)))


if __name__ == "__main__":
    main()
