"""Each layer's share of a model's estimated latency on each target.

Why the same search yields different plans on different targets: a depthwise conv or
the classifier can be a rounding error on one device and a large share on another. The
shares come from the profile's per-op cost model (``autocomp.hardware.costmodel.estimate``), for
every target, the measured host included, so that all targets are compared by one
method; each figure carries the estimate's provenance string.

Kernels map to the inventory's conv and linear layers by module name: a layer's kernel
holds the elementwise ops fused into it (activation, residual add, folded batch norm),
so those count for that layer. Kernels that belong to no layer (pooling, and elementwise
ops that were not fused, such as an add whose input has another reader) go to the
``other`` bucket, which is absent when empty: they are not compressible, and moving
them onto a neighbouring layer would overstate what compressing that layer saves.
"""

from dataclasses import dataclass

from torch import nn

from autocomp.core.inventory import build_inventory
from autocomp.hardware.costmodel.estimate import estimate
from autocomp.hardware.profiles import HardwareProfile, load_target

OTHER = "other"


@dataclass(frozen=True)
class LayerShares:
    """One target's estimated latency split over the model's layers (shares sum to 1)."""

    target: str
    provenance: str
    total_s: float
    layers: dict[str, float]
    seconds: dict[str, float]

    def to_json(self) -> dict:
        return {"provenance": self.provenance, "total_s": self.total_s, "layers": self.layers,
                "seconds": self.seconds}


def _owner(kernel: str, names: list[str]) -> str:
    """The layer a kernel belongs to: its own module, or the layer module it lies inside
    (a compressed layer replaced by a small sequence of modules)."""
    if kernel in names:
        return kernel
    inside = [name for name in names if kernel.startswith(name + ".")]
    return max(inside, key=len) if inside else OTHER


def layer_shares(model: nn.Module, input_shape: tuple[int, ...], profile: HardwareProfile) -> LayerShares:
    """``model``'s estimated latency on ``profile`` split over its conv and linear layers
    (in model order, then ``other``), at the profile's default thread count."""
    names = build_inventory(model, input_shape, coupling=False).names
    result = estimate(model, input_shape, profile)
    seconds = dict.fromkeys(names, 0.0)
    for cost in result.ops:
        owner = _owner(cost.op.name, names)
        seconds[owner] = seconds.get(owner, 0.0) + cost.seconds
    total = sum(seconds.values())
    return LayerShares(profile.name, result.latency.provenance, total,
                       {name: value / total for name, value in seconds.items()}, seconds)


def all_target_shares(model: nn.Module, input_shape: tuple[int, ...], targets: list[str]) -> dict:
    """The ``layer_shares.json`` structure: ``{"targets": {TARGET: {"provenance",
    "total_s", "layers", "seconds"}}}``, targets in the order given (duplicates once)."""
    model = model.eval()
    shares = {name: layer_shares(model, input_shape, load_target(name)).to_json()
              for name in dict.fromkeys(targets)}
    return {"targets": shares}


def shares_table(shares: dict) -> str:
    """Markdown: one row per layer, one column per target (% of that target's estimated
    latency), the totals, and each target's provenance below the table."""
    targets = shares["targets"]
    names = list(targets)
    layers = list(dict.fromkeys(layer for entry in targets.values() for layer in entry["layers"]))
    if OTHER in layers:  # keep the bucket last whatever the first target's order
        layers.remove(OTHER)
        layers.append(OTHER)
    lines = ["| layer | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names)]
    for layer in layers:
        cells = [f"{targets[name]['layers'][layer]:.1%}" if layer in targets[name]["layers"] else "-"
                 for name in names]
        lines.append(f"| {layer} | " + " | ".join(cells) + " |")
    totals = [f"{targets[name]['total_s'] * 1e3:.3g} ms" for name in names]
    lines.append("| **total (estimated)** | " + " | ".join(totals) + " |")
    lines.append("")
    lines.extend(f"- {name}: {targets[name]['provenance']}" for name in names)
    return "\n".join(lines)
