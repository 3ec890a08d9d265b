"""Low-rank factorisation of a layer's weight: SVD, Tucker-2, CP or tensor-train.

- ``svd``: a Linear becomes Linear(in, r) -> Linear(r, out); a conv becomes a conv to
  r channels with the original kernel followed by a 1x1 conv (the weight reshaped to
  out x (in*K*K) and truncated). The rank is a fraction of the full rank, or the
  smallest rank whose squared singular values reach an ``energy`` fraction of the total.
- ``tucker2`` (Kim et al., ICLR 2016): a KxK conv becomes 1x1 (Cin->R_in) -> KxK core
  (R_in->R_out) -> 1x1 (R_out->Cout). Initialised by HOSVD: tensorly's ``partial_tucker``
  on the output and input modes with SVD initialisation and no HOOI iterations.
- ``cp`` (Lebedev et al., ICLR 2015): a KxK conv becomes 1x1 (Cin->R) -> Kx1 depthwise ->
  1xK depthwise -> 1x1 (R->Cout), from tensorly's ``parafac`` (ALS, SVD initialisation,
  fixed iterations and seed, so deterministic).
- ``tt`` (Novikov et al., NIPS 2015): a Linear's matrix held as a tensor-train matrix
  (tensorly's ``tensor_train_matrix``), applied core by core with reshapes and small
  Linear layers, so torch.export, the inventory and TVM all see ordinary ops.

At rank fraction 1 every kind reproduces the layer exactly (for ``cp`` "full rank" is the
rank at which an exact CP decomposition always exists, see ``cp_full_rank``; ALS reaches
it in practice but is not guaranteed to). Decompositions run in float64 with tensorly's
pytorch backend, set only for the calling thread and only for the call.
"""

import math
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Any, ClassVar

import tensorly
import torch
from tensorly.decomposition import parafac, partial_tucker, tensor_train_matrix
from torch import nn

from autocomp.core.errors import AutocompError
from autocomp.core.inventory import LayerInfo
from autocomp.methods.registry import ApplyContext, MethodConfig, Stage, register_method

KINDS = ("svd", "tucker2", "cp", "tt")
CP_ITERATIONS = 25  # ALS sweeps; parafac stops earlier once the error changes by < 1e-8
SEED = 0  # tensorly fills factor columns beyond a mode's size at random
TT_CORES = 3  # default number of factors the in and out features are each split into
_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_GROUPED = "grouped and depthwise convs have no dense weight to factorise"
_MODULES = {"svd": (nn.Linear, *_CONVS), "tucker2": _CONVS, "cp": _CONVS, "tt": (nn.Linear,)}


@dataclass(frozen=True)
class LowRankConfig(MethodConfig):
    """Factorise a layer's weight by ``kind``; ranks are fractions in (0, 1] of the full rank.

    ``rank``: svd, of min(out, in*K*K); tucker2, of Cin (input side); cp, of ``cp_full_rank``;
    tt, of each TT-rank's maximum. ``rank_out`` (tucker2 only): of Cout, default ``rank``.
    ``energy`` (svd only, instead of ``rank``): keep the fewest singular values whose squares
    reach this fraction of the total. ``cores`` (tt only): factors per side, default 3.
    """

    method: ClassVar[str] = "lowrank"
    stage: ClassVar[Stage] = Stage.FACTORISE
    rank: float | None = None
    kind: str = "svd"
    rank_out: float | None = None
    energy: float | None = None
    cores: int | None = None

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"lowrank kind {self.kind!r} is not known (known: {', '.join(KINDS)})")
        for name in ("rank", "rank_out", "energy"):
            value = getattr(self, name)
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise ValueError(f"lowrank {name} must be a number, not {value!r}")
            if not 0.0 < value <= 1.0:
                raise ValueError(f"lowrank {name} fraction {value} is outside (0, 1]")
        for name, kind in (("energy", "svd"), ("rank_out", "tucker2"), ("cores", "tt")):
            if getattr(self, name) is not None and self.kind != kind:
                raise ValueError(f"lowrank {name} applies to kind {kind} only, not {self.kind}")
        if self.kind == "svd" and (self.rank is None) == (self.energy is None):
            raise ValueError("lowrank svd takes either a rank or an energy (exactly one)")
        if self.kind != "svd" and self.rank is None:
            raise ValueError(f"lowrank {self.kind} needs a rank")
        if self.cores is not None and (isinstance(self.cores, bool) or not isinstance(self.cores, int)
                                       or not 2 <= self.cores <= 8):
            raise ValueError(f"lowrank cores {self.cores!r} is not an integer in [2, 8]")

    def to_json(self) -> dict[str, Any]:
        """The JSON form, without the parameters this kind leaves unset."""
        return {"method": self.method, **{k: v for k, v in asdict(self).items() if v is not None}}

    @classmethod
    def ineligible(cls, layer: LayerInfo, kind: str = "svd") -> str | None:
        """Why ``kind`` cannot factorise ``layer``, or None.

        Every kind's eligible layers are a subset of svd's, so the default also answers
        whether any kind can apply. For tt this assumes the default ``TT_CORES``.
        """
        return _INELIGIBLE[kind](layer)

    def unfit(self, layer: LayerInfo) -> str | None:
        """Why this config (its kind and parameters) cannot apply to ``layer``, or None."""
        if self.kind == "tt" and layer.kind == "linear":
            return tt_unfit(layer.in_channels, layer.out_channels, self.cores or TT_CORES)
        return self.ineligible(layer, self.kind)


