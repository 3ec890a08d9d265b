"""``apply_plan``: the one transform verb that turns a model and a plan into a compressed model,
and the size measures of a model (parameters, bytes as deployed)."""

import copy
from collections.abc import Iterable

import torch
from torch import nn

from autocomp.core.inventory import Inventory, build_inventory
from autocomp.methods.hooks import StoredSize
from autocomp.methods.plan import CompressionPlan
from autocomp.methods.registry import HANDLERS, ApplyContext

Batches = Iterable[tuple[torch.Tensor, torch.Tensor]]


def apply_plan(model: nn.Module, plan: CompressionPlan, example_inputs: torch.Tensor | Inventory, *,
               calib: Batches | None = None, channel_multiple: int = 1) -> nn.Module:
    """Return a compressed copy of ``model``; the input model is never modified.

    ``example_inputs`` is one input of the model (batch of one), from which its layer
    inventory is built; an ``Inventory`` of the model already built (the search builds one
    for all its trials) may stand in for it. The plan is validated against the inventory
    first. ``channel_multiple`` rounds the channels pruning keeps and the ranks of
    factorised layers. Handlers run by stage (pruning, then factorisation or
    substitution, then sparsity, then quantization), each over all the layers that
    chose it. ``calib`` yields
    (images, labels) batches for methods that calibrate or initialise from
    data. Deterministic: the same model, plan and data give the same result.
    """
    inventory = (example_inputs if isinstance(example_inputs, Inventory)
                 else build_inventory(model, tuple(example_inputs.shape)))
    plan.validate(inventory)
    compressed = copy.deepcopy(model).eval()
    example = torch.zeros(*inventory.input_shape)
    ctx = ApplyContext(inventory, example, channel_multiple, calib)
    for config_cls in sorted(HANDLERS, key=lambda cls: cls.stage):
        chosen = {name: cfg for name, cfg in plan.configs() if type(cfg) is config_cls}
        if chosen:
            HANDLERS[config_cls](compressed, chosen, ctx)
    return compressed


def count_params(model: nn.Module) -> int:
    """Number of parameters."""
    return sum(p.numel() for p in model.parameters())


def size_bytes(model: nn.Module) -> int:
    """Bytes needed to store the weights as deployed.

    A module that stores its weights in another form (integers of a few bits, a
    sparse encoding) says so as a ``StoredSize``, which then accounts for it and
    everything beneath it; other parameters count at their dtype's size.
    """
    if isinstance(model, StoredSize):
        return int(model.storage_bytes())
    own = sum(p.numel() * p.element_size() for p in model.parameters(recurse=False))
    return own + sum(size_bytes(child) for child in model.children())
