"""Quantization methods: integer (``quant``), binary (``binary``) and ternary (``ternary``)
weights per layer, optionally with integer activations.

Weights are quantized per output channel c and symmetrically, ``w ≈ scale_c * q``:
``quant`` takes q in [-(2^(b-1) - 1), 2^(b-1) - 1] with the scale that minimises the
squared error (found by alternating the best integers for a scale and the best scale
for the integers, as Leng et al. 2018 project onto a grid); ``binary`` is BWN /
XNOR-Net, q in {-1, +1} with scale_c = mean |w_c|; ``ternary`` is TWN (Li & Liu 2016),
q in {-1, 0, +1} above the threshold Delta_c = threshold * mean |w_c|, scale_c the mean
|w| above it.

With ``a_bits`` the layer's input is quantized per tensor to *unsigned* integers in
[0, 2^a_bits - 1] with a zero point (affine): an input after a ReLU uses the whole range
(zero point 0), a signed one (the image, a residual stream) still fits, and real zero is
exactly representable, so zero padding stays exact. The range comes from running the
calibration batches through the partly compressed model (min/max, or the mean over
batches of the lower and upper percentiles).

The replacement modules subclass the float Conv1d/Conv2d/Linear (so inventories and
export still see a conv or linear layer). They keep the float weight, which training
updates, plus the integer weights and scales derived from it, and compute in float with
the quantized values (fake quantization). In training the rounding passes gradients
straight through (STE), so ``autocomp.training.distill.finetune`` is quantization-aware
training; with ``admm_rho > 0`` it is ADMM training instead (the float weights are
pulled towards the grid by a penalty whose target G and dual U are updated every
``ADMM_INTERVAL`` steps, and projected onto the grid when training ends).
``integer_form()`` gives what an integer kernel needs (``IntegerLayer``).

Latency: TVM has no quantized operators, so ``autocomp.hardware.compile.int8`` lowers these
layers itself. With integer activations (``a_bits`` 8 or 4) a layer compiles to a
uint8 x int8 -> int32 conv or matmul, requantized per output channel, with a batch norm
that follows it folded into that scale; weights of fewer bits compute as int8 and are
packed only in storage (``storage_bytes``). Weight-only layers compile as float layers
holding the dequantized weights. ``autocomp.hardware.compile.int8.lowering_report`` says which
happened to each layer.
"""

import math
from abc import ABC, abstractmethod
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from autocomp.core.errors import AutocompError
from autocomp.core.inventory import LayerInfo
from autocomp.methods.registry import ApplyContext, MethodConfig, Stage, register_method

WEIGHT_BITS = (8, 4, 2)
ACT_BITS = (8, 4)
CALIBRATIONS = ("minmax", "percentile")
ELIGIBLE_KINDS = ("conv", "dwconv", "gconv", "linear")
# Alternations of the integer-grid projection; it stops earlier once the integers settle.
GRID_ITERATIONS = 10
# Optimizer steps between ADMM's G and U updates: the W-subproblem gets a few steps to
# follow the penalty first. Updating every step makes the dual U outrun weights that
# Adam moves by about the learning rate per step, and W never settles near the grid.
ADMM_INTERVAL = 20


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


