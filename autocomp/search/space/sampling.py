"""Search spaces: ``search_spaces/NAME.yaml`` and how a trial samples a plan from one.

A space names the methods a layer may take (``methods``, each with fixed values, lists of
choices or ``{low, high, step}`` grids per parameter), combinations of methods one layer
may take together (``combine``, e.g. prune then quantize), which choices each layer kind
may take (``layers``), the fine-tuning knobs (``finetune``; a list is a choice per
trial) and deployment knobs searched per trial where the target supports them
(``deploy``). Every Optuna parameter is conditional on the choices above it:
``{layer}.method``, then ``{layer}.{method}.variant``, then
``{layer}.{method}[.{variant}].{param}``; ``finetune.{knob}`` and ``deploy.{knob}`` are
global.
"""

import dataclasses
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna

from autocomp.core.inventory import Inventory, LayerInfo
from autocomp.hardware.profiles import HardwareProfile
from autocomp.methods.lowrank import LowRankConfig, full_rank, target_rank
from autocomp.methods.plan import CompressionPlan
from autocomp.methods.registry import MethodConfig
from autocomp.training.config import FinetuneConfig

KEEP = "keep"
COMBINE = "+"  # joins the methods of a combination: "prune+quant"
LAYER_KINDS = ("conv", "dwconv", "gconv", "linear")  # autocomp.core.inventory.LayerInfo.kind
DEPLOY_KNOBS = ("threads",)
# Space options that are policies of the space, not parameters of a method's config.
POLICY_KEYS = {"lowrank": {"min_full_rank"}}
# The warm-start baselines after "uncompressed": label, method, target parameter values.
BASELINES = (
    ("uniform int8", "quant", {"w_bits": 8, "a_bits": 8}),
    ("uniform prune 30%", "prune", {"ratio": 0.3}),
    ("uniform prune 50%", "prune", {"ratio": 0.5}),
    ("uniform rank 50%", "lowrank", {"kind": "svd", "rank": 0.5}),
)
# A baseline method offered to a layer only in a combination takes its partners at these
# values (a space whose convs take pruning only together with int8, as on an int8 MCU).
PARTNERS = {"quant": ({"w_bits": 8, "a_bits": 8}, "int8")}
_FRACTIONS = {"ratio", "rank", "rank_out", "sparsity", "energy"}  # shown as percentages


@dataclass(frozen=True)
class Range:
    """An inclusive numeric range sampled on a grid of ``step`` (integers when all three are)."""

    low: float
    high: float
    step: float

    @property
    def integer(self) -> bool:
        return all(float(v).is_integer() and isinstance(v, int) for v in (self.low, self.high, self.step))

    def nearest(self, value: float) -> float:
        """The grid point nearest ``value`` (rounded so that 0.1 + 2 * 0.1 is 0.3)."""
        top = math.floor((self.high - self.low) / self.step + 1e-9)
        index = min(max(round((value - self.low) / self.step), 0), top)
        point = self.low + index * self.step
        return round(point) if self.integer else round(point, 10)

    def text(self) -> str:
        return f"{_fmt(self.low)}-{_fmt(self.high)} step {_fmt(self.step)}"


# A method parameter in a space: a fixed value, a list of choices, or a range.
ParamSpec = Any