def _svd_ineligible(layer: LayerInfo) -> str | None:
    if layer.groups > 1:
        return _GROUPED
    if full_rank(layer.in_channels, layer.out_channels, layer.kernel) < 2:
        return "its weight matrix has rank 1"
    return None


def _spatial_ineligible(kind: str, layer: LayerInfo) -> str | None:
    """Rules shared by the kinds that factorise a conv's spatial kernel (tucker2, cp)."""
    if layer.kind == "linear":
        return f"{kind} factorises conv kernels; a Linear layer takes svd or tt"
    if layer.groups > 1:
        return _GROUPED
    if math.prod(layer.kernel) == 1:
        return f"a 1x1 conv has no spatial kernel for {kind} to factorise; use svd"
    if layer.out_channels < 2:
        return "a single output channel leaves nothing to factorise"
    return None


def _tucker2_ineligible(layer: LayerInfo) -> str | None:
    reason = _spatial_ineligible("tucker2", layer)
    if reason is None and layer.in_channels < 2:
        return "a single input channel leaves nothing to factorise on the input side"
    return reason


def _tt_ineligible(layer: LayerInfo) -> str | None:
    if layer.kind != "linear":
        return "tt factorises Linear layers; convs take svd, tucker2 or cp"
    return tt_unfit(layer.in_channels, layer.out_channels, TT_CORES)


_INELIGIBLE = {
    "svd": _svd_ineligible,
    "tucker2": _tucker2_ineligible,
    "cp": lambda layer: _spatial_ineligible("cp", layer),
    "tt": _tt_ineligible,
}


def full_rank(in_channels: int, out_channels: int, kernel: list[int]) -> int:
    """Rank of the out x (in * prod(kernel)) weight matrix."""
    return min(out_channels, in_channels * math.prod(kernel))


def target_rank(full: int, fraction: float, multiple: int = 1) -> int:
    """Singular values kept for a rank fraction (at least one), rounded to ``multiple`` (the
    target's channel grid, so that factorised layers of different trials share kernels)."""
    return on_grid(max(1, int(full * fraction + 0.5)), full, multiple)


