"""GPU: compile for TVM's CUDA target, export, and time the module on ``tvm.cuda()``.

Compiling needs no GPU. GPU kernels need a thread schedule, which DLight's
default GPU rules give every fused kernel (matmul, GEMV, reductions, and a
fallback that binds the rest); without one TVM rejects the kernels for unbound
thread axes. In TVM 0.27 the compiled CUDA module carries CUDA C, which the
runtime compiles with NVRTC when the module is loaded (``tvm_callback_cuda_compile``):
the exported library needs no nvcc, but wherever it is loaded it needs NVRTC
(the ``cuda-bindings`` package) and the CUDA toolkit's headers.
``compile_kernels`` runs that NVRTC step here, so a kernel that would not
compile is caught without a GPU.

Measuring needs a GPU: ``CudaMeasurer`` raises ``GpuUnavailableError`` on a
machine without one, and the caller falls back to the profile's estimate. The
module is timed in a worker process (``python -m autocomp.hardware.cuda``, one
JSON request per line), apart from PyTorch.
"""

import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from functools import cache
from pathlib import Path

from autocomp.errors import AutocompError
from autocomp.hardware.timer_worker import WorkerProcess, serve

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


class GpuUnavailableError(AutocompError):
    """No usable CUDA GPU on this machine: the caller falls back to the profile's estimate."""


def is_cuda_target(target: dict) -> bool:
    return target.get("kind") == "cuda"


@cache
def gpu_count() -> int:
    """CUDA GPUs the driver sees here, probed in a child process so this one never initialises CUDA."""
    try:
        out = subprocess.run([sys.executable, "-c", DEVICE_PROBE], capture_output=True, text=True,
                             timeout=60, check=True).stdout
        return int(out.strip() or 0)
    except (subprocess.SubprocessError, ValueError):
        return 0


def cuda_toolkit() -> Path | None:
    """The CUDA toolkit whose headers NVRTC compiles against (CUDA_PATH, CUDA_HOME, /usr/local/cuda, nvcc)."""
    nvcc = shutil.which("nvcc")
    candidates = [os.environ.get("CUDA_PATH"), os.environ.get("CUDA_HOME"), "/usr/local/cuda",
                  str(Path(nvcc).resolve().parent.parent) if nvcc else None]
    for root in filter(None, candidates):
        if (Path(root) / "include" / "cuda_runtime.h").is_file():
            return Path(root)
    return None


def _prepare_cuda_compiler() -> None:
    """Point TVM's NVRTC step at the toolkit, or fail with one clear line.

    TVM looks for the toolkit through CUDA_PATH, else two folders above ``nvcc``,
    which is wrong when nvcc is a wrapper script (as in /usr/local/bin), so
    CUDA_PATH is set when it is not.
    """
    root = cuda_toolkit()
    if root is None:
        raise AutocompError("compiling CUDA kernels needs the CUDA toolkit headers (set CUDA_PATH, or "
                            "install it at /usr/local/cuda): none found")
    os.environ.setdefault("CUDA_PATH", str(root))
    if os.environ.get("TVM_CUDA_COMPILE_MODE", "nvrtc").lower() == "nvrtc":
        try:
            from cuda.bindings import nvrtc  # noqa: F401
        except ImportError:
            raise AutocompError("compiling CUDA kernels needs NVRTC from the cuda-bindings package "
                                "(pip install cuda-bindings), or TVM_CUDA_COMPILE_MODE=nvcc") from None


def _cuda_modules(module) -> list:
    found = [module] if module.kind == "cuda" else []
    for imported in module.imports:
        found += _cuda_modules(imported)
    return found


def cuda_source(executable) -> str:
    """The CUDA C of a compiled executable's kernels."""
    modules = _cuda_modules(executable.mod)
    if not modules:
        raise AutocompError("the compiled module has no CUDA kernels")
    return "\n".join(module.inspect_source("cuda") for module in modules)


def _compile_source(code: str, arch: str) -> bytes:
    from tvm.support import nvcc

    _prepare_cuda_compiler()
    mode = os.environ.get("TVM_CUDA_COMPILE_MODE", "nvrtc").lower()
    return bytes(nvcc.compile_cuda(code, target_format="cubin" if mode == "nvrtc" else "fatbin",
                                   arch=arch, compiler=mode))


