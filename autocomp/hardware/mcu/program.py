"""A model as the static kernel schedule the bare-metal MCU artefact runs, and its arena.

The model is lowered the way the MCU export builds it (``lower_program``): Relax, with
operators legalised and fused into TIR kernels, each kernel's injective producers
inlined and its epilogue computed inside the reduction loop (so a fused conv needs no
temporary the size of its output), then compiled with TVM's C code generator. The
Relax ``main`` is then a static schedule: a list of ``call_tir`` steps, each writing one
new tensor, plus reshapes, which are views. Every tensor is live from the step that
writes it to its last reader (the input from the copy-in, the output until the
copy-out), and the workspace a kernel asks the runtime for is live during that step
only. ``plan_arena`` places them all in one static arena (greedy by size: the largest
buffer first, at the lowest offset that overlaps no buffer live at the same time).
"""

import contextlib
import math
import re
from dataclasses import dataclass
from typing import Any

import numpy as np
from torch import nn

from autocomp.core.errors import AutocompError

ALIGN = 16
DEFAULT_TARGET = {"kind": "c", "mcpu": "cortex-m7"}
_WORKSPACE_ALLOC = re.compile(r"(\w+) = \(\(\w+\*\)\(\(\w+\*\)TVMBackendAllocWorkspace\("
                              r"\d+, dev_id, \(uint64_t\)(\d+)ULL, \d+, \d+\)\)\);")
_WORKSPACE_FREE = re.compile(r"TVMBackendFreeWorkspace\(\d+, dev_id, (\w+)\)")
_KERNEL_START = re.compile(r"^TVM_DLL int32_t __tvm_ffi_(\w+)\(.*\) \{$", re.MULTILINE)


