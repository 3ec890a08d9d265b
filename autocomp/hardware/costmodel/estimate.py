"""Per-op latency estimate for targets with no reachable device.

The model is walked once through ``torch.export`` (batch norms folded first, as the
compiled module folds them) and cut into kernels the way TVM's operator fusion cuts it:
each conv, dense, pool or other op starts a kernel, and an elementwise op (activation,
residual add, unfolded batch norm) joins the kernel that produced its input when it is
that tensor's only consumer. Shape-only ops (view, flatten) and work on constants cost
nothing. Each kernel has an op kind (conv, dwconv, gconv, dense, elementwise, pool,
other), its MACs (one per element for ops without multiply-accumulates), the bytes it
moves (activations read and written plus weights at their stored widths) and a compute
dtype: int8 when the layer is quantized with integer activations and the target runs
int8, else float32.

Time of a kernel, with constants from the profile's ``cost_model``::

    compute  = MACs / (clock_hz * macs_per_cycle[dtype] * efficiency_KIND
                       [* int8_efficiency] * speedup(threads))
    memory   = bytes / bandwidth_bytes_per_s
    time     = max(compute, memory) + kernel_overhead_s
    speedup(n) = 1 / ((1 - parallel_fraction) + parallel_fraction / min(n, cores))

``max`` is the roofline: a compiled kernel streams its operands while the multiply units
work, so the slower of the two bounds it; a sum would count overlapped work twice, and
with the few published figures a fit has, two additive terms cannot be told apart.
Memory bandwidth is shared by the cores, so only compute scales with threads, and
Amdahl's parallel fraction absorbs synchronisation: together they give the weak thread
scaling seen on the Cortex-A53 (shared/ANCHORS.md).

Spread: the estimate is the median; p10 and p90 are ``median * exp(-+1.2816 * s)`` with
``s = spread_log_sd``, the RMS of the leave-one-out log errors of the calibration that
fitted the constants (``autocomp calibrate``), so the band is the model's own measured
error, not a guess. An uncalibrated profile uses a factor-2 prior and says so.
"""

import math
from dataclasses import dataclass, field, replace

import numpy as np
import torch
from torch import nn

from autocomp.hardware.measure.base import Latency
from autocomp.hardware.profiles import HardwareProfile

KINDS = ("conv", "dwconv", "gconv", "dense", "elementwise", "pool", "other")
HARDWARE_CONSTANTS = ("clock_hz", "cores", "macs_per_cycle_fp32", "macs_per_cycle_int8",
                      "bandwidth_bytes_per_s")
# Starting values of the fitted constants (what an uncalibrated profile uses): fractions
# of peak typical of tuned CPU kernels at batch 1; a calibration replaces them.
PRIORS = {
    "efficiency_conv": 0.5, "efficiency_dwconv": 0.15, "efficiency_gconv": 0.3, "efficiency_dense": 0.3,
    "efficiency_elementwise": 0.25, "efficiency_pool": 0.25, "efficiency_other": 0.1,
    "int8_efficiency": 0.75, "parallel_fraction": 0.9, "kernel_overhead_s": 1.0e-5,
}
UNCALIBRATED_LOG_SD = math.log(2.0)
Z90 = 1.2815516  # standard normal 90th percentile

_FREE = {"view", "reshape", "_unsafe_view", "flatten", "unsqueeze", "squeeze", "expand", "contiguous",
         "clone", "detach", "alias", "dropout", "feature_dropout", "_to_copy", "to", "type_as",
         "lift_fresh_copy", "identity", "getitem"}
_CONV = {"conv1d", "conv2d", "conv3d", "convolution", "conv_transpose1d", "conv_transpose2d", "int_conv"}
_DENSE = {"linear", "matmul", "mm", "addmm", "bmm", "baddbmm", "int_linear"}
_INTEGER = {"int_conv", "int_linear"}  # autocomp.hardware.compile.int8's uint8 x int8 -> int32 ops
_POOL = {"max_pool1d", "max_pool2d", "max_pool2d_with_indices", "avg_pool1d", "avg_pool2d",
         "adaptive_avg_pool1d", "adaptive_avg_pool2d", "adaptive_max_pool2d", "mean", "sum", "amax"}
