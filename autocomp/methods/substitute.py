"""Compact-layer substitution: a conv replaced by a cheaper structure fitted to it.

- ``dwsep`` (MobileNet, Howard et al. 2017): a KxK conv becomes a depthwise KxK conv (same
  stride, padding, dilation) followed by a pointwise 1x1 conv.
- ``shuffle`` (ShuffleNet, Zhang et al., CVPR 2018): a 1x1 conv becomes a grouped 1x1 conv
  with ``groups`` groups followed by a channel shuffle, so that a later grouped layer sees
  channels of every group.

Initialisation fits the substitute to the replaced layer by least squares on calibration
activations: one pass of the model over ``ctx.calib`` with a forward hook on each chosen
layer accumulates the sufficient statistics of its input patches U and outputs Y (U'U, U'Y
and their sums), so no activation is stored. Every layer is fitted to the activations of the
model as it enters this stage (after any pruning), independently of the other layers
substituted with it. The substitute's last conv has a bias, fitted as an intercept: dropped
cross-group or cross-channel terms have a non-zero mean on post-ReLU inputs, which the
intercept absorbs.

- shuffle: each group's 1x1 is an exact linear least-squares problem (the outputs that the
  shuffle routes to the group, from the group's inputs).
- dwsep: output = pointwise(depthwise(x)) is bilinear in the two weights; alternating least
  squares solves for the pointwise weights and bias with the depthwise fixed, then for the
  depthwise with the pointwise fixed (both exact least-squares steps, so the calibration error
  never rises), ``ALS_ROUNDS`` times, starting from the data-free fit and ending on a
  pointwise step.

Without calibration data (``calib`` None or empty) the substitute takes the data-free fit of
the weights themselves: for dwsep, each input channel's Cout x (K*K) slice of the weight
replaced by its best rank-one approximation (its leading singular pair); for shuffle, the
original weights inside each group's block; the bias is the original (or zero).
"""

import math
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from autocomp.core.errors import AutocompError
from autocomp.core.inventory import LayerInfo
from autocomp.methods.registry import ApplyContext, MethodConfig, Stage, register_method

KINDS = ("dwsep", "shuffle")
ALS_ROUNDS = 4  # alternating least-squares rounds for dwsep
RIDGE = 1e-8  # Tikhonov term, relative to the mean diagonal of each normal matrix
_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


@dataclass(frozen=True)
class SubstituteConfig(MethodConfig):
    """Replace a conv by a compact substitute of ``kind``; ``groups`` (shuffle only, >= 2)
    must divide the layer's input and output channels."""

    method: ClassVar[str] = "substitute"
    stage: ClassVar[Stage] = Stage.FACTORISE
    kind: str = "dwsep"
    groups: int | None = None

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"substitute kind {self.kind!r} is not known (known: {', '.join(KINDS)})")
        if self.kind == "dwsep" and self.groups is not None:
            raise ValueError("substitute groups applies to kind shuffle only, not dwsep")
        if self.kind == "shuffle" and (isinstance(self.groups, bool) or not isinstance(self.groups, int)
                                       or self.groups < 2):
            raise ValueError(f"substitute shuffle needs groups, an integer >= 2 (got {self.groups!r})")

    def to_json(self) -> dict[str, Any]:
        """The JSON form, without ``groups`` where the kind has none."""
        return {"method": self.method, **{k: v for k, v in asdict(self).items() if v is not None}}

    @classmethod
    def ineligible(cls, layer: LayerInfo, kind: str | None = None) -> str | None:
        """Why ``kind`` (None: every kind) cannot substitute ``layer``, or None."""
        if layer.kind == "linear":
            return "substitution replaces convs; a Linear layer has no compact form here"
        if layer.groups > 1:
            return "it is already grouped or depthwise"
        spatial = math.prod(layer.kernel) > 1
        if kind == "dwsep" and not spatial:
            return "a 1x1 conv has no spatial kernel to separate; shuffle replaces 1x1 convs"
        if kind == "shuffle" and spatial:
            return "shuffle replaces 1x1 convs; a KxK conv takes dwsep"
        if not spatial and math.gcd(layer.in_channels, layer.out_channels) < 2:
            return (f"its {layer.in_channels} input and {layer.out_channels} output channels share "
                    "no number of groups >= 2")
        return None

    def unfit(self, layer: LayerInfo) -> str | None:
        """Why this config (its kind and groups) cannot apply to ``layer``, or None."""
        reason = self.ineligible(layer, self.kind)
        if reason is None and self.kind == "shuffle":
            reason = _groups_unfit(self.groups, layer.in_channels, layer.out_channels)
        return reason


def _groups_unfit(groups: int, in_channels: int, out_channels: int) -> str | None:
    if in_channels % groups or out_channels % groups:
        return f"{groups} groups do not divide its {in_channels} input and {out_channels} output channels"
    return None


