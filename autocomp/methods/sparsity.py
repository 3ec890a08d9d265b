"""Fine-grained magnitude sparsity: a layer's smallest-magnitude weights set to zero.

Each chosen Conv1d/Conv2d/Linear (or each one inside a layer an earlier stage
replaced, such as a low-rank pair) becomes a ``Sparse*`` subclass of its type
that keeps a boolean ``mask`` buffer. Its forward is the plain layer's, so
``torch.export`` and TVM see an ordinary layer whose weights hold zeros;
``after_step()`` re-applies the mask after every fine-tuning step, so pruned
weights stay zero; ``storage_bytes()`` is the size of the cheapest real encoding
of the weights (CSR, bitmap plus values, or dense), named by ``encoding``.

Latency is unchanged: a zero costs as much as any other weight in a dense
kernel, and no target has a sparse kernel yet (``SPARSE_KERNEL_TARGETS`` is
empty). Sparsity here buys storage only; ``LATENCY_NOTE`` says so for reports,
and every sparse layer carries it as ``latency_note``.
"""

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from autocomp.core.errors import AutocompError
from autocomp.methods.registry import ApplyContext, MethodConfig, Stage, register_method

# TVM targets with a kernel that skips zero weights; none yet.
SPARSE_KERNEL_TARGETS: frozenset[str] = frozenset()
LATENCY_NOTE = ("unstructured sparsity shrinks storage only: no target has a sparse kernel, "
                "so latency is that of the dense layer")
INT16_MAX = 2**15 - 1


@dataclass(frozen=True)
class SparsityConfig(MethodConfig):
    """Set the ``sparsity`` fraction of the layer's weights, smallest magnitudes first, to zero."""

    method: ClassVar[str] = "sparsity"
    stage: ClassVar[Stage] = Stage.SPARSIFY
    sparsity: float

    def __post_init__(self) -> None:
        if not 0.0 < self.sparsity < 1.0:
            raise ValueError(f"sparsity {self.sparsity} is outside (0, 1)")


