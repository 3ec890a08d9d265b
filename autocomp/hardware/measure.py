"""Latency measurement behind a small interface, and the record every figure carries.

A ``Latency`` always says how it was obtained (its ``provenance``); the search
stores it with the trial and every table and plot prints it.
"""

import statistics
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Protocol

from torch import nn

from autocomp.errors import AutocompError
from autocomp.hardware.lower import compile_model, export_library
from autocomp.hardware.profiles import HardwareProfile
from autocomp.hardware.timer_worker import WorkerProcess


@dataclass(frozen=True)
class Latency:
    """One model's latency on one target, with its spread and how it was obtained."""

    median_s: float
    p10_s: float
    p90_s: float
    samples: int
    kind: str  # "measured" or "estimated"
    provenance: str

    def to_json(self) -> dict:
        return asdict(self)


class Measurer(Protocol):
    """Anything that can give a model's latency on a target."""

    def measure(self, model: nn.Module, input_shape: tuple[int, ...]) -> Latency: ...

    def close(self) -> None: ...


class LocalMeasurer:
    """Compiles with TVM here and times the module in a persistent worker process."""

    def __init__(self, profile: HardwareProfile) -> None:
        self.profile = profile
        self._worker = WorkerProcess("autocomp.hardware.timer_worker", "timing worker",
                                     threads=profile.latency.threads)

    def measure(self, model: nn.Module, input_shape: tuple[int, ...]) -> Latency:
        executable = compile_model(model, input_shape, self.profile)
        with tempfile.TemporaryDirectory(prefix="autocomp-") as tmp:
            library = export_library(executable, Path(tmp) / "model.so")
            seconds = self._ask({"library": str(library), "shape": list(input_shape),
                                 "repeat": self.profile.latency.repeat,
                                 "min_repeat_ms": self.profile.latency.min_repeat_ms})
        return self._summarise(seconds)

    def close(self) -> None:
        self._worker.close()

    def _ask(self, request: dict) -> list[float]:
        reply = self._worker.ask(request)
        if not reply["ok"]:
            raise AutocompError(f"timing failed: {reply['error']}")
        return reply["seconds"]

    def _summarise(self, seconds: list[float]) -> Latency:
        from autocomp.hardware.tune import tuning_label

        deciles = statistics.quantiles(seconds, n=10, method="inclusive")
        provenance = (f"measured ({self.profile.name}: TVM {self.profile.target_text()}, "
                      f"{tuning_label(self.profile)}, {self.profile.latency.threads} threads, "
                      f"median of {len(seconds)})")
        return Latency(statistics.median(seconds), deciles[0], deciles[-1], len(seconds),
                       "measured", provenance)


def make_measurer(profile: HardwareProfile, *, say=print) -> Measurer:
    """The measurer a profile asks for: this machine's CPU or GPU, a device through a TVM
    RPC tracker, or the profile's cost-model estimate.

    Where the profile's device cannot be reached (no GPU here, no device registered with
    the tracker) the estimate stands in, says why in every figure's provenance, and
    ``say`` tells the user once.
    """
    from autocomp.hardware.estimate import EstimateMeasurer

    lat = profile.latency
    if lat.method == "estimate":
        return EstimateMeasurer(profile)
    if lat.method == "rpc":
        from autocomp.hardware.rpc import RPCMeasurer, registered_servers

        assert lat.rpc is not None
        try:
            servers = registered_servers(lat.rpc.tracker_host, lat.rpc.tracker_port, lat.rpc.key)
            reason = None if servers else f"no device with key {lat.rpc.key!r} is registered with the tracker"
        except (OSError, ConnectionError) as err:
            reason = f"RPC tracker {lat.rpc.tracker_host}:{lat.rpc.tracker_port} unreachable ({err})"
        if reason is None:
            return RPCMeasurer(profile)
    elif lat.device == "cuda":
        from autocomp.hardware.cuda import CudaMeasurer, GpuUnavailableError

        try:
            return CudaMeasurer(profile)
        except GpuUnavailableError as err:
            reason = str(err).split(": ", 1)[-1]
    else:
        return LocalMeasurer(profile)
    say(f"note: target {profile.name}: {reason}; latency is estimated by its cost model instead")
    return EstimateMeasurer(profile, fallback_reason=reason)