def compile_kernels(executable, arch: str) -> bytes:
    """Compile the executable's CUDA C to device code for ``arch`` (e.g. ``sm_90``), as loading it will."""
    try:
        return _compile_source(cuda_source(executable), arch)
    except (RuntimeError, ValueError) as err:
        text = str(err).strip()
        raise AutocompError(f"the CUDA kernels do not compile for {arch}: "
                            f"{text.splitlines()[0] if text else type(err).__name__}") from None


def gpu_pipeline(target):
    """Relax -> VM pipeline for a CUDA ``tvm.target.Target``: fuse, then DLight's default GPU schedules."""
    import tvm
    from tvm import relax
    from tvm.relax.backend.cuda import pipeline as backend
    from tvm.s_tir import dlight as dl

    passes = [
        *backend.library_dispatch_passes(target),
        relax.transform.LegalizeOps(),
        relax.transform.AnnotateTIROpPattern(),
        relax.transform.FoldConstant(),
        relax.transform.FuseOps(),
        relax.transform.FuseTIR(),
        dl.ApplyDefaultSchedule(dl.gpu.Matmul(), dl.gpu.GEMV(), dl.gpu.Reduction(),
                                dl.gpu.GeneralReduction(), dl.gpu.Fallback()),
        *backend.dataflow_lower_passes(target),
        *backend.finalize_passes(target),
    ]

    @tvm.transform.module_pass(opt_level=0, name="AutocompCudaPipeline")
    def pipeline(mod, _ctx):
        with target:
            return tvm.transform.Sequential(passes)(mod)

    return pipeline


def compile_relax_cuda(module, target: dict, cuda_graph: bool = False):
    """Compile a Relax IRModule for a CUDA target dict; returns a ``tvm.relax.Executable``.

    ``cuda_graph`` captures the model's kernel launches in a CUDA graph, replayed
    as one launch (batch-1 GPU latency is mostly launch overhead).
    """
    import tvm

    if not is_cuda_target(target):
        raise AutocompError(f"not a CUDA target: {target}")
    tvm_target = tvm.target.Target(target)
    config = {"relax.backend.use_cuda_graph": cuda_graph}
    try:
        with tvm.transform.PassContext(opt_level=3, config=config):
            return tvm.compile(module, target=tvm_target, relax_pipeline=gpu_pipeline(tvm_target))
    except Exception as err:
        text = str(err).strip()
        raise AutocompError(f"compiling for CUDA failed: {type(err).__name__}: "
                            f"{text.splitlines()[0] if text else ''}") from None


def compile_cuda(model, input_shape: tuple[int, ...], profile, cuda_graph: bool = False):
    """Import a PyTorch model and compile it for the profile's CUDA target."""
    from autocomp.hardware.lower import to_relax

    return compile_relax_cuda(to_relax(model, input_shape), profile.tvm_target, cuda_graph)


def export_cuda(executable, path: Path) -> Path:
    """Write the host library with the kernels' CUDA C embedded (compiled by NVRTC when loaded)."""
    executable.export_library(str(path))
    return path


class CudaMeasurer:
    """Compiles for the profile's CUDA target and times the module on this machine's GPU."""

    def __init__(self, profile, device_id: int = 0) -> None:
        if not is_cuda_target(profile.tvm_target):
            raise AutocompError(f"target {profile.name} is not a CUDA target")
        if gpu_count() <= device_id:
            raise GpuUnavailableError(f"target {profile.name}: no CUDA GPU {device_id} on this machine")
        self.profile = profile
        self.device_id = device_id
        self._worker = WorkerProcess("autocomp.hardware.cuda", "CUDA timing worker", attempts=1)

    def measure(self, model, input_shape: tuple[int, ...]):
        executable = compile_cuda(model, input_shape, self.profile)
        with tempfile.TemporaryDirectory(prefix="autocomp-cuda-") as tmp:
            library = export_cuda(executable, Path(tmp) / "model.so")
            return self.time_library(library, input_shape)

    def time_library(self, library: Path, input_shape: tuple[int, ...],
                     what: str = "DLight default schedules"):
        """Time an exported CUDA library; ``what`` says how its kernels were scheduled."""
        from autocomp.hardware.measure import Latency

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
        return _compile_source(code, arch)


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
