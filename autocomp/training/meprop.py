"""meProp: top-k sparsified back-propagation (Sun et al., ICML 2017) for faster fine-tuning.

In the backward pass of each Linear and ungrouped Conv2d, only the ``k``
output units (Linear) or output channels (Conv2d) with the largest gradient
magnitude, summed over the mini-batch (the paper's "unified" top-k for
mini-batches), propagate. The input and weight gradients are then computed
from that subset alone, so the backward matrix products really shrink.
The forward pass is unchanged.
"""

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn


class _TopKLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, keep: float):
        ctx.save_for_backward(x, weight)
        ctx.has_bias, ctx.keep = bias is not None, keep
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        x, weight = ctx.saved_tensors
        flat_grad = grad_out.reshape(-1, grad_out.shape[-1])
        k = max(1, round(ctx.keep * flat_grad.shape[1]))
        index = flat_grad.abs().sum(0).topk(k).indices
        sub_grad = flat_grad[:, index]
        flat_x = x.reshape(-1, x.shape[-1])
        grad_x = (sub_grad @ weight[index]).reshape(x.shape)
        grad_w = torch.zeros_like(weight)
        grad_w[index] = sub_grad.t() @ flat_x
        grad_b = None
        if ctx.has_bias:
            grad_b = torch.zeros(weight.shape[0], dtype=grad_out.dtype)
            grad_b[index] = sub_grad.sum(0)
        return grad_x, grad_w, grad_b, None


class _TopKConv2d(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, keep: float,
                stride: tuple, padding: tuple, dilation: tuple):
        ctx.save_for_backward(x, weight)
        ctx.has_bias, ctx.keep = bias is not None, keep
        ctx.conv = (stride, padding, dilation)
        return F.conv2d(x, weight, bias, stride, padding, dilation)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        x, weight = ctx.saved_tensors
        stride, padding, dilation = ctx.conv
        k = max(1, round(ctx.keep * grad_out.shape[1]))
        index = grad_out.abs().sum((0, 2, 3)).topk(k).indices
        sub_grad = grad_out[:, index].contiguous()
        sub_weight = weight[index]
        grad_x = torch.nn.grad.conv2d_input(x.shape, sub_weight, sub_grad, stride, padding, dilation)
        grad_w = torch.zeros_like(weight)
        grad_w[index] = torch.nn.grad.conv2d_weight(x, sub_weight.shape, sub_grad, stride, padding,
                                                    dilation)
        grad_b = None
        if ctx.has_bias:
            grad_b = torch.zeros(weight.shape[0], dtype=grad_out.dtype)
            grad_b[index] = sub_grad.sum((0, 2, 3))
        return grad_x, grad_w, grad_b, None, None, None, None


def _linear_forward(module: nn.Linear, keep: float):
    def forward(x: torch.Tensor) -> torch.Tensor:
        return _TopKLinear.apply(x, module.weight, module.bias, keep)

    return forward


def _conv_forward(module: nn.Conv2d, keep: float):
    def forward(x: torch.Tensor) -> torch.Tensor:
        if module.padding_mode != "zeros" or isinstance(module.padding, str):
            return module._conv_forward(x, module.weight, module.bias)
        return _TopKConv2d.apply(x, module.weight, module.bias, keep, module.stride, module.padding,
                                 module.dilation)

    return forward


@contextmanager
def meprop(model: nn.Module, keep: float) -> Iterator[int]:
    """Within the block, back-propagate only the top ``keep`` fraction of each Linear's output
    units and each ungrouped Conv2d's output channels; yields how many layers were changed."""
    if not 0.0 < keep <= 1.0:
        raise ValueError(f"meProp keep fraction {keep} is outside (0, 1]")
    patched = []
    for module in model.modules():
        if type(module) is nn.Linear:
            module.forward = _linear_forward(module, keep)
        elif type(module) is nn.Conv2d and module.groups == 1:
            module.forward = _conv_forward(module, keep)
        else:
            continue
        patched.append(module)
    try:
        yield len(patched)
    finally:
        for module in patched:
            del module.forward
