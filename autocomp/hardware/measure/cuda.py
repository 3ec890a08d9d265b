"""Latency measured on this machine's CUDA GPU, in a worker process apart from PyTorch.

``CudaMeasurer`` compiles for the profile's CUDA target (``autocomp.hardware.compile.cuda``)
and times the module on ``tvm.cuda()`` in a worker (``python -m
autocomp.hardware.measure.cuda``, one JSON request per line). On a machine without a GPU
it raises ``GpuUnavailableError``, and the caller falls back to the profile's estimate.
"""

import os
import statistics
import subprocess
import sys
import tempfile
from functools import cache
from pathlib import Path

from autocomp.core.errors import AutocompError
from autocomp.hardware.compile.cuda import compile_cuda, compile_cuda_c, export_cuda, is_cuda_target
from autocomp.hardware.measure.base import DeviceUnreachable, Latency
from autocomp.hardware.measure.timer_worker import WorkerProcess, serve

DEVICE_PROBE = """
import ctypes
try:
    lib = ctypes.CDLL("libcuda.so.1")
except OSError:
    print(0)
else:
    count = ctypes.c_int(0)
    ok = lib.cuInit(0) == 0 and lib.cuDeviceGetCount(ctypes.byref(count)) == 0
    print(count.value if ok else 0)
"""


class GpuUnavailableError(DeviceUnreachable):
    """No usable CUDA GPU on this machine: the caller falls back to the profile's estimate."""


@cache
def gpu_count() -> int:
    """CUDA GPUs the driver sees here, probed in a child process so this one never initialises CUDA."""
    try:
        out = subprocess.run([sys.executable, "-c", DEVICE_PROBE], capture_output=True, text=True,
                             timeout=60, check=True).stdout
        return int(out.strip() or 0)
    except (subprocess.SubprocessError, ValueError):
        return 0


class CudaMeasurer:
    """Compiles for the profile's CUDA target and times the module on this machine's GPU."""

    def __init__(self, profile, device_id: int = 0) -> None:
        if not is_cuda_target(profile.tvm_target):
            raise AutocompError(f"target {profile.name} is not a CUDA target")
        if gpu_count() <= device_id:
            raise GpuUnavailableError(f"target {profile.name}: no CUDA GPU {device_id} on this machine")
        self.profile = profile
        self.device_id = device_id
        self._worker = WorkerProcess("autocomp.hardware.measure.cuda", "CUDA timing worker", attempts=1)

    def set_reference(self, model, input_shape: tuple[int, ...], baseline_s: float | None = None):
        """The reference's latency, timed plainly: GPU figures are not reference-relative yet (the
        A/B protocol of ``measure.reference`` runs on CPUs, here and through RPC)."""
        return self.measure(model, input_shape)

    def measure(self, model, input_shape: tuple[int, ...]):
        executable = compile_cuda(model, input_shape, self.profile)
        with tempfile.TemporaryDirectory(prefix="autocomp-cuda-") as tmp:
            library = export_cuda(executable, Path(tmp) / "model.so")
            return self.time_library(library, input_shape)

    def time_library(self, library: Path, input_shape: tuple[int, ...],
                     what: str = "DLight default schedules"):
        """Time an exported CUDA library; ``what`` says how its kernels were scheduled."""
        lat = self.profile.latency
        reply = self._ask({"library": str(library), "shape": list(input_shape), "device": self.device_id,
                           "repeat": lat.repeat, "min_repeat_ms": lat.min_repeat_ms})
        seconds = reply["seconds"]
        deciles = statistics.quantiles(seconds, n=10, method="inclusive")
        provenance = (f"measured ({self.profile.name}: {reply['device_name']}, TVM "
                      f"{self.profile.target_text()}, {what}, median of {len(seconds)})")
        return Latency(statistics.median(seconds), deciles[0], deciles[-1], len(seconds), "measured",
                       provenance)

    def run_library(self, library: Path, data):
        """Run an exported CUDA library once on ``data`` (a numpy array); returns its first output."""
        import numpy as np

        with tempfile.TemporaryDirectory(prefix="autocomp-cuda-") as tmp:
            np.save(Path(tmp) / "input.npy", data)
            self._ask({"library": str(library), "device": self.device_id, "input": f"{tmp}/input.npy",
                       "output": f"{tmp}/output.npy"})
            return np.load(Path(tmp) / "output.npy")

    def close(self) -> None:
        self._worker.close()

    def _ask(self, request: dict) -> dict:
        reply = self._worker.ask(request)
        if not reply["ok"]:
            if reply.get("no_gpu"):
                raise GpuUnavailableError(reply["error"])
            raise AutocompError(f"CUDA timing failed: {reply['error']}")
        return reply


def _cuda_runtime_loaded() -> bool:
    import tvm

    return tvm.get_global_func("device_api.cuda", allow_missing=True) is not None


def _load_cuda_runtime() -> None:
    """Make sure TVM's CUDA runtime is loaded (a runtime-only TVM does not load it by itself)."""
    import ctypes

    if _cuda_runtime_loaded():
        return
    from tvm import libinfo
    from tvm_ffi.libinfo import load_lib_ctypes

    candidates = ["libcudart.so.13", "libcudart.so.12"]
    for root in filter(None, [os.environ.get("CUDA_PATH"), "/usr/local/cuda"]):
        candidates += sorted(str(p) for p in Path(root).glob("lib*/libcudart.so.*"))
    for name in candidates:
        try:
            ctypes.CDLL(name, mode=ctypes.RTLD_GLOBAL)
            break
        except OSError:
            continue
    load_lib_ctypes("tvm", "tvm_runtime_cuda", "RTLD_LOCAL", extra_lib_paths=libinfo.package_lib_paths())


def _compile_when_loaded(arch: str) -> None:
    """Compile kernels for this GPU's arch when a module is loaded.

    TVM's own callback asks the current compilation target for the arch, which a
    runtime-only TVM (the usual deployment) cannot answer.
    """
    import tvm_ffi

    @tvm_ffi.register_global_func("tvm_callback_cuda_compile", override=True)
    def compile_for_this_gpu(code, *_):
        return compile_cuda_c(code, arch)


def _serve(request: dict) -> dict:
    import numpy as np
    import tvm
    from tvm.runtime.vm import VirtualMachine

    try:
        _load_cuda_runtime()
    except (OSError, RuntimeError) as err:
        return {"ok": False, "no_gpu": True, "error": f"TVM's CUDA runtime does not load here: {err}"}
    device = tvm.cuda(request["device"])
    if not device.exist:
        return {"ok": False, "no_gpu": True, "error": f"no CUDA GPU {request['device']} on this machine"}
    arch = f"sm_{device.compute_version.replace('.', '')}"
    _compile_when_loaded(arch)
    vm = VirtualMachine(tvm.runtime.load_module(request["library"]), device)
    if "input" in request:
        outputs = vm["main"](tvm.runtime.tensor(np.load(request["input"]), device))
        first = outputs if hasattr(outputs, "numpy") else outputs[0]
        np.save(request["output"], first.numpy())
        return {"ok": True}
    data = np.random.default_rng(0).standard_normal(request["shape"]).astype("float32")
    tensor = tvm.runtime.tensor(data, device)
    vm["main"](tensor)  # warm-up: module load, first touch of weights and workspace
    evaluator = vm.time_evaluator("main", device, number=1, repeat=request["repeat"],
                                  min_repeat_ms=request["min_repeat_ms"])
    seconds = list(evaluator(tensor).results)
    return {"ok": True, "seconds": seconds, "device_name": f"{device.device_name} {arch}"}


if __name__ == "__main__":
    serve(_serve)
