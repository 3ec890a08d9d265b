"""The deployable artefacts of a compressed model, one writer per kind, each checked against
PyTorch on real inputs wherever it can run here; an export that disagrees is refused.

Every export holds the PyTorch weights and an ONNX model, plus the target's own artefact,
chosen by the profile's ``export.format`` and TVM target: a shared library for LLVM targets
(this machine's, or cross-compiled for aarch64), the CUDA module (``autocomp.hardware.compile.cuda``)
or the MCU C sources (``autocomp.hardware.mcu.codegen``). A target writer is any function
``(ExportJob) -> list[Artefact]`` that writes into ``job.folder`` and checks with
``job.compare`` (or says why it cannot with ``Check.skipped``).
"""

import copy
import io
import logging
import math
import shutil
import warnings
from collections.abc import Callable
from contextlib import redirect_stdout
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from autocomp.core.errors import AutocompError
from autocomp.hardware.deploy.runtimes import RuntimeUnavailable, host_arch, run_library, runtime_for
from autocomp.hardware.profiles import HardwareProfile
from autocomp.methods.quant import QuantizedLayer

logger = logging.getLogger(__name__)

# An artefact must agree with PyTorch to this fraction of the largest |output| (at least 1).
RELATIVE_TOLERANCE = 1e-3
# The same where activations are quantized: a value on a rounding tie can round the other
# way when the kernels sum in another order, one step of that activation's scale, carried to
# the output (seen: 1.7e-3 on demo-resnet, ONNX Runtime and TVM agreeing with each other).
# A miscompiled kernel is off by far more.
QUANTIZED_RELATIVE_TOLERANCE = 1e-2
# ONNX keeps weights in one file up to this size (protobuf's limit is 2 GiB).
ONNX_INLINE_BYTES = 1 << 30


@dataclass(frozen=True)
class Check:
    """How an artefact's outputs compare with PyTorch's, or why that was not run here."""

    ran: str | None
    max_abs_diff: float | None = None
    tolerance: float | None = None
    problem: str | None = None  # an output mismatch that is not a number (count, shapes)
    not_run: str | None = None

    @classmethod
    def skipped(cls, reason: str) -> "Check":
        return cls(ran=None, not_run=reason)

    @property
    def failed(self) -> bool:
        if self.problem is not None:
            return True
        # NaN compares false, so a NaN difference fails too
        return self.max_abs_diff is not None and not self.max_abs_diff <= self.tolerance

    def summary(self, label: str, samples: int) -> str:
        if self.not_run is not None:
            return f"not checked here: {self.not_run}"
        if self.problem is not None:
            return f"{self.problem} ({self.ran})"
        return (f"max |{label} - PyTorch| over {samples} validation images: {self.max_abs_diff:.3g} "
                f"(tolerance {self.tolerance:.3g}; {self.ran})")

    def to_json(self, samples: int) -> dict[str, Any]:
        if self.not_run is not None:
            return {"not_run_here": self.not_run}
        record = {"ran": self.ran, "against": "PyTorch (the compressed model, eval mode)",
                  "samples": samples, "max_abs_diff": self.max_abs_diff, "tolerance": self.tolerance}
        if self.problem is not None:
            record["problem"] = self.problem
        return record


@dataclass(frozen=True)
class Artefact:
    """Files written for one deployable form of the model, and how they were checked."""

    kind: str
    files: tuple[str, ...]
    usage: str
    check: Check
    label: str  # what produced the outputs, as printed: "TVM", "ONNX Runtime"
    details: dict[str, Any] | None = None

    def to_json(self, samples: int) -> dict[str, Any]:
        return {"kind": self.kind, "files": list(self.files), "usage": self.usage, **(self.details or {}),
                "check": self.check.to_json(samples)}


@dataclass(frozen=True)
class ExportJob:
    """What every writer gets: the model, the target, where to write, and the reference."""

    model: nn.Module
    input_shape: tuple[int, ...]
    profile: HardwareProfile
    folder: Path
    inputs: np.ndarray  # float32, shape (N, *input_shape)
    expected: list[np.ndarray]  # PyTorch's outputs, each stacked over the N inputs
    tolerance: float

    @property
    def samples(self) -> int:
        return len(self.inputs)

    def compare(self, outputs: list[np.ndarray], ran: str) -> Check:
        """Check outputs (each stacked over the N inputs) against PyTorch's."""
        got = [tuple(o.shape) for o in outputs]
        want = [tuple(e.shape) for e in self.expected]
        if got != want:
            return Check(ran, tolerance=self.tolerance,
                         problem=f"outputs have shapes {got}, PyTorch's {want}")
        diff = max(float(np.abs(o.astype(np.float64) - e).max()) for o, e in zip(outputs, self.expected,
                                                                                  strict=True))
        return Check(ran, diff, self.tolerance)


Writer = Callable[[ExportJob], list[Artefact]]


def reference_outputs(model: nn.Module, inputs: np.ndarray) -> list[np.ndarray]:
    """PyTorch's outputs for each input, flattened to a list of tensors as TVM returns them."""
    per_input = []
    with torch.no_grad():
        for sample in inputs:
            per_input.append([t.numpy() for t in _flatten(model(torch.from_numpy(sample)))])
    return [np.stack(column) for column in zip(*per_input, strict=True)]