_ELEMENTWISE = {"add", "sub", "mul", "div", "relu", "relu6", "hardtanh", "clamp", "clamp_min", "clamp_max",
                "sigmoid", "hardsigmoid", "hardswish", "silu", "gelu", "tanh", "round", "neg", "exp", "log",
                "sqrt", "rsqrt", "pow", "abs", "leaky_relu", "elu", "where", "maximum", "minimum",
                "batch_norm", "_native_batch_norm_legit_no_training", "rsub", "reciprocal"}


@dataclass(frozen=True)
class Op:
    """One kernel of the compiled model, as the cost model sees it."""

    name: str
    kind: str
    macs: int
    bytes: int
    dtype: str  # float32 or int8
    fused: tuple[str, ...] = ()  # elementwise ops folded into this kernel


@dataclass(frozen=True)
class OpCost:
    """An op with its estimated compute, memory and overhead time (seconds)."""

    op: Op
    compute_s: float
    memory_s: float
    overhead_s: float

    @property
    def seconds(self) -> float:
        return max(self.compute_s, self.memory_s) + self.overhead_s

    @property
    def bound(self) -> str:
        return "compute" if self.compute_s >= self.memory_s else "memory"


@dataclass(frozen=True)
class Estimate:
    """An estimated latency and the per-op breakdown behind it."""

    latency: Latency
    ops: list[OpCost]
    threads: int

    def table(self) -> str:
        """The per-op breakdown as text, slowest share first within model order."""
        total = sum(cost.seconds for cost in self.ops) or 1.0
        lines = [f"{'op':<36} {'kind':<11} {'dtype':<7} {'MMACs':>9} {'KB moved':>9} {'us':>9} "
                 f"{'share':>6}  bound"]
        for cost in self.ops:
            op = cost.op
            lines.append(f"{op.name[:36]:<36} {op.kind:<11} {op.dtype:<7} {op.macs / 1e6:>9.3f} "
                         f"{op.bytes / 1024:>9.1f} {cost.seconds * 1e6:>9.1f} {cost.seconds / total:>6.1%}  "
                         f"{cost.bound}")
        lines.append(f"total {total * 1e3:.3f} ms over {len(self.ops)} kernels, {self.threads} threads; "
                     f"{self.latency.provenance}")
        return "\n".join(lines)

    def to_json(self) -> dict:
        return {"latency": self.latency.to_json(), "threads": self.threads,
                "ops": [{"name": c.op.name, "kind": c.op.kind, "dtype": c.op.dtype, "macs": c.op.macs,
                         "bytes": c.op.bytes, "fused": list(c.op.fused), "compute_s": c.compute_s,
                         "memory_s": c.memory_s, "overhead_s": c.overhead_s, "seconds": c.seconds}
                        for c in self.ops]}


@dataclass
class _Kernel:
    name: str
    kind: str
    macs: int
    bytes: int
    dtype: str
    fused: list[str] = field(default_factory=list)


def _op_name(node: torch.fx.Node) -> str:
    """``add`` for aten.add.Tensor, ``relu`` for aten.relu_.default, ``getitem`` for operator.getitem."""
    target = node.target
    packet = getattr(target, "overloadpacket", None)
    name = packet.__name__ if packet is not None else getattr(target, "__name__", str(target))
    return name.rstrip("_")


def _module_name(node: torch.fx.Node) -> str:
    stack = node.meta.get("nn_module_stack")
    return list(stack.values())[-1][0] if stack else ""