def on_grid(rank: int, full: int, multiple: int, *, up: bool = False) -> int:
    """``rank`` rounded to a multiple of ``multiple`` (upwards with ``up``), within [1, full]."""
    if multiple <= 1:
        return rank
    steps = -(-rank // multiple) if up else int(rank / multiple + 0.5)
    return max(min(multiple, full), min(multiple * steps, full), 1)


def energy_rank(singular_values: torch.Tensor, energy: float) -> int:
    """The fewest leading singular values whose squares reach ``energy`` of the total."""
    squares = singular_values.double() ** 2
    cumulative = squares.cumsum(0)
    needed = torch.searchsorted(cumulative, energy * cumulative[-1] * (1 - 1e-12)).item()
    return min(int(needed) + 1, len(singular_values))


def cp_full_rank(shape: tuple[int, ...] | torch.Size) -> int:
    """A rank at which a CP decomposition of a tensor of ``shape`` always exists exactly.

    Spelling the tensor out as a sum over every index of all modes but the largest gives one
    rank-one term each, so the CP rank is at most the product of all dimensions but the largest.
    """
    return math.prod(shape) // max(shape)


def balanced_factors(n: int, count: int) -> list[int] | None:
    """``n`` split into ``count`` factors >= 2, as equal as the primes allow (largest first).

    Primes are placed largest first, each on the currently smallest factor; None when ``n``
    has fewer than ``count`` prime factors.
    """
    primes, rest, p = [], n, 2
    while p * p <= rest:
        while rest % p == 0:
            primes.append(p)
            rest //= p
        p += 1
    if rest > 1:
        primes.append(rest)
    if len(primes) < count:
        return None
    factors = [1] * count
    for prime in sorted(primes, reverse=True):
        factors[factors.index(min(factors))] *= prime
    return sorted(factors, reverse=True)


def tt_unfit(in_features: int, out_features: int, cores: int) -> str | None:
    """The tt eligibility rule: in and out features each split into ``cores`` factors >= 2
    with no factor above twice the ``cores``-th root of its side (else one core would hold
    most of the matrix and the train saves little)."""
    for side, n in (("in", in_features), ("out", out_features)):
        factors = balanced_factors(n, cores)
        if factors is None:
            return f"{n} {side} features do not split into {cores} factors of at least 2"
        if factors[0] > 2 * n ** (1 / cores):
            return f"{n} {side} features split only unevenly into {cores} factors ({factors})"
    return None


def tt_ranks(in_factors: list[int], out_factors: list[int], fraction: float) -> list[int]:
    """TT-ranks (1, r_1, ..., r_{d-1}, 1): ``fraction`` of each boundary's maximal rank, the
    smaller of the products of m_k * n_k on either side (at fraction 1 the train is exact)."""
    sizes = [m * n for m, n in zip(in_factors, out_factors, strict=True)]
    ranks = [1]
    for k in range(1, len(sizes)):
        full = min(math.prod(sizes[:k]), math.prod(sizes[k:]))
        ranks.append(target_rank(full, fraction))
    ranks.append(1)
    for k in range(1, len(sizes)):  # keep each rank reachable from its neighbour's side
        ranks[k] = min(ranks[k], ranks[k - 1] * sizes[k - 1])
    for k in range(len(sizes) - 1, 0, -1):
        ranks[k] = min(ranks[k], ranks[k + 1] * sizes[k])
    return ranks


@contextmanager
def _tensorly_torch() -> Iterator[None]:
    """tensorly's pytorch backend for this thread only, without its notes on SVD sizes."""
    with tensorly.backend_context("pytorch", local_threadsafe=True), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Trying to compute SVD", category=UserWarning)
        yield


def _weight(module: nn.Module) -> torch.Tensor:
    """The weight, detached, in float64: ALS then converges to ~1e-12 rather than ~1e-5."""
    return module.weight.detach().double()


def _copy(target: nn.Module, weight: torch.Tensor, bias: torch.Tensor | None = None) -> nn.Module:
    with torch.no_grad():
        target.weight.copy_(weight.reshape(target.weight.shape))
        if bias is not None:
            target.bias.copy_(bias)
    return target


def _bias(module: nn.Module) -> torch.Tensor | None:
    return None if module.bias is None else module.bias.detach()


def _pointwise(module: nn.Module, c_in: int, c_out: int, bias: bool) -> nn.Module:
    """A 1x1 conv of the same dimensionality as ``module`` (no padding: it commutes with padding)."""
    return type(module)(c_in, c_out, 1, bias=bias, device=module.weight.device,
                        dtype=module.weight.dtype)


def svd_factorise(module: nn.Module, rank: float | None = None, energy: float | None = None,
                  multiple: int = 1) -> nn.Sequential:
    """The two-layer SVD factorisation of a Linear or ungrouped conv, by rank fraction or energy
    (the rank on a grid of ``multiple``; an energy's rank rounds up, keeping at least it)."""
    weight = _weight(module)
    out_channels = weight.shape[0]
    u, s, vh = torch.linalg.svd(weight.reshape(out_channels, -1), full_matrices=False)
    keep = (on_grid(energy_rank(s, energy), len(s), multiple, up=True) if energy is not None
            else target_rank(len(s), rank, multiple))
    root = s[:keep].sqrt()
    first_w, second_w = root[:, None] * vh[:keep], u[:, :keep] * root[None, :]
    has_bias = module.bias is not None
    kwargs = {"device": module.weight.device, "dtype": module.weight.dtype}
    if isinstance(module, nn.Linear):
        first = nn.Linear(module.in_features, keep, bias=False, **kwargs)
        second = nn.Linear(keep, out_channels, bias=has_bias, **kwargs)
    else:
        first = type(module)(module.in_channels, keep, module.kernel_size, module.stride, module.padding,
                             module.dilation, bias=False, padding_mode=module.padding_mode, **kwargs)
        second = _pointwise(module, keep, out_channels, has_bias)
    return nn.Sequential(_copy(first, first_w), _copy(second, second_w, _bias(module)))


def tucker2_factorise(module: nn.Module, rank: float, rank_out: float | None = None,
                      multiple: int = 1) -> nn.Sequential:
    """Tucker-2 of a KxK conv: 1x1 in, KxK core, 1x1 out, from the HOSVD of the weight."""
    weight = _weight(module)
    c_out, c_in = weight.shape[:2]
    r_in = target_rank(c_in, rank, multiple)
    r_out = target_rank(c_out, rank if rank_out is None else rank_out, multiple)
    with _tensorly_torch():
        (core, (u_out, u_in)), _ = partial_tucker(weight, [r_out, r_in], modes=[0, 1], n_iter_max=0,
                                                  init="svd", random_state=SEED)
    kwargs = {"device": module.weight.device, "dtype": module.weight.dtype}
    middle = type(module)(r_in, r_out, module.kernel_size, module.stride, module.padding,
                          module.dilation, bias=False, padding_mode=module.padding_mode, **kwargs)
    return nn.Sequential(_copy(_pointwise(module, c_in, r_in, False), u_in.T),
                         _copy(middle, core),
                         _copy(_pointwise(module, r_out, c_out, module.bias is not None), u_out,
                               _bias(module)))


def _axis(value: Any, axis: int, other: int) -> Any:
    """One spatial axis of a conv argument given per axis; ``other`` for the rest."""
    return value if isinstance(value, str) else tuple(v if i == axis else other for i, v in enumerate(value))


def cp_factorise(module: nn.Module, rank: float, multiple: int = 1) -> nn.Sequential:
    """CP of a conv: 1x1 (Cin->R), one depthwise conv per spatial axis, 1x1 (R->Cout)."""
    weight = _weight(module)
    c_out, c_in = weight.shape[:2]
    r = target_rank(cp_full_rank(weight.shape), rank, multiple)
    with _tensorly_torch():
        weights, factors = parafac(weight, r, n_iter_max=CP_ITERATIONS, init="svd", random_state=SEED)
    a_out, b_in, *spatial = factors
    kwargs = {"device": module.weight.device, "dtype": module.weight.dtype}
    layers = [_copy(_pointwise(module, c_in, r, False), b_in.T)]
    dims = len(module.kernel_size)
    for axis, factor in enumerate(spatial):
        kernel = tuple(module.kernel_size[axis] if i == axis else 1 for i in range(dims))
        depthwise = type(module)(r, r, kernel, _axis(module.stride, axis, 1), _axis(module.padding, axis, 0),
                                 _axis(module.dilation, axis, 1), groups=r, bias=False,
                                 padding_mode=module.padding_mode, **kwargs)
        layers.append(_copy(depthwise, factor.T))
    layers.append(_copy(_pointwise(module, r, c_out, module.bias is not None), a_out * weights[None, :],
                        _bias(module)))
    return nn.Sequential(*layers)


class TTLinear(nn.Module):
    """A Linear whose transposed weight is a tensor-train matrix; one small Linear per core.

    Core k, of shape (r_{k-1}, m_k, n_k, r_k), is stored as Linear(r_{k-1} m_k, n_k r_k).
    The input (..., m_1...m_d) is carried as (rows, n_1..n_{k-1}, r_{k-1}, m_k..m_d); each core
    contracts (r_{k-1}, m_k) into (n_k, r_k) with a matmul, then reshapes and permutes bring
    n_k forward. The bias is added at the end.
    """

    def __init__(self, in_factors: list[int], out_factors: list[int], ranks: list[int], bias: bool,
                 device: torch.device | None = None, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.in_factors, self.out_factors, self.ranks = list(in_factors), list(out_factors), list(ranks)
        self.in_features, self.out_features = math.prod(in_factors), math.prod(out_factors)
        self.cores = nn.ModuleList(
            nn.Linear(ranks[k] * m, n * ranks[k + 1], bias=False, device=device, dtype=dtype)
            for k, (m, n) in enumerate(zip(in_factors, out_factors, strict=True)))
        self.bias = nn.Parameter(torch.zeros(self.out_features, device=device, dtype=dtype)) if bias else None

    def load_cores(self, cores: list[torch.Tensor]) -> None:
        """Set the cores from tensors of shape (r_{k-1}, m_k, n_k, r_k)."""
        with torch.no_grad():
            for linear, core in zip(self.cores, cores, strict=True):
                linear.weight.copy_(core.permute(2, 3, 0, 1).reshape(linear.weight.shape))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        state = x.reshape(-1, 1, 1, self.in_features)  # rows, outputs done, rank, inputs left
        for k, linear in enumerate(self.cores):
            m, n, r_in, r_out = self.in_factors[k], self.out_factors[k], self.ranks[k], self.ranks[k + 1]
            rows, done, _, left = state.shape
            left //= m
            state = linear(state.reshape(rows, done, r_in * m, left).transpose(2, 3))
            state = state.reshape(rows, done, left, n, r_out).permute(0, 1, 3, 4, 2)
            state = state.reshape(rows, done * n, r_out, left)
        out = state.reshape(*lead, self.out_features)
        return out if self.bias is None else out + self.bias

    def extra_repr(self) -> str:
        return f"in={self.in_factors}, out={self.out_factors}, ranks={self.ranks}"


def tt_factorise(module: nn.Linear, rank: float, cores: int = TT_CORES) -> TTLinear:
    """The tensor-train matrix of a Linear's weight, at ``rank`` of each maximal TT-rank."""
    reason = tt_unfit(module.in_features, module.out_features, cores)
    if reason:
        raise AutocompError(f"lowrank tt: {reason}")
    in_factors = balanced_factors(module.in_features, cores)
    out_factors = balanced_factors(module.out_features, cores)
    ranks = tt_ranks(in_factors, out_factors, rank)
    tensor = _weight(module).T.reshape(*in_factors, *out_factors)
    with _tensorly_torch():
        train = tensor_train_matrix(tensor, ranks)
    layer = TTLinear(in_factors, out_factors, ranks, module.bias is not None,
                     device=module.weight.device, dtype=module.weight.dtype)
    layer.load_cores(list(train))
    if module.bias is not None:
        with torch.no_grad():
            layer.bias.copy_(module.bias)
    return layer


def factorise(module: nn.Module, config: LowRankConfig, multiple: int = 1) -> nn.Module:
    """The replacement for ``module`` that ``config`` asks for; SVD, Tucker-2 and CP ranks land on
    a grid of ``multiple`` (tensor-train ranks are bound to their neighbours and stay exact)."""
    if config.kind == "svd":
        return svd_factorise(module, config.rank, config.energy, multiple)
    if config.kind == "tucker2":
        return tucker2_factorise(module, config.rank, config.rank_out, multiple)
    if config.kind == "cp":
        return cp_factorise(module, config.rank, multiple)
    return tt_factorise(module, config.rank, config.cores or TT_CORES)


@register_method(LowRankConfig)
def apply_lowrank(model: nn.Module, choices: dict[str, LowRankConfig], ctx: ApplyContext) -> None:
    """Replace each chosen layer by its factorisation, in place, after checking every choice."""
    for name, config in choices.items():
        reason = config.unfit(ctx.inventory.layer(name))
        if reason:
            raise AutocompError(f"layer {name!r} cannot take lowrank {config.kind}: {reason}")
        module = model.get_submodule(name)
        if not isinstance(module, _MODULES[config.kind]):
            raise AutocompError(f"layer {name!r} is a {type(module).__name__}, which lowrank "
                                f"{config.kind} cannot factorise")
    for name, config in choices.items():
        model.set_submodule(name, factorise(model.get_submodule(name), config, ctx.channel_multiple))