@dataclass(frozen=True, kw_only=True)
class LowBitConfig(MethodConfig, ABC):
    """Options every quantization method shares.

    ``a_bits`` quantizes the layer's input (None keeps it float), with its range
    calibrated by ``calibration`` (``minmax`` or ``percentile`` at ``percentile``);
    ``admm_rho > 0`` makes fine-tuning ADMM training with that penalty weight.
    """

    stage: ClassVar[Stage] = Stage.QUANTIZE
    a_bits: int | None = None
    calibration: str = "minmax"
    percentile: float = 99.99
    admm_rho: float = 0.0

    @property
    @abstractmethod
    def weight_bits(self) -> int:
        """Bits each stored weight takes."""

    @abstractmethod
    def project(self, weight: Tensor) -> tuple[Tensor, Tensor]:
        """The nearest point of the grid: integers q (float, shaped like ``weight``) and the
        per-output-channel scales, so that ``weight ≈ q * scale[c]``."""

    def __post_init__(self) -> None:
        if self.a_bits is not None and (type(self.a_bits) is not int or self.a_bits not in ACT_BITS):
            raise ValueError(f"{self.method} a_bits {self.a_bits!r} is not one of 8, 4 or null")
        if self.calibration not in CALIBRATIONS:
            raise ValueError(f"{self.method} calibration {self.calibration!r} is not one of "
                             f"{', '.join(CALIBRATIONS)}")
        if not _is_number(self.percentile) or not 50.0 < self.percentile <= 100.0:
            raise ValueError(f"{self.method} percentile {self.percentile!r} is outside (50, 100]")
        if not _is_number(self.admm_rho) or self.admm_rho < 0.0:
            raise ValueError(f"{self.method} admm_rho {self.admm_rho!r} is not a number >= 0")

    @classmethod
    def ineligible(cls, layer: LayerInfo) -> str | None:
        if layer.kind not in ELIGIBLE_KINDS:
            return f"it is a {layer.kind} layer, not a conv or linear one"
        return None


@dataclass(frozen=True, kw_only=True)
class QuantConfig(LowBitConfig):
    """Symmetric per-channel integer weights of ``w_bits`` bits."""

    method: ClassVar[str] = "quant"
    w_bits: int

    @property
    def weight_bits(self) -> int:
        return self.w_bits

    def __post_init__(self) -> None:
        if type(self.w_bits) is not int or self.w_bits not in WEIGHT_BITS:
            raise ValueError(f"quant w_bits {self.w_bits!r} is not one of "
                             f"{', '.join(map(str, WEIGHT_BITS))}")
        super().__post_init__()

    def project(self, weight: Tensor) -> tuple[Tensor, Tensor]:
        return integer_grid(weight, self.w_bits)


@dataclass(frozen=True, kw_only=True)
class BinaryConfig(LowBitConfig):
    """Binary weights, alpha_c * sign(w) (BWN / XNOR-Net)."""

    method: ClassVar[str] = "binary"

    @property
    def weight_bits(self) -> int:
        return 1

    def project(self, weight: Tensor) -> tuple[Tensor, Tensor]:
        return binary_grid(weight)


@dataclass(frozen=True, kw_only=True)
class TernaryConfig(LowBitConfig):
    """Ternary weights in {-alpha_c, 0, +alpha_c} (TWN), zero below ``threshold`` * mean |w_c|."""

    method: ClassVar[str] = "ternary"
    threshold: float = 0.7

    @property
    def weight_bits(self) -> int:
        return 2

    def __post_init__(self) -> None:
        if not _is_number(self.threshold) or not 0.0 < self.threshold < 1.0:
            raise ValueError(f"ternary threshold {self.threshold!r} is outside (0, 1)")
        super().__post_init__()

    def project(self, weight: Tensor) -> tuple[Tensor, Tensor]:
        return ternary_grid(weight, self.threshold)


def _rows(weight: Tensor) -> Tensor:
    """The weight as one row per output channel."""
    return weight.detach().reshape(weight.shape[0], -1)


def integer_grid(weight: Tensor, bits: int) -> tuple[Tensor, Tensor]:
    """Symmetric ``bits``-bit projection per output channel minimising ||w - scale * q||^2.

    Starts from the max-abs scale and alternates the best integers for the scale
    (round and clip) with the best scale for the integers (<w, q> / <q, q>); each step
    lowers the error, which matters most at 2 and 4 bits where clipping outliers pays.
    """
    top = 2 ** (bits - 1) - 1
    rows = _rows(weight)
    peak = rows.abs().amax(1)
    scale = torch.where(peak > 0, peak / top, torch.ones_like(peak))
    q = torch.clamp(torch.round(rows / scale[:, None]), -top, top)
    for _ in range(GRID_ITERATIONS):
        norm = (q * q).sum(1)
        scale = torch.where(norm > 0, (rows * q).sum(1) / norm.clamp(min=1), scale)
        settled = torch.clamp(torch.round(rows / scale[:, None]), -top, top)
        if torch.equal(settled, q):
            break
        q = settled
    return q.reshape(weight.shape), scale


