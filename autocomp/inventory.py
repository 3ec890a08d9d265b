"""The layer inventory: one pass over the exported graph gives each compressible layer's
shapes, parameters, MACs and activation bytes, and torch-pruning's dependency graph
gives the channel coupling (residual adds, concatenation, depthwise convs) that
structured pruning must respect.
"""

from collections.abc import Iterator
from dataclasses import asdict, dataclass, field

import torch
import torch_pruning as tp
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten, tree_unflatten

from autocomp.errors import AutocompError

_CONV_OPS = {torch.ops.aten.conv1d.default, torch.ops.aten.conv2d.default}
_LINEAR_OPS = {torch.ops.aten.linear.default}


@dataclass
class LayerInfo:
    """One conv or linear layer as the compressor sees it."""

    name: str
    kind: str  # conv, dwconv (depthwise), gconv (grouped), linear
    in_shape: list[int]
    out_shape: list[int]
    in_channels: int
    out_channels: int
    kernel: list[int]
    groups: int
    params: int
    macs: int
    act_bytes: int
    prune_group: str | None = None  # leader of the coupled-channel group its outputs belong to
    coupled: list[str] = field(default_factory=list)  # other layers pruned with it
    is_output: bool = False  # its output channels are the model's outputs


@dataclass
class Inventory:
    """All compressible layers of a model at one input shape, plus totals."""

    input_shape: list[int]
    layers: list[LayerInfo]
    params: int
    macs: int
    act_bytes: int
    notes: list[str] = field(default_factory=list)

    def layer(self, name: str) -> LayerInfo:
        for layer in self.layers:
            if layer.name == name:
                return layer
        raise KeyError(name)

    @property
    def names(self) -> list[str]:
        return [layer.name for layer in self.layers]

    def prune_leaders(self) -> list[str]:
        """Layers that each stand for one prunable group of coupled channels."""
        return [layer.name for layer in self.layers if layer.prune_group == layer.name]

    def to_json(self) -> dict:
        return {
            "input_shape": self.input_shape,
            "layers": [asdict(layer) for layer in self.layers],
            "totals": {"params": self.params, "macs": self.macs, "act_bytes": self.act_bytes,
                       "layers": len(self.layers)},
            "notes": self.notes,
        }


def export_model(model: nn.Module, example: torch.Tensor) -> torch.export.ExportedProgram:
    """``torch.export`` the model in eval mode, turning failures into one-line errors."""
    try:
        return torch.export.export(model.eval(), (example,))
    except Exception as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise AutocompError(f"torch.export cannot trace the model: {first}") from None


def build_inventory(model: nn.Module, input_shape: tuple[int, ...], *,
                    coupling: bool = True) -> Inventory:
    """Inventory ``model`` for inputs of ``input_shape`` (batch included).

    ``coupling=False`` skips the pruning dependency graph when only figures are needed.
    """
    example = torch.randn(*input_shape)
    try:
        with torch.no_grad():
            model.eval()(example)
    except Exception as err:
        raise AutocompError(f"model does not run on input shape {list(input_shape)}: {err}") from None
    program = export_model(model, example)
    layers = _layers_from_graph(model, program)
    _mark_outputs(layers, program)
    notes = _add_coupling(model, example, layers) if coupling else []
    params = sum(p.numel() for p in model.parameters())
    return Inventory(list(input_shape), list(layers.values()), params,
                     sum(layer.macs for layer in layers.values()),
                     sum(layer.act_bytes for layer in layers.values()), notes)


def _module_name(node: torch.fx.Node) -> str | None:
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return None
    return list(stack.values())[-1][0]


