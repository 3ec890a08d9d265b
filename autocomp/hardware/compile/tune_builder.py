"""A fast MetaSchedule builder: persistent workers that skip the slow intrinsic import.

TVM's ``LocalBuilder`` is slow on a small machine for two reasons: its default
build function imports ``tvm.s_tir.tensor_intrin``, which spends 25-40 s
registering CUDA/ROCm intrinsics in every worker, and it starts new worker
processes for every batch of candidates. Candidates reach the builder already
scheduled (tensorized blocks are inlined), so building them needs no intrinsic
registry, and the workers here live for the whole tuning call.
"""

import os
import tempfile
from collections.abc import Callable

import tvm
from tvm.ir.utils import derived_object
from tvm.runtime import save_param_dict
from tvm.s_tir.meta_schedule.builder import BuilderInput, BuilderResult, PyBuilder
from tvm.s_tir.meta_schedule.builder.local_builder import _worker_func
from tvm.support.popen_pool import PopenPoolExecutor, StatusKind


def build(mod: tvm.IRModule, target: tvm.target.Target, _params: dict | None) -> tvm.runtime.Module:
    """MetaSchedule ``f_build``: what TVM's default does, without the intrinsic import."""
    from tvm.driver import build as tvm_build
    from tvm.s_tir.transform import RemoveWeightLayoutRewriteBlock

    mod = RemoveWeightLayoutRewriteBlock(skip_tensor_rewrite=True)(mod)
    return tvm_build(mod, target=target)


def export_shared(mod: tvm.runtime.Module, compiler: str | None) -> str:
    """MetaSchedule ``f_export`` for remote devices: a shared library linked by ``compiler``."""
    from tvm.support import cc

    path = os.path.join(tempfile.mkdtemp(prefix="autocomp-ms-"), "kernel.so")
    mod.export_library(path, fcompile=cc.cross_compiler(compiler) if compiler else None)
    return path


@derived_object
class PooledBuilder(PyBuilder):
    """Builds candidates in a pool of worker processes kept for the builder's lifetime."""

    def __init__(self, max_workers: int, timeout_sec: float,
                 f_export: Callable[[tvm.runtime.Module], str] | None = None) -> None:
        """``f_export`` writes the built module to a file (None: TVM's default, a tar)."""
        super().__init__()
        self.timeout_sec = timeout_sec
        self.f_export = f_export
        self.pool = PopenPoolExecutor(max_workers=max_workers, timeout=timeout_sec)

    def build(self, build_inputs: list[BuilderInput]) -> list[BuilderResult]:
        jobs = [(build, self.f_export, item.mod, item.target,
                 None if item.params is None else save_param_dict(item.params)) for item in build_inputs]
        results = []
        for outcome in self.pool.map_with_error_catching(lambda job: _worker_func(*job), jobs):
            if outcome.status == StatusKind.COMPLETE:
                results.append(BuilderResult(outcome.value, None))
            elif outcome.status == StatusKind.TIMEOUT:
                results.append(BuilderResult(None, f"build timed out after {self.timeout_sec} s"))
            else:
                results.append(BuilderResult(None, f"build failed: {outcome.value}"))
        return results

    def close(self) -> None:
        self.pool.shutdown()
