"""Parsing and formatting of the quantities users type and read: budgets, shapes, sizes."""

import re
from dataclasses import dataclass

from autocomp.core.errors import AutocompError

_TIME_UNITS = {"us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0}
_BUDGET_RE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*(us|µs|ms|s|%)\s*$")


@dataclass(frozen=True)
class LatencyBudget:
    """A latency limit: absolute (``seconds``) or relative to the uncompressed model (``fraction``)."""

    text: str
    seconds: float | None = None
    fraction: float | None = None

    def resolve(self, baseline_seconds: float) -> float:
        """The limit in seconds, given the uncompressed model's latency on the target."""
        if self.seconds is not None:
            return self.seconds
        assert self.fraction is not None
        return self.fraction * baseline_seconds


def parse_budget(text: str) -> LatencyBudget:
    """Parse ``20ms``, ``1.5s``, ``800us`` or ``60%`` (of the uncompressed model's latency)."""
    match = _BUDGET_RE.match(text)
    if not match:
        raise AutocompError(
            f"cannot read budget {text!r}: use a number with us, ms or s (20ms, 1.5s, 800us) "
            "or a percentage of the uncompressed model's latency (60%)"
        )
    value, unit = float(match.group(1)), match.group(2)
    if value <= 0:
        raise AutocompError(f"budget {text!r} must be positive")
    if unit == "%":
        if value > 100:
            raise AutocompError(f"budget {text!r} is above 100% of the uncompressed model")
        return LatencyBudget(text=text.strip(), fraction=value / 100)
    return LatencyBudget(text=text.strip(), seconds=value * _TIME_UNITS[unit])


_BYTES_RE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*(B|KB|KiB|K|MB|MiB|M|GB|GiB|G)\s*$", re.IGNORECASE)
_BYTE_UNITS = {"b": 1, "k": 1024, "kb": 1024, "kib": 1024, "m": 1024**2, "mb": 1024**2, "mib": 1024**2,
               "g": 1024**3, "gb": 1024**3, "gib": 1024**3}


def parse_bytes(text: str) -> int:
    """Parse a memory size such as ``320KB``, ``1MB`` or ``2048B``.

    KB and MB are binary (1024, 1024^2), as microcontroller datasheets count them:
    the STM32F746's "320 KB" of SRAM is 327,680 bytes.
    """
    match = _BYTES_RE.match(str(text))
    if not match:
        raise AutocompError(f"cannot read memory size {text!r}: use a number with B, KB, MB or GB "
                            "(320KB, 1MB)")
    count = float(match.group(1)) * _BYTE_UNITS[match.group(2).lower()]
    if count <= 0:
        raise AutocompError(f"memory size {text!r} must be positive")
    return int(count)


def parse_shape(text: str) -> tuple[int, ...]:
    """Parse an input shape such as ``1,3,224,224``."""
    try:
        shape = tuple(int(part) for part in text.replace("x", ",").split(","))
    except ValueError:
        raise AutocompError(f"cannot read input shape {text!r}: use e.g. 1,3,224,224") from None
    if len(shape) < 2 or any(dim <= 0 for dim in shape):
        raise AutocompError(f"input shape {text!r} needs a batch and at least one positive dim")
    return shape


def format_seconds(seconds: float) -> str:
    """Human latency: ``812 us``, ``3.41 ms``, ``1.20 s``."""
    if seconds < 1e-3:
        return f"{seconds * 1e6:.0f} us"
    if seconds < 1.0:
        return f"{seconds * 1e3:.3g} ms"
    return f"{seconds:.3g} s"


def format_count(count: float) -> str:
    """Human count with SI suffix: ``3.50M``, ``812k``, ``1.81G``."""
    for suffix, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(count) >= scale:
            return f"{count / scale:.3g}{suffix}"
    return f"{count:.0f}"


def format_bytes(count: float) -> str:
    """Human byte size: ``1.2 MB``, ``812 kB``."""
    for suffix, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(count) >= scale:
            return f"{count / scale:.3g} {suffix}"
    return f"{count:.0f} B"


def format_memory(count: float) -> str:
    """Memory size in binary units, as ``parse_bytes`` reads them: ``320 KiB``, ``1 MiB``."""
    for suffix, scale in (("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if abs(count) >= scale:
            return f"{count / scale:.4g} {suffix}"
    return f"{count:.0f} B"