def binary_grid(weight: Tensor) -> tuple[Tensor, Tensor]:
    """BWN: q = sign(w) (+1 at zero), scale_c = mean |w_c|, the least-squares optimum."""
    rows = _rows(weight)
    q = torch.where(rows >= 0, 1.0, -1.0).to(rows.dtype)
    return q.reshape(weight.shape), rows.abs().mean(1)


def ternary_grid(weight: Tensor, threshold: float) -> tuple[Tensor, Tensor]:
    """TWN: q = sign(w) where |w| > threshold * mean |w_c|, else 0; scale_c = mean of those |w|."""
    rows = _rows(weight)
    magnitude = rows.abs()
    keep = magnitude > threshold * magnitude.mean(1, keepdim=True)
    count = keep.sum(1)
    total = (magnitude * keep).sum(1)
    scale = torch.where(count > 0, total / count.clamp(min=1), torch.ones_like(total))
    return (torch.sign(rows) * keep).reshape(weight.shape), scale


@dataclass(frozen=True)
class IntegerLayer:
    """A quantized layer as an integer kernel needs it.

    Dequantisation, per output channel c (weight zero points are always 0, the
    quantization being symmetric)::

        w[c]  = (weight[c] - weight_zero_point[c]) * weight_scale[c]
        x_int = clamp(round(x / act_scale) + act_zero_point, 0, 2**act_bits - 1)
        x     = (x_int - act_zero_point) * act_scale      (x as is when act_bits is None)
        y     = op(x, w, bias, stride, padding, dilation, groups)

    computed in fp32, this is exactly what the PyTorch module computes outside training.
    ``weight`` is int8 shaped like the float weight, with values in {-1, +1} for 1 bit,
    {-1, 0, +1} for 2 bits (ternary or 2-bit integers) and within +-(2^(bits-1) - 1)
    otherwise; activations are unsigned. For linear layers ``stride``, ``padding`` and
    ``dilation`` are empty and ``groups`` is 1.
    """

    op: str  # conv1d, conv2d or linear
    weight: Tensor
    weight_scale: Tensor
    weight_zero_point: Tensor
    weight_bits: int
    act_scale: float | None
    act_zero_point: int | None
    act_bits: int | None
    bias: Tensor | None
    stride: tuple[int, ...]
    padding: tuple[int, ...] | str
    dilation: tuple[int, ...]
    groups: int
    padding_mode: str = "zeros"


