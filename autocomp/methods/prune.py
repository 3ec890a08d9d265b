"""Structured filter pruning: whole output channels removed, coupled channels removed together.

torch-pruning's dependency graph finds every layer tied to a pruned channel
(residual adds, concatenation, depthwise convs, batch norms) and slices them all,
so the result is a real, smaller, valid network. Where torch-pruning cannot map a
model's channel splits or shuffles (ShuffleNet), only the groups whose channels
never reach one are offered (see ``autocomp.core.graph.prune_graph``).

Which channels go is decided per coupled group by a criterion, all computed by
torch-pruning's importance classes over every layer of the group:

- ``l1`` / ``l2``: a channel's weight magnitudes (sum of |w| or w^2) over the group:
  producers' filters, BatchNorm scales, consumers' input weights (Li et al., ICLR
  2017, extended to the group);
- ``bn_scale``: |gamma| of the group's BatchNorms (network slimming, Liu et al.,
  ICCV 2017), meaningful after training with an L1 penalty on gamma
  (``autocomp.training.regularizers``);
- ``taylor``: first-order Taylor, sum of |w * dL/dw| over the channel's conv and
  linear weights in the group (Molchanov et al., CVPR 2019), with L the
  cross-entropy on the calibration batches.
"""

from collections.abc import Iterable
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
import torch_pruning as tp
from torch import nn

from autocomp.core.errors import AutocompError
from autocomp.core.graph import prune_graph
from autocomp.core.inventory import LayerInfo
from autocomp.methods.registry import ApplyContext, MethodConfig, Stage, register_method

CRITERIA = ("l1", "l2", "bn_scale", "taylor")
Batches = Iterable[tuple[torch.Tensor, torch.Tensor]]


@dataclass(frozen=True)
class PruneConfig(MethodConfig):
    """Remove ``ratio`` of the output channels of a layer's coupled group, least important first
    by ``criterion`` (one of ``CRITERIA``)."""

    method: ClassVar[str] = "prune"
    stage: ClassVar[Stage] = Stage.PRUNE
    ratio: float
    criterion: str = "l1"

    def __post_init__(self) -> None:
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


def _importance(criterion: str) -> tp.importance.Importance:
    if criterion == "bn_scale":
        return tp.importance.BNScaleImportance()
    if criterion == "taylor":
        return tp.importance.GroupTaylorImportance()
    return tp.importance.GroupMagnitudeImportance(p={"l1": 1, "l2": 2}[criterion])


def _accumulate_gradients(model: nn.Module, batches: Batches | None, names: list[str]) -> None:
    """Leave in each parameter's ``.grad`` the gradient of the cross-entropy summed over ``batches``.

    The model stays in eval mode, so batch-norm statistics are not touched. ``names``
    (the layers asking) only serve the error raised when there is no batch.
    """
    for param in model.parameters():
        param.grad = None
        param.requires_grad_(True)
    seen = 0
    with torch.enable_grad():
        for images, labels in batches or ():
            F.cross_entropy(model(images), labels).backward()
            seen += 1
    if not seen:
        layers = ("layers " if len(names) > 1 else "layer ") + ", ".join(repr(name) for name in names)
        raise AutocompError(f"{layers}: the taylor prune criterion needs calibration batches "
                            "to compute gradients, and none were given")


@register_method(PruneConfig)
def apply_prune(model: nn.Module, choices: dict[str, PruneConfig], ctx: ApplyContext) -> None:
    """Prune each chosen group leader's coupled channels in place."""
    taylor = [name for name, config in choices.items() if config.criterion == "taylor"]
    grad_flags = {name: p.requires_grad for name, p in model.named_parameters()}
    try:
        if taylor:
            _accumulate_gradients(model, ctx.calib, taylor)
        pruning = prune_graph(model, ctx.example)
        graph = pruning.graph
        for name, config in choices.items():
            module = model.get_submodule(name)
            pruner = graph.get_pruner_of_module(module)
            channels = pruner.get_out_channels(module)
            keep = kept_channels(channels, config.ratio, ctx.channel_multiple)
            if keep >= channels:
                continue
            group = graph.get_pruning_group(module, pruner.prune_out_channels, list(range(channels)))
            if not pruning.is_safe(group):
                raise AutocompError(f"layer {name!r}: its channels reach a channel split or shuffle "
                                    "that cannot be pruned consistently")
            scores = _importance(config.criterion)(group)
            if scores is None:
                raise AutocompError(f"layer {name!r}: the {config.criterion} prune criterion finds no "
                                    "weights to score in its channel group (bn_scale needs a BatchNorm)")
            drop = torch.argsort(scores, stable=True)[: channels - keep].tolist()
            graph.get_pruning_group(module, pruner.prune_out_channels, sorted(drop)).prune()
    finally:
        for param_name, param in model.named_parameters():
            param.grad = None
            param.requires_grad_(grad_flags.get(param_name, True))