def _flatten(value: Any) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, list | tuple):
        return [t for item in value for t in _flatten(item)]
    raise AutocompError(f"the model returns a {type(value).__name__}, not tensors")


def make_job(model: nn.Module, input_shape: tuple[int, ...], profile: HardwareProfile, folder: Path,
             inputs: np.ndarray) -> ExportJob:
    """Prepare an export of ``model`` into ``folder``, with PyTorch's outputs on ``inputs``."""
    model = model.eval()
    inputs = np.ascontiguousarray(inputs, dtype=np.float32)
    if inputs.shape[1:] != tuple(input_shape):
        raise AutocompError(f"check inputs have shape {list(inputs.shape[1:])}, "
                            f"the model takes {list(input_shape)}")
    expected = reference_outputs(model, inputs)
    scale = max(float(np.abs(e).max()) for e in expected)
    if not math.isfinite(scale):
        raise AutocompError("the PyTorch model itself outputs NaN or infinity on the check inputs")
    quantized = any(isinstance(m, QuantizedLayer) and m.act_levels for m in model.modules())
    relative = QUANTIZED_RELATIVE_TOLERANCE if quantized else RELATIVE_TOLERANCE
    return ExportJob(model, tuple(input_shape), profile, folder, inputs, expected, relative * max(scale, 1.0))


def write_artefacts(job: ExportJob) -> list[Artefact]:
    """Write PyTorch weights, ONNX and the target's artefact, logging each one's check; refuse
    any that disagrees."""
    artefacts = []
    for writer in (write_pytorch, write_onnx, target_writer(job.profile)):
        for artefact in writer(job):
            logger.info("export: %s: %s", ", ".join(artefact.files) or artefact.kind,
                        artefact.check.summary(artefact.label, job.samples))
            artefacts.append(artefact)
    refused = [a for a in artefacts if a.check.failed]
    if refused:
        reasons = "; ".join(f"{', '.join(a.files)} {_mismatch(a.check)}" for a in refused)
        raise AutocompError(f"export refused: {reasons}")
    return artefacts


def _mismatch(check: Check) -> str:
    if check.problem is not None:
        return check.problem
    return f"differs from PyTorch by {check.max_abs_diff:.3g} (tolerance {check.tolerance:.3g})"


def target_writer(profile: HardwareProfile) -> Writer:
    """The writer of the profile's own artefact."""
    kind = profile.tvm_target["kind"]
    if profile.export.format == "c-sources":
        return write_c_sources
    if kind == "cuda":
        return write_cuda_module
    if kind == "llvm" and profile.export.format == "shared-library":
        return write_shared_library
    raise AutocompError(f"{profile.source}: no exporter for export.format "
                        f"{profile.export.format!r} with TVM target kind {kind!r}")


def write_pytorch(job: ExportJob) -> list[Artefact]:
    """``model.pt``: the state dict, checked by loading it back into a copy of the model."""
    path = job.folder / "model.pt"
    torch.save(job.model.state_dict(), path)
    reloaded = copy.deepcopy(job.model)
    reloaded.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    check = job.compare(reference_outputs(reloaded.eval(), job.inputs),
                        "torch.load into a copy of the model, PyTorch eager")
    return [Artefact("pytorch-state-dict", (path.name,),
                     "torch.load(..., weights_only=True) into the model rebuilt with plan.json",
                     check, "reloaded weights")]


def write_onnx(job: ExportJob) -> list[Artefact]:
    """``model.onnx`` from ``torch.onnx.export`` (torch.export-based), checked with ONNX Runtime."""
    import onnx

    from autocomp.core.graph import export_model

    path = job.folder / "model.onnx"
    example = torch.from_numpy(job.inputs[0])
    program = export_model(job.model, example)
    weight_bytes = sum(t.numel() * t.element_size() for t in job.model.state_dict().values())
    try:
        with warnings.catch_warnings(), redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            torch.onnx.export(program, (example,), str(path), dynamo=True, verbose=False,
                              external_data=weight_bytes > ONNX_INLINE_BYTES)
    except Exception as err:
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        return [Artefact("onnx", (), "", Check.skipped(f"not written: torch.onnx.export failed: {first}"),
                         "ONNX Runtime")]
    files = tuple(p.name for p in sorted(job.folder.glob("model.onnx*")))
    name = onnx.load(str(path), load_external_data=False).graph.input[0].name
    usage = f"onnxruntime.InferenceSession('model.onnx').run(None, {{'{name}': x}})"
    try:
        import onnxruntime
    except ImportError:
        return [Artefact("onnx", files, usage, Check.skipped("onnxruntime is not installed"),
                         "ONNX Runtime")]
    options = onnxruntime.SessionOptions()
    options.log_severity_level = 3
    session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    per_input = [session.run(None, {name: sample}) for sample in job.inputs]
    outputs = [np.stack(column) for column in zip(*per_input, strict=True)]
    check = job.compare(outputs, f"ONNX Runtime {onnxruntime.__version__}, CPU")
    return [Artefact("onnx", files, usage, check, "ONNX Runtime")]