class QuantizedLayer(nn.Module):
    """What the quantized Conv1d, Conv2d and Linear share; mixed in before the float class.

    ``weight`` stays the float (latent) weight; ``int_weight`` and ``weight_scale`` are
    its projection, refreshed when the layer enters eval mode, which is when they are
    used. ``act_scale`` and ``act_zero_point`` hold the calibrated input range.
    """

    op: ClassVar[str]
    weight: nn.Parameter
    bias: nn.Parameter | None
    int_weight: Tensor
    weight_scale: Tensor
    act_scale: Tensor
    act_zero_point: Tensor

    def setup_quantization(self, config: LowBitConfig) -> None:
        """Add the quantization state for ``config`` and derive the integer weights."""
        self.config = config
        self.admm_active = config.admm_rho > 0
        self.input_calibrated = False
        self.projected_from: tuple[int, int] | None = None
        self.act_levels = 2**config.a_bits - 1 if config.a_bits is not None else 0
        self.scale_shape = (-1,) + (1,) * (self.weight.dim() - 1)
        device = self.weight.device
        self.register_buffer("int_weight", torch.zeros(self.weight.shape, dtype=torch.int8, device=device))
        self.register_buffer("weight_scale", torch.zeros(self.weight.shape[0], device=device))
        if config.a_bits is not None:
            self.register_buffer("act_scale", torch.ones((), device=device))
            self.register_buffer("act_zero_point", torch.zeros((), device=device))
        self.requantize()
        if self.admm_active:
            self.admm_steps = 0
            self.register_buffer("admm_g", self.quantized_weight().detach().clone(), persistent=False)
            self.register_buffer("admm_u", torch.zeros_like(self.weight), persistent=False)

    def quantized_weight(self) -> Tensor:
        """The weight used outside training: ``int_weight * weight_scale`` per output channel."""
        return self.int_weight.to(self.weight_scale.dtype) * self.weight_scale.view(self.scale_shape)

    @torch.no_grad()
    def requantize(self) -> None:
        """Project the float weight onto the grid, unless it has not changed since the last
        projection (same storage, same version counter, which every in-place change bumps)
        or already lies on the stored grid (as ADMM leaves it)."""
        source = (self.weight.data_ptr(), self.weight._version)
        if source == self.projected_from:
            return
        if not torch.equal(self.weight, self.quantized_weight()):
            q, scale = self.config.project(self.weight)
            self.int_weight.copy_(q.to(torch.int8))
            self.weight_scale.copy_(scale)
        self.projected_from = source

    def train(self, mode: bool = True) -> "QuantizedLayer":
        super().train(mode)
        if not mode:
            self.requantize()
        return self

    def set_input_range(self, low: float, high: float) -> None:
        """Quantize the input over [low, high], widened to include 0."""
        low, high = min(low, 0.0), max(high, 0.0)
        scale = (high - low) / self.act_levels if high > low else 1.0
        self.act_scale.fill_(scale)
        self.act_zero_point.fill_(min(max(round(-low / scale), 0), self.act_levels))
        self.input_calibrated = True

    def compute_weight(self) -> Tensor:
        """The weight of this forward: stored grid in eval; in training the float weight
        (ADMM) or the live projection with gradients passed straight through."""
        if not self.training:
            return self.quantized_weight()
        if self.admm_active:
            return self.weight
        q, scale = self.config.project(self.weight)
        return q * scale.view(self.scale_shape) + (self.weight - self.weight.detach())

    def quantize_input(self, x: Tensor) -> Tensor:
        """Fake-quantize the input; in training, gradients pass where it is inside the range."""
        if not self.input_calibrated:
            return x
        levels = torch.round(x / self.act_scale) + self.act_zero_point
        fake = (torch.clamp(levels, 0, self.act_levels) - self.act_zero_point) * self.act_scale
        if not self.training:
            return fake
        inside = (levels >= 0) & (levels <= self.act_levels)
        return fake.detach() + (x - x.detach()) * inside

    def penalty(self) -> Tensor:
        """ADMM's proximity term rho/2 * ||W - G + U||^2 while ADMM training runs, else 0."""
        if not self.admm_active:
            return self.weight.new_zeros(())
        return self.config.admm_rho / 2 * (self.weight - self.admm_g + self.admm_u).pow(2).sum()

    @torch.no_grad()
    def after_step(self) -> None:
        """ADMM's updates, every ``ADMM_INTERVAL`` optimizer steps: G = project(W + U), U = U + W - G."""
        if not self.admm_active:
            return
        self.admm_steps += 1
        if self.admm_steps % ADMM_INTERVAL:
            return
        q, scale = self.config.project(self.weight + self.admm_u)
        self.admm_g.copy_(q * scale.view(self.scale_shape))
        self.admm_u.add_(self.weight - self.admm_g)

    @torch.no_grad()
    def finish_training(self) -> None:
        """End ADMM: put the float weight on the grid; later training is plain QAT."""
        if not self.admm_active:
            return
        q, scale = self.config.project(self.weight)
        self.int_weight.copy_(q.to(torch.int8))
        self.weight_scale.copy_(scale)
        self.weight.copy_(self.quantized_weight())
        self.projected_from = (self.weight.data_ptr(), self.weight._version)
        self.admm_active = False

    def storage_bytes(self) -> int:
        """Packed integer weights plus fp32 per-channel scales plus fp32 bias."""
        packed = math.ceil(self.weight.numel() * self.config.weight_bits / 8)
        bias = self.bias.numel() * 4 if self.bias is not None else 0
        return packed + 4 * self.weight_scale.numel() + bias

    def geometry(self) -> tuple[tuple[int, ...], tuple[int, ...] | str, tuple[int, ...], int, str]:
        """Stride, padding, dilation, groups and padding mode of the operator."""
        return (), (), (), 1, "zeros"

    def integer_form(self) -> IntegerLayer:
        """The layer for an integer kernel (see ``IntegerLayer`` for the formula)."""
        self.requantize()
        calibrated = self.input_calibrated
        stride, padding, dilation, groups, padding_mode = self.geometry()
        return IntegerLayer(
            op=self.op, weight=self.int_weight.clone(), weight_scale=self.weight_scale.clone(),
            weight_zero_point=torch.zeros_like(self.weight_scale, dtype=torch.int8),
            weight_bits=self.config.weight_bits,
            act_scale=float(self.act_scale) if calibrated else None,
            act_zero_point=int(self.act_zero_point) if calibrated else None,
            act_bits=self.config.a_bits if calibrated else None,
            bias=self.bias.detach().clone() if self.bias is not None else None,
            stride=stride, padding=padding, dilation=dilation, groups=groups, padding_mode=padding_mode)


