"""Sparsity-inducing penalties added to the fine-tuning loss, so that later pruning removes
channels or weights the network has already learnt to do without.

Each takes the model and returns a differentiable scalar; the caller scales it:

- ``bn_l1``: sum of |gamma| over BatchNorm layers (network slimming, Liu et al.,
  ICCV 2017); drives the scale of unneeded channels to zero, which the
  ``bn_scale`` prune criterion then reads;
- ``group_lasso``: sum over conv/linear output filters of sqrt(filter size) times
  the filter's L2 norm (Yuan & Lin 2006; Wen et al., NeurIPS 2016): whole filters
  go to zero together;
- ``exclusive_sparsity``: per layer, half the sum over output filters of the
  squared L1 norm of the filter (exclusive lasso, Yoon & Hwang, ICML 2017): the
  weights of one filter compete, so each keeps few inputs;
- ``combined_group_exclusive``: ``(1 - mu) * group_lasso + mu * exclusive_sparsity``,
  Yoon & Hwang's combination, with one mixing weight ``mu`` (0.5 here) for all layers.
"""

from collections.abc import Callable

import torch
from torch import nn

_FILTERED = (nn.Conv1d, nn.Conv2d, nn.Linear)
COMBINED_MU = 0.5


def _filters(model: nn.Module) -> list[torch.Tensor]:
    """Each conv/linear weight as an out-filters x filter-size matrix."""
    return [module.weight.flatten(1) for module in model.modules() if isinstance(module, _FILTERED)]


def _total(terms: list[torch.Tensor], model: nn.Module) -> torch.Tensor:
    if terms:
        return torch.stack(terms).sum()
    parameter = next(model.parameters(), None)
    return torch.zeros((), device=parameter.device if parameter is not None else None)


def bn_l1(model: nn.Module) -> torch.Tensor:
    """Sum of |gamma| over the model's affine BatchNorm layers."""
    terms = [module.weight.abs().sum() for module in model.modules()
             if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.weight is not None]
    return _total(terms, model)


def group_lasso(model: nn.Module) -> torch.Tensor:
    """Sum over conv/linear output filters of sqrt(filter size) * the filter's L2 norm."""
    terms = [weights.norm(dim=1).sum() * weights.shape[1] ** 0.5 for weights in _filters(model)]
    return _total(terms, model)


def exclusive_sparsity(model: nn.Module) -> torch.Tensor:
    """Half the sum over conv/linear output filters of the filter's squared L1 norm."""
    terms = [0.5 * weights.abs().sum(dim=1).square().sum() for weights in _filters(model)]
    return _total(terms, model)


def combined_group_exclusive(model: nn.Module, mu: float = COMBINED_MU) -> torch.Tensor:
    """``(1 - mu) * group_lasso + mu * exclusive_sparsity``."""
    return (1.0 - mu) * group_lasso(model) + mu * exclusive_sparsity(model)


REGULARIZERS: dict[str, Callable[[nn.Module], torch.Tensor]] = {
    "bn_l1": bn_l1,
    "group_lasso": group_lasso,
    "exclusive_sparsity": exclusive_sparsity,
    "combined_group_exclusive": combined_group_exclusive,
}