class ChannelShuffle(nn.Module):
    """ShuffleNet's channel shuffle: channel i*(C/g) + j moves to j*g + i, by reshape and transpose."""

    def __init__(self, groups: int) -> None:
        super().__init__()
        self.groups = groups

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, channels, *spatial = x.shape
        x = x.reshape(batch, self.groups, channels // self.groups, *spatial).transpose(1, 2)
        return x.reshape(batch, channels, *spatial)

    def extra_repr(self) -> str:
        return f"groups={self.groups}"


class PatchStats:
    """Least-squares statistics of one conv over calibration data.

    Patches are taken by a fixed depthwise conv of one-hot kernels with the layer's own
    stride, padding, dilation and padding mode, so patch ``c*K + k`` is input channel c at
    kernel offset k (K = kernel size), in the order of a depthwise weight's flattening. The
    conv only copies values, so it runs exactly in the layer's dtype; the products are float64.
    """

    def __init__(self, module: nn.Module) -> None:
        c_in, c_out = module.in_channels, module.out_channels
        self.taps = math.prod(module.kernel_size)
        self.patches = type(module)(c_in, c_in * self.taps, module.kernel_size, module.stride,
                                    module.padding, module.dilation, groups=c_in, bias=False,
                                    padding_mode=module.padding_mode, dtype=module.weight.dtype,
                                    device=module.weight.device)
        with torch.no_grad():
            self.patches.weight.copy_(torch.eye(self.taps).repeat(c_in, 1).reshape(self.patches.weight.shape))
        size = c_in * self.taps
        self.uu = torch.zeros(size, size, dtype=torch.float64, device=module.weight.device)
        self.uy = torch.zeros(size, c_out, dtype=torch.float64, device=module.weight.device)
        self.su = torch.zeros(size, dtype=torch.float64, device=module.weight.device)
        self.sy = torch.zeros(c_out, dtype=torch.float64, device=module.weight.device)
        self.count = 0

    def __call__(self, module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        u = self.patches(inputs[0]).movedim(1, -1).reshape(-1, self.su.numel()).double()
        y = output.double().movedim(1, -1).reshape(-1, self.sy.numel())
        self.uu += u.T @ u
        self.uy += u.T @ y
        self.su += u.sum(0)
        self.sy += y.sum(0)
        self.count += u.shape[0]


def collect_stats(model: nn.Module, modules: dict[str, nn.Module],
                  calib: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> dict[str, PatchStats]:
    """One pass of ``model`` over ``calib`` gathering each named module's patch statistics."""
    stats = {name: PatchStats(module) for name, module in modules.items()}
    handles = [module.register_forward_hook(stats[name]) for name, module in modules.items()]
    device = next(model.parameters()).device
    try:
        with torch.no_grad():
            for images, _ in calib:
                model(images.to(device))
    finally:
        for handle in handles:
            handle.remove()
    return stats


def _solve(gram: torch.Tensor, cross: torch.Tensor) -> torch.Tensor:
    """Normal equations with a small relative ridge, which keeps dead inputs at zero weight."""
    ridge = RIDGE * max(gram.diagonal().mean().item(), 1e-12)
    return torch.linalg.solve(gram + ridge * torch.eye(len(gram), dtype=gram.dtype, device=gram.device),
                              cross)


def _with_intercept(gram: torch.Tensor, cross: torch.Tensor, feature_sum: torch.Tensor,
                    target_sum: torch.Tensor, count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Solve for (weights, bias) with a constant feature appended."""
    n = len(gram)
    full = torch.empty(n + 1, n + 1, dtype=gram.dtype, device=gram.device)
    full[:n, :n], full[:n, n], full[n, :n], full[n, n] = gram, feature_sum, feature_sum, count
    solution = _solve(full, torch.cat([cross, target_sum[None, :]]))
    return solution[:n], solution[n]


def _shuffle_fit(weight: torch.Tensor, bias: torch.Tensor, groups: int,
                 stats: PatchStats | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Grouped 1x1 weight (Cout, Cin/g) and bias whose shuffled output approximates the layer.

    After the shuffle, final channel j*g + i is grouped-conv channel i*(Cout/g) + j, computed
    from input group i: so group i is fitted to the layer's outputs i, i+g, i+2g, ...
    """
    c_out, c_in = weight.shape
    per_in, per_out = c_in // groups, c_out // groups
    new_w = torch.empty(c_out, per_in, dtype=torch.float64)
    new_b = torch.empty(c_out, dtype=torch.float64)
    for i in range(groups):
        inputs, outputs = slice(i * per_in, (i + 1) * per_in), slice(i, c_out, groups)
        rows = slice(i * per_out, (i + 1) * per_out)
        if stats is None:
            new_w[rows], new_b[rows] = weight[outputs, inputs], bias[outputs]
        else:
            w, b = _with_intercept(stats.uu[inputs, inputs], stats.uy[inputs, outputs], stats.su[inputs],
                                   stats.sy[outputs], stats.count)
            new_w[rows], new_b[rows] = w.T.cpu(), b.cpu()
    return new_w, new_b


def _dwsep_fit(weight: torch.Tensor, bias: torch.Tensor,
               stats: PatchStats | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Depthwise (Cin, K), pointwise (Cout, Cin) and bias approximating a (Cout, Cin, K) weight."""
    c_in, taps = weight.shape[1:]
    u, s, vh = torch.linalg.svd(weight.permute(1, 0, 2), full_matrices=False)  # per input channel
    depthwise, pointwise = vh[:, 0, :], (u[:, :, 0] * s[:, :1]).T
    if stats is None:
        return depthwise, pointwise, bias
    uu, uy, su = stats.uu.cpu(), stats.uy.cpu(), stats.su.cpu()
    for _ in range(ALS_ROUNDS):
        pointwise, bias = _pointwise_step(depthwise, stats)
        # With the pointwise fixed, output (o, p) is linear in the depthwise taps D[i, k]:
        # its feature is P[o, i] * U[p, (i, k)], whose Gram sums over o to (P'P)[i, j] * U'U.
        mix = (pointwise.T @ pointwise).repeat_interleave(taps, 0).repeat_interleave(taps, 1)
        cross = ((uy - su[:, None] * bias[None, :]) @ pointwise).reshape(c_in, taps, c_in)
        depthwise = _solve(mix * uu, cross.diagonal(dim1=0, dim2=2).T.reshape(-1)).reshape(c_in, taps)
        depthwise = depthwise / depthwise.norm(dim=1, keepdim=True).clamp_min(1e-12)
    pointwise, bias = _pointwise_step(depthwise, stats)
    return depthwise, pointwise, bias


def _pointwise_step(depthwise: torch.Tensor, stats: PatchStats) -> tuple[torch.Tensor, torch.Tensor]:
    """Pointwise weight and bias by least squares, the depthwise output Z = U B being fixed."""
    c_in, taps = depthwise.shape
    block = torch.zeros(c_in * taps, c_in, dtype=torch.float64)
    block[torch.arange(c_in * taps), torch.arange(c_in).repeat_interleave(taps)] = depthwise.reshape(-1)
    uu, uy, su = stats.uu.cpu(), stats.uy.cpu(), stats.su.cpu()
    w, b = _with_intercept(block.T @ uu @ block, block.T @ uy, block.T @ su, stats.sy.cpu(), stats.count)
    return w.T, b


def substitute(module: nn.Module, config: SubstituteConfig, stats: PatchStats | None) -> nn.Sequential:
    """The substitute for ``module``, fitted by least squares when ``stats`` are given."""
    weight = module.weight.detach().double().cpu()
    c_out, c_in = weight.shape[:2]
    bias = (torch.zeros(c_out, dtype=torch.float64) if module.bias is None
            else module.bias.detach().double().cpu())
    kwargs = {"device": module.weight.device, "dtype": module.weight.dtype}
    conv = type(module)
    if config.kind == "shuffle":
        new_w, new_b = _shuffle_fit(weight.reshape(c_out, c_in), bias, config.groups, stats)
        grouped = conv(c_in, c_out, 1, module.stride, module.padding, module.dilation, groups=config.groups,
                       padding_mode=module.padding_mode, **kwargs)
        _load(grouped, new_w, new_b)
        return nn.Sequential(grouped, ChannelShuffle(config.groups))
    depthwise, pointwise, new_b = _dwsep_fit(weight.reshape(c_out, c_in, -1), bias, stats)
    spatial = conv(c_in, c_in, module.kernel_size, module.stride, module.padding, module.dilation,
                   groups=c_in, bias=False, padding_mode=module.padding_mode, **kwargs)
    mixing = conv(c_in, c_out, 1, **kwargs)
    _load(spatial, depthwise)
    _load(mixing, pointwise, new_b)
    return nn.Sequential(spatial, mixing)


def _load(target: nn.Module, weight: torch.Tensor, bias: torch.Tensor | None = None) -> None:
    with torch.no_grad():
        target.weight.copy_(weight.reshape(target.weight.shape))
        if bias is not None:
            target.bias.copy_(bias)


@register_method(SubstituteConfig)
def apply_substitute(model: nn.Module, choices: dict[str, SubstituteConfig], ctx: ApplyContext) -> None:
    """Replace each chosen conv by its fitted substitute, in place, after checking every choice."""
    modules = {}
    for name, config in choices.items():
        reason = config.unfit(ctx.inventory.layer(name))
        module = model.get_submodule(name)
        if reason is None and not isinstance(module, _CONVS):
            reason = f"it is a {type(module).__name__}, not a Conv1d/2d/3d"
        if reason is None and config.kind == "shuffle":  # channels may have been pruned since
            reason = _groups_unfit(config.groups, module.in_channels, module.out_channels)
        if reason:
            raise AutocompError(f"layer {name!r} cannot take substitute {config.kind}: {reason}")
        modules[name] = module
    stats = collect_stats(model, modules, ctx.calib) if ctx.calib is not None else {}
    for name, config in choices.items():
        fitted = stats.get(name)
        fitted = fitted if fitted is not None and fitted.count else None
        model.set_submodule(name, substitute(modules[name], config, fitted))