class _QuantizedConv(QuantizedLayer):
    stride: tuple[int, ...]
    padding: tuple[int, ...] | str
    dilation: tuple[int, ...]
    groups: int
    padding_mode: str

    def geometry(self) -> tuple[tuple[int, ...], tuple[int, ...] | str, tuple[int, ...], int, str]:
        padding = self.padding if isinstance(self.padding, str) else tuple(self.padding)
        return tuple(self.stride), padding, tuple(self.dilation), self.groups, self.padding_mode

    def forward(self, x: Tensor) -> Tensor:
        return self._conv_forward(self.quantize_input(x), self.compute_weight(), self.bias)


class QuantConv1d(_QuantizedConv, nn.Conv1d):
    """A Conv1d computing with quantized weights (and input)."""

    op = "conv1d"


class QuantConv2d(_QuantizedConv, nn.Conv2d):
    """A Conv2d computing with quantized weights (and input)."""

    op = "conv2d"


class QuantLinear(QuantizedLayer, nn.Linear):
    """A Linear computing with quantized weights (and input)."""

    op = "linear"

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(self.quantize_input(x), self.compute_weight(), self.bias)


FLOAT_LAYERS = (nn.Conv1d, nn.Conv2d, nn.Linear)


def quantized_copy(module: nn.Conv1d | nn.Conv2d | nn.Linear, config: LowBitConfig) -> QuantizedLayer:
    """The quantized counterpart of a float layer, sharing its weight and bias tensors."""
    bias = module.bias is not None
    if isinstance(module, nn.Linear):
        layer: QuantizedLayer = QuantLinear(module.in_features, module.out_features, bias, device="meta")
    else:
        cls = QuantConv1d if isinstance(module, nn.Conv1d) else QuantConv2d
        layer = cls(module.in_channels, module.out_channels, module.kernel_size, module.stride,
                    module.padding, module.dilation, module.groups, bias, module.padding_mode,
                    device="meta")
    layer.weight = module.weight
    layer.bias = module.bias
    layer.setup_quantization(config)
    return layer.train(module.training)


