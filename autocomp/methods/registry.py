"""The method registry: one config dataclass per technique and a handler registered for it.

A plan maps layer names to configs; ``apply_plan`` runs each config type's
handler over the layers that chose it, in the order of the configs' ``stage``
(structural surgery such as pruning before per-layer rewrites; see ``Stage``).
Configs validate their parameters when they are created.
"""

from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, fields
from enum import IntEnum
from typing import Any, ClassVar

import torch
from torch import nn

from autocomp.core.inventory import Inventory, LayerInfo


class Stage(IntEnum):
    """When a method rewrites a layer, relative to the methods of the other stages: the
    structure first, quantization last. A layer takes at most one method per stage."""

    PRUNE = 0  # structured pruning: whole channels removed
    FACTORISE = 1  # low-rank factorisation or compact-layer substitution
    SPARSIFY = 2  # fine-grained sparsity
    QUANTIZE = 3  # quantization


@dataclass
class ApplyContext:
    """What handlers may need besides the model: the inventory, an example input, the
    channel multiple pruning and low ranks round to, and calibration batches of (images, labels)."""

    inventory: Inventory
    example: torch.Tensor
    channel_multiple: int = 1
    calib: Iterable[tuple[torch.Tensor, torch.Tensor]] | None = None


@dataclass(frozen=True)
class MethodConfig:
    """Base of every method's config; subclasses are frozen dataclasses whose
    ``__post_init__`` raises ``ValueError`` naming the parameter when a value is out of range."""

    method: ClassVar[str]
    stage: ClassVar[Stage]

    def __post_init__(self) -> None:
        """Nothing to check here; each method checks its own parameters."""

    @classmethod
    def ineligible(cls, layer: LayerInfo) -> str | None:
        """Why this method (with any parameters) cannot apply to ``layer``, or None when it can."""
        return None

    def unfit(self, layer: LayerInfo) -> str | None:
        """Why this config, with its parameters, cannot apply to ``layer``, or None when it can."""
        return type(self).ineligible(layer)

    def to_json(self) -> dict[str, Any]:
        return {"method": self.method, **asdict(self)}


Handler = Callable[[nn.Module, dict[str, Any], ApplyContext], None]
METHODS: dict[str, type[MethodConfig]] = {}
HANDLERS: dict[type[MethodConfig], Handler] = {}


def register_method(config_cls: type[MethodConfig]) -> Callable[[Handler], Handler]:
    """Register ``config_cls`` under its method name and the decorated function as its handler."""

    def decorate(handler: Handler) -> Handler:
        METHODS[config_cls.method] = config_cls
        HANDLERS[config_cls] = handler
        return handler

    return decorate


def config_from_json(data: dict[str, Any]) -> MethodConfig:
    """Build a method config from its JSON form; ``ValueError`` names what is wrong."""
    if not isinstance(data, dict) or "method" not in data:
        raise ValueError("a layer choice needs a 'method'")
    method = data["method"]
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r} (known: {', '.join(sorted(METHODS))})")
    cls = METHODS[method]
    known = {f.name for f in fields(cls)}
    extra = sorted(set(data) - known - {"method"})
    if extra:
        raise ValueError(f"method {method!r} has no parameter {extra[0]!r}")
    try:
        return cls(**{k: v for k, v in data.items() if k != "method"})
    except TypeError as err:
        raise ValueError(f"method {method!r}: {err}") from None
