"""Latency measurement behind a small interface, and the record every figure carries.

A ``Latency`` always says how it was obtained (its ``provenance``); the search
stores it with the trial and every table and plot prints it.
"""

from dataclasses import asdict, dataclass
from typing import Protocol

from torch import nn

from autocomp.core.errors import AutocompError


@dataclass(frozen=True)
class Latency:
    """One model's latency on one target, with its spread and how it was obtained."""

    median_s: float
    p10_s: float
    p90_s: float
    samples: int
    kind: str  # "measured" or "estimated"
    provenance: str
    # Reference-relative figures: the ratio to the reference in the same rounds, the raw
    # median, the reference's median, its baseline and level (``measure.reference``).
    reference: dict | None = None
    noisy: str | None = None  # what made the figure untrustworthy, when it never settled
    attempts: int = 1

    def to_json(self) -> dict:
        return asdict(self)


class Measurer(Protocol):
    """Anything that can give a model's latency on a target."""

    def measure(self, model: nn.Module, input_shape: tuple[int, ...]) -> Latency: ...

    def set_reference(self, model: nn.Module, input_shape: tuple[int, ...],
                      baseline_s: float | None = None) -> Latency:
        """Keep ``model`` as the reference later measurements are timed beside (where the
        measurer supports it); returns its own latency, the run's baseline."""
        ...

    def close(self) -> None: ...


class DeviceUnreachable(AutocompError):
    """The profile's device cannot be reached from here (no GPU, no device registered with the
    RPC tracker, the tracker down); the message is the reason."""