def llvm_arch(target: dict[str, Any]) -> str:
    """The CPU architecture an LLVM target compiles for (this machine's without ``mtriple``)."""
    triple = target.get("mtriple")
    return triple.split("-")[0] if triple else host_arch()


def write_shared_library(job: ExportJob) -> list[Artefact]:
    """``model.so``: the Relax VM module for an LLVM target, cross-compiled when the target is
    another architecture, and run by a C++ loader against the TVM runtime (under qemu for
    aarch64) to check it."""
    import tvm

    from autocomp.hardware.compile.lower import compile_label, compile_model

    profile = job.profile
    arch = llvm_arch(profile.tvm_target)
    compiler = profile.export.cross_compiler
    if arch != host_arch() and not compiler:
        raise AutocompError(f"{profile.source}: the target is {arch}; export.cross_compiler must name "
                            f"a compiler for it (such as {arch}-linux-gnu-g++)")
    if compiler and shutil.which(compiler) is None:
        raise AutocompError(f"the cross compiler {compiler} of profile {profile.name} is not installed")
    path = job.folder / "model.so"
    untuned = profile.latency.method == "estimate"  # no device to tune on: TVM's default schedules
    # The schedules a search measured: tuned ones, and for workloads the database lacks, the
    # transferred ones its trials ran (a workload no neighbour fits is tuned).
    executable = compile_model(job.model, job.input_shape, profile, untuned=untuned, new_workloads="transfer")
    kernels = compile_label(profile, untuned)
    options = list(profile.export.cflags) or None
    if compiler:
        fcompile = tvm.support.cc.cross_compiler(compiler, options=options)
        executable.export_library(str(path), fcompile=fcompile)
    else:
        executable.export_library(str(path), options=options)
    usage = ("tvm.runtime.load_module(path), then tvm.runtime.vm.VirtualMachine(lib, tvm.cpu())['main'](x); "
             f"needs TVM runtime {tvm.__version__} for {arch}")
    details = {"arch": arch, "tvm_target": profile.tvm_target, "kernels": kernels}
    try:
        runtime = runtime_for(arch, compiler)
    except RuntimeUnavailable as reason:
        return [Artefact("shared-library", (path.name,), usage, Check.skipped(str(reason)), "TVM", details)]
    outputs = run_library(path, job.inputs, runtime)
    return [Artefact("shared-library", (path.name,), usage, job.compare(outputs, runtime.describe()),
                     "TVM", details)]


def write_cuda_module(job: ExportJob) -> list[Artefact]:
    """``model.so`` for a CUDA target: the host library with the kernels' CUDA C embedded,
    run on this machine's GPU to check it when there is one."""
    from autocomp.hardware.compile.cuda import compile_cuda, export_cuda
    from autocomp.hardware.measure.cuda import CudaMeasurer, gpu_count

    path = export_cuda(compile_cuda(job.model, job.input_shape, job.profile), job.folder / "model.so")
    usage = ("tvm.runtime.load_module(path), then tvm.runtime.vm.VirtualMachine(lib, tvm.cuda())['main'](x) "
             "with x on the GPU")
    details = {"tvm_target": job.profile.tvm_target, "kernels": "DLight default GPU schedules"}
    if gpu_count() == 0:
        return [Artefact("cuda-module", (path.name,), usage, Check.skipped("no CUDA GPU on this machine"),
                         "TVM", details)]
    measurer = CudaMeasurer(job.profile)
    try:
        outputs = [np.stack([measurer.run_library(path, sample) for sample in job.inputs])]
    finally:
        measurer.close()
    return [Artefact("cuda-module", (path.name,), usage,
                     job.compare(outputs, "TVM VM on this machine's GPU (first output)"), "TVM", details)]


def write_c_sources(job: ExportJob) -> list[Artefact]:
    """``mcu/``: bare-metal C (TVM's C kernels, a static call sequence, one arena, const weights;
    ``autocomp.hardware.mcu.codegen``), checked by building the same C for this machine."""
    from autocomp.hardware.mcu.artefact import export_mcu, run_on_host

    folder = job.folder / "mcu"
    folder.mkdir()
    artefact = export_mcu(job.model, job.input_shape, folder, job.profile)
    usage = ("compile model.c, kernels.c and model_weights.c with -Iinclude into the firmware; call "
             "autocomp_run(input, output) from autocomp_model.h")
    details = {"tvm_target": job.profile.tvm_target, "memory": artefact.memory.as_dict()}
    if shutil.which("cc") is None:
        return [Artefact("c-sources", ("mcu/",), usage,
                         Check.skipped("no C compiler (cc) to build the C for this machine"), "MCU C code",
                         details)]
    outputs = [run_on_host(artefact, job.inputs).reshape(len(job.inputs), *artefact.output_shape)]
    return [Artefact("c-sources", ("mcu/",), usage,
                     job.compare(outputs, "the same C built for this machine with cc (not on the MCU)"),
                     "MCU C code", details)]
