"""``CompressionPlan``: which methods, with which parameters, each layer gets.

Layers not named keep their original form. A layer takes one method or an
ordered combination of methods of different stages (prune then quantize,
factorise then quantize). Plans are JSON, hashable and versioned, so a trial's
plan can be stored, compared and re-applied.
"""

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from autocomp.core.errors import AutocompError
from autocomp.core.inventory import Inventory
from autocomp.core.staging import write_json
from autocomp.methods.registry import MethodConfig, config_from_json

PLAN_VERSION = 1


@dataclass(frozen=True)
class CompressionPlan:
    """Layer name -> the method configs it takes, in stage order; absent layers are kept.

    The constructor also accepts a single config per layer.
    """

    layers: Mapping[str, tuple[MethodConfig, ...]] = field(default_factory=dict)
    version: int = PLAN_VERSION

    def __post_init__(self) -> None:
        normalised = {}
        for name, configs in self.layers.items():
            configs = (configs,) if isinstance(configs, MethodConfig) else tuple(configs)
            if configs:
                normalised[name] = tuple(sorted(configs, key=lambda cfg: cfg.stage))
        object.__setattr__(self, "layers", normalised)

    def to_json(self) -> dict[str, Any]:
        def encode(configs: tuple[MethodConfig, ...]) -> Any:
            return configs[0].to_json() if len(configs) == 1 else [c.to_json() for c in configs]

        return {"version": self.version,
                "layers": {name: encode(cfgs) for name, cfgs in sorted(self.layers.items())}}

    def configs(self) -> list[tuple[str, MethodConfig]]:
        """Every (layer, config) pair of the plan."""
        return [(name, cfg) for name, cfgs in self.layers.items() for cfg in cfgs]

    @classmethod
    def from_json(cls, data: Any, source: str = "plan") -> "CompressionPlan":
        """Parse a plan; every problem is an ``AutocompError`` naming the layer or key."""
        if not isinstance(data, dict) or not isinstance(data.get("layers"), dict):
            raise AutocompError(f"{source}: a plan is an object with a 'layers' object")
        version = data.get("version", PLAN_VERSION)
        if version != PLAN_VERSION:
            raise AutocompError(f"{source}: plan version {version} is not {PLAN_VERSION}")
        layers = {}
        for name, choice in data["layers"].items():
            choices = choice if isinstance(choice, Sequence) and not isinstance(choice, str) else [choice]
            try:
                configs = [config_from_json(c) for c in choices
                           if not (isinstance(c, dict) and c.get("method") == "keep")]
            except ValueError as err:
                raise AutocompError(f"{source}: layer {name!r}: {err}") from None
            stages = [cfg.stage for cfg in configs]
            if len(set(stages)) != len(stages):
                methods = " and ".join(cfg.method for cfg in configs)
                raise AutocompError(f"{source}: layer {name!r} cannot take {methods} together "
                                    "(at most one method of each kind per layer)")
            layers[name] = configs
        return cls(layers, version)

    def digest(self) -> str:
        """A short stable hash of the plan's canonical JSON."""
        text = json.dumps(self.to_json(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()[:12]

    def save(self, path: Path) -> None:
        write_json(path, self.to_json())

    @classmethod
    def load(cls, path: Path) -> "CompressionPlan":
        try:
            data = json.loads(Path(path).read_text())
        except FileNotFoundError:
            raise AutocompError(f"plan file {path} does not exist") from None
        except json.JSONDecodeError as err:
            raise AutocompError(f"plan file {path} is not JSON: {err}") from None
        return cls.from_json(data, source=str(path))

    def validate(self, inventory: Inventory) -> None:
        """Reject, before any work, a plan naming a missing layer or an ineligible method."""
        known = set(inventory.names)
        for name, config in self.configs():
            if name not in known:
                raise AutocompError(f"plan names layer {name!r}, which the model does not have")
            reason = config.unfit(inventory.layer(name))
            if reason:
                raise AutocompError(f"layer {name!r} cannot take {config.method}: {reason}")

    def describe(self) -> str:
        """One short line: how many layers take each method."""
        if not self.layers:
            return "uncompressed"
        counts: dict[str, int] = {}
        for _, config in self.configs():
            counts[config.method] = counts.get(config.method, 0) + 1
        return ", ".join(f"{method} x{count}" for method, count in sorted(counts.items()))
