"""Reading ``search_spaces/NAME.yaml`` into a ``SearchSpace``; every error names the file and
the key."""

import dataclasses
from pathlib import Path
from typing import Any

from autocomp.core.errors import AutocompError
from autocomp.core.paths import bundled_dir
from autocomp.core.yaml_checks import Checker, read_yaml
from autocomp.methods.registry import METHODS, Stage
from autocomp.search.space.sampling import (
    COMBINE,
    DEPLOY_KNOBS,
    KEEP,
    LAYER_KINDS,
    POLICY_KEYS,
    MethodSpace,
    ParamSpec,
    Range,
    SearchSpace,
)
from autocomp.training.config import FinetuneConfig


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
    top = check.mapping(data, "", {"name", "description", "methods", "finetune", "combine", "layers",
                                   "deploy"}, {"name", "methods", "finetune"})
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
    combos = _combos(check, top.get("combine"), list(methods))
    kinds = _kinds(check, top.get("layers"), list(methods), combos)
    finetune, finetune_choices = parse_finetune(check, top["finetune"], "finetune")
    return SearchSpace(str(top["name"]), check.path, tuple(spaces), finetune, finetune_choices,
                       combos, kinds, _deploy(check, top.get("deploy")),
                       description=str(top.get("description", "")))


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
            config_cls(**values)
        except (TypeError, ValueError) as err:
            raise check.fail(key, str(err)) from None
    if "min_full_rank" in spec:
        space = MethodSpace(config_cls, params, int(check.number(
            spec["min_full_rank"], f"{key}.min_full_rank", 2, 1_000_000, integer=True)), label)
    return space


def _names(check: Checker, value: Any, key: str) -> list:
    if not isinstance(value, list):
        raise check.fail(key, "must be a list")
    return value


def _combos(check: Checker, value: Any, methods: list[str]) -> tuple[tuple[str, ...], ...]:
    """``combine``: lists of methods of different stages one layer may take together."""
    combos: list[tuple[str, ...]] = []
    for index, combo in enumerate(_names(check, value if value is not None else [], "combine")):
        key = f"combine[{index}]"
        parts = _names(check, combo, key)
        for part in parts:
            if part not in methods:
                raise check.fail(key, f"{part!r} is not one of the space's methods ({', '.join(methods)})")
        if len(parts) < 2:
            raise check.fail(key, "a combination needs at least two methods")
        stages = [METHODS[part].stage for part in parts]
        if len(set(stages)) != len(stages):
            raise check.fail(key, f"{' and '.join(parts)} rewrite a layer at the same stage; "
                                  "one layer takes at most one of them")
        ordered = tuple(sorted(parts, key=lambda part: METHODS[part].stage))
        if ordered in combos:
            raise check.fail(key, f"{COMBINE.join(ordered)} is listed twice")
        combos.append(ordered)
    return tuple(combos)


def _kinds(check: Checker, value: Any, methods: list[str],
           combos: tuple[tuple[str, ...], ...]) -> tuple[tuple[str, tuple[str, ...]], ...]:
    """``layers``: layer kind -> the methods (or combinations, ``prune+quant``) it may take."""
    section = check.mapping(value if value is not None else {}, "layers", set(LAYER_KINDS), set())
    combined = {COMBINE.join(combo): combo for combo in combos}
    kinds = []
    for kind, names in section.items():
        allowed = []
        for index, name in enumerate(_names(check, names, f"layers.{kind}")):
            key = f"layers.{kind}[{index}]"
            if not isinstance(name, str):
                raise check.fail(key, f"must be a method name, not {name!r}")
            if name == KEEP:  # always offered
                continue
            parts = sorted(name.split(COMBINE),
                           key=lambda m: METHODS[m].stage if m in METHODS else Stage.PRUNE)
            canonical = COMBINE.join(parts)
            for part in parts:
                if part not in METHODS:
                    raise check.fail(key, f"unknown method {part!r} (known: {', '.join(sorted(METHODS))})")
                if part not in methods:
                    raise check.fail(key, f"{part!r} is not in this space's methods ({', '.join(methods)})")
            if len(parts) > 1 and canonical not in combined:
                raise check.fail(key, f"{canonical} is not a combination listed under combine")
            allowed.append(canonical)
        kinds.append((kind, tuple(dict.fromkeys(allowed))))
    return tuple(sorted(kinds))


def _deploy(check: Checker, value: Any) -> tuple[tuple[str, tuple], ...]:
    """``deploy``: deployment knobs searched per trial, e.g. ``threads: [1, 2, 4]``."""
    section = check.mapping(value if value is not None else {}, "deploy", set(DEPLOY_KNOBS), set())
    knobs = []
    for name, choices in section.items():
        choices = _names(check, choices, f"deploy.{name}")
        if not choices:
            raise check.fail(f"deploy.{name}", "an empty list offers nothing")
        numbers = [int(check.number(v, f"deploy.{name}[{i}]", 1, 4096, integer=True))
                   for i, v in enumerate(choices)]
        knobs.append((name, tuple(dict.fromkeys(numbers))))
    return tuple(knobs)


# finetune key -> (low, high, integer) for the numeric FinetuneConfig fields.
_FINETUNE_NUMBERS = {
    "steps": (0, 1_000_000, True), "batch_size": (1, 65_536, True), "lr": (1e-8, 10.0, False),
    "temperature": (0.1, 100.0, False), "alpha": (0.0, 1.0, False),
    "hint_weight": (0.0, 1e6, False), "attention_weight": (0.0, 1e6, False),
    "fsp_weight": (0.0, 1e6, False), "feature_points": (1, 16, True),
    "regularizer_weight": (0.0, 1e3, False), "meprop_keep": (0.001, 1.0, False),
}


def parse_finetune(check: Checker, value: Any,
                           key: str) -> tuple[FinetuneConfig, tuple[tuple[str, tuple], ...]]:
    """A ``finetune`` section: every FinetuneConfig field, validated, defaults for the rest.

    A knob given as a list is a choice per trial: returns the config with each list's first
    value, and the knobs' choices."""
    section = check.mapping(value, key, set(_FINETUNE_NUMBERS) | {"regularizer"}, set())
    values: dict[str, Any] = {}
    choices: list[tuple[str, tuple]] = []
    for name, raw in section.items():
        where = f"{key}.{name}"
        if isinstance(raw, list):
            if not raw:
                raise check.fail(where, "an empty list offers nothing")
            options = tuple(dict.fromkeys(_finetune_value(check, name, v, f"{where}[{i}]")
                                          for i, v in enumerate(raw)))
            values[name] = options[0]
            if len(options) > 1:
                choices.append((name, options))
        else:
            values[name] = _finetune_value(check, name, raw, where)
    return FinetuneConfig(**values), tuple(choices)


def _finetune_value(check: Checker, name: str, value: Any, key: str) -> Any:
    if name == "regularizer":
        if value is None:
            return None
        from autocomp.training.regularizers import REGULARIZERS

        return check.choice(value, key, tuple(sorted(REGULARIZERS)))
    low, high, integer = _FINETUNE_NUMBERS[name]
    number = check.number(value, key, low, high, integer=integer)
    return int(number) if integer else float(number)


def _range(check: Checker, value: Any, key: str) -> Range:
    spec = check.mapping(value, key, {"low", "high", "step"}, {"low", "high", "step"})
    lo = check.number(spec["low"], f"{key}.low", -1e9, 1e9)
    hi = check.number(spec["high"], f"{key}.high", lo, 1e9)
    step = check.number(spec["step"], f"{key}.step", 1e-9, max(hi - lo, 1e-9))
    return Range(lo, hi, step)
