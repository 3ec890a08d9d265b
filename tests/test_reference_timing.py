"""Reference-relative timing, load detection and re-measurement (``hardware.measure.reference``)."""

import dataclasses
import multiprocessing
import os
import time

import pytest
import torch
from torch import nn

from autocomp.hardware.measure import reference as ab
from autocomp.hardware.measure.load import Load
from autocomp.hardware.measure.local import LocalMeasurer
from autocomp.hardware.measure.timer_worker import timing_cpus
from autocomp.hardware.profiles import load_target

SHAPE = (1, 1, 16, 16)
QUIET = Load("other processes 0% of 2 CPUs, load average 0.1, steal 0%", False)
BUSY = Load("other processes 50% of 2 CPUs, load average 1.9, steal 0%", True)


def net(width: int = 8) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, width, 3, padding=1), nn.ReLU(), nn.Conv2d(width, width, 3, padding=1),
                         nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, 10)).eval()


def scripted(attempts: list[tuple[list[float], list[float], Load]], reference: ab.Reference | None):
    """``reference.timed`` over scripted attempts (no pause between them)."""
    script = iter(attempts)
    loads = iter(load for _, _, load in attempts)

    def time_once() -> ab.Rounds:
        candidate, ref, _ = next(script)
        return ab.Rounds(candidate, ref)

    return ab.timed(time_once, reference, lambda: None, lambda before, after: next(loads))


@pytest.fixture(autouse=True)
def _no_backoff(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ab, "BACKOFF_S", (0.0, 0.0))


def test_figure_is_the_ratio_times_the_baseline() -> None:
    reference = ab.Reference(level_s=100e-6, baseline_s=120e-6)
    attempt, count = scripted([([50e-6] * 9, [100e-6] * 9, QUIET)], reference)
    latency = ab.summarise(attempt, count, reference, "host: test")
    assert count == 1 and latency.noisy is None
    assert latency.median_s == pytest.approx(60e-6)  # ratio 0.5 x the 120 us baseline
    assert latency.reference["ratio"] == pytest.approx(0.5) and latency.reference["raw_median_s"] == 50e-6
    assert "reference-relative: 0.500 x baseline 120 us over 9 A/B rounds" in latency.provenance


def test_load_that_slows_both_does_not_change_the_figure() -> None:
    reference = ab.Reference(level_s=100e-6, baseline_s=100e-6)
    quiet, _ = scripted([([50e-6] * 9, [100e-6] * 9, QUIET)], reference)
    # both 30% slower on a quiet machine (its speed changed): two agreeing attempts settle it
    slow, count = scripted([([65e-6] * 9, [130e-6] * 9, QUIET)] * 3, reference)
    assert count == 2 and not slow.problems
    assert ab.summarise(slow, count, reference, "x").median_s == pytest.approx(
        ab.summarise(quiet, 1, reference, "x").median_s)
    assert reference.level_s == pytest.approx(130e-6)  # the level follows the machine


def test_the_level_follows_slow_drift_and_still_catches_a_jump() -> None:
    reference = ab.Reference(level_s=100e-6, baseline_s=100e-6)
    for level in (106e-6, 112e-6, 119e-6):  # each within 10% of the last trusted one
        _, count = scripted([([50e-6] * 9, [level] * 9, QUIET)], reference)
        assert count == 1 and reference.level_s == pytest.approx(level)
    _, count = scripted([([50e-6] * 9, [150e-6] * 9, BUSY), ([60e-6] * 9, [120e-6] * 9, QUIET)], reference)
    assert count == 2  # 26% above the level: not trusted at once


def test_off_reference_is_retried_and_a_good_attempt_kept() -> None:
    reference = ab.Reference(level_s=100e-6, baseline_s=100e-6)
    attempt, count = scripted([([80e-6] * 9, [160e-6] * 9, BUSY), ([50e-6] * 9, [101e-6] * 9, QUIET)],
                              reference)
    assert count == 2 and attempt.problems == [] and attempt.rounds.candidate[0] == 50e-6


def test_a_busy_machine_is_marked_noisy_after_three_attempts() -> None:
    reference = ab.Reference(level_s=100e-6, baseline_s=100e-6)
    jitter = [50e-6, 90e-6, 40e-6, 120e-6, 55e-6]
    attempt, count = scripted([(jitter, [150e-6] * 5, BUSY)] * 3, reference)
    latency = ab.summarise(attempt, count, reference, "host: test")
    assert count == 3 and latency.attempts == 3
    assert latency.noisy.startswith("machine busy: other processes 50% of 2 CPUs")
    assert "reference +50% off its level" in latency.noisy and "after 3 attempts" in latency.noisy
    assert latency.provenance.endswith(f"; noisy ({latency.noisy})")


def test_spread_without_reference_is_judged_on_the_raw_readings() -> None:
    attempt, count = scripted([([1.0, 1.0, 2.0, 2.0, 3.0], [], QUIET)] * 3, None)
    latency = ab.summarise(attempt, count, None, "host: test")
    assert latency.noisy.startswith("unsettled:") and "p90/p10" in latency.noisy
    assert latency.reference is None and "median of 5" in latency.provenance


def _spin(seconds: float, cpu: int) -> None:
    os.sched_setaffinity(0, {cpu})
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        pass


@pytest.fixture(scope="module")
def measurer():
    profile = load_target("host", untuned=True)
    profile = dataclasses.replace(profile, latency=dataclasses.replace(profile.latency, repeat=7,
                                                                       min_repeat_ms=10))
    measurer = LocalMeasurer(profile)
    baseline = measurer.set_reference(net(), SHAPE)
    assert "reference against itself, reference-relative" in baseline.provenance
    yield measurer
    measurer.close()


@pytest.mark.slow
def test_busy_loop_on_a_timing_core_is_retried_then_marked_noisy(measurer: LocalMeasurer) -> None:
    """A real busy loop holds one of the timing worker's CPUs for the whole measurement."""
    cpu = timing_cpus(measurer.profile.latency.threads)[-1]
    loop = multiprocessing.get_context("spawn").Process(target=_spin, args=(60.0, cpu))
    loop.start()
    try:
        time.sleep(0.5)
        latency = measurer.measure(net(), SHAPE)
    finally:
        loop.terminate()
        loop.join()
    assert latency.attempts == 3, latency
    assert latency.noisy is not None and latency.noisy.startswith("machine busy: other processes")
    assert "; noisy (machine busy" in latency.provenance


@pytest.mark.slow
def test_reference_off_its_level_is_timed_again(measurer: LocalMeasurer) -> None:
    """A level half what the machine gives (as if the baseline ran on a faster machine): every
    attempt sees the reference +100% off, so the figure is timed again; then either the
    ratios of the attempts agree and the level moves to the machine's, or after three
    attempts the figure is marked."""
    measurer.reference.level_s /= 2
    level = measurer.reference.level_s
    latency = measurer.measure(net(12), SHAPE)
    assert latency.attempts >= 2 and (latency.attempts == 3 or latency.noisy is None)
    assert (latency.noisy is None and measurer.reference.level_s > 1.5 * level) or latency.noisy
    assert "reference-relative" in latency.provenance and latency.reference["baseline_s"] > 0