def _float_layers(module: nn.Module, name: str) -> list[tuple[str, nn.Module]]:
    """The Conv/Linear modules a plan entry covers: the module itself, or all under it.

    Only plain Conv1d/Conv2d/Linear are quantized: a subclass (a sparse layer from stage 2,
    a conv with its own forward) would lose its behaviour, so it is refused.
    """
    found = [(name, module)] if isinstance(module, FLOAT_LAYERS) else [
        (f"{name}.{sub}", child) for sub, child in module.named_modules()
        if sub and isinstance(child, FLOAT_LAYERS)]
    for full_name, child in found:
        if type(child) not in FLOAT_LAYERS:
            raise AutocompError(f"layer {name!r}: {full_name} is a {type(child).__name__}, not a plain "
                                "Conv1d, Conv2d or Linear, and cannot be quantized")
    return found


class _RangeObserver:
    """Collects an input range over calibration batches: the overall min/max, or the
    mean over batches of the lower and upper ``percentile`` points."""

    def __init__(self, config: LowBitConfig) -> None:
        self.percentile = config.percentile if config.calibration == "percentile" else None
        self.lows: list[float] = []
        self.highs: list[float] = []

    def __call__(self, module: nn.Module, args: tuple[Any, ...]) -> None:
        values = args[0].detach().flatten()
        if self.percentile is None:
            self.lows.append(values.min().item())
            self.highs.append(values.max().item())
            return
        rank = int(values.numel() * (100.0 - self.percentile) / 100.0) + 1
        self.lows.append(torch.topk(values, rank, largest=False).values[-1].item())
        self.highs.append(torch.topk(values, rank).values[-1].item())

    def range(self) -> tuple[float, float]:
        if self.percentile is None:
            return min(self.lows), max(self.highs)
        return sum(self.lows) / len(self.lows), sum(self.highs) / len(self.highs)


def calibrate(model: nn.Module, layers: list[tuple[str, QuantizedLayer]],
              batches: Iterable[tuple[Tensor, Tensor]]) -> None:
    """Run ``batches`` through ``model`` in eval mode and set each layer's input range from
    what it saw; ``layers`` pairs each layer with the plan entry named in errors."""
    observers = [_RangeObserver(layer.config) for _, layer in layers]
    handles = [layer.register_forward_pre_hook(observer)
               for (_, layer), observer in zip(layers, observers, strict=True)]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for images, _ in batches:
                model(images)
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    for (name, layer), observer in zip(layers, observers, strict=True):
        if not observer.lows:
            raise AutocompError(f"layer {name!r}: the calibration batches never reached it")
        layer.set_input_range(*observer.range())


@register_method(TernaryConfig)
@register_method(BinaryConfig)
@register_method(QuantConfig)
def apply_quantization(model: nn.Module, choices: dict[str, LowBitConfig], ctx: ApplyContext) -> None:
    """Replace each chosen layer's Conv/Linear modules by quantized ones, in place, then
    calibrate the input ranges of those that quantize activations."""
    for name, config in choices.items():
        if config.a_bits is not None and ctx.calib is None:
            raise AutocompError(f"layer {name!r}: {config.method} with a_bits={config.a_bits} needs "
                                "calibration batches, and none were given")
    to_calibrate: list[tuple[str, QuantizedLayer]] = []
    for name, config in choices.items():
        targets = _float_layers(model.get_submodule(name), name)
        if not targets:
            raise AutocompError(f"layer {name!r} holds no Conv1d, Conv2d or Linear to quantize")
        for full_name, module in targets:
            layer = quantized_copy(module, config)
            model.set_submodule(full_name, layer)
            if config.a_bits is not None:
                to_calibrate.append((name, layer))
    if to_calibrate:
        assert ctx.calib is not None
        calibrate(model, to_calibrate, ctx.calib)
