"""One latency measurer per deployment setting a search tries (threads, for CPU targets)."""

from dataclasses import replace

from autocomp.hardware.costmodel.lut import LatencyTable
from autocomp.hardware.measure.base import Measurer
from autocomp.hardware.measure.local import LocalMeasurer
from autocomp.hardware.oracle import make_measurer
from autocomp.hardware.profiles import HardwareProfile


class MeasurerPool:
    """Measurers keyed by the trial's deployment knobs, created on first use and closed
    together; with ``check_table``, also the kernel latency table of targets timed on this
    machine, whose prediction is then recorded next to each measurement (each new kernel
    is compiled and timed alone once, which costs seconds per trial on a fresh cache)."""

    def __init__(self, profile: HardwareProfile, *, check_table: bool = False) -> None:
        self.profile = profile
        self.check_table = check_table
        self._pool: dict[int, tuple[HardwareProfile, Measurer, LatencyTable | None]] = {}

    def get(self, deploy: dict) -> tuple[HardwareProfile, Measurer, LatencyTable | None]:
        """The profile variant, measurer and latency table for ``deploy`` (e.g. ``{"threads": 1}``)."""
        threads = int(deploy.get("threads", self.profile.latency.threads))
        if threads not in self._pool:
            profile = self.profile
            if threads != profile.latency.threads:
                profile = replace(profile, latency=replace(profile.latency, threads=threads))
            measurer = make_measurer(profile)
            # The table's predictions are checked at the profile's own thread count only:
            # each other setting would time every kernel again.
            table = (LatencyTable(profile) if self.check_table and isinstance(measurer, LocalMeasurer)
                     and threads == self.profile.latency.threads else None)
            self._pool[threads] = (profile, measurer, table)
        return self._pool[threads]

    def tables(self) -> list[LatencyTable]:
        return [table for _, _, table in self._pool.values() if table is not None]

    def close(self) -> None:
        for _, measurer, table in self._pool.values():
            measurer.close()
            if table is not None:
                table.close()
        self._pool.clear()
