"""Latency measured on this machine's CPU: compiled with TVM here, timed in a worker process,
beside a reference module when one is set (``autocomp.hardware.measure.reference``)."""

import os
import shutil
import tempfile
from pathlib import Path

from torch import nn

from autocomp.core.errors import AutocompError
from autocomp.hardware.compile.lower import compile_label, compile_model, export_library
from autocomp.hardware.measure import reference as ab
from autocomp.hardware.measure.base import Latency
from autocomp.hardware.measure.load import describe_load, sample
from autocomp.hardware.measure.timer_worker import WorkerProcess
from autocomp.hardware.profiles import HardwareProfile


class LocalMeasurer:
    """Compiles with TVM here and times the module in a persistent worker process pinned to
    the profile's cores.

    After ``set_reference`` every measurement alternates the candidate with the reference
    (kept loaded in the worker) and reports the reference-relative figure.
    ``new_workloads`` says what a compile does with workloads the tuning database lacks:
    ``"tune"`` them now, or ``"transfer"`` a tuned neighbour's schedule (a search's trials).
    """

    def __init__(self, profile: HardwareProfile, new_workloads: str = "tune") -> None:
        self.profile = profile
        self.new_workloads = new_workloads
        self._worker = WorkerProcess("autocomp.hardware.measure.timer_worker", "timing worker",
                                     threads=profile.latency.threads)
        self._reference: ab.Reference | None = None
        self._reference_dir: Path | None = None

    @property
    def reference(self) -> ab.Reference | None:
        return self._reference

    def set_reference(self, model: nn.Module, input_shape: tuple[int, ...],
                      baseline_s: float | None = None) -> Latency:
        """Compile ``model`` as the reference and measure it against itself (several A/B rounds,
        retried while noisy); returns that baseline figure. ``baseline_s`` (a resumed run's
        stored baseline) stays the scale of later figures; the level measured now is what
        later measurements' reference is checked against."""
        self._drop_reference()
        self._reference_dir = Path(tempfile.mkdtemp(prefix="autocomp-reference-"))
        library = export_library(compile_model(model, input_shape, self.profile),
                                 self._reference_dir / "reference.so")
        schedules = compile_label(self.profile)
        rounds_of = self._rounds_of(library, input_shape, library)
        attempt, attempts = ab.timed(rounds_of, None, self._watch, describe_load)
        level = ab.summarise(attempt, attempts, None, "").median_s
        self._reference = ab.Reference(level, baseline_s or level)
        return ab.summarise(attempt, attempts, self._reference,
                            self._label(schedules, "reference against itself"))

    def measure(self, model: nn.Module, input_shape: tuple[int, ...]) -> Latency:
        executable = compile_model(model, input_shape, self.profile, new_workloads=self.new_workloads)
        schedules = compile_label(self.profile)
        with tempfile.TemporaryDirectory(prefix="autocomp-") as tmp:
            library = export_library(executable, Path(tmp) / "model.so")
            attempt, attempts = ab.timed(self._rounds_of(library, input_shape), self._reference,
                                         self._watch, describe_load)
        return ab.summarise(attempt, attempts, self._reference, self._label(schedules))

    def close(self) -> None:
        self._worker.close()
        self._drop_reference()

    def _drop_reference(self) -> None:
        if self._reference_dir is not None:
            shutil.rmtree(self._reference_dir, ignore_errors=True)
        self._reference_dir, self._reference = None, None

    def _rounds_of(self, library: Path, input_shape: tuple[int, ...], reference: Path | None = None):
        if reference is None and self._reference_dir is not None:
            reference = self._reference_dir / "reference.so"
        request = {"library": str(library), "reference": str(reference) if reference else None,
                   "shape": list(input_shape), "rounds": self.profile.latency.repeat,
                   "min_repeat_ms": self.profile.latency.min_repeat_ms}

        def time_once() -> ab.Rounds:
            reply = self._worker.ask(request)
            if not reply["ok"]:
                raise AutocompError(f"timing failed: {reply['error']}")
            return ab.Rounds(reply["candidate"], reply["reference"])

        return time_once

    def _watch(self):
        return sample([self._worker.start().pid, os.getpid()])

    def _label(self, schedules: str, what: str = "") -> str:
        return (f"{self.profile.name}: TVM {self.profile.target_text()}, {schedules}, "
                f"{self.profile.latency.threads} threads" + (f", {what}" if what else ""))