def _tensors(node: torch.fx.Node) -> list[torch.Tensor]:
    val = node.meta.get("val")
    values = val if isinstance(val, list | tuple) else [val]
    return [v for v in values if isinstance(v, torch.Tensor)]


def _tensor_bytes(node: torch.fx.Node, esize: int | None = None) -> int:
    """Bytes of the node's tensor(s), at ``esize`` bytes per element if given."""
    return sum(v.numel() * (esize if esize is not None else v.element_size()) for v in _tensors(node))


def _numel(node: torch.fx.Node) -> int:
    return sum(v.numel() for v in _tensors(node))


def _conv_work(node: torch.fx.Node) -> tuple[str, int]:
    """Kind and MACs of a convolution node (aten convs and the integer ``int_conv``)."""
    name, args = _op_name(node), node.args
    x, weight = args[0].meta["val"], args[1].meta["val"]
    transposed = name.startswith("conv_transpose") or (name == "convolution" and bool(args[6]))
    group_arg = {"convolution": 8, "int_conv": 11}.get(name, 6)
    groups = args[group_arg] if len(args) > group_arg else 1
    per_output = math.prod(weight.shape[1:])
    macs = x.numel() * per_output if transposed else node.meta["val"].numel() * per_output
    kind = "conv" if groups == 1 else "dwconv" if groups == x.shape[1] else "gconv"
    return kind, int(macs)


def _dense_macs(node: torch.fx.Node) -> int:
    name, args = _op_name(node), node.args
    # linear(x, W[out, in]) and addmm(bias, a, b) take the inner size from their second argument.
    inner = args[1 if name in ("linear", "int_linear", "addmm", "baddbmm") else 0].meta["val"].shape[-1]
    return int(node.meta["val"].numel() * inner)


def list_ops(model: nn.Module, input_shape: tuple[int, ...], *, assume_dtype: str | None = None) -> list[Op]:
    """The kernels of ``model`` at ``input_shape`` (see the module docstring).

    The model is lowered as ``autocomp.hardware.compile.lower`` lowers it for TVM: quantized
    layers with integer activations become int8 ops (reading fp32 activations, which
    they quantize themselves, and int8 weights: sub-8-bit weights are held as int8 in
    the compiled module, so that is what a kernel reads; ``storage_bytes()`` is their
    packed size on disk) and batch norms are folded. ``assume_dtype="int8"`` treats
    every conv and dense op as int8 with 8-bit weights, for published int8 figures of
    float models.
    """
    from autocomp.core.graph import export_model
    from autocomp.hardware.compile.int8 import integer_model
    from autocomp.hardware.compile.lower import fold_batchnorm

    lowered = fold_batchnorm(integer_model(model).module)
    program = export_model(lowered, torch.zeros(*input_shape))
    user_inputs = set(program.graph_signature.user_inputs)

    dynamic: set[torch.fx.Node] = set()
    alias: dict[torch.fx.Node, torch.fx.Node] = {}
    ops: list[torch.fx.Node] = []
    for node in program.graph.nodes:
        if node.op == "placeholder":
            if node.name in user_inputs:
                dynamic.add(node)
            continue
        if node.op != "call_function":
            continue
        inputs = [arg for arg in node.all_input_nodes if arg in dynamic]
        if not inputs:
            continue  # work on constants only: folded at compile time
        dynamic.add(node)
        if _op_name(node) in _FREE or not _tensors(node):
            alias[node] = alias.get(inputs[0], inputs[0])
            continue
        ops.append(node)

    def source(node: torch.fx.Node) -> torch.fx.Node:
        return alias.get(node, node)

    users: dict[torch.fx.Node, int] = {}
    for node in ops:
        for arg in {source(a) for a in node.all_input_nodes if a in dynamic}:
            users[arg] = users.get(arg, 0) + 1
    output = next(node for node in program.graph.nodes if node.op == "output")
    for arg in output.all_input_nodes:
        users[source(arg)] = users.get(source(arg), 0) + 1

    kernels: list[_Kernel] = []
    produced: dict[torch.fx.Node, _Kernel] = {}  # tensor -> the kernel that writes it
    for node in ops:
        name = _op_name(node)
        label = _module_name(node) or node.name
        inputs = list(dict.fromkeys(source(a) for a in node.all_input_nodes if a in dynamic))
        constants = [a for a in node.all_input_nodes if a not in dynamic]
        if name in _ELEMENTWISE:
            host = next((produced[t] for t in inputs if t in produced and users.get(t, 0) == 1), None)
            if host is not None:  # fused into the kernel that produced its input
                previous = next(t for t in inputs if produced.get(t) is host)
                extra = [t for t in inputs if produced.get(t) is not host]
                host.bytes += sum(_tensor_bytes(t) for t in extra) + sum(_tensor_bytes(c) for c in constants)
                host.bytes += (_numel(node) - _numel(previous)) * 4  # it writes this instead
                host.fused.append(f"{label} ({name})")
                produced[node] = host
                continue
        if name in _CONV:
            kind, macs = _conv_work(node)
        elif name in _DENSE:
            kind, macs = "dense", _dense_macs(node)
        elif name in _POOL:
            kind, macs = "pool", sum(_numel(t) for t in inputs)
        elif name in _ELEMENTWISE:
            kind, macs = "elementwise", _numel(node)
        else:
            kind, macs = "other", _numel(node)
        assumed = assume_dtype == "int8" and name in _CONV | _DENSE
        if assumed:  # int8 weights, fp32 bias
            weights = sum(_tensor_bytes(c, 4 if c.meta["val"].dim() == 1 else 1) for c in constants)
        else:
            weights = sum(_tensor_bytes(c) for c in constants)
        moved = sum(_tensor_bytes(t) for t in inputs) + weights + _tensor_bytes(node)
        kernel = _Kernel(label if kind != "elementwise" else f"{label} ({name})", kind, macs, moved,
                         "int8" if assumed or name in _INTEGER else "float32")
        kernels.append(kernel)
        produced[node] = kernel
    return [Op(k.name, k.kind, k.macs, k.bytes, k.dtype, tuple(k.fused)) for k in kernels]