def magnitude_mask(weight: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Boolean mask keeping all but the ``round(sparsity * numel)`` smallest-magnitude weights
    (ties broken by position, so the count is exact)."""
    dropped = round(sparsity * weight.numel())
    order = torch.argsort(weight.detach().abs().flatten(), stable=True)
    mask = torch.ones(weight.numel(), dtype=torch.bool, device=weight.device)
    mask[order[:dropped]] = False
    return mask.view_as(weight)


def index_bytes(largest: int) -> int:
    """Bytes of the narrowest index type (int16 or int32) that holds ``largest``."""
    return 2 if largest <= INT16_MAX else 4


def encoding_bytes(mask: torch.Tensor, value_bytes: int) -> dict[str, int]:
    """Bytes to store a weight whose nonzeros are ``mask``, viewed as an out x rest matrix:

    - ``csr``: values, a column index per value, and out + 1 row pointers, indices as
      int16 when they fit and int32 otherwise;
    - ``bitmap``: one bit per weight plus the values;
    - ``dense``: every weight.
    """
    rows = mask.shape[0]
    cols = mask.numel() // rows
    nonzeros = int(mask.count_nonzero())
    return {
        "csr": nonzeros * (value_bytes + index_bytes(cols - 1)) + (rows + 1) * index_bytes(nonzeros),
        "bitmap": math.ceil(mask.numel() / 8) + nonzeros * value_bytes,
        "dense": mask.numel() * value_bytes,
    }


class SparseLayer:
    """What the sparse layers add to their dense base class: the mask and its bookkeeping."""

    mask: torch.Tensor
    weight: nn.Parameter
    latency_note: ClassVar[str] = LATENCY_NOTE

    def penalty(self) -> torch.Tensor:
        """No loss term of its own."""
        return self.weight.new_zeros(())

    def after_step(self) -> None:
        """Zero the pruned weights again (an optimizer step may have moved them)."""
        with torch.no_grad():
            self.weight.mul_(self.mask)

    def finish_training(self) -> None:
        """Nothing to settle: the mask holds after every step."""

    @property
    def sparsity(self) -> float:
        """Fraction of the weights that are pruned."""
        return 1.0 - int(self.mask.count_nonzero()) / self.mask.numel()

    def weight_encodings(self) -> dict[str, int]:
        """Bytes of the weight in each encoding (see ``encoding_bytes``)."""
        return encoding_bytes(self.mask, self.weight.element_size())

    @property
    def encoding(self) -> str:
        """The cheapest encoding of the weight, which ``storage_bytes`` counts."""
        sizes = self.weight_encodings()
        return min(sizes, key=sizes.__getitem__)

    def storage_bytes(self) -> int:
        """The encoded weight plus the other parameters (the bias) at their dtype's size."""
        others = sum(p.numel() * p.element_size() for name, p in self.named_parameters(recurse=False)
                     if name != "weight")
        return self.weight_encodings()[self.encoding] + others


class SparseConv1d(SparseLayer, nn.Conv1d):
    """A Conv1d with a fixed pattern of zero weights."""


class SparseConv2d(SparseLayer, nn.Conv2d):
    """A Conv2d with a fixed pattern of zero weights."""


class SparseLinear(SparseLayer, nn.Linear):
    """A Linear with a fixed pattern of zero weights."""


_SPARSE = {nn.Conv1d: SparseConv1d, nn.Conv2d: SparseConv2d, nn.Linear: SparseLinear}
_DENSE = {sparse: dense for dense, sparse in _SPARSE.items()}


def _same_layer(cls: type[nn.Module], layer: nn.Module) -> nn.Module:
    """A new ``cls`` with ``layer``'s hyper-parameters and a copy of its parameters."""
    options = {"bias": layer.bias is not None, "device": layer.weight.device, "dtype": layer.weight.dtype}
    if isinstance(layer, nn.Linear):
        new = cls(layer.in_features, layer.out_features, **options)
    else:
        new = cls(layer.in_channels, layer.out_channels, layer.kernel_size, layer.stride, layer.padding,
                  layer.dilation, layer.groups, padding_mode=layer.padding_mode, **options)
    with torch.no_grad():
        new.weight.copy_(layer.weight)
        if layer.bias is not None:
            new.bias.copy_(layer.bias)
    return new.train(layer.training)


def sparsify(layer: nn.Module, sparsity: float) -> SparseLayer:
    """The sparse version of a plain Conv1d/Conv2d/Linear with its smallest weights zeroed."""
    sparse = _same_layer(_SPARSE[type(layer)], layer)
    sparse.register_buffer("mask", magnitude_mask(layer.weight, sparsity))
    sparse.after_step()
    return sparse


def densify(model: nn.Module) -> nn.Module:
    """Replace, in place, every sparse layer of ``model`` by its plain base type with the same
    (zero-holding) weights; returns ``model``, or a new layer when ``model`` is itself one.

    For tools that match exact layer types, such as batch-norm folding before TVM
    import; the outputs are unchanged.
    """
    if type(model) in _DENSE:
        return _same_layer(_DENSE[type(model)], model)
    for name, module in list(model.named_modules()):
        if type(module) in _DENSE:
            model.set_submodule(name, _same_layer(_DENSE[type(module)], module))
    return model


@register_method(SparsityConfig)
def apply_sparsity(model: nn.Module, choices: dict[str, SparsityConfig], ctx: ApplyContext) -> None:
    """Sparsify each chosen layer in place, or each plain layer inside what replaced it."""
    for name, config in choices.items():
        target = model.get_submodule(name)
        found = [(name, target)] if type(target) in _SPARSE else [
            (f"{name}.{inner}", module) for inner, module in target.named_modules()
            if type(module) in _SPARSE]
        if not found:
            raise AutocompError(f"layer {name!r} is a {type(target).__name__}, which holds no plain "
                                "Conv1d, Conv2d or Linear to sparsify")
        for layer_name, layer in found:
            model.set_submodule(layer_name, sparsify(layer, config.sparsity))
