"""Low-rank factorisation by truncated SVD of a layer's weight matrix.

A Linear layer becomes Linear(in, r) -> Linear(r, out); a KxK conv becomes a
KxK conv to r channels followed by a 1x1 conv to the original outputs (the
weight reshaped to out x (in*K*K) and factorised). At full rank the pair
reproduces the original layer exactly.
"""

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from autocomp.inventory import LayerInfo
from autocomp.methods import ApplyContext, MethodConfig, register_method


@dataclass(frozen=True)
class LowRankConfig(MethodConfig):
    """Keep ``rank`` (a fraction of the full rank) singular values of the layer's weight."""

    method: ClassVar[str] = "lowrank"
    stage: ClassVar[int] = 1
    rank: float
    kind: str = "svd"

    def check(self) -> None:
        if not 0.0 < self.rank <= 1.0:
            raise ValueError(f"lowrank rank fraction {self.rank} is outside (0, 1]")
        if self.kind != "svd":
            raise ValueError(f"lowrank kind {self.kind!r} is not known (known: svd)")

    @classmethod
    def ineligible(cls, layer: LayerInfo) -> str | None:
        if layer.groups > 1:
            return "grouped and depthwise convs have no dense weight matrix to factorise"
        if full_rank(layer.in_channels, layer.out_channels, layer.kernel) < 2:
            return "its weight matrix has rank 1"
        return None


def full_rank(in_channels: int, out_channels: int, kernel: list[int]) -> int:
    """Rank of the out x (in * prod(kernel)) weight matrix."""
    spatial = 1
    for size in kernel:
        spatial *= size
    return min(out_channels, in_channels * spatial)


def target_rank(full: int, fraction: float) -> int:
    """Singular values kept for a rank fraction (at least one)."""
    return max(1, int(full * fraction + 0.5))


def factorise(module: nn.Module, fraction: float) -> nn.Sequential:
    """The two-layer SVD factorisation of a Linear or ungrouped Conv1d/Conv2d."""
    weight = module.weight.detach()
    out_channels = weight.shape[0]
    matrix = weight.reshape(out_channels, -1)
    rank = target_rank(min(matrix.shape), fraction)
    u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
    root = s[:rank].sqrt()
    first_w = (root[:, None] * vh[:rank]).reshape(rank, *weight.shape[1:])
    second_w = u[:, :rank] * root[None, :]
    has_bias = module.bias is not None
    if isinstance(module, nn.Linear):
        first = nn.Linear(module.in_features, rank, bias=False)
        second = nn.Linear(rank, out_channels, bias=has_bias)
    else:
        conv = type(module)
        first = conv(module.in_channels, rank, module.kernel_size, module.stride, module.padding,
                     module.dilation, bias=False, padding_mode=module.padding_mode)
        second = conv(rank, out_channels, 1, bias=has_bias)
        second_w = second_w.reshape(out_channels, rank, *([1] * (weight.dim() - 2)))
    with torch.no_grad():
        first.weight.copy_(first_w)
        second.weight.copy_(second_w)
        if has_bias:
            second.bias.copy_(module.bias.detach())
    return nn.Sequential(first, second)


@register_method(LowRankConfig)
def apply_lowrank(model: nn.Module, choices: dict[str, LowRankConfig], ctx: ApplyContext) -> None:
    """Replace each chosen layer by its factorisation, in place."""
    for name, config in choices.items():
        model.set_submodule(name, factorise(model.get_submodule(name), config.rank))