@dataclass(frozen=True)
class MethodSpace:
    """One method offered by a space: its config class and how each parameter is sampled."""

    config_cls: type[MethodConfig]
    params: dict[str, ParamSpec]
    min_full_rank: int = 16
    label: str = ""  # names the variant when a method is offered in several variants

    @property
    def method(self) -> str:
        return self.config_cls.method

    def first_values(self) -> dict[str, Any]:
        """Each parameter at its first choice (or the low end of its range)."""
        return {name: (spec[0] if isinstance(spec, list) else spec.low if isinstance(spec, Range)
                       else spec) for name, spec in self.params.items()}

    def _fits(self, layer: LayerInfo, values: dict[str, Any]) -> bool:
        try:
            config = self.config_cls(**values)
        except (TypeError, ValueError):
            return False
        if config.unfit(layer) is not None:
            return False
        return self.method != LowRankConfig.method or self._lowrank_pays(layer, values)

    def _lowrank_pays(self, layer: LayerInfo, values: dict[str, Any]) -> bool:
        """Offer low rank only on matrices big enough to keep several ranks (a 10-class head
        at rank 1 predicts one direction) and, for SVD, where even the top rank saves
        parameters."""
        full = full_rank(layer.in_channels, layer.out_channels, layer.kernel)
        if full < self.min_full_rank:
            return False
        if values.get("kind", "svd") != "svd" or not isinstance(self.params.get("rank"), Range):
            return True
        rank = target_rank(full, self.params["rank"].high)
        rows = layer.in_channels * math.prod(layer.kernel)
        return rank * (rows + layer.out_channels) < rows * layer.out_channels

    def choices_for(self, layer: LayerInfo) -> dict[str, list] | None:
        """For each list-valued parameter, the choices that fit ``layer`` (others at their
        first value); None when the method does not fit the layer at all."""
        base = self.first_values()
        choices = {}
        for name, spec in self.params.items():
            if isinstance(spec, list):
                fitting = [value for value in spec if self._fits(layer, {**base, name: value})]
                if not fitting:
                    return None
                choices[name] = fitting
        if not choices and not self._fits(layer, base):
            return None
        return choices

    def prefix(self, layer: LayerInfo) -> str:
        return f"{layer.name}.{self.method}" + (f".{self.label}" if self.label else "")

    def suggest(self, trial: optuna.Trial, layer: LayerInfo, choices: dict[str, list]) -> MethodConfig:
        values = {}
        for name, spec in self.params.items():
            key = f"{self.prefix(layer)}.{name}"
            if isinstance(spec, list):
                values[name] = trial.suggest_categorical(key, choices[name])
            elif isinstance(spec, Range):
                values[name] = (trial.suggest_int(key, int(spec.low), int(spec.high), step=int(spec.step))
                                if spec.integer else
                                round(trial.suggest_float(key, spec.low, spec.high, step=spec.step), 10))
            else:
                values[name] = spec
        return self.config_cls(**values)

    def text(self) -> str:
        parts = []
        for name, spec in self.params.items():
            shown = (spec.text() if isinstance(spec, Range) else
                     "/".join(map(_fmt, spec)) if isinstance(spec, list) else _fmt(spec))
            parts.append(f"{name} {shown}")
        return ", ".join(parts)


Options = dict[str, list[tuple[MethodSpace, dict[str, list]]]]


