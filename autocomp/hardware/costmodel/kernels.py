"""The kernels a compiled model runs, each with its workload signature, its call count and
the PyTorch layer it belongs to.

A model is lowered the way it is built for measurement (``tune.lower_for_build``:
tuned schedules applied), then run through the Relax pipeline ``tvm.compile``
applies, so the PrimFuncs listed here are exactly the ones the VM calls, in the
order it calls them. Kernels are named to the PyTorch layers whose weights they
consume (weights are matched by value, so transposed or reshaped constants still
match); a kernel with no weights (an activation, a residual add) belongs to the
layer that produced its first input.
"""

import hashlib
import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from autocomp.hardware.profiles import HardwareProfile

Arg = tuple[tuple[int, ...], str]  # one buffer: shape and dtype


@dataclass(frozen=True)
class Kernel:
    """One PrimFunc the VM calls.

    ``tuning`` says how it was scheduled (``untuned`` or ``scheduled``, with the TVM
    version); ``digest`` hashes its text as scheduled, which pins the schedule and
    every detail of the workload that shapes do not show (layout, strides, padding).
    """

    name: str
    op: str
    args: tuple[Arg, ...]
    tuning: str
    digest: str
    func: Any = field(compare=False, repr=False)

    @property
    def signature(self) -> str:
        """Shapes and dtypes of its buffers, e.g. ``1x16x14x14:float32,16x1x3x3:float32``."""
        return ",".join(f"{'x'.join(map(str, shape)) or 'scalar'}:{dtype}" for shape, dtype in self.args)


@dataclass(frozen=True)
class KernelCall:
    """One call of a kernel by the VM, and the PyTorch layer it computes (None: unknown)."""

    kernel: str
    layer: str | None


@dataclass
class ModelKernels:
    """A compiled model's kernels and its kernel calls in execution order."""

    kernels: dict[str, Kernel]
    calls: list[KernelCall]
    module: Any = field(repr=False)  # the Relax module as the VM runs it (``build`` compiles it)

    def counts(self) -> Counter:
        """How many times each kernel is called per inference."""
        return Counter(call.kernel for call in self.calls)


def lower(model: nn.Module, input_shape: tuple[int, ...], profile: HardwareProfile):
    """The Relax module that is built for measurement: imported, with the tuned schedules
    applied where the profile tunes (``tune.lower_for_build``)."""
    from autocomp.hardware.compile.lower import to_relax
    from autocomp.hardware.compile.tune import lower_for_build

    return lower_for_build(to_relax(model, input_shape), profile,
                           untuned=profile.latency.tuning == "untuned")


def vm_module(module, profile: HardwareProfile):
    """``module`` after the Relax pipeline ``tvm.compile`` runs on it for the profile's
    target (the GPU pipeline schedules with DLight; the CPU one only legalizes)."""
    import tvm
    from tvm import relax

    target = tvm.target.Target(profile.tvm_target)
    gpu = "gpu" in target.keys
    pipeline = relax.get_default_pipeline(target) if gpu else relax.get_pipeline("default")
    with target, pass_context(profile):
        return pipeline(module)


def pass_context(profile: HardwareProfile):
    """The pass context ``tune.compile_tuned`` compiles in (opt level 3 for tuned builds)."""
    import tvm

    return tvm.transform.PassContext(opt_level=2 if profile.latency.tuning == "untuned" else 3)


def build(kernels: ModelKernels, profile: HardwareProfile):
    """The executable of the model whose kernels these are (the Relax pipeline already ran)."""
    import tvm

    with pass_context(profile):
        return tvm.compile(kernels.module, tvm.target.Target(profile.tvm_target), relax_pipeline=None)


def model_kernels(model: nn.Module, input_shape: tuple[int, ...], profile: HardwareProfile) -> ModelKernels:
    """Lower ``model`` as it is built for measurement and list the kernels the VM calls."""
    final = vm_module(lower(model, input_shape, profile), profile)
    return extract(final, layer_fingerprints(model))