def _layers_from_graph(model: nn.Module, program: torch.export.ExportedProgram) -> dict[str, LayerInfo]:
    layers: dict[str, LayerInfo] = {}
    for node in program.graph.nodes:
        if node.op != "call_function" or node.target not in _CONV_OPS | _LINEAR_OPS:
            continue
        name = _module_name(node)
        if name is None:
            continue
        module = model.get_submodule(name)
        in_shape = list(node.args[0].meta["val"].shape)
        out_val = node.meta["val"]
        out_shape = list(out_val.shape)
        if node.target in _CONV_OPS:
            groups = module.groups
            kernel = list(module.kernel_size)
            per_output = (module.in_channels // groups) * int(torch.tensor(kernel).prod())
            kind = ("dwconv" if groups == module.in_channels and groups > 1
                    else "gconv" if groups > 1 else "conv")
            in_ch, out_ch = module.in_channels, module.out_channels
        else:
            groups, kernel, kind = 1, [], "linear"
            per_output = module.in_features
            in_ch, out_ch = module.in_features, module.out_features
        macs = out_val.numel() * per_output
        act = out_val.numel() * out_val.element_size()
        if name in layers:  # a module called more than once: its work adds up
            layers[name].macs += macs
            layers[name].act_bytes += act
            continue
        params = sum(p.numel() for p in module.parameters(recurse=False))
        layers[name] = LayerInfo(name, kind, in_shape, out_shape, in_ch, out_ch, kernel, groups,
                                 params, macs, act)
    if not layers:
        raise AutocompError("the model has no Conv1d/Conv2d/Linear layer to compress")
    return layers


def _mark_outputs(layers: dict[str, LayerInfo], program: torch.export.ExportedProgram) -> None:
    """Flag layers whose output channels reach the model output unchanged."""
    output = next(node for node in program.graph.nodes if node.op == "output")
    stack = _flatten_nodes(output.args)
    seen: set[torch.fx.Node] = set()
    while stack:
        node = stack.pop()
        if node in seen or node.op != "call_function":
            continue
        seen.add(node)
        if node.target in _CONV_OPS | _LINEAR_OPS:
            name = _module_name(node)
            if name in layers:
                layers[name].is_output = True
            continue
        # Activations, pooling, reshapes and adds keep channels: look further back.
        stack.extend(_flatten_nodes(node.args))


def _flatten_nodes(args: object) -> list[torch.fx.Node]:
    found: list[torch.fx.Node] = []
    torch.fx.node.map_arg(args, found.append)
    return found


_ROOT_TYPES = (nn.Conv1d, nn.Conv2d, nn.Linear)
# Ops that always split, join or reorder channels: torch-pruning's index mapping for them is
# unreliable once it has failed on a model, so the restricted graph never prunes through them.
_ALWAYS_OPAQUE = {
    "cat", "concat", "concatenate", "stack", "hstack", "vstack", "dstack",
    "split", "split_with_sizes", "chunk", "tensor_split", "unbind", "narrow", "__getitem__",
    "index_select", "gather", "expand", "expand_as", "broadcast_to", "repeat", "tile",
    "repeat_interleave", "channel_shuffle", "native_channel_shuffle", "pixel_shuffle", "pixel_unshuffle",
}
# Ops that rearrange a tensor: opaque unless channel c of the output is channel c of the input.
_REARRANGING = {
    "view", "reshape", "flatten", "unflatten", "view_as", "reshape_as", "squeeze", "unsqueeze",
    "transpose", "swapaxes", "swapdims", "permute", "movedim", "moveaxis", "t", "roll", "flip",
}


class _Opaque(torch.autograd.Function):
    """Computes a channel-rearranging op as one autograd node torch-pruning cannot see into."""

    @staticmethod
    def forward(ctx, op, *tensors):
        ctx.op = op
        ctx.save_for_backward(*tensors)
        out = op(*tensors)
        return tuple(t.clone() for t in out) if isinstance(out, tuple | list) else out.clone()

    @staticmethod
    def backward(ctx, *grads):
        inputs = [t.detach().requires_grad_() for t in ctx.saved_tensors]
        with torch.enable_grad():
            out = ctx.op(*inputs)
        outs = out if isinstance(out, tuple | list) else (out,)
        used = [(o, g) for o, g in zip(outs, grads, strict=True) if g is not None]
        found = torch.autograd.grad([o for o, _ in used], inputs, [g for _, g in used], allow_unused=True)
        return (None, *found)


def _keeps_channels(func, args: tuple, kwargs: dict) -> bool:
    """Whether ``func`` maps channel c (dim 1) of its tensor input to channel c of its output,
    checked on a probe whose elements hold their own (batch, channel) position."""
    x = args[0]
    if not isinstance(x, torch.Tensor) or x.dim() < 2:
        return False
    n, c = x.shape[:2]
    position = torch.arange(n * c, dtype=torch.float64)
    probe = position.view(n, c, *[1] * (x.dim() - 2)).expand(x.shape).contiguous()
    out = func(probe, *args[1:], **kwargs)
    if not isinstance(out, torch.Tensor) or out.dim() < 2 or out.shape[:2] != x.shape[:2]:
        return False
    return bool((out == position.view(n, c, *[1] * (out.dim() - 2))).all())


class _OpaqueRearrangements(TorchFunctionMode):
    """While active, ops that split, join or reorder channels run as ``_Opaque`` nodes."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        if name not in _ALWAYS_OPAQUE and name not in _REARRANGING:
            return func(*args, **kwargs)
        flat, spec = tree_flatten((args, kwargs))
        slots = [i for i, v in enumerate(flat)
                 if isinstance(v, torch.Tensor) and v.is_floating_point()]
        traced = torch.is_grad_enabled() and any(flat[i].requires_grad for i in slots)
        if not traced or (name in _REARRANGING and _keeps_channels(func, args, kwargs)):
            return func(*args, **kwargs)

        def op(*tensors: torch.Tensor):
            values = list(flat)
            for i, tensor in zip(slots, tensors, strict=True):
                values[i] = tensor
            call_args, call_kwargs = tree_unflatten(values, spec)
            return func(*call_args, **call_kwargs)

        return _Opaque.apply(op, *(flat[i] for i in slots))


def _is_opaque(node) -> bool:
    return getattr(node.grad_fn, "_forward_cls", None) is _Opaque


@dataclass
class PruneGraph:
    """torch-pruning's dependency graph of a model and its groups that are safe to prune.

    ``restricted`` says the plain graph failed (torch-pruning cannot map some channel split,
    join or shuffle, e.g. ShuffleNet's chunk + concat + channel shuffle) and the graph was
    rebuilt with every such op opaque: then only groups whose channels never reach one are
    kept, and ``reason`` is why the plain graph failed.
    """

    graph: tp.DependencyGraph
    groups: list[tp.Group]
    restricted: bool = False
    reason: str = ""

    def is_safe(self, group: tp.Group) -> bool:
        """Whether pruning ``group`` touches no op whose channel mapping is unknown."""
        return not any(_is_opaque(dep.target) for dep, _ in group)

    def members(self, group: tp.Group) -> list[nn.Module]:
        """The modules whose output channels the group removes."""
        found: list[nn.Module] = []
        for dep, _ in group:
            module = dep.target.module
            if (isinstance(module, nn.Module) and self.graph.is_out_channel_pruning_fn(dep.handler)
                    and module not in found):
                found.append(module)
        return found


def prune_graph(model: nn.Module, example: torch.Tensor,
                ignored: list[nn.Module] | None = None) -> PruneGraph:
    """Build the pruning dependency graph of ``model``, restricted to safe groups when needed.

    Groups that contain an ``ignored`` module (e.g. the output layers) are left out.
    Raises what torch-pruning raises when even the restricted graph cannot be built.
    """
    ignored = ignored or []
    try:
        with torch.enable_grad():  # torch-pruning traces through autograd
            graph = tp.DependencyGraph().build_dependency(model, example_inputs=example, verbose=False)
        pruning = PruneGraph(graph, [])
        pruning.groups = list(_safe_groups(pruning, ignored, strict=True))
        return pruning
    except Exception as err:
        reason = f"{type(err).__name__}: {str(err).strip()[:200]}"

    def forward(module: nn.Module, inputs: torch.Tensor) -> torch.Tensor:
        with _OpaqueRearrangements():
            return module(inputs)

    with torch.enable_grad():
        graph = tp.DependencyGraph().build_dependency(model, example_inputs=example, forward_fn=forward,
                                                       verbose=False)
    pruning = PruneGraph(graph, [], restricted=True, reason=reason)
    pruning.groups = list(_safe_groups(pruning, ignored, strict=False))
    return pruning


def _safe_groups(pruning: PruneGraph, ignored: list[nn.Module], strict: bool) -> Iterator[tp.Group]:
    """Each conv/linear's output-channel group once, skipping unsafe ones; ``strict`` re-raises
    torch-pruning's errors instead of treating the group as unsafe."""
    graph = pruning.graph
    visited: set[nn.Module] = set()
    for module in list(graph.module2node):
        if not isinstance(module, _ROOT_TYPES) or module in visited or module in ignored:
            continue
        pruner = graph.get_pruner_of_module(module)
        channels = pruner.get_out_channels(module) if pruner is not None else None
        if channels is None:
            continue
        try:
            group = graph.get_pruning_group(module, pruner.prune_out_channels, list(range(channels)))
        except Exception:
            if strict:
                raise
            visited.add(module)
            continue
        members = pruning.members(group)
        visited.update(members)
        if pruning.is_safe(group) and not any(m in ignored for m in members):
            yield group


def _add_coupling(model: nn.Module, example: torch.Tensor, layers: dict[str, LayerInfo]) -> list[str]:
    """Record the safe coupled-channel groups on the layers; returns notes for the user."""
    names = {module: name for name, module in model.named_modules()}
    order = list(layers)
    outputs = [model.get_submodule(name) for name, layer in layers.items() if layer.is_output]
    try:
        pruning = prune_graph(model, example, outputs)
    except Exception as err:  # an untraceable model is simply not prunable
        return [f"structured pruning is unavailable: torch-pruning could not trace the model "
                f"({type(err).__name__}: {str(err).strip()[:200]})"]
    for group in pruning.groups:
        members = [names[m] for m in pruning.members(group) if names.get(m) in layers]
        if not members:
            continue
        leader = min(members, key=order.index)
        for name in members:
            layers[name].prune_group = leader
            layers[name].coupled = [other for other in members if other != name]
    if pruning.restricted:
        return ["structured pruning is limited to channels that never reach a channel split, join or "
                f"shuffle, which torch-pruning cannot map here ({pruning.reason})"]
    return []