@dataclass(frozen=True)
class SearchSpace:
    """Which methods a layer may take, how their parameters are sampled, how trials are
    fine-tuned and which deployment knobs are searched.

    The mapping-like fields are tuples of pairs (``excluded`` sorted) so that a space stays
    frozen and compares equal however it was built; ``excluded_map`` gives the narrowing as
    a dict, to save beside a run and replay with ``narrowed``.
    """

    name: str
    source: Path
    methods: tuple[MethodSpace, ...]  # a method may appear in several labelled variants
    finetune: FinetuneConfig  # every list-valued knob at its first value
    finetune_choices: tuple[tuple[str, tuple], ...] = ()  # knob -> choices sampled per trial
    combos: tuple[tuple[str, ...], ...] = ()  # methods one layer may take together, stage order
    kinds: tuple[tuple[str, tuple[str, ...]], ...] = ()  # layer kind -> the choices it may take
    deploy: tuple[tuple[str, tuple], ...] = ()  # deployment knob -> choices
    excluded: tuple[tuple[str, tuple[str, ...]], ...] = ()  # layer -> methods narrowed away
    description: str = ""

    @property
    def excluded_map(self) -> dict[str, set[str]]:
        """Layer -> methods ``narrowed`` removed (JSON-ready with ``sorted``)."""
        return {layer: set(methods) for layer, methods in self.excluded}

    def _method_names(self) -> list[str]:
        return list(dict.fromkeys(variant.method for variant in self.methods))

    def _fitting(self, layer: LayerInfo) -> Options:
        fitting: Options = {}
        for variant in self.methods:
            choices = variant.choices_for(layer)
            if choices is not None:
                fitting.setdefault(variant.method, []).append((variant, choices))
        return fitting

    def _choices(self, layer: LayerInfo, fitting: Options) -> list[str]:
        excluded = self.excluded_map.get(layer.name, set())
        allowed = dict(self.kinds).get(layer.kind)
        names = [method for method in self._method_names() if method in fitting]
        names += [COMBINE.join(combo) for combo in self.combos if all(m in fitting for m in combo)]
        return [KEEP] + [name for name in names
                         if (allowed is None or name in allowed) and name not in excluded
                         and not excluded & set(name.split(COMBINE))]

    def layer_choices(self, layer: LayerInfo) -> list[str]:
        """The values of ``{layer}.method``: keep, each method offered alone, each combination."""
        return self._choices(layer, self._fitting(layer))

    def layer_options(self, layer: LayerInfo) -> Options:
        """The methods this space offers ``layer`` (keep always), alone or in a combination,
        each with its fitting variants and their fitting choices."""
        fitting = self._fitting(layer)
        offered = {method for choice in self._choices(layer, fitting) for method in choice.split(COMBINE)}
        return {KEEP: [], **{method: variants for method, variants in fitting.items() if method in offered}}

    def suggest_plan(self, trial: optuna.Trial, inventory: Inventory) -> CompressionPlan:
        """Sample one choice per eligible layer, then each method's variant, then its parameters."""
        layers = {}
        for layer in inventory.layers:
            fitting = self._fitting(layer)
            choices = self._choices(layer, fitting)
            if len(choices) == 1:
                continue
            choice = trial.suggest_categorical(f"{layer.name}.method", choices)
            if choice == KEEP:
                continue
            configs = []
            for method in choice.split(COMBINE):
                variants = fitting[method]
                if len(variants) > 1:
                    label = trial.suggest_categorical(f"{layer.name}.{method}.variant",
                                                      [variant.label for variant, _ in variants])
                    variants = [(v, c) for v, c in variants if v.label == label]
                variant, fitting_choices = variants[0]
                configs.append(variant.suggest(trial, layer, fitting_choices))
            layers[layer.name] = tuple(configs)
        return CompressionPlan(layers)

    def uncompressed_params(self, inventory: Inventory) -> dict[str, str]:
        """Trial parameters that keep every layer: the uncompressed model, enqueued first."""
        return {f"{layer.name}.method": KEEP for layer in inventory.layers
                if len(self.layer_choices(layer)) > 1}

    def uniform_baselines(self, inventory: Inventory) -> list[tuple[str, dict[str, Any]]]:
        """Labelled fixed parameters of the warm-start trials, for ``study.enqueue_trial``:
        uncompressed, then uniform int8, prune 30% and 50%, rank 50% where the space offers
        them. Each compresses every layer offered its method (values on the space's grid,
        the nearest point named in the label when the target is off it) and keeps the rest.
        Where a layer takes the method only together with int8 (the mcu space), the baseline
        is "... + int8" and every other layer that can takes int8 as well. A baseline equal to
        an earlier one is left out."""
        baselines = [("uncompressed", self.uncompressed_params(inventory))]
        for label, method, targets in BASELINES:
            params: dict[str, Any] = {}
            notes: set[str] = set()
            partners: set[str] = set()
            for layer in inventory.layers:
                params.update(self._baseline_layer(layer, method, targets, notes, partners))
            for partner in sorted(partners):  # the rest of a "prune 30% + int8" model is int8 too
                for layer in inventory.layers:
                    if params.get(f"{layer.name}.method") == KEEP:
                        params.update(self._baseline_layer(layer, partner, PARTNERS[partner][0], notes,
                                                           set()))
            if all(params != earlier for _, earlier in baselines):
                suffix = "".join(f" + {PARTNERS[p][1]}" for p in sorted(partners))
                note = f" (grid nearest {', '.join(sorted(notes))})" if notes else ""
                baselines.append((label + suffix + note, params))
        return baselines

    def _baseline_layer(self, layer: LayerInfo, method: str, targets: dict[str, Any],
                        notes: set[str], partners: set[str]) -> dict[str, Any]:
        """One layer's fixed parameters in a baseline of ``method`` (keep when it cannot take it)."""
        fitting = self._fitting(layer)
        choices = self._choices(layer, fitting)
        if len(choices) == 1:
            return {}
        keep = {f"{layer.name}.method": KEEP}
        candidates = [method] + [c for c in choices if COMBINE in c and method in c.split(COMBINE)
                                 and all(m == method or m in PARTNERS for m in c.split(COMBINE))]
        choice = next((c for c in candidates if c in choices), None)
        if choice is None:
            return keep
        params: dict[str, Any] = {f"{layer.name}.method": choice}
        layer_notes: set[str] = set()
        for part in choice.split(COMBINE):
            fixed = _fixed_params(layer, fitting[part],
                                  targets if part == method else PARTNERS[part][0], layer_notes)
            if fixed is None:
                return keep
            params.update(fixed)
        notes |= layer_notes
        partners |= {m for m in choice.split(COMBINE) if m != method}
        return params

    def narrowed(self, excluded: Mapping[str, Iterable[str]]) -> "SearchSpace":
        """A copy in which layer L no longer offers the methods in ``excluded[L]`` (nor the
        combinations holding them); keep always stays. Adds to earlier narrowing."""
        merged = self.excluded_map
        for layer, methods in excluded.items():
            merged.setdefault(layer, set()).update(set(methods) - {KEEP})
        return dataclasses.replace(self, excluded=tuple(
            (layer, tuple(sorted(methods))) for layer, methods in sorted(merged.items()) if methods))

    def suggest_finetune(self, trial: optuna.Trial) -> FinetuneConfig:
        """This trial's fine-tuning: list-valued knobs sampled as ``finetune.<knob>``."""
        sampled = {name: trial.suggest_categorical(f"finetune.{name}", list(choices))
                   for name, choices in self.finetune_choices}
        return dataclasses.replace(self.finetune, **sampled)

    def with_finetune(self, **values: Any) -> "SearchSpace":
        """A copy with these fine-tuning knobs fixed (no longer sampled), e.g. ``steps=0``."""
        return dataclasses.replace(
            self, finetune=dataclasses.replace(self.finetune, **values),
            finetune_choices=tuple((n, c) for n, c in self.finetune_choices if n not in values))

    def deploy_knobs(self, profile: HardwareProfile) -> dict[str, list]:
        """The deployment knobs ``profile`` supports, with their choices: threads for CPUs
        compiled by LLVM, clamped to the profile's thread count; nothing elsewhere."""
        knobs: dict[str, list] = {}
        threads = dict(self.deploy).get("threads")
        if threads and profile.latency.device == "cpu" and profile.tvm_target.get("kind") == "llvm":
            knobs["threads"] = list(dict.fromkeys(min(n, profile.latency.threads) for n in threads))
        return knobs

    def suggest_deploy(self, trial: optuna.Trial, profile: HardwareProfile) -> dict[str, Any]:
        """This trial's deployment knobs, sampled as ``deploy.<knob>``; {} where none apply."""
        return {name: trial.suggest_categorical(f"deploy.{name}", choices)
                for name, choices in self.deploy_knobs(profile).items()}

    def describe(self) -> str:
        """One paragraph for reports: methods, ranges, per-kind limits, fine-tune and deploy knobs."""
        variants = "; ".join(f"{v.method}{f' [{v.label}]' if v.label else ''} ({v.text() or 'no parameters'})"
                             for v in self.methods)
        text = f"Search space {self.name} ({self.source.name}): each layer keeps or takes {variants}"
        if self.combos:
            text += f"; combinations {', '.join(COMBINE.join(c) for c in self.combos)}"
        if self.kinds:
            text += "; " + "; ".join(f"{kind} layers only {', '.join(choices) or KEEP}"
                                     for kind, choices in self.kinds)
        ft = self.finetune
        choices = dict(self.finetune_choices)
        knobs = ", ".join(f"{name} {'/'.join(map(_fmt, choices[name])) if name in choices else _fmt(value)}"
                          for name, value in (("steps", ft.steps), ("lr", ft.lr), ("alpha", ft.alpha),
                                              ("temperature", ft.temperature)))
        extra = [f"{name} {'/'.join(map(_fmt, values))}" for name, values in self.finetune_choices
                 if name not in ("steps", "lr", "alpha", "temperature")]
        text += (". Fine-tuning: none (calibration only)." if ft.steps == 0 and "steps" not in choices
                 else f". Fine-tuning with distillation: {', '.join([knobs, *extra])}.")
        if self.deploy:
            text += " Deployment knobs searched where the target supports them: " + ", ".join(
                f"{name} {'/'.join(map(str, values))}" for name, values in self.deploy) + "."
        if self.excluded:
            text += (f" Narrowed: {len(self.excluded)} layers no longer offer "
                     f"{sum(len(m) for _, m in self.excluded)} layer-method pairs.")
        return text


