"""Search spaces: ``search_spaces/NAME.yaml`` and how a trial samples a plan from one."""

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna

from autocomp.distill import FinetuneConfig
from autocomp.errors import AutocompError
from autocomp.inventory import Inventory, LayerInfo
from autocomp.methods.lowrank import LowRankConfig, full_rank, target_rank
from autocomp.methods.prune import CRITERIA, PruneConfig
from autocomp.paths import bundled_dir
from autocomp.plan import CompressionPlan
from autocomp.yaml_files import Checker, read_yaml

KEEP = "keep"


@dataclass(frozen=True)
class Range:
    """An inclusive numeric range sampled on a grid of ``step``."""

    low: float
    high: float
    step: float


@dataclass(frozen=True)
class SearchSpace:
    """Which methods a layer may take, their ranges, and how trials are fine-tuned."""

    name: str
    source: Path
    prune_ratio: Range | None
    prune_criterion: str
    lowrank_rank: Range | None
    lowrank_min_full_rank: int
    finetune: FinetuneConfig

    def layer_options(self, layer: LayerInfo) -> list[str]:
        """The methods this space offers ``layer`` (always including keep)."""
        options = [KEEP]
        if self.prune_ratio and PruneConfig.ineligible(layer) is None:
            options.append(PruneConfig.method)
        if self.lowrank_rank and LowRankConfig.ineligible(layer) is None and self._lowrank_pays(layer):
            options.append(LowRankConfig.method)
        return options

    def _lowrank_pays(self, layer: LayerInfo) -> bool:
        """Offer SVD only on matrices big enough to keep several ranks (a 10-class head at
        rank 1 predicts one direction) and where even the top rank saves parameters."""
        full = full_rank(layer.in_channels, layer.out_channels, layer.kernel)
        if full < self.lowrank_min_full_rank:
            return False
        rank = target_rank(full, self.lowrank_rank.high)
        rows = layer.in_channels * math.prod(layer.kernel)
        return rank * (rows + layer.out_channels) < rows * layer.out_channels

    def suggest_plan(self, trial: optuna.Trial, inventory: Inventory) -> CompressionPlan:
        """Sample one method per eligible layer; the parameters depend on the method chosen."""
        layers = {}
        for layer in inventory.layers:
            options = self.layer_options(layer)
            if len(options) == 1:
                continue
            method = trial.suggest_categorical(f"{layer.name}.method", options)
            if method == PruneConfig.method:
                ratio = _suggest(trial, f"{layer.name}.prune.ratio", self.prune_ratio)
                layers[layer.name] = PruneConfig(ratio, self.prune_criterion)
            elif method == LowRankConfig.method:
                rank = _suggest(trial, f"{layer.name}.lowrank.rank", self.lowrank_rank)
                layers[layer.name] = LowRankConfig(rank)
        return CompressionPlan(layers)

    def uncompressed_params(self, inventory: Inventory) -> dict[str, str]:
        """Trial parameters that keep every layer: the uncompressed model, enqueued first."""
        return {f"{layer.name}.method": KEEP for layer in inventory.layers
                if len(self.layer_options(layer)) > 1}


def _suggest(trial: optuna.Trial, name: str, rng: Range) -> float:
    return trial.suggest_float(name, rng.low, rng.high, step=rng.step)


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
    methods = check.mapping(top["methods"], "methods", {"prune", "lowrank"}, set())
    if not methods:
        raise check.fail("methods", "names no method")
    prune_ratio, criterion, rank, min_full_rank = None, "l1", None, 16
    if "prune" in methods:
        prune = check.mapping(methods["prune"], "methods.prune", {"ratio", "criterion"}, {"ratio"})
        prune_ratio = _range(check, prune["ratio"], "methods.prune.ratio", 0.0, 0.99)
        criterion = check.choice(prune.get("criterion", "l1"), "methods.prune.criterion",
                                 tuple(CRITERIA))
    if "lowrank" in methods:
        lowrank = check.mapping(methods["lowrank"], "methods.lowrank", {"rank", "min_full_rank"},
                                {"rank"})
        rank = _range(check, lowrank["rank"], "methods.lowrank.rank", 0.01, 1.0)
        min_full_rank = int(check.number(lowrank.get("min_full_rank", 16),
                                         "methods.lowrank.min_full_rank", 2, 1_000_000,
                                         integer=True))
    keys = {"steps", "batch_size", "lr", "temperature", "alpha"}
    ft = check.mapping(top["finetune"], "finetune", keys, set())
    defaults = FinetuneConfig()
    finetune = FinetuneConfig(
        steps=int(check.number(ft.get("steps", defaults.steps), "finetune.steps", 0, 1_000_000,
                               integer=True)),
        batch_size=int(check.number(ft.get("batch_size", defaults.batch_size),
                                    "finetune.batch_size", 1, 65_536, integer=True)),
        lr=float(check.number(ft.get("lr", defaults.lr), "finetune.lr", 1e-8, 10.0)),
        temperature=float(check.number(ft.get("temperature", defaults.temperature),
                                       "finetune.temperature", 0.1, 100.0)),
        alpha=float(check.number(ft.get("alpha", defaults.alpha), "finetune.alpha", 0.0, 1.0)),
    )
    return SearchSpace(str(top["name"]), check.path, prune_ratio, criterion, rank, min_full_rank,
                       finetune)


def _range(check: Checker, value: Any, key: str, low: float, high: float) -> Range:
    spec = check.mapping(value, key, {"low", "high", "step"}, {"low", "high", "step"})
    lo = check.number(spec["low"], f"{key}.low", low, high)
    hi = check.number(spec["high"], f"{key}.high", lo, high)
    step = check.number(spec["step"], f"{key}.step", 1e-6, max(hi - lo, 1e-6))
    return Range(float(lo), float(hi), float(step))
