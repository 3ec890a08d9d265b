"""Reference-relative timing: the candidate and a reference module alternate (A B A B ...), so
load that slows both cannot flip a decision; noisy figures are measured again, then marked.

A measurer with a reference (a search's uncompressed model, compiled once and kept
loaded where it is timed) reports ``ratio x baseline``: the median of the per-round
ratios candidate/reference, times the baseline figure the run measured for the
reference against itself.

An attempt is not trusted when the reference in its rounds is more than
``REFERENCE_TOLERANCE`` off the reference's level (its median in the last trusted
attempt: the level follows slow changes of the machine's speed, a sudden change is
checked), when the reported figure's p90/p10
exceeds ``SPREAD_LIMIT`` (the per-round ratios with a reference, the raw readings
without), or when other processes or the hypervisor took the CPU meanwhile
(``autocomp.hardware.measure.load``). It is then timed again, ``ATTEMPTS`` in all with
a back-off. A figure that does not settle is kept, and its provenance says
``noisy (...)`` with what was seen. One case settles without being noisy: a quiet
machine whose speed changed (this development VM's speed drifts by a third within
minutes) moves the reference while the ratios of two or more attempts agree: the
attempt with the median ratio is kept, and the level follows the machine when every
attempt saw it moved.
"""

import logging
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

from autocomp.core.units import format_seconds
from autocomp.hardware.measure.base import Latency
from autocomp.hardware.measure.load import Load

REFERENCE_TOLERANCE = 0.10
SPREAD_LIMIT = 1.25
ATTEMPTS = 3
BACKOFF_S = (0.3, 1.0)  # pause before the 2nd and the 3rd attempt
RATIO_AGREEMENT = 0.03  # attempts' ratios this close: a speed change, not load

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Rounds:
    """Seconds per timed round: the candidate's, and the reference's in the same rounds
    (empty without a reference)."""

    candidate: list[float]
    reference: list[float]

    @property
    def ratios(self) -> list[float]:
        return [a / b for a, b in zip(self.candidate, self.reference, strict=True)]


@dataclass
class Reference:
    """The reference a measurer times beside each candidate.

    ``level_s`` is its median on this machine as it is now (measured against itself, and
    moved when the machine's speed changes); ``baseline_s`` the figure candidates are
    scaled to: the run's baseline (a resumed run keeps its stored one).
    """

    level_s: float
    baseline_s: float


@dataclass(frozen=True)
class Attempt:
    """One timed attempt, the machine's load meanwhile, and why it is not trusted (if so)."""

    rounds: Rounds
    load: Load
    problems: list[str]


def _deciles(values: list[float]) -> tuple[float, float]:
    if len(values) < 2:
        return values[0], values[0]
    deciles = statistics.quantiles(values, n=10, method="inclusive")
    return deciles[0], deciles[-1]


def _drift(rounds: Rounds, reference: Reference | None) -> float:
    if reference is None or not rounds.reference:
        return 0.0
    return statistics.median(rounds.reference) / reference.level_s - 1


def _spread(rounds: Rounds, reference: Reference | None) -> float:
    p10, p90 = _deciles(rounds.ratios if reference is not None and rounds.reference else rounds.candidate)
    return p90 / p10


def problems(rounds: Rounds, reference: Reference | None, load: Load) -> list[str]:
    """Why an attempt cannot be trusted (empty when it can)."""
    found = []
    spread = _spread(rounds, reference)
    if spread > SPREAD_LIMIT:
        found.append(f"p90/p10 {spread:.2f} over {SPREAD_LIMIT}")
    drift = _drift(rounds, reference)
    if abs(drift) > REFERENCE_TOLERANCE:
        found.append(f"reference {drift:+.0%} off its level")
    if load.busy:
        found.append("machine busy")
    return found


