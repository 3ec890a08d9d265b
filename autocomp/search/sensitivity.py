"""Sensitivity pre-pass: how much val accuracy each layer loses to each method, alone.

Before the search, every layer the space offers a method to is compressed on its own
(the rest of the model untouched, no fine-tuning) at the mildest and the strongest
setting of the space's grid, and scored on a fixed subset of validation images. The
figures narrow the space (a method that is destructive even at its mildest setting is
dropped for that layer), seed the sampler with plans built from what each layer
tolerates, and tell the report which layers tolerate what.
"""

import copy
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset, TensorDataset

from autocomp.core.inventory import Inventory, LayerInfo
from autocomp.intake.data import make_loader, take
from autocomp.methods.apply import apply_plan, size_bytes
from autocomp.methods.plan import CompressionPlan
from autocomp.search.space.sampling import KEEP, MethodSpace, Range, SearchSpace
from autocomp.training.train import evaluate

FORMAT = 1
STRENGTHS = ("mild", "strong")
# A method is excluded for a layer only when it is clearly destructive at its mildest
# setting: fine-tuning recovers a lot (on the trained demo-resnet, the stem's group pruned
# 75% lost 44 points here, and 200 distillation steps brought it back to 88% of 91%).
EXCLUDE_MAX_DROP = 0.5
# A seed plan compresses every layer whose drop stays under this, so the drops of many
# layers, which add up, stay within what fine-tuning recovers.
SEED_MAX_DROP = 0.02
# Images the batch-norm statistics are re-estimated on after each compression (the first
# calibration batches): enough for stable statistics, and half the default calibration set.
ADAPT_IMAGES = 256
# Which way each numeric method parameter makes compression stronger: +1 when a larger
# value compresses more (prune ratio), -1 when a smaller one does (rank, bits). Other
# parameters (criterion, kind, calibration) are not strengths: their first choice is used.
STRONGER = {"ratio": 1, "sparsity": 1, "groups": 1, "threshold": 1,
            "rank": -1, "rank_out": -1, "energy": -1, "w_bits": -1, "a_bits": -1}

Progress = Callable[[int, int], None]


@dataclass
class SensitivityRow:
    """One layer compressed alone by one method variant at one strength.

    ``values``: the method's parameter values; ``params``: the same as Optuna trial
    parameters (``suggest_plan``'s names, including ``{layer}.method``); ``drop``: the
    reference accuracy minus this accuracy, as a fraction (0.05 = 5 points). A compression that
    failed has ``error`` and no accuracy.
    """

    layer: str
    method: str
    label: str
    strength: str
    values: dict[str, Any]
    params: dict[str, Any]
    accuracy: float | None
    drop: float | None
    seconds: float
    size_bytes: int | None = None  # the whole model's, with only this layer compressed
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None and self.drop is not None


