"""Integer lowering: quantized layers with integer activations compute in integers under TVM.

TVM 0.27's PyTorch importer has no quantized operators: a fake-quantized layer would
import as float ops on float constants. So, before ``torch.export``, each quantized
layer with calibrated integer activations (``a_bits`` 8 or 4) is swapped for a module
calling one opaque custom op (``autocomp::int_conv`` or ``autocomp::int_linear``), and
``CONVERT_MAP`` turns that op into Relax::

    x_q = astype(clip(round(x / s_x) + zp, 0, 2^a_bits - 1), "uint8")
    acc = conv2d / conv1d / linear(x_q, w_q: int8, out_dtype="int32")   (padding with zp)
    y   = astype(acc - zp * sum(w_q[c]), "float32") * out_scale[c] + out_bias[c]

with ``out_scale = s_x * s_w[c]`` and ``out_bias`` the bias. The input is padded with
its zero point (real zero), so the zero-point correction is one constant per output
channel. A batch norm right after such a layer folds exactly into ``out_scale`` and
``out_bias``: the integers are untouched. The float result feeds the next layer, whose
quantization fuses into this kernel's epilogue (requantization). Weights of fewer
bits (4, 2, ternary, binary) are integers within int8, so they compute as int8 too
and are held as int8 in the compiled module; their packed size is what
``QuantizedLayer.storage_bytes`` reports. Weight-only layers (``a_bits`` None) become
plain float layers with the dequantized weights, so their batch norms fold like any
float layer's. ``lowering_report`` says, per quantized layer, which of these happened.

Activations are unsigned with a zero point, weights signed: uint8 x int8 is also the
only combination x86's VNNI tensorization accepts (with NHWC/OHWI convs).
"""

import copy
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn

from autocomp.methods.quant import FLOAT_LAYERS, QuantizedLayer

INTEGER_ACT_BITS = (8, 4)


@torch.library.custom_op("autocomp::int_conv", mutates_args=())
def int_conv(x: Tensor, weight: Tensor, correction: Tensor, out_scale: Tensor, out_bias: Tensor,
             act_scale: float, act_zero_point: int, act_levels: int, stride: list[int],
             padding: list[int], dilation: list[int], groups: int) -> Tensor:
    """Integer conv (1-D or 2-D by the weight's rank), the op's PyTorch reference: the
    integer product is exact in float64. ``padding`` is all pads before, then all after."""
    dims = weight.dim() - 2
    x_q = torch.clamp(torch.round(x / act_scale) + act_zero_point, 0, act_levels)
    pads = [p for d in reversed(range(dims)) for p in (padding[d], padding[dims + d])]
    x_q = F.pad(x_q, pads, value=float(act_zero_point))
    conv = F.conv2d if dims == 2 else F.conv1d
    acc = conv(x_q.double(), weight.double(), None, stride, 0, dilation, groups) - correction.double()
    return acc.float() * out_scale + out_bias


@int_conv.register_fake
def _int_conv_fake(x: Tensor, weight: Tensor, correction: Tensor, out_scale: Tensor, out_bias: Tensor,
                   act_scale: float, act_zero_point: int, act_levels: int, stride: list[int],
                   padding: list[int], dilation: list[int], groups: int) -> Tensor:
    dims = weight.dim() - 2
    pads = [p for d in reversed(range(dims)) for p in (padding[d], padding[dims + d])]
    conv = F.conv2d if dims == 2 else F.conv1d
    return conv(F.pad(x, pads), weight.to(x.dtype), None, stride, 0, dilation, groups)


@torch.library.custom_op("autocomp::int_linear", mutates_args=())
def int_linear(x: Tensor, weight: Tensor, correction: Tensor, out_scale: Tensor, out_bias: Tensor,
               act_scale: float, act_zero_point: int, act_levels: int) -> Tensor:
    """Integer linear layer, the op's PyTorch reference (exact integer product in float64)."""
    x_q = torch.clamp(torch.round(x / act_scale) + act_zero_point, 0, act_levels)
    acc = F.linear(x_q.double(), weight.double()) - correction.double()
    return acc.float() * out_scale + out_bias


@int_linear.register_fake
def _int_linear_fake(x: Tensor, weight: Tensor, correction: Tensor, out_scale: Tensor, out_bias: Tensor,
                     act_scale: float, act_zero_point: int, act_levels: int) -> Tensor:
    return F.linear(x, weight.to(x.dtype))