def timed(time_once: Callable[[], Rounds], reference: Reference | None,
          watch: Callable[[], object], describe: Callable[[object, object], Load]) -> tuple[Attempt, int]:
    """Time until an attempt can be trusted, ``ATTEMPTS`` at most; returns the attempt kept and
    how many were made. ``watch`` samples the machine's load, ``describe`` says what
    happened between two samples. A kept attempt with problems left is noisy."""
    attempts: list[Attempt] = []
    for number in range(ATTEMPTS):
        if number:
            time.sleep(BACKOFF_S[min(number, len(BACKOFF_S)) - 1])
        before = watch()
        rounds = time_once()
        load = describe(before, watch())
        attempt = Attempt(rounds, load, problems(rounds, reference, load))
        attempts.append(attempt)
        if not attempt.problems:
            if reference is not None and rounds.reference:
                reference.level_s = statistics.median(rounds.reference)  # follow the machine's speed
            return attempt, len(attempts)
        logger.debug("latency attempt %d of %d not trusted (%s; %s)", number + 1, ATTEMPTS,
                     ", ".join(attempt.problems), load.text)
        if reference is not None and len(attempts) > 1 and _agree(attempts):
            return _settled(attempts, reference), len(attempts)
    least_noisy = min(attempts, key=lambda a: abs(_drift(a.rounds, reference)) + _spread(a.rounds, reference))
    return least_noisy, len(attempts)


def _settled(attempts: list[Attempt], reference: Reference) -> Attempt:
    """Quiet attempts whose ratios agree: the figure holds even though the machine's speed moved
    the reference; the one with the median ratio is kept, and the level follows the machine
    when every attempt saw it moved."""
    ranked = sorted(attempts, key=lambda a: statistics.median(a.rounds.ratios))
    kept = ranked[(len(ranked) - 1) // 2]
    drifts = [_drift(a.rounds, reference) for a in attempts]
    if all(d > REFERENCE_TOLERANCE for d in drifts) or all(d < -REFERENCE_TOLERANCE for d in drifts):
        level = statistics.median(statistics.median(a.rounds.reference) for a in attempts)
        logger.debug("latency: the machine's speed changed (reference %+.0f%% off its level in %d quiet "
                     "attempts whose ratios agree); level now %s", 100 * (level / reference.level_s - 1),
                     len(attempts), format_seconds(level))
        reference.level_s = level
    return Attempt(kept.rounds, kept.load, [])


def _agree(attempts: list[Attempt]) -> bool:
    """No attempt saw a busy machine, and their median ratios agree within ``RATIO_AGREEMENT``."""
    if any(a.load.busy or not a.rounds.reference for a in attempts):
        return False
    ratios = [statistics.median(a.rounds.ratios) for a in attempts]
    return max(ratios) / min(ratios) - 1 <= RATIO_AGREEMENT


def summarise(attempt: Attempt, attempts: int, reference: Reference | None, label: str) -> Latency:
    """The ``Latency`` of a kept attempt. ``label`` describes the device and compile (it opens
    the provenance); the provenance then says whether the figure is reference-relative and,
    when it never settled, ``noisy (...)`` with what was seen."""
    rounds = attempt.rounds
    raw = statistics.median(rounds.candidate)
    if reference is not None and rounds.reference:
        ratios = rounds.ratios
        ratio = statistics.median(ratios)
        low, high = _deciles(ratios)
        scale = reference.baseline_s
        median, p10, p90 = ratio * scale, low * scale, high * scale
        how = (f"reference-relative: {ratio:.3f} x baseline {format_seconds(scale)} "
               f"over {len(ratios)} A/B rounds")
        detail = {"ratio": ratio, "raw_median_s": raw, "reference_s": statistics.median(rounds.reference),
                  "baseline_s": scale, "level_s": reference.level_s}
    else:
        median, (p10, p90) = raw, _deciles(rounds.candidate)
        how = f"median of {len(rounds.candidate)}"
        detail = None
    noisy = None
    if attempt.problems:
        seen = [problem for problem in attempt.problems if problem != "machine busy"]
        noisy = (f"{'machine busy' if attempt.load.busy else 'unsettled'}: {attempt.load.text}"
                 + "".join(f"; {problem}" for problem in seen) + f"; after {attempts} attempts")
    provenance = f"measured ({label}, {how})" + (f"; noisy ({noisy})" if noisy else "")
    return Latency(median, p10, p90, len(rounds.candidate), "measured", provenance,
                   reference=detail, noisy=noisy, attempts=attempts)
