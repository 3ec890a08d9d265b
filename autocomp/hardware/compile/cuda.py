"""GPU: compile for TVM's CUDA target and export the module.

Compiling needs no GPU. GPU kernels need a thread schedule, which DLight's
default GPU rules give every fused kernel (matmul, GEMV, reductions, and a
fallback that binds the rest); without one TVM rejects the kernels for unbound
thread axes. In TVM 0.27 the compiled CUDA module carries CUDA C, which the
runtime compiles with NVRTC when the module is loaded (``tvm_callback_cuda_compile``):
the exported library needs no nvcc, but wherever it is loaded it needs NVRTC
(the ``cuda-bindings`` package) and the CUDA toolkit's headers.
``compile_kernels`` runs that NVRTC step here, so a kernel that would not
compile is caught without a GPU.

Timing the module needs a GPU: see ``autocomp.hardware.measure.cuda``.
"""

import os
import shutil
from pathlib import Path

from autocomp.core.errors import AutocompError
from autocomp.hardware.compile.tune import fusion_passes, gpu_default_schedules


def is_cuda_target(target: dict) -> bool:
    return target.get("kind") == "cuda"


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


def compile_cuda_c(code: str, arch: str) -> bytes:
    """Compile CUDA C to device code for ``arch`` with NVRTC, as TVM does when a module loads."""
    from tvm.support import nvcc

    _prepare_cuda_compiler()
    mode = os.environ.get("TVM_CUDA_COMPILE_MODE", "nvrtc").lower()
    return bytes(nvcc.compile_cuda(code, target_format="cubin" if mode == "nvrtc" else "fatbin",
                                   arch=arch, compiler=mode))


def compile_kernels(executable, arch: str) -> bytes:
    """Compile the executable's CUDA C to device code for ``arch`` (e.g. ``sm_90``), as loading it will."""
    try:
        return compile_cuda_c(cuda_source(executable), arch)
    except (RuntimeError, ValueError) as err:
        text = str(err).strip()
        raise AutocompError(f"the CUDA kernels do not compile for {arch}: "
                            f"{text.splitlines()[0] if text else type(err).__name__}") from None


def gpu_pipeline(target):
    """Relax -> VM pipeline for a CUDA ``tvm.target.Target``: fuse, then DLight's default GPU schedules."""
    import tvm
    from tvm.relax.backend.cuda import pipeline as backend

    passes = [
        *fusion_passes(target),
        gpu_default_schedules(),
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
    from autocomp.hardware.compile.lower import to_relax

    return compile_relax_cuda(to_relax(model, input_shape), profile.tvm_target, cuda_graph)


def export_cuda(executable, path: Path) -> Path:
    """Write the host library with the kernels' CUDA C embedded (compiled by NVRTC when loaded)."""
    executable.export_library(str(path))
    return path
