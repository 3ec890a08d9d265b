"""Search spaces: ``search_spaces/NAME.yaml`` and how a trial samples a plan from one."""

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna

from autocomp.distill import FinetuneConfig
from autocomp.errors import AutocompError
from autocomp.inventory import Inventory, LayerInfo
from autocomp.methods import METHODS, MethodConfig
from autocomp.methods.lowrank import LowRankConfig, full_rank, target_rank
from autocomp.paths import bundled_dir
from autocomp.plan import CompressionPlan
from autocomp.yaml_files import Checker, read_yaml

KEEP = "keep"
# Space options that are policies of the space, not parameters of a method's config.
POLICY_KEYS = {"lowrank": {"min_full_rank"}}


@dataclass(frozen=True)
class Range:
    """An inclusive numeric range sampled on a grid of ``step`` (integers when all three are)."""

    low: float
    high: float
    step: float

    @property
    def integer(self) -> bool:
        return all(float(v).is_integer() and isinstance(v, int) for v in (self.low, self.high, self.step))


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
            config.check()
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

    def suggest(self, trial: optuna.Trial, layer: LayerInfo, choices: dict[str, list]) -> MethodConfig:
        values = {}
        prefix = f"{layer.name}.{self.method}" + (f".{self.label}" if self.label else "")
        for name, spec in self.params.items():
            key = f"{prefix}.{name}"
            if isinstance(spec, list):
                values[name] = trial.suggest_categorical(key, choices[name])
            elif isinstance(spec, Range):
                values[name] = (trial.suggest_int(key, int(spec.low), int(spec.high), step=int(spec.step))
                                if spec.integer else
                                trial.suggest_float(key, spec.low, spec.high, step=spec.step))
            else:
                values[name] = spec
        config = self.config_cls(**values)
        config.check()
        return config


@dataclass(frozen=True)
class SearchSpace:
    """Which methods a layer may take, how their parameters are sampled, and how trials are
    fine-tuned."""

    name: str
    source: Path
    methods: tuple[MethodSpace, ...]  # a method may appear in several labelled variants
    finetune: FinetuneConfig

    def layer_options(self, layer: LayerInfo) -> dict[str, list[tuple[MethodSpace, dict[str, list]]]]:
        """The methods this space offers ``layer`` (keep always), each with its fitting
        variants and their fitting choices."""
        options: dict[str, list[tuple[MethodSpace, dict[str, list]]]] = {KEEP: []}
        for variant in self.methods:
            choices = variant.choices_for(layer)
            if choices is not None:
                options.setdefault(variant.method, []).append((variant, choices))
        return options

    def suggest_plan(self, trial: optuna.Trial, inventory: Inventory) -> CompressionPlan:
        """Sample one method per eligible layer, then its variant, then the variant's parameters."""
        layers = {}
        for layer in inventory.layers:
            options = self.layer_options(layer)
            if len(options) == 1:
                continue
            method = trial.suggest_categorical(f"{layer.name}.method", list(options))
            if method == KEEP:
                continue
            variants = options[method]
            if len(variants) > 1:
                label = trial.suggest_categorical(f"{layer.name}.{method}.variant",
                                                  [variant.label for variant, _ in variants])
                variants = [(v, c) for v, c in variants if v.label == label]
            variant, choices = variants[0]
            layers[layer.name] = variant.suggest(trial, layer, choices)
        return CompressionPlan(layers)

    def uncompressed_params(self, inventory: Inventory) -> dict[str, str]:
        """Trial parameters that keep every layer: the uncompressed model, enqueued first."""
        return {f"{layer.name}.method": KEEP for layer in inventory.layers
                if len(self.layer_options(layer)) > 1}


def available_spaces() -> list[str]:
    return sorted(path.stem for path in bundled_dir("search_spaces").glob("*.yaml"))


def load_space(name_or_path: str) -> SearchSpace:
    """Load a search space by name (``default``) or path; errors name the file and key."""
    path = Path(name_or_path)
    if path.suffix not in (".yaml", ".yml"):
        path = bundled_dir("search_spaces") / f"{name_or_path}.yaml"
        if not path.is_file():
            raise AutocompError(f"unknown search space {name_or_path!r} "
                                f"(known: {', '.join(available_spaces())})")
    elif not path.is_file():
        raise AutocompError(f"search space {path} does not exist")
    return _parse(read_yaml(path), Checker(path))