def aligned(nbytes: int) -> int:
    """``nbytes`` rounded up to the arena's alignment."""
    return -(-nbytes // ALIGN) * ALIGN


@dataclass(frozen=True)
class Slot:
    """A tensor of the static schedule.

    ``kind`` is ``input``, ``activation`` (written by a step), ``constant`` (a weight) or
    ``workspace`` (a kernel's scratch memory, a flat byte buffer). ``storage`` is the slot
    whose memory this one uses: itself, or the tensor it is a reshaped view of.
    """

    name: str
    shape: tuple[int, ...]
    dtype: str
    kind: str
    storage: int

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * np.dtype(self.dtype).itemsize


@dataclass(frozen=True)
class Step:
    """One kernel call: its arguments (slot ids, the inputs then the outputs) and the
    workspace slot it runs with (None when it asks for no workspace)."""

    kernel: str
    args: tuple[int, ...]
    workspace: int | None = None


@dataclass
class McuProgram:
    """A model as a static sequence of C kernels over numbered tensors."""

    target: dict[str, Any]
    slots: list[Slot]
    steps: list[Step]
    constants: dict[int, np.ndarray]
    input: int
    output: int
    kernel_source: str
    checks: bool

    def storage_slots(self) -> list[int]:
        """Slots that own arena memory (inputs, activations, workspaces, not views)."""
        return [i for i, slot in enumerate(self.slots)
                if slot.storage == i and slot.kind in ("input", "activation", "workspace")]

    def constant_bytes(self) -> int:
        """Bytes of the weight arrays as the artefact stores them (their Relax dtype)."""
        return sum(value.nbytes for value in self.constants.values())


@dataclass(frozen=True)
class ArenaPlan:
    """Offsets in the activation arena and what the liveness analysis found.

    Time 0 is the copy of the input into the arena, step i runs at time i + 1 and the
    output is copied out at time ``len(steps) + 1``. ``live_bytes[t]`` is what must be
    held at time t; its maximum is a lower bound for any arena, ``size`` what this plan
    needs (fragmentation and alignment make it larger or equal).
    """

    offsets: dict[int, int]
    lifetimes: dict[int, tuple[int, int]]
    size: int
    live_bytes: tuple[int, ...]

    @property
    def peak_live(self) -> int:
        return max(self.live_bytes, default=0)

    @property
    def peak_time(self) -> int:
        return self.live_bytes.index(self.peak_live) if self.live_bytes else 0


def _schedule_kernel(func):
    """Inline each kernel's injective producers, and compute the epilogue after a
    reduction (bias, residual add, activation) inside the reduction's spatial loops:
    the reduction then accumulates into a scalar instead of a temporary buffer the size
    of its output, which is what keeps the kernels' workspace near zero. Primitives that
    do not apply to a kernel leave it as it was (still correct, more workspace)."""
    from tvm import s_tir

    sch = s_tir.Schedule(func)
    # An output block, or a producer that cannot be inlined; a loop nest that does not
    # put the reduction innermost: the primitive refuses, and the kernel stays as it is.
    refused = contextlib.suppress(s_tir.ScheduleError)
    root = sch.get_sblock("root")

    def reduces(block) -> bool:
        return any(int(var.iter_type) != 0 for var in sch.get(block).iter_vars)

    for block in sch.get_child_blocks(root):
        if not reduces(block):
            with refused:
                sch.compute_inline(block)
    for block in sch.get_child_blocks(root):
        producers = [p for p in sch.get_producers(block) if reduces(p)]
        if reduces(block) or len(producers) != 1:
            continue
        iter_vars = sch.get(producers[0]).iter_vars
        spatial = next((i for i, var in enumerate(iter_vars) if int(var.iter_type) != 0), len(iter_vars))
        loops = sch.get_loops(producers[0])
        if 0 < spatial <= len(loops):
            with refused:
                sch.reverse_compute_at(block, loops[spatial - 1])
    return sch.mod["main"]


def _lower_relax(module, target):
    """Relax IRModule -> main as call_tir steps over scheduled, exported PrimFuncs."""
    import tvm
    from tvm import relax

    passes = [relax.transform.DecomposeOpsForInference(), relax.transform.LegalizeOps(),
              relax.transform.AnnotateTIROpPattern(), relax.transform.FoldConstant(),
              relax.transform.FuseOps(), relax.transform.FuseTIR(),
              relax.transform.RewriteDataflowReshape(), relax.transform.ToNonDataflow(),
              relax.transform.DeadCodeElimination(), relax.transform.AttachGlobalSymbol()]
    with target:
        module = tvm.transform.Sequential(passes)(module)
    for gvar, func in list(module.functions.items()):
        if isinstance(func, tvm.tirx.PrimFunc):
            module[gvar] = _schedule_kernel(func)
    return module


class _ScheduleBuilder:
    """Walks the lowered Relax ``main`` and numbers its tensors."""

    def __init__(self) -> None:
        self.slots: list[Slot] = []
        self.steps: list[Step] = []
        self.constants: dict[int, np.ndarray] = {}
        self.values: dict[Any, Any] = {}  # Relax var -> slot id, or tuple of them

    def add(self, name: str, ty, kind: str, storage: int | None = None) -> int:
        if not hasattr(ty, "dtype") or ty.shape is None:
            raise AutocompError(f"MCU export: {name} is not a tensor of static shape")
        shape = tuple(int(d) for d in ty.shape)
        dtype = str(ty.dtype)
        index = len(self.slots)
        self.slots.append(Slot(name, shape, dtype, kind, index if storage is None else storage))
        return index

    def value(self, expr) -> Any:
        from tvm import ir, relax

        if isinstance(expr, ir.GenericConst):
            data = expr.value.numpy()
            index = self.add(f"const{len(self.constants)}", expr.ty, "constant")
            self.constants[index] = np.ascontiguousarray(data)
            return index
        if isinstance(expr, relax.Tuple):
            return tuple(self.value(item) for item in expr.fields)
        if isinstance(expr, relax.TupleGetItem):
            return self.value(expr.tuple_value)[expr.index]
        if isinstance(expr, ir.Var):
            return self.values[expr]
        raise AutocompError(f"MCU export: unsupported Relax expression {type(expr).__name__}")

    def bind(self, var, expr, used: set[str]) -> None:
        from tvm import relax

        name = f"t{len(self.slots)}"
        if not isinstance(expr, relax.Call):
            self.values[var] = self.value(expr)
            return
        op = getattr(expr.op, "name", None)
        if op == "relax.reshape":
            source = self.value(expr.args[0])
            base = self.slots[source]
            self.values[var] = self.add(name, var.ty, base.kind, base.storage)
            return
        if op != "relax.call_tir":
            raise AutocompError(f"MCU export: operator {op or expr.op} was not lowered to a C kernel")
        kernel = expr.args[0].name_hint
        inputs = tuple(self.value(arg) for arg in expr.args[1].fields)
        types = var.ty.fields if isinstance(var.ty, relax.TupleType) else [var.ty]
        outputs = tuple(self.add(f"{name}_{i}" if len(types) > 1 else name, ty, "activation")
                        for i, ty in enumerate(types))
        self.steps.append(Step(kernel, inputs + outputs))
        used.add(kernel)
        self.values[var] = outputs if len(types) > 1 else outputs[0]


def _workspace_peaks(source: str) -> dict[str, int]:
    """Per kernel, the most workspace it holds at once (allocations nest, and are freed
    in reverse), read from TVM's generated C: what ``TVMBackendAllocWorkspace`` will be
    asked for."""
    starts = list(_KERNEL_START.finditer(source))
    peaks: dict[str, int] = {}
    for start, end in zip(starts, [*starts[1:], None], strict=True):
        body = source[start.end():end.start() if end else len(source)]
        if body.count("TVMBackendAllocWorkspace(") != len(_WORKSPACE_ALLOC.findall(body)):
            raise AutocompError(f"MCU export: cannot read the workspace requests of kernel "
                                f"{start.group(1)} in TVM's generated C")
        events = sorted([(m.start(), m.group(1), int(m.group(2))) for m in _WORKSPACE_ALLOC.finditer(body)]
                        + [(m.start(), m.group(1), None) for m in _WORKSPACE_FREE.finditer(body)])
        held: list[tuple[str, int]] = []
        peak = 0
        for _, name, size in events:
            if size is not None:
                held.append((name, aligned(size)))
                peak = max(peak, sum(s for _, s in held))
            elif held and held[-1][0] == name:
                held.pop()
        peaks[start.group(1)] = peak
    return peaks


def lower_program(model: nn.Module, input_shape: tuple[int, ...], target: dict[str, Any] | None = None,
                  *, checks: bool = False) -> McuProgram:
    """Lower ``model`` to the static kernel schedule the MCU export builds.

    ``checks`` keeps the argument checks TVM puts in every kernel (shapes, dtypes,
    strides of each tensor descriptor): they make the kernels' code about ten times
    larger, so the artefact leaves them out unless asked.
    """
    import tvm

    from autocomp.hardware.compile.lower import to_relax

    target_dict = dict(target or DEFAULT_TARGET)
    if target_dict.get("kind") != "c":
        raise AutocompError(f"the MCU export needs a TVM 'c' target, not {target_dict.get('kind')!r}")
    tvm_target = tvm.target.Target(target_dict)
    module = _lower_relax(to_relax(model, input_shape), tvm_target)
    main = module["main"]
    if len(main.params) != 1:
        raise AutocompError(f"MCU export: the model takes {len(main.params)} inputs; one is supported")
    builder = _ScheduleBuilder()
    builder.values[main.params[0]] = builder.add("input", main.params[0].ty, "input")
    used: set[str] = set()
    for block in main.body.blocks:
        for binding in block.bindings:
            builder.bind(binding.var, binding.value, used)
    result = builder.value(main.body.body)
    while isinstance(result, tuple):
        if len(result) != 1:
            raise AutocompError(f"MCU export: the model has {len(result)} outputs; one is supported")
        result = result[0]
    if builder.slots[result].kind == "constant":
        raise AutocompError("MCU export: the model's output is a constant")
    kernels = tvm.IRModule({gvar: func for gvar, func in module.functions.items()
                            if isinstance(func, tvm.tirx.PrimFunc) and gvar.name_hint in used})
    config = {} if checks else {"tirx.disable_assert": True}
    with tvm.transform.PassContext(config=config):
        source = tvm.tirx.build(kernels, target=tvm_target).inspect_source()
    peaks = _workspace_peaks(source)
    steps = []
    for step in builder.steps:
        need = peaks.get(step.kernel, 0)
        workspace = None
        if need:
            workspace = len(builder.slots)
            builder.slots.append(Slot(f"ws{len(steps)}", (need,), "uint8", "workspace", workspace))
        steps.append(Step(step.kernel, step.args, workspace))
    return McuProgram(target_dict, builder.slots, steps, builder.constants,
                      builder.values[main.params[0]], result, source, checks)


def lifetimes(program: McuProgram) -> dict[int, tuple[int, int]]:
    """(first, last) time each storage slot is live (see ``ArenaPlan`` for the clock)."""
    span: dict[int, list[int]] = {program.input: [0, 0]}
    slots = program.slots
    for time, step in enumerate(program.steps, start=1):
        for arg in step.args:
            root = slots[arg].storage
            if slots[root].kind == "constant":
                continue
            if root in span:
                span[root][1] = time
            else:
                span[root] = [time, time]
        if step.workspace is not None:
            span[step.workspace] = [time, time]
    end = len(program.steps) + 1
    span[slots[program.output].storage][1] = end
    return {root: (first, last) for root, (first, last) in span.items()}


def plan_arena(program: McuProgram) -> ArenaPlan:
    """Offsets of every storage slot in one arena, greedy by size (largest first, each
    at the lowest aligned offset free of the buffers live at the same time)."""
    life = lifetimes(program)
    sizes = {root: aligned(program.slots[root].nbytes) for root in life}
    offsets: dict[int, int] = {}
    for root in sorted(life, key=lambda r: (-sizes[r], life[r][0], r)):
        first, last = life[root]
        taken = sorted((offsets[other], offsets[other] + sizes[other]) for other in offsets
                       if life[other][0] <= last and first <= life[other][1])
        offset = 0
        for start, stop in taken:
            if offset + sizes[root] <= start:
                break
            offset = max(offset, stop)
        offsets[root] = offset
    horizon = len(program.steps) + 2
    live = tuple(sum(program.slots[r].nbytes for r, (a, b) in life.items() if a <= t <= b)
                 for t in range(horizon))
    size = max((offsets[r] + sizes[r] for r in offsets), default=0)
    return ArenaPlan(offsets, life, size, live)
