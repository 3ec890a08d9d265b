"""``apply_plan`` and ``compress``: the pure functions that turn a model and a plan into a
compressed model."""

import copy
from collections.abc import Iterable

import torch
from torch import nn

from autocomp.inventory import Inventory, build_inventory
from autocomp.methods import HANDLERS, ApplyContext
from autocomp.plan import CompressionPlan

Batches = Iterable[tuple[torch.Tensor, torch.Tensor]]


def apply_plan(model: nn.Module, plan: CompressionPlan, inventory: Inventory, *,
               channel_multiple: int = 1, calib: Batches | None = None) -> nn.Module:
    """Return a compressed copy of ``model``; the input model is never modified.

    The plan is validated against ``inventory`` first. Handlers run by stage
    (pruning, then factorisation or substitution, then sparsity, then
    quantization), each over all the layers that chose it. ``calib`` yields
    (images, labels) batches for methods that calibrate or initialise from
    data. Deterministic: the same model, plan and data give the same result.
    """
    plan.validate(inventory)
    compressed = copy.deepcopy(model).eval()
    example = torch.zeros(*inventory.input_shape)
    ctx = ApplyContext(inventory, example, channel_multiple, calib)
    for config_cls in sorted(HANDLERS, key=lambda cls: cls.stage):
        chosen = {name: cfg for name, cfg in plan.configs() if type(cfg) is config_cls}
        if chosen:
            HANDLERS[config_cls](compressed, chosen, ctx)
    return compressed


def compress(model: nn.Module, plan: CompressionPlan, calib_loader: Batches, *,
             channel_multiple: int = 1) -> nn.Module:
    """Compress ``model`` by ``plan``; the input shape is taken from ``calib_loader``'s first batch."""
    images, _ = next(iter(calib_loader))
    inventory = build_inventory(model, (1, *images.shape[1:]))
    return apply_plan(model, plan, inventory, channel_multiple=channel_multiple, calib=calib_loader)


def count_params(model: nn.Module) -> int:
    """Number of parameters."""
    return sum(p.numel() for p in model.parameters())


def size_bytes(model: nn.Module) -> int:
    """Bytes needed to store the weights as deployed.

    A module that stores its weights in another form (integers of a few bits, a
    sparse encoding) says so with a ``storage_bytes()`` method, which then
    accounts for it and everything beneath it; other parameters count at their
    dtype's size.
    """
    storage = getattr(model, "storage_bytes", None)
    if callable(storage):
        return int(storage())
    own = sum(p.numel() * p.element_size() for p in model.parameters(recurse=False))
    return own + sum(size_bytes(child) for child in model.children())
