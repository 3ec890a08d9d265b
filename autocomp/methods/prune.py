"""Structured filter pruning: whole output channels removed, coupled channels removed together.

torch-pruning's dependency graph finds every layer tied to a pruned channel
(residual adds, concatenation, depthwise convs, batch norms) and slices them all,
so the result is a real, smaller, valid network.
"""

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch_pruning as tp
from torch import nn

from autocomp.inventory import LayerInfo
from autocomp.methods import ApplyContext, MethodConfig, register_method

CRITERIA = {"l1": 1, "l2": 2}


@dataclass(frozen=True)
class PruneConfig(MethodConfig):
    """Remove ``ratio`` of the output channels of a layer's coupled group, least important first."""

    method: ClassVar[str] = "prune"
    stage: ClassVar[int] = 0
    ratio: float
    criterion: str = "l1"

    def check(self) -> None:
        if not 0.0 < self.ratio < 1.0:
            raise ValueError(f"prune ratio {self.ratio} is outside (0, 1)")
        if self.criterion not in CRITERIA:
            raise ValueError(f"prune criterion {self.criterion!r} is not one of {sorted(CRITERIA)}")

    @classmethod
    def ineligible(cls, layer: LayerInfo) -> str | None:
        if layer.is_output:
            return "its output channels are the model's outputs"
        if layer.prune_group is None:
            return "it belongs to no prunable channel group"
        if layer.prune_group != layer.name:
            return f"its channels are coupled to {layer.prune_group}, which leads their pruning"
        return None


def kept_channels(channels: int, ratio: float, multiple: int = 1) -> int:
    """Channels left after pruning ``ratio``, rounded to ``multiple`` (at least one multiple)."""
    wanted = channels * (1.0 - ratio)
    rounded = multiple * int(wanted / multiple + 0.5)
    return max(min(multiple, channels), min(rounded, channels), 1)


@register_method(PruneConfig)
def apply_prune(model: nn.Module, choices: dict[str, PruneConfig], ctx: ApplyContext) -> None:
    """Prune each chosen group leader's coupled channels in place."""
    graph = tp.DependencyGraph().build_dependency(model, example_inputs=ctx.example, verbose=False)
    for name, config in choices.items():
        module = model.get_submodule(name)
        pruner = graph.get_pruner_of_module(module)
        channels = pruner.get_out_channels(module)
        keep = kept_channels(channels, config.ratio, ctx.channel_multiple)
        if keep >= channels:
            continue
        group = graph.get_pruning_group(module, pruner.prune_out_channels, list(range(channels)))
        importance = tp.importance.GroupMagnitudeImportance(p=CRITERIA[config.criterion])
        with torch.no_grad():
            scores = importance(group)
        drop = torch.argsort(scores)[: channels - keep].tolist()
        graph.get_pruning_group(module, pruner.prune_out_channels, sorted(drop)).prune()