def extract(final, fingerprints: dict[str, str | None] | None = None) -> ModelKernels:
    """Kernels and kernel calls of ``main`` in a module the Relax pipeline has lowered.

    ``fingerprints`` (from ``layer_fingerprints``) names calls after PyTorch layers.
    """
    import tvm
    from tvm import relax, tirx

    fingerprints = fingerprints or {}
    kernels: dict[str, Kernel] = {}
    calls: list[KernelCall] = []
    alias: dict[Any, Any] = {}  # a var bound to a view of another value (vm.builtin.reshape)
    produced_by: dict[Any, str | None] = {}  # a tensor var -> the layer whose kernel wrote it
    weights: dict[Any, tuple[int, str | None]] = {}  # a constant, or a tensor computed from
    # constants alone (a transposed weight): its size and its layer

    def source(value):
        while isinstance(value, relax.Var) and value in alias:
            value = alias[value]
        return value

    def weight(value) -> tuple[int, str | None] | None:
        if isinstance(value, tvm.ir.expr.Constant) and value not in weights:
            data = value.value.numpy()
            weights[value] = (data.size, fingerprints.get(fingerprint(data)))
        return weights.get(value)

    for block in final["main"].body.blocks:
        for binding in block.bindings:
            value = binding.value
            if not isinstance(value, relax.Call):
                continue
            if isinstance(value.op, relax.ExternFunc):
                if value.op.global_symbol == "vm.builtin.reshape" and value.args:
                    alias[binding.var] = value.args[0]
                continue
            if not isinstance(value.op, tvm.ir.GlobalVar) or not isinstance(final[value.op], tirx.PrimFunc):
                continue
            name = value.op.name_hint
            if name not in kernels:
                kernels[name] = describe(name, final[value.op])
            *inputs, output = [source(arg) for arg in value.args]
            found = [weight(arg) for arg in inputs]
            named = [entry for entry in found if entry is not None and entry[1] is not None]
            if named:
                layer = max(named, key=lambda entry: entry[0])[1]
            else:
                tensors = [arg for arg in inputs if isinstance(arg, relax.Var)]
                layer = produced_by.get(tensors[0]) if tensors else None
            if isinstance(output, relax.Var):
                produced_by[output] = layer
                if inputs and all(entry is not None for entry in found):
                    weights[output] = (max(entry[0] for entry in found), layer)
            calls.append(KernelCall(name, layer))
    return ModelKernels(kernels, calls, final)


def describe(name: str, func) -> Kernel:
    """A PrimFunc as a ``Kernel``: its op (name without the numbering), buffers and digest."""
    import tvm

    args = tuple((tuple(int(dim) for dim in param.ty.shape), str(param.ty.dtype)) for param in func.params)
    text = (func.without_attr("global_symbol") if "global_symbol" in func.attrs else func).script()
    scheduled = bool(func.attrs.get("tirx.is_scheduled", False))
    tuning = f"{'scheduled' if scheduled else 'untuned'}@tvm-{tvm.__version__}"
    digest = hashlib.sha256(text.encode()).hexdigest()[:16]
    return Kernel(name, re.sub(r"\d+$", "", name), args, tuning, digest, func)


def fingerprint(array) -> str:
    """A hash of an array's values regardless of their order, so a weight matches itself
    after a transpose or reshape."""
    import numpy as np

    values = np.sort(np.asarray(array).ravel())
    return hashlib.sha1(values.tobytes() + str(values.dtype).encode()).hexdigest()


def layer_fingerprints(model: nn.Module) -> dict[str, str | None]:
    """Value fingerprint of each weight the imported module embeds -> the PyTorch layer it
    belongs to (None where several layers hold identical values, e.g. zero biases).

    The model is prepared as ``lower.to_relax`` prepares it (integer layers, folded batch
    norms), so the fingerprints are those of the constants TVM sees.
    """
    from autocomp.hardware.compile.lower import fold_batchnorm

    try:
        from autocomp.hardware.compile.int8 import integer_model

        prepared = fold_batchnorm(integer_model(model).module)
    except ImportError:
        prepared = fold_batchnorm(model)
    owners: dict[str, set[str]] = {}
    tensors = list(prepared.named_parameters()) + list(prepared.named_buffers())
    for name, tensor in tensors:
        if tensor.numel() < 2:
            continue
        layer = name.rsplit(".", 1)[0]
        owners.setdefault(fingerprint(tensor.detach().cpu().numpy()), set()).add(layer)
    return {key: next(iter(layers)) if len(layers) == 1 else None for key, layers in owners.items()}
