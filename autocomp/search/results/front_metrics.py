"""How good an accuracy-latency front is: hypervolume, best accuracy under a latency
budget, and the speedup reachable within an accuracy loss.

Results are anything with ``latency_s`` and an accuracy: ``test_acc`` when it is set (not
None), else ``val_acc`` (e.g. ``autocomp.search.results.pareto.TrialResult``). Accuracies are
fractions (0..1), latencies seconds.
"""

import math
from collections.abc import Iterable
from typing import Any


def accuracy(result: Any) -> float:
    """The result's test accuracy when it has one, else its validation accuracy."""
    test = getattr(result, "test_acc", None)
    return float(test if test is not None else result.val_acc)


def hypervolume(points: Iterable[tuple[float, float]], ref: tuple[float, float]) -> float:
    """Exact area dominated by ``points`` (accuracy up, latency down) and bounded by ``ref``
    = (accuracy floor, latency ceiling). Dominated points add nothing; points no more
    accurate than the floor or no faster than the ceiling are left out."""
    floor, ceiling = ref
    inside = sorted((latency, acc) for acc, latency in points
                    if acc > floor and latency < ceiling and not math.isnan(acc + latency))
    area, best = 0.0, floor
    for i, (latency, acc) in enumerate(inside):
        best = max(best, acc)
        right = inside[i + 1][0] if i + 1 < len(inside) else ceiling
        area += (right - latency) * (best - floor)
    return area


def best_under_budget(results: Iterable[Any], budget_s: float) -> Any | None:
    """The most accurate result with latency <= ``budget_s`` (the faster among ties), or None."""
    within = [r for r in results if r.latency_s <= budget_s]
    return max(within, key=lambda r: (accuracy(r), -r.latency_s)) if within else None


def speedup_at_loss(results: Iterable[Any], baseline_acc: float, baseline_latency_s: float,
                    max_loss: float = 0.005) -> float:
    """The largest ``baseline_latency_s / latency`` among results whose accuracy is at least
    ``baseline_acc - max_loss`` (0.005: half a percentage point); 0.0 when none is."""
    return max((baseline_latency_s / r.latency_s for r in results
                if accuracy(r) >= baseline_acc - max_loss - 1e-12), default=0.0)