class IntegerModule(nn.Module):
    """A quantized layer as its integer op: int8 weights, per-channel int32 zero-point
    correction, and the per-channel fp32 output scale and bias (batch norm folded in)."""

    weight: Tensor
    correction: Tensor
    out_scale: Tensor
    out_bias: Tensor

    def __init__(self, layer: QuantizedLayer) -> None:
        super().__init__()
        form = layer.integer_form()
        assert form.act_scale is not None and form.act_zero_point is not None and form.act_bits is not None
        self.op = form.op
        self.act_scale = form.act_scale
        self.act_zero_point = form.act_zero_point
        self.act_levels = 2**form.act_bits - 1
        self.folded_batchnorm: str | None = None
        channels = form.weight.shape[0]
        # per-channel tensors broadcast against (N, C, spatial...) or (..., C)
        shape = (channels,) + (1,) * (form.weight.dim() - 2)
        weight_sums = form.weight.to(torch.int32).reshape(channels, -1).sum(1)
        bias = form.bias.float() if form.bias is not None else torch.zeros(channels)
        self.register_buffer("weight", form.weight)
        self.register_buffer("correction", (form.act_zero_point * weight_sums).to(torch.int32).reshape(shape))
        self.register_buffer("out_scale", (form.act_scale * form.weight_scale.float()).reshape(shape))
        self.register_buffer("out_bias", bias.reshape(shape))

    @torch.no_grad()
    def fold_batchnorm(self, bn: nn.modules.batchnorm._BatchNorm, name: str) -> None:
        """Fold an eval-mode batch norm applied to this layer's output into its scale and bias."""
        assert bn.running_mean is not None and bn.running_var is not None
        factor = torch.rsqrt(bn.running_var.float() + bn.eps)
        if bn.weight is not None:
            factor = factor * bn.weight.float()
        shift = -bn.running_mean.float() * factor
        if bn.bias is not None:
            shift = shift + bn.bias.float()
        shape = self.out_scale.shape
        self.out_scale.copy_(self.out_scale * factor.reshape(shape))
        self.out_bias.copy_(self.out_bias * factor.reshape(shape) + shift.reshape(shape))
        self.folded_batchnorm = name


class IntegerConv(IntegerModule):
    """A quantized Conv1d/Conv2d with integer activations, computed by ``autocomp::int_conv``."""

    def __init__(self, layer: QuantizedLayer) -> None:
        super().__init__(layer)
        stride, padding, dilation, groups, _ = layer.geometry()
        kernel = tuple(layer.weight.shape[2:])
        self.stride = list(stride)
        self.padding = _explicit_padding(padding, kernel, dilation)
        self.dilation = list(dilation)
        self.groups = groups

    def forward(self, x: Tensor) -> Tensor:
        return int_conv(x, self.weight, self.correction, self.out_scale, self.out_bias, self.act_scale,
                        self.act_zero_point, self.act_levels, self.stride, self.padding, self.dilation,
                        self.groups)


class IntegerLinear(IntegerModule):
    """A quantized Linear with integer activations, computed by ``autocomp::int_linear``."""

    def forward(self, x: Tensor) -> Tensor:
        return int_linear(x, self.weight, self.correction, self.out_scale, self.out_bias, self.act_scale,
                          self.act_zero_point, self.act_levels)


