"""``CompressionPlan``: which method, with which parameters, each layer gets.

Layers not named keep their original form. Plans are JSON, hashable and
versioned, so a trial's plan can be stored, compared and re-applied.
"""

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from autocomp.errors import AutocompError
from autocomp.inventory import Inventory
from autocomp.methods import MethodConfig, config_from_json

PLAN_VERSION = 1


@dataclass(frozen=True)
class CompressionPlan:
    """Layer name -> method config; absent layers are kept as they are."""

    layers: dict[str, MethodConfig] = field(default_factory=dict)
    version: int = PLAN_VERSION

    def to_json(self) -> dict[str, Any]:
        return {"version": self.version,
                "layers": {name: cfg.to_json() for name, cfg in sorted(self.layers.items())}}

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
            if isinstance(choice, dict) and choice.get("method") == "keep":
                continue
            try:
                layers[name] = config_from_json(choice)
            except ValueError as err:
                raise AutocompError(f"{source}: layer {name!r}: {err}") from None
        return cls(layers, version)

    def digest(self) -> str:
        """A short stable hash of the plan's canonical JSON."""
        text = json.dumps(self.to_json(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()[:12]

    def save(self, path: Path) -> None:
        path.write_text(json.dumps(self.to_json(), indent=2) + "\n")

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
        for name, config in self.layers.items():
            if name not in known:
                raise AutocompError(f"plan names layer {name!r}, which the model does not have")
            reason = type(config).ineligible(inventory.layer(name))
            if reason:
                raise AutocompError(f"layer {name!r} cannot take {config.method}: {reason}")

    def describe(self) -> str:
        """One short line: how many layers take each method."""
        if not self.layers:
            return "uncompressed"
        counts: dict[str, int] = {}
        for config in self.layers.values():
            counts[config.method] = counts.get(config.method, 0) + 1
        return ", ".join(f"{method} x{count}" for method, count in sorted(counts.items()))