def _parse(data: Any, check: Checker) -> SearchSpace:
    top = check.mapping(data, "", {"name", "description", "methods", "finetune"},
                        {"name", "methods", "finetune"})
    methods = check.mapping(top["methods"], "methods", set(METHODS), set())
    if not methods:
        raise check.fail("methods", "names no method")
    spaces = []
    for name, spec in methods.items():
        if isinstance(spec, list):  # several variants of one method, e.g. per kind
            spaces += [_method_space(check, name, variant, f"v{index}", f"methods.{name}[{index}]")
                       for index, variant in enumerate(spec)]
        else:
            spaces.append(_method_space(check, name, spec, "", f"methods.{name}"))
    finetune = parse_finetune(check, top["finetune"], "finetune")
    return SearchSpace(str(top["name"]), check.path, tuple(spaces), finetune)


def _method_space(check: Checker, method: str, spec: Any, label: str, key: str) -> MethodSpace:
    config_cls = METHODS[method]
    fields = {f.name for f in dataclasses.fields(config_cls)}
    policies = POLICY_KEYS.get(method, set())
    spec = check.mapping(spec if spec is not None else {}, key, fields | policies,
                         {f.name for f in dataclasses.fields(config_cls)
                          if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING})
    params: dict[str, ParamSpec] = {}
    for name, value in spec.items():
        if name in policies:
            continue
        if isinstance(value, dict):
            params[name] = _range(check, value, f"{key}.{name}")
        elif isinstance(value, list):
            if not value:
                raise check.fail(f"{key}.{name}", "an empty list offers nothing")
            params[name] = value
        else:
            params[name] = value
    space = MethodSpace(config_cls, params, label=label)
    first = space.first_values()
    ends = [first] + [{**first, name: spec.high} for name, spec in params.items()
                      if isinstance(spec, Range)]
    ends += [{**first, name: value} for name, spec in params.items() if isinstance(spec, list)
             for value in spec]
    for values in ends:
        try:
            config_cls(**values).check()
        except (TypeError, ValueError) as err:
            raise check.fail(key, str(err)) from None
    if "min_full_rank" in spec:
        space = MethodSpace(config_cls, params, int(check.number(
            spec["min_full_rank"], f"{key}.min_full_rank", 2, 1_000_000, integer=True)), label)
    return space


# finetune key -> (low, high, integer) for the numeric FinetuneConfig fields.
_FINETUNE_NUMBERS = {
    "steps": (0, 1_000_000, True), "batch_size": (1, 65_536, True), "lr": (1e-8, 10.0, False),
    "temperature": (0.1, 100.0, False), "alpha": (0.0, 1.0, False),
    "hint_weight": (0.0, 1e6, False), "attention_weight": (0.0, 1e6, False),
    "fsp_weight": (0.0, 1e6, False), "feature_points": (1, 16, True),
    "regularizer_weight": (0.0, 1e3, False), "meprop_keep": (0.001, 1.0, False),
}


def parse_finetune(check: Checker, value: Any, key: str) -> FinetuneConfig:
    """A ``finetune`` section: every FinetuneConfig field, validated, defaults for the rest."""
    section = check.mapping(value, key, set(_FINETUNE_NUMBERS) | {"regularizer"}, set())
    values: dict[str, Any] = {}
    for name, (low, high, integer) in _FINETUNE_NUMBERS.items():
        if name in section:
            number = check.number(section[name], f"{key}.{name}", low, high, integer=integer)
            values[name] = int(number) if integer else float(number)
    if section.get("regularizer") is not None:
        from autocomp.regularizers import REGULARIZERS

        values["regularizer"] = check.choice(section["regularizer"], f"{key}.regularizer",
                                             tuple(sorted(REGULARIZERS)))
    return FinetuneConfig(**values)


def _range(check: Checker, value: Any, key: str) -> Range:
    spec = check.mapping(value, key, {"low", "high", "step"}, {"low", "high", "step"})
    lo = check.number(spec["low"], f"{key}.low", -1e9, 1e9)
    hi = check.number(spec["high"], f"{key}.high", lo, 1e9)
    step = check.number(spec["step"], f"{key}.step", 1e-9, max(hi - lo, 1e-9))
    return Range(lo, hi, step)