def _explicit_padding(padding: tuple[int, ...] | str, kernel: tuple[int, ...],
                      dilation: tuple[int, ...]) -> list[int]:
    """Padding as all pads before, then all after (``same`` puts the odd pad after, as PyTorch)."""
    if padding == "valid":
        return [0] * (2 * len(kernel))
    if padding == "same":
        total = [d * (k - 1) for k, d in zip(kernel, dilation, strict=True)]
        return [t // 2 for t in total] + [t - t // 2 for t in total]
    assert not isinstance(padding, str)
    return list(padding) * 2


@dataclass(frozen=True)
class LayerLowering:
    """What one quantized layer computes in the compiled module, and how its weights are stored."""

    name: str
    op: str  # conv1d, conv2d or linear
    integer: bool
    compute: str
    weight_bits: int
    act_bits: int | None
    storage_bytes: int
    folded_batchnorm: str | None
    reason: str  # why the layer computes in float; empty for integer layers

    def describe(self) -> str:
        """One line for reports, e.g. ``uint8 x int8 -> int32 conv2d, ...; weights 4-bit packed ...``."""
        bn = f", batch norm {self.folded_batchnorm} folded in" if self.folded_batchnorm else ""
        why = f" ({self.reason})" if self.reason else ""
        if self.weight_bits == 8:
            weights = f"weights int8, {self.storage_bytes} B with scales"
        else:
            held = ", held as int8 in the module" if self.integer else ""
            weights = f"weights {self.weight_bits}-bit packed, {self.storage_bytes} B with scales{held}"
        return f"{self.compute}{why}{bn}; {weights}"


def _float_reason(layer: QuantizedLayer) -> str:
    """Why ``layer`` cannot compute in integers; empty when it can."""
    if layer.config.a_bits is None:
        return "weight-only quantization, weights dequantized to fp32"
    if layer.config.a_bits not in INTEGER_ACT_BITS:
        return f"{layer.config.a_bits}-bit activations have no integer kernel"
    if not layer.input_calibrated:
        return "input range never calibrated"
    _, _, _, _, padding_mode = layer.geometry()
    if padding_mode != "zeros":
        return f"{padding_mode} padding has no integer kernel"
    return ""


def _lowering(name: str, layer: QuantizedLayer, reason: str, folded: str | None) -> LayerLowering:
    a_bits = layer.config.a_bits
    if reason:
        compute = f"fp32 {layer.op}"
    else:
        kernel = "matmul" if layer.op == "linear" else layer.op
        note = "" if a_bits == 8 else f" ({a_bits}-bit activations held in uint8)"
        compute = f"uint8 x int8 -> int32 {kernel}{note}, requantized per channel to fp32"
    return LayerLowering(name, layer.op, not reason, compute, layer.config.weight_bits,
                         a_bits, layer.storage_bytes(), folded, reason)


class _IntegerLeafTracer(fx.Tracer):
    """Keeps integer modules as ``call_module`` nodes so that batch norms after them can be found."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return isinstance(m, IntegerModule) or super().is_leaf_module(m, module_qualified_name)


def _fold_batchnorms(model: nn.Module) -> nn.Module:
    """A graph module with each batch norm that only follows an integer layer folded into it;
    the model unchanged if FX cannot trace it (still correct, the batch norm then runs)."""
    try:
        graph = _IntegerLeafTracer().trace(model)
    except Exception:
        return model
    module = fx.GraphModule(model, graph)
    modules = dict(module.named_modules())
    calls: dict[str, int] = {}
    for node in graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
    for node in list(graph.nodes):
        bn = modules.get(node.target) if node.op == "call_module" else None
        if not isinstance(bn, nn.BatchNorm1d | nn.BatchNorm2d) or bn.running_mean is None:
            continue
        source = node.args[0]
        if not isinstance(source, fx.Node) or source.op != "call_module":
            continue
        layer = modules.get(source.target)
        dims = 2 if isinstance(bn, nn.BatchNorm2d) else 1
        expected = {"conv2d": (2,), "conv1d": (1,), "linear": (1,)}
        if (not isinstance(layer, IntegerModule) or dims not in expected[layer.op]
                or len(source.users) > 1 or calls[source.target] > 1 or calls[node.target] > 1
                or bn.num_features != layer.weight.shape[0]):
            continue
        layer.fold_batchnorm(bn, node.target)
        node.replace_all_uses_with(source)
        graph.erase_node(node)
    graph.lint()
    module.delete_all_unused_submodules()
    module.recompile()
    return module


@torch.no_grad()
def _dequantized(layer: QuantizedLayer) -> nn.Module:
    """The plain float layer computing what a weight-only quantized layer computes in eval."""
    base = next(cls for cls in type(layer).__mro__ if cls in FLOAT_LAYERS)
    bias = layer.bias is not None
    if base is nn.Linear:
        plain = nn.Linear(layer.in_features, layer.out_features, bias)
    else:
        stride, padding, dilation, groups, padding_mode = layer.geometry()
        plain = base(layer.in_channels, layer.out_channels, layer.kernel_size, stride, padding,
                     dilation, groups, bias, padding_mode)
    plain.weight.copy_(layer.quantized_weight())
    if layer.bias is not None:
        plain.bias.copy_(layer.bias)
    return plain.eval()


@dataclass(frozen=True)
class IntegerModel:
    """A model ready for ``torch.export``: integer layers swapped in, batch norms folded."""

    module: nn.Module
    layers: list[LayerLowering]


def integer_model(model: nn.Module) -> IntegerModel:
    """An eval-mode copy of ``model`` whose quantized layers with integer activations call
    the integer ops, with the batch norms after them folded, and whose weight-only
    quantized layers are plain float layers; ``model`` is not changed."""
    copied = copy.deepcopy(model).eval()
    swapped: dict[str, IntegerModule] = {}
    replacements: dict[str, nn.Module] = {}
    reasons: dict[str, str] = {}
    for name, layer in list(copied.named_modules()):
        if not isinstance(layer, QuantizedLayer):
            continue
        reasons[name] = _float_reason(layer)
        if not reasons[name]:
            swapped[name] = IntegerConv(layer) if layer.op != "linear" else IntegerLinear(layer)
        elif layer.config.a_bits is None or not layer.input_calibrated:
            replacements[name] = _dequantized(layer)
    replacements.update(swapped)
    if "" in replacements:
        copied = replacements[""]
    else:
        for name, replacement in replacements.items():
            copied.set_submodule(name, replacement)
    quantized = dict(model.named_modules())
    module = _fold_batchnorms(copied) if swapped else copied
    layers = [_lowering(name, quantized[name], reason,
                        swapped[name].folded_batchnorm if name in swapped else None)
              for name, reason in reasons.items()]
    return IntegerModel(module, layers)


def lowering_report(model: nn.Module) -> list[LayerLowering]:
    """What each quantized layer of ``model`` computes once compiled (see ``LayerLowering``)."""
    return integer_model(model).layers


def _quantize(bb, x, scale: float, zero_point: int, levels: int):
    from tvm import relax

    x = relax.op.round(relax.op.divide(x, relax.const(scale, "float32")))
    if zero_point:
        x = relax.op.add(x, relax.const(float(zero_point), "float32"))
    return bb.emit(relax.op.astype(relax.op.clip(x, 0, levels), "uint8"))


def _requantize(bb, acc, correction, out_scale, out_bias, zero_point: int):
    from tvm import relax

    if zero_point:
        acc = relax.op.subtract(acc, correction)
    y = relax.op.multiply(relax.op.astype(acc, "float32"), out_scale)
    return bb.emit(relax.op.add(y, out_bias))


def _convert_int_conv(node: fx.Node, importer):
    from tvm import relax

    (x, weight, correction, out_scale, out_bias, act_scale, zero_point, levels, stride, padding,
     dilation, groups) = importer.retrieve_args(node)
    bb = importer.block_builder
    dims = len(stride)
    x_q = _quantize(bb, x, act_scale, zero_point, levels)
    if zero_point and any(padding):
        widths = [0, 0, 0, 0] + [p for d in range(dims) for p in (padding[d], padding[dims + d])]
        x_q = bb.emit(relax.op.nn.pad(x_q, widths, pad_value=float(zero_point)))
        padding = [0] * (2 * dims)
    conv = relax.op.nn.conv2d if dims == 2 else relax.op.nn.conv1d
    acc = bb.emit(conv(x_q, weight, strides=stride, padding=padding, dilation=dilation, groups=groups,
                       out_dtype="int32"))
    return _requantize(bb, acc, correction, out_scale, out_bias, zero_point)


def _convert_int_linear(node: fx.Node, importer):
    from tvm import relax

    x, weight, correction, out_scale, out_bias, act_scale, zero_point, levels = importer.retrieve_args(node)
    bb = importer.block_builder
    x_q = _quantize(bb, x, act_scale, zero_point, levels)
    acc = bb.emit(relax.op.linear(x_q, weight, out_dtype="int32"))
    return _requantize(bb, acc, correction, out_scale, out_bias, zero_point)


# For ``from_exported_program(..., custom_convert_map=CONVERT_MAP)``: the importer looks
# ops up by their overload's name.
CONVERT_MAP = {"int_conv.default": _convert_int_conv, "int_linear.default": _convert_int_linear}