@dataclass
class Sensitivity:
    """The pre-pass's measurements: per (layer, method variant, strength) rows, in layer order."""

    base_accuracy: float  # the uncompressed model as given
    reference_accuracy: float  # the uncompressed model with re-estimated batch-norm statistics
    images: int
    seconds: float
    rows: list[SensitivityRow] = field(default_factory=list)
    space: str = ""

    @property
    def layers(self) -> list[str]:
        """Measured layers, in the model's order."""
        return list(dict.fromkeys(row.layer for row in self.rows))

    def to_json(self) -> dict[str, Any]:
        return {"format": FORMAT, "space": self.space, "base_accuracy": self.base_accuracy,
                "reference_accuracy": self.reference_accuracy, "images": self.images, "seconds": self.seconds,
                "rows": [asdict(row) for row in self.rows]}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "Sensitivity":
        if data.get("format") != FORMAT:
            raise ValueError(f"sensitivity format {data.get('format')!r} is not {FORMAT}")
        return cls(data["base_accuracy"], data["reference_accuracy"], data["images"], data["seconds"],
                   [SensitivityRow(**row) for row in data["rows"]], data.get("space", ""))

    def _rows(self, layer: str, strength: str | None = None) -> list[SensitivityRow]:
        return [r for r in self.rows if r.layer == layer and (strength is None or r.strength == strength)]

    def excluded(self, max_drop: float = EXCLUDE_MAX_DROP) -> dict[str, set[str]]:
        """Per layer, the methods that cannot help it: every variant either failed to apply or
        already lost more than ``max_drop`` accuracy at its mildest setting. Never ``keep``."""
        out: dict[str, set[str]] = {}
        for layer in self.layers:
            mild = self._rows(layer, "mild")
            for method in dict.fromkeys(r.method for r in mild):
                if all(not r.ok or r.drop > max_drop for r in mild if r.method == method):
                    out.setdefault(layer, set()).add(method)
        return out

    def seed_choices(self, space: SearchSpace, inventory: Inventory,
                     max_drop: float = SEED_MAX_DROP) -> list[tuple[str, dict[str, SensitivityRow]]]:
        """The labelled seed plans as measured rows, per layer (layers absent keep), among the
        choices ``space`` offers the layer alone and that lost less than ``max_drop``.

        "least sensitive": the method whose strongest setting loses least, else the one whose
        mildest does. "smallest": the setting that leaves the model smallest. The second is
        left out when it is the first; a seed that compresses nothing is left out."""
        rules = (("sensitivity seed: least sensitive",
                  lambda r: (r.strength != "strong", r.drop)),
                 ("sensitivity seed: smallest", lambda r: (r.size_bytes, r.drop)))
        seeds: list[tuple[str, dict[str, SensitivityRow]]] = []
        for label, key in rules:
            chosen = {}
            for layer in inventory.layers:
                offered = [r for r in self._rows(layer.name) if r.ok and r.drop < max_drop
                           and _offered(space, layer, r)]
                if offered:
                    chosen[layer.name] = min(offered, key=key)
            if chosen and all(_params_of(chosen) != _params_of(rows) for _, rows in seeds):
                seeds.append((label, chosen))
        return seeds

    def seed_params(self, space: SearchSpace, inventory: Inventory,
                    max_drop: float = SEED_MAX_DROP) -> list[tuple[str, dict[str, Any]]]:
        """The seed plans as labelled Optuna fixed parameters for ``space`` (possibly narrowed):
        enqueued with ``study.enqueue_trial``, ``space.suggest_plan`` samples exactly the plan
        of ``seed_choices``."""
        seeds = []
        for label, rows in self.seed_choices(space, inventory, max_drop):
            params = space.uncompressed_params(inventory)
            for layer in inventory.layers:
                row = rows.get(layer.name)
                if row is not None:
                    variants = space.layer_options(layer)[row.method]
                    variant, _ = _variant(variants, row.label)
                    params.update(_trial_params(layer.name, row.method, variant, row.values,
                                                len(variants)))
            seeds.append((label, params))
        return seeds

    def rank_layers(self) -> list[tuple[str, dict[str, float]]]:
        """Layers from most to least tolerant: (layer, method -> accuracy drop at its strongest
        setting, the least over the method's variants), ordered by the mean drop over its
        methods; a layer where nothing applied comes last with {}."""
        ranked = []
        for layer in self.layers:
            drops: dict[str, float] = {}
            for row in self._rows(layer, "strong"):
                if row.ok:
                    drops[row.method] = min(drops.get(row.method, math.inf), row.drop)
            ranked.append((layer, drops))
        return sorted(ranked, key=lambda item: sum(item[1].values()) / len(item[1]) if item[1] else math.inf)

    def describe(self, count: int = 3) -> str:
        """Which layers tolerate what, in a sentence or two for the report."""
        ranked = [item for item in self.rank_layers() if item[1]]
        if not ranked:
            return "No layer could be compressed alone."

        def name(items: Iterable[tuple[str, dict[str, float]]]) -> str:
            return "; ".join(f"{layer} ({', '.join(f'{m} {_points(d)}' for m, d in drops.items())})"
                             for layer, drops in items)

        count = min(count, max(1, len(ranked) // 2))
        text = f"At the strongest setting of each method, most tolerant: {name(ranked[:count])}."
        if len(ranked) > count:
            text += f" Most sensitive: {name(reversed(ranked[-count:]))}."
        return text

    def table(self) -> str:
        """Markdown: one line per layer, one column per method variant, the drop at the mildest
        / strongest setting in accuracy points (negative: accuracy rose)."""
        columns = list(dict.fromkeys(_column(row) for row in self.rows))
        lines = [f"Accuracy drop in points on {self.images} val images, one layer compressed at a "
                 "time at the mildest / strongest setting of the space, batch-norm statistics "
                 "re-estimated, no fine-tuning (uncompressed: "
                 f"{self.reference_accuracy:.2%} scored so, {self.base_accuracy:.2%} as given).", "",
                 "| layer | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
        for layer in self.layers:
            cells = []
            for column in columns:
                found = {r.strength: r for r in self._rows(layer) if _column(r) == column}
                cells.append(" / ".join(_cell(found[s]) for s in STRENGTHS) if found else "")
            lines.append(f"| {layer} | " + " | ".join(cells) + " |")
        return "\n".join(lines)


def _points(drop: float | None) -> str:
    if drop is None:
        return "n/a"
    return f"loses {drop * 100:.1f} pt" if drop >= 0 else f"gains {-drop * 100:.1f} pt"


def _cell(row: SensitivityRow) -> str:
    return "failed" if not row.ok else f"{row.drop * 100:.1f}"


def _column(row: SensitivityRow) -> str:
    return f"{row.method} {row.label}" if row.label else row.method


def _params_of(rows: dict[str, SensitivityRow]) -> dict[str, dict]:
    return {layer: row.params for layer, row in rows.items()}


def _variant(variants: list[tuple[MethodSpace, dict[str, list]]],
             label: str) -> tuple[MethodSpace, dict[str, list]] | None:
    return next(((v, c) for v, c in variants if v.label == label), None)


def _offered(space: SearchSpace, layer: LayerInfo, row: SensitivityRow) -> bool:
    """Whether ``space`` offers ``layer`` the row's method alone, in the row's variant, with
    the row's values on its grid (list values among the fitting choices, range values within
    the range, fixed values equal)."""
    if row.method not in space.layer_choices(layer):
        return False
    found = _variant(space.layer_options(layer)[row.method], row.label)
    if found is None:
        return False
    variant, choices = found
    for name, spec in variant.params.items():
        value = row.values.get(name)
        if isinstance(spec, list):
            if value not in choices[name]:
                return False
        elif isinstance(spec, Range):
            if value is None or abs(spec.nearest(value) - value) > 1e-9:
                return False
        elif value != spec:
            return False
    return True


def _trial_params(layer: str, method: str, variant: MethodSpace, values: dict[str, Any],
                  variants: int) -> dict[str, Any]:
    """Optuna parameters under which ``SearchSpace.suggest_plan`` gives ``layer`` this method
    variant with ``values``: exactly the names it suggests, for the sampled parameters only."""
    params: dict[str, Any] = {f"{layer}.method": method}
    if variants > 1:
        params[f"{layer}.{method}.variant"] = variant.label
    prefix = f"{layer}.{method}" + (f".{variant.label}" if variant.label else "")
    for name, spec in variant.params.items():
        if isinstance(spec, list | Range):
            params[f"{prefix}.{name}"] = values[name]
    return params


def _strength_key(direction: int) -> Callable[[Any], float]:
    """Sort key making larger = stronger; None (e.g. float activations) is the mildest."""
    return lambda value: -math.inf if value is None else direction * value


def setting_values(variant: MethodSpace, choices: dict[str, list], strength: str) -> dict[str, Any]:
    """The variant's parameter values at its mildest or strongest grid point: strength
    parameters (``STRONGER``) at that end, other choices at their first fitting value."""
    values = {}
    strong = strength == "strong"
    for name, spec in variant.params.items():
        direction = STRONGER.get(name)
        if isinstance(spec, list):
            options = choices[name]
            if direction is None:
                values[name] = options[0]
            else:
                pick = max if strong else min
                values[name] = pick(options, key=_strength_key(direction))
        elif isinstance(spec, Range):
            larger_is_stronger = (direction or 1) > 0
            values[name] = spec.nearest(spec.high if larger_is_stronger == strong else spec.low)
        else:
            values[name] = spec
    return values


def _batches(loader: Iterable | None) -> list | None:
    """Calibration batches read once, so that each compression reuses them."""
    return None if loader is None else list(loader)


def _tensors(dataset: Dataset) -> TensorDataset:
    """The images and labels in memory, so that the many evaluations do not re-read them."""
    images, labels = zip(*make_loader(dataset, 512, shuffle=False), strict=True)
    return TensorDataset(torch.cat(images), torch.cat(labels))


def measure_sensitivity(teacher: nn.Module, inventory: Inventory, space: SearchSpace, val: Dataset,
                        calib: Iterable | None, *, channel_multiple: int = 1, images: int = 1000,
                        seed: int = 0, progress: Progress | None = None) -> Sensitivity:
    """Compress each layer alone by each method variant of ``space`` at its mildest and
    strongest setting, and score it on ``images`` validation images; no fine-tuning.

    ``calib`` yields (images, labels) batches for methods that calibrate from data;
    ``progress(done, total)`` is called after each evaluation. A compression that fails
    is recorded with its reason (a method that fails for every setting of a layer is then
    ruled out for it); a programming error (``PROGRAMMING_ERRORS``) is raised.
    """
    start = time.perf_counter()
    subset = _tensors(take(val, images, seed))
    batches = _batches(calib)
    jobs = []
    for layer in inventory.layers:
        options = space.layer_options(layer)
        for method, variants in options.items():
            if method == KEEP:
                continue
            for variant, choices in variants:
                settings = [setting_values(variant, choices, strength) for strength in STRENGTHS]
                jobs.append((layer.name, method, variant, len(variants), settings))
    total = 1 + sum(1 if s[0] == s[1] else 2 for *_, s in jobs)
    teacher = teacher.eval()
    base = evaluate(teacher, subset)
    # Drops are taken against the uncompressed model scored the same way (statistics
    # re-estimated on the same batches), so that they are the compression's alone.
    reference = evaluate(adapt_batchnorm(copy.deepcopy(teacher), batches), subset)
    done = 1
    if progress:
        progress(done, total)
    rows = []
    for layer, method, variant, count, settings in jobs:
        measured: dict[str, tuple[float | None, float, int | None, str | None]] = {}
        for strength, values in zip(STRENGTHS, settings, strict=True):
            key = repr(sorted(values.items()))
            if key not in measured:
                measured[key] = _score(teacher, inventory, layer, variant, values, subset, batches,
                                       channel_multiple, seed)
                done += 1
                if progress:
                    progress(done, total)
            accuracy, seconds, size, error = measured[key]
            rows.append(SensitivityRow(
                layer, method, variant.label, strength, values,
                _trial_params(layer, method, variant, values, count), accuracy,
                None if accuracy is None else reference - accuracy, seconds, size, error))
    return Sensitivity(base, reference, len(subset), time.perf_counter() - start, rows, space.name)


# Exceptions that mean a bug in autocomp (or in the model's code), which the pre-pass re-raises;
# any other failure means the method does not fit the layer and is recorded with its reason.
PROGRAMMING_ERRORS = (TypeError, AttributeError, AssertionError, NameError)


def _score(teacher: nn.Module, inventory: Inventory, layer: str, variant: MethodSpace,
           values: dict[str, Any], subset: Dataset, calib: list | None, channel_multiple: int,
           seed: int) -> tuple[float | None, float, int | None, str | None]:
    """(accuracy, seconds, model size, None) with only ``layer`` compressed, or
    (None, seconds, None, reason)."""
    start = time.perf_counter()
    try:
        config = variant.config_cls(**values)
        torch.manual_seed(seed)
        model = apply_plan(teacher, CompressionPlan({layer: config}), inventory,
                           channel_multiple=channel_multiple, calib=calib)
        accuracy = evaluate(adapt_batchnorm(model, calib), subset)
    except PROGRAMMING_ERRORS:
        raise  # a bug, not a method that does not fit the layer: never a silent gap in the search
    except Exception as err:
        reason = f"{type(err).__name__}: {str(err).strip().splitlines()[0] if str(err).strip() else ''}"
        return None, time.perf_counter() - start, None, reason
    return accuracy, time.perf_counter() - start, size_bytes(model), None


def adapt_batchnorm(model: nn.Module, batches: list | None) -> nn.Module:
    """Re-estimate every batch norm's running statistics on the first ``ADAPT_IMAGES`` images
    of ``batches`` (no gradients), in place.

    Compression shifts the statistics a layer's successors see; scored with the stale ones
    a mildly pruned stem loses half the accuracy that 200 fine-tuning steps give back, so
    the raw drop says little about what a trial can reach. With re-estimated statistics
    (adaptive batch norm, EagleEye, ECCV 2020) the drop ranks choices as fine-tuning does.
    """
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not batches or not norms:
        return model.eval()
    seen = 0
    momenta = [norm.momentum for norm in norms]
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None  # a cumulative average over the batches
    model.train()
    with torch.no_grad():
        for images, _ in batches:
            if seen >= ADAPT_IMAGES:
                break
            model(images)
            seen += len(images)
    for norm, momentum in zip(norms, momenta, strict=True):
        norm.momentum = momentum
    return model.eval()
