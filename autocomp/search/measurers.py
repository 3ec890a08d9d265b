"""One latency measurer per deployment setting a search tries (threads, for CPU targets), each
timing trials beside the run's uncompressed model."""

from dataclasses import replace

from torch import nn

from autocomp.hardware.costmodel.estimate import EstimateMeasurer
from autocomp.hardware.costmodel.lut import LatencyTable
from autocomp.hardware.measure.base import Latency, Measurer
from autocomp.hardware.measure.local import LocalMeasurer
from autocomp.hardware.oracle import estimated_instead, make_measurer
from autocomp.hardware.profiles import HardwareProfile


class MeasurerPool:
    """Measurers keyed by the trial's deployment knobs, created on first use and closed
    together.

    Each one is given ``reference`` (the run's uncompressed model) when created, so its
    figures are reference-relative: the profile's own setting scales them to the run's
    baseline (``anchor``), another setting to the reference's latency measured in that
    setting. By default trials give workloads the tuning database lacks a tuned
    neighbour's schedule (``new_workloads="transfer"``) so that no tuning runs on their
    critical path; the front's re-measurement and the export use the same schedules.
    With ``check_table``, the pool also
    keeps the kernel latency table of targets timed on this machine, whose prediction is
    then recorded next to each measurement (each new kernel is compiled and timed alone
    once, which costs seconds per trial on a fresh cache).
    """

    def __init__(self, profile: HardwareProfile, reference: nn.Module | None = None,
                 input_shape: tuple[int, ...] = (), *, check_table: bool = False,
                 new_workloads: str = "transfer") -> None:
        self.profile = profile
        self.check_table = check_table
        self._reference = reference
        self._shape = input_shape
        self._baseline_s: float | None = None
        self._new_workloads = new_workloads
        self._baseline: Latency | None = None  # the reference timed against itself, own setting
        self._pool: dict[int, tuple[HardwareProfile, Measurer, LatencyTable | None]] = {}

    def get(self, deploy: dict) -> tuple[HardwareProfile, Measurer, LatencyTable | None]:
        """The profile variant, measurer and latency table for ``deploy`` (e.g. ``{"threads": 1}``)."""
        threads = int(deploy.get("threads", self.profile.latency.threads))
        if threads not in self._pool:
            profile = self.profile
            if threads != profile.latency.threads:
                profile = replace(profile, latency=replace(profile.latency, threads=threads))
            measurer = make_measurer(profile)
            if self._reference is not None:  # the reference is tuned, whatever trials do
                own = threads == self.profile.latency.threads
                figure = measurer.set_reference(self._reference, self._shape,
                                                baseline_s=self._baseline_s if own else None)
                if own:
                    self._baseline = figure
            # The table's predictions are checked at the profile's own thread count only:
            # each other setting would time every kernel again.
            table = (LatencyTable(profile) if self.check_table and isinstance(measurer, LocalMeasurer)
                     and threads == self.profile.latency.threads else None)
            _set_new_workloads(measurer, self._new_workloads)
            self._pool[threads] = (profile, measurer, table)
        return self._pool[threads]

    def how(self) -> str:
        """How the profile's own setting obtains latency here, in words: its device, or its
        cost model standing in (with the reason) where the device could not be reached."""
        _, measurer, _ = self.get({})
        if isinstance(measurer, EstimateMeasurer) and measurer.fallback_reason:
            return estimated_instead(self.profile, measurer.fallback_reason)
        return self.profile.how()

    def baseline(self) -> Latency:
        """The reference's latency in the profile's own setting, timed against itself: the run's
        baseline when it has none yet."""
        if self._reference is None:
            raise ValueError("the pool has no reference model")
        self.get({})
        assert self._baseline is not None
        return self._baseline

    def anchor(self, baseline_s: float) -> None:
        """Scale the profile's own setting to ``baseline_s`` (the run's stored baseline, which a
        resumed or joined run keeps)."""
        self._baseline_s = baseline_s
        entry = self._pool.get(self.profile.latency.threads)
        reference = getattr(entry[1], "reference", None) if entry else None
        if reference is not None:
            reference.baseline_s = baseline_s

    def tables(self) -> list[LatencyTable]:
        return [table for _, _, table in self._pool.values() if table is not None]

    def close(self) -> None:
        for _, measurer, table in self._pool.values():
            measurer.close()
            if table is not None:
                table.close()
        self._pool.clear()
        self._baseline = None


def _set_new_workloads(measurer: Measurer, mode: str) -> None:
    """Measurers that compile (local, RPC) take the policy; estimates and GPUs have none."""
    if hasattr(measurer, "new_workloads"):
        measurer.new_workloads = mode
