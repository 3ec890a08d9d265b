"""``apply_plan``: the pure function that turns a model and a plan into a compressed model."""

import copy

import torch
from torch import nn

from autocomp.inventory import Inventory
from autocomp.methods import HANDLERS, ApplyContext
from autocomp.plan import CompressionPlan


def apply_plan(model: nn.Module, plan: CompressionPlan, inventory: Inventory, *,
               channel_multiple: int = 1) -> nn.Module:
    """Return a compressed copy of ``model``; the input model is never modified.

    The plan is validated against ``inventory`` first. Handlers run by stage
    (pruning before factorisation), each over all the layers that chose it.
    Deterministic: the same model and plan give the same result.
    """
    plan.validate(inventory)
    compressed = copy.deepcopy(model).eval()
    example = torch.zeros(*inventory.input_shape)
    ctx = ApplyContext(inventory, example, channel_multiple)
    for config_cls in sorted(HANDLERS, key=lambda cls: cls.stage):
        chosen = {name: cfg for name, cfg in plan.layers.items() if type(cfg) is config_cls}
        if chosen:
            HANDLERS[config_cls](compressed, chosen, ctx)
    return compressed


def count_params(model: nn.Module) -> int:
    """Number of parameters."""
    return sum(p.numel() for p in model.parameters())