def _fmt(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def _nearest(spec: ParamSpec, target: Any) -> Any:
    """The value of ``spec`` nearest ``target``: a grid point, the closest choice, or the fixed value."""
    if isinstance(spec, Range):
        return spec.nearest(target)
    if not isinstance(spec, list):
        return spec
    if target in spec:
        return target
    numbers = [v for v in spec if isinstance(v, int | float) and not isinstance(v, bool)]
    if isinstance(target, int | float) and numbers:
        return min(numbers, key=lambda v: abs(v - target))
    return spec[0]


def _fixed_params(layer: LayerInfo, variants: list[tuple[MethodSpace, dict[str, list]]],
                  targets: dict[str, Any], notes: set[str]) -> dict[str, Any] | None:
    """Trial parameters putting ``layer`` on the variant and grid values nearest ``targets``;
    None when those values do not fit the layer. Off-target values are added to ``notes``."""
    best = None
    for variant, choices in variants:
        values, params, misses = {}, {}, set()
        for name, spec in variant.params.items():
            value = (_nearest(spec, targets[name]) if name in targets else
                     choices[name][0] if isinstance(spec, list) else spec.low if isinstance(spec, Range)
                     else spec)
            if isinstance(spec, list) and value not in choices[name]:
                break
            values[name] = value
            if isinstance(spec, list | Range):
                params[f"{variant.prefix(layer)}.{name}"] = value
        else:
            try:
                config = variant.config_cls(**values)
            except (TypeError, ValueError):
                continue
            if config.unfit(layer) is not None:
                continue
            for name, target in targets.items():
                got = getattr(config, name, None)
                if got != target and not (isinstance(got, float) and abs(got - target) < 1e-9):
                    misses.add(f"{got:.0%}" if name in _FRACTIONS and isinstance(got, float)
                               else f"{name} {got}")
            if len(variants) > 1:
                params[f"{layer.name}.{variant.method}.variant"] = variant.label
            if best is None or len(misses) < len(best[1]):
                best = (params, misses)
    if best is None:
        return None
    notes |= best[1]
    return best[0]