def aggregate_op(macs: float, dtype: str) -> Op:
    """A whole model known only by its MAC count, as one conv-kind kernel (no memory term)."""
    return Op("all layers (aggregate MACs)", "conv", int(macs), 0, dtype)


class CostModel:
    """The cost-model formula with one profile's constants (see the module docstring)."""

    def __init__(self, constants: dict[str, float]) -> None:
        missing = [name for name in HARDWARE_CONSTANTS if name not in constants]
        if missing:
            raise ValueError(f"cost model lacks hardware constants {missing}")
        self.constants = {**PRIORS, **constants}

    @classmethod
    def for_profile(cls, profile: HardwareProfile) -> "CostModel":
        from autocomp.core.errors import AutocompError

        try:
            return cls(profile.cost_model.constants)
        except ValueError as err:
            raise AutocompError(f"{profile.source}: cost_model.constants: {err}") from None

    def speedup(self, threads: int) -> float:
        n = max(1, min(threads, int(self.constants["cores"])))
        p = self.constants["parallel_fraction"]
        return 1.0 / ((1.0 - p) + p / n)

    def costs(self, ops: list[Op], threads: int, clock_hz: float | None = None) -> list[OpCost]:
        c = self.constants
        clock = clock_hz or c["clock_hz"]
        speedup = self.speedup(threads)
        result = []
        for op in ops:
            peak = clock * (c["macs_per_cycle_int8"] * c["int8_efficiency"] if op.dtype == "int8"
                            else c["macs_per_cycle_fp32"])
            compute = op.macs / (peak * c[f"efficiency_{op.kind}"] * speedup)
            result.append(OpCost(op, compute, op.bytes / c["bandwidth_bytes_per_s"], c["kernel_overhead_s"]))
        return result

    def seconds(self, ops: list[Op], threads: int, clock_hz: float | None = None) -> float:
        return sum(cost.seconds for cost in self.costs(ops, threads, clock_hz))


