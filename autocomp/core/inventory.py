"""The layer inventory: one pass over the exported graph gives each compressible layer's
shapes, parameters, MACs and activation bytes, and torch-pruning's dependency graph
gives the channel coupling (residual adds, concatenation, depthwise convs) that
structured pruning must respect.
"""

import math
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from autocomp.core.errors import AutocompError
from autocomp.core.graph import export_model, prune_graph

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


def count_macs(model: nn.Module, input_shape: tuple[int, ...]) -> int:
    """The multiply-accumulates of ``model``'s conv and linear layers at ``input_shape``, as
    ``build_inventory`` counts them, from one eager forward pass with hooks: a trial needs
    only this figure, and ``torch.export`` would cost it about a second."""
    total = 0

    def add(module: nn.Module, _inputs: tuple, output: torch.Tensor) -> None:
        nonlocal total
        if isinstance(module, nn.Linear):
            per_output = module.in_features
        else:
            per_output = (module.in_channels // module.groups) * math.prod(module.kernel_size)
        total += output.numel() * per_output

    hooks = [module.register_forward_hook(add) for module in model.modules()
             if isinstance(module, nn.Conv1d | nn.Conv2d | nn.Linear)]
    try:
        with torch.no_grad():
            model.eval()(torch.zeros(*input_shape))
    finally:
        for hook in hooks:
            hook.remove()
    return total


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
    notes = []
    if pruning.restricted:
        notes.append("structured pruning is limited to channels that never reach a channel split, join "
                     f"or shuffle, which torch-pruning cannot map here ({pruning.reason})")
    for module, reason in pruning.unbuilt:
        notes.append(f"{names.get(module, type(module).__name__)} is not prunable: torch-pruning could not "
                     f"build its channel group ({reason})")
    return notes
