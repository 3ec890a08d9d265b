"""Per-layer latency breakdown: where a compiled model spends its time, layer by layer.

The model is built as it is for measurement and run in the kernel worker (with
the profile's threads, apart from PyTorch), where the VM calls back around every
kernel call and each call is timed in place, with the model's real data flowing
through it. Each kernel call is named to the PyTorch layer it computes
(``kernels.extract``). The rows give each (kernel, layer) pair's time per
inference and its share of the total kernel time; the VM's own time between
kernels is not in any row.
"""

import statistics
import tempfile
from collections import defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path

from torch import nn

from autocomp.core.errors import AutocompError
from autocomp.hardware.compile.lower import compile_label
from autocomp.hardware.costmodel.kernels import build, model_kernels
from autocomp.hardware.measure.kernel_worker import shared_worker
from autocomp.hardware.profiles import HardwareProfile

UNKNOWN = "(unknown)"


@dataclass(frozen=True)
class ProfileRow:
    """One kernel's calls on behalf of one layer: their time per inference and share."""

    kernel: str
    layer: str | None
    calls: int
    median_s: float  # the sum over these calls of each call's median time
    share: float  # of the model's total kernel time


@dataclass(frozen=True)
class Breakdown:
    """A model's per-kernel, per-layer timing, largest first, with how it was measured."""

    rows: list[ProfileRow]
    total_s: float  # the sum of all kernel calls' median times
    provenance: str

    def by_layer(self) -> list[tuple[str | None, float, float]]:
        """(layer, seconds, share) per layer, largest first."""
        seconds: dict[str | None, float] = defaultdict(float)
        for row in self.rows:
            seconds[row.layer] += row.median_s
        return sorted(((layer, s, s / self.total_s) for layer, s in seconds.items()), key=lambda r: -r[1])

    def table(self) -> str:
        """The rows as aligned text."""
        lines = [f"{'kernel':<32} {'layer':<32} {'calls':>5} {'time':>11} {'share':>6}"]
        lines += [f"{row.kernel[:32]:<32} {(row.layer or UNKNOWN)[:32]:<32} {row.calls:>5} "
                  f"{row.median_s * 1e3:>8.3f} ms {row.share:>6.1%}" for row in self.rows]
        lines.append(f"total kernel time {self.total_s * 1e3:.3f} ms; {self.provenance}")
        return "\n".join(lines)

    def to_json(self) -> dict:
        return {"total_s": self.total_s, "provenance": self.provenance,
                "kernels": [asdict(row) for row in self.rows],
                "layers": [{"layer": layer, "seconds": seconds, "share": share}
                           for layer, seconds, share in self.by_layer()]}


def profile_model(model: nn.Module, input_shape: tuple[int, ...], profile: HardwareProfile, *,
                  runs: int | None = None) -> Breakdown:
    """Time every kernel call of the compiled model in place over ``runs`` inferences
    (default: the profile's ``latency.repeat``) and group the calls by kernel and layer."""
    lat = profile.latency
    if lat.method != "local":
        raise AutocompError(f"target {profile.name}: a per-layer profile runs the model on this "
                            f"machine, but its latency method is {lat.method!r}")
    runs = runs or lat.repeat
    kernels = model_kernels(model, input_shape, profile)
    executable = build(kernels, profile)
    with tempfile.TemporaryDirectory(prefix="autocomp-profile-") as tmp:
        library = Path(tmp) / "model.so"
        executable.export_library(str(library))
        reply = shared_worker(lat.threads).ask({
            "op": "profile", "library": str(library), "device": lat.device, "shape": list(input_shape),
            "dtype": "float32", "kernels": sorted(kernels.kernels), "runs": runs})
    timed = reply["calls"]
    if [symbol for symbol, _ in timed] != [call.kernel for call in kernels.calls]:
        raise AutocompError("the VM's kernel calls do not match the compiled module's call sequence")
    grouped: dict[tuple[str, str | None], list[float]] = defaultdict(list)
    for call, (_, seconds) in zip(kernels.calls, timed, strict=True):
        grouped[(call.kernel, call.layer)].append(statistics.median(seconds))
    total = sum(sum(times) for times in grouped.values())
    rows = sorted((ProfileRow(kernel, layer, len(times), sum(times), sum(times) / total)
                   for (kernel, layer), times in grouped.items()), key=lambda row: -row.median_s)
    provenance = (f"measured in place ({profile.name}: TVM {profile.target_text()}, "
                  f"{compile_label(profile)}, {lat.threads} threads; each call timed around the VM's "
                  f"call, median of {runs} runs)")
    return Breakdown(rows, total, provenance)
