"""What else the machine was doing while a measurement ran, read from ``/proc``.

A figure timed while other processes held the CPU is marked noisy with what was seen:
other processes' share of the CPUs, the load average and the hypervisor's steal time.
"""

import os
import time
from dataclasses import dataclass
from pathlib import Path

_CLOCK_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


@dataclass(frozen=True)
class CpuSample:
    """Cumulative CPU times (seconds) at one moment: the machine's and some processes'."""

    wall_s: float
    busy_s: float  # all CPUs, every state but idle and iowait
    steal_s: float
    total_s: float
    own_s: float  # the watched processes (the timing worker, this process)


def _machine_times() -> tuple[float, float, float] | None:
    try:
        fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    except OSError:
        return None
    ticks = [int(value) for value in fields[:8]]
    user, nice, system, idle, iowait, irq, softirq, steal = ticks + [0] * (8 - len(ticks))
    busy = user + nice + system + irq + softirq
    return busy / _CLOCK_TICKS, steal / _CLOCK_TICKS, (busy + idle + iowait + steal) / _CLOCK_TICKS


def _process_seconds(pid: int) -> float:
    """User + system CPU seconds of ``pid`` and its threads (0 when it is gone)."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0.0
    fields = text.rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _CLOCK_TICKS


def sample(pids: list[int]) -> CpuSample | None:
    """The machine's CPU times now, with those of ``pids``; None where ``/proc`` is missing."""
    machine = _machine_times()
    if machine is None:
        return None
    return CpuSample(time.monotonic(), *machine, sum(_process_seconds(pid) for pid in pids))


# Other processes' share of the CPUs, or the hypervisor's steal, above which the machine
# counts as busy during a measurement.
BUSY_SHARE = 0.10
BUSY_STEAL = 0.05


@dataclass(frozen=True)
class Load:
    """What the machine did between two samples besides the watched processes."""

    text: str  # e.g. "other processes 48% of 2 CPUs, load average 2.1, steal 0%"
    busy: bool


def describe_load(before: CpuSample | None, after: CpuSample | None) -> Load:
    """Other processes' CPU share, the load average and the steal time between two samples
    (unknown, and not counted as busy, without ``/proc``)."""
    if before is None or after is None:
        return Load("machine load unknown (no /proc)", False)
    total = max(after.total_s - before.total_s, 1e-9)
    cpus = os.cpu_count() or 1
    others = max(0.0, (after.busy_s - before.busy_s) - (after.own_s - before.own_s)) / total
    steal = (after.steal_s - before.steal_s) / total
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return Load(f"other processes {others:.0%} of {cpus} CPUs, load average {load:.1f}, steal {steal:.0%}",
                others > BUSY_SHARE or steal > BUSY_STEAL)