class OpArrays:
    """The ops of one model as arrays, for evaluating many sets of constants quickly (fits)."""

    def __init__(self, ops: list[Op]) -> None:
        self.macs = np.array([op.macs for op in ops], dtype=float)
        self.bytes = np.array([op.bytes for op in ops], dtype=float)
        self.int8 = np.array([op.dtype == "int8" for op in ops])
        self.kind = np.array([KINDS.index(op.kind) for op in ops], dtype=int)
        self.count = len(ops)

    def seconds(self, c: dict[str, float], threads: int, clock_hz: float) -> float:
        n = max(1, min(threads, int(c["cores"])))
        p = c["parallel_fraction"]
        speedup = 1.0 / ((1.0 - p) + p / n)
        efficiency = np.array([c[f"efficiency_{kind}"] for kind in KINDS])[self.kind]
        peak = clock_hz * np.where(self.int8, c["macs_per_cycle_int8"] * c["int8_efficiency"],
                                   c["macs_per_cycle_fp32"])
        compute = self.macs / (peak * efficiency * speedup)
        memory = self.bytes / c["bandwidth_bytes_per_s"]
        return float(np.maximum(compute, memory).sum() + self.count * c["kernel_overhead_s"])


def default_threads(profile: HardwareProfile) -> int:
    """Threads an estimate assumes: the profile's, or every SM of a GPU."""
    if profile.latency.device == "cuda":
        return int(profile.cost_model.constants.get("cores", 1))
    return profile.latency.threads


def provenance(profile: HardwareProfile, threads: int) -> str:
    cost = profile.cost_model
    calibrated = "" if "spread_log_sd" in cost.constants else "; uncalibrated, spread is a factor-2 prior"
    return (f"estimated ({profile.name} cost model {cost.version}, fitted to {cost.fitted_to}, "
            f"{threads} threads{calibrated})")


def estimate(model: nn.Module, input_shape: tuple[int, ...], profile: HardwareProfile, *,
             threads: int | None = None) -> Estimate:
    """Estimated latency of ``model`` on the profile's target, with the per-op breakdown."""
    threads = threads or default_threads(profile)
    cost_model = CostModel.for_profile(profile)
    costs = cost_model.costs(list_ops(model, input_shape), threads)
    median = sum(cost.seconds for cost in costs)
    spread = profile.cost_model.constants.get("spread_log_sd", UNCALIBRATED_LOG_SD)
    points = int(profile.cost_model.constants.get("calibration_points", 0))
    latency = Latency(median, median * math.exp(-Z90 * spread), median * math.exp(Z90 * spread), points,
                      "estimated", provenance(profile, threads))
    return Estimate(latency, costs, threads)


class EstimateMeasurer:
    """The ``Measurer`` of profiles whose latency method is ``estimate``.

    ``Latency.samples`` of an estimate is the number of calibration points its spread
    comes from (0 when uncalibrated).
    """

    def __init__(self, profile: HardwareProfile, *, fallback_reason: str | None = None) -> None:
        self.profile = profile
        self.fallback_reason = fallback_reason

    def set_reference(self, model: nn.Module, input_shape: tuple[int, ...],
                      baseline_s: float | None = None) -> Latency:
        """The reference's estimate: an estimate has no load to cancel, so nothing is kept."""
        return self.measure(model, input_shape)

    def measure(self, model: nn.Module, input_shape: tuple[int, ...]) -> Latency:
        latency = estimate(model, input_shape, self.profile).latency
        if self.fallback_reason:
            latency = replace(latency, provenance=latency.provenance[:-1] + f"; {self.fallback_reason})")
        return latency

    def close(self) -> None:
        pass
