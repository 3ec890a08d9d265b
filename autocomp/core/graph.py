"""A model's graph, two ways: ``torch.export`` (what the inventory and TVM's importer read),
and the structured-pruning dependency graph: torch-pruning's graph of which channels are
coupled, and, where torch-pruning cannot map a channel split, join or shuffle (ShuffleNet's
chunk + concat + channel shuffle), a rebuilt graph that treats such ops as opaque and offers
only the groups that never reach one.
"""

from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
import torch_pruning as tp
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten, tree_unflatten

from autocomp.core.errors import AutocompError


def export_model(model: nn.Module, example: torch.Tensor) -> torch.export.ExportedProgram:
    """``torch.export`` the model in eval mode, turning failures into one-line errors."""
    try:
        return torch.export.export(model.eval(), (example,))
    except Exception as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise AutocompError(f"torch.export cannot trace the model: {first}") from None


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
    kept, and ``reason`` is why the plain graph failed; ``unbuilt`` lists the layers whose
    group could not be built there.
    """

    graph: tp.DependencyGraph
    groups: list[tp.Group]
    restricted: bool = False
    reason: str = ""
    # Layers whose group torch-pruning failed to build (restricted graph only), with why:
    # they are not prunable.
    unbuilt: list[tuple[nn.Module, str]] = field(default_factory=list)

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
        except Exception as err:
            if strict:
                raise
            pruning.unbuilt.append((module, f"{type(err).__name__}: {str(err).strip()[:160]}"))
            visited.add(module)
            continue
        members = pruning.members(group)
        visited.update(members)
        if pruning.is_safe(group) and not any(m in ignored for m in members):
            yield group
