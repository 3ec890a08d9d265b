"""Latency measured on this machine's CPU: compiled with TVM here, timed in a worker process."""

import statistics
import tempfile
from pathlib import Path

from torch import nn

from autocomp.core.errors import AutocompError
from autocomp.hardware.compile.lower import compile_model, export_library
from autocomp.hardware.measure.base import Latency
from autocomp.hardware.measure.timer_worker import WorkerProcess
from autocomp.hardware.profiles import HardwareProfile


class LocalMeasurer:
    """Compiles with TVM here and times the module in a persistent worker process."""

    def __init__(self, profile: HardwareProfile) -> None:
        self.profile = profile
        self._worker = WorkerProcess("autocomp.hardware.measure.timer_worker", "timing worker",
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
        from autocomp.hardware.compile.tune import tuning_label

        deciles = statistics.quantiles(seconds, n=10, method="inclusive")
        provenance = (f"measured ({self.profile.name}: TVM {self.profile.target_text()}, "
                      f"{tuning_label(self.profile)}, {self.profile.latency.threads} threads, "
                      f"median of {len(seconds)})")
        return Latency(statistics.median(seconds), deciles[0], deciles[-1], len(seconds),
                       "measured", provenance)
