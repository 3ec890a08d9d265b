"""Trial results, their Pareto front, and how the front is shown: table, CSV, plot."""

import csv
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna

from autocomp.core.staging import replacing
from autocomp.core.units import format_bytes, format_count, format_seconds


@dataclass
class TrialResult:
    """A finished trial as the reports see it."""

    number: int
    val_acc: float
    latency_s: float
    latency_p10_s: float
    latency_p90_s: float
    provenance: str
    params: int
    macs: int
    size_bytes: int
    feasible: bool
    plan_summary: str
    test_acc: float | None = None
    label: str | None = None  # warm-start baselines and seeds ("uniform int8"); None when sampled
    deploy: dict[str, Any] = field(default_factory=dict)  # deployment knobs, e.g. {"threads": 2}
    noisy: str | None = None  # why the latency never settled, when it did not (``Latency.noisy``)


def collect(study: optuna.Study) -> list[TrialResult]:
    """Every completed trial of the study (trials stored before labels and deployment knobs
    existed have neither)."""
    results = []
    for trial in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)):
        attrs = trial.user_attrs
        latency = attrs["latency"]
        results.append(TrialResult(
            trial.number, attrs["val_acc"], latency["median_s"], latency["p10_s"],
            latency["p90_s"], latency["provenance"], attrs["params"], attrs["macs"],
            attrs["size_bytes"], attrs["feasible"], attrs["plan_summary"],
            label=attrs.get("label"), deploy=dict(attrs.get("deploy") or {}), noisy=latency.get("noisy")))
    return results


def latency_provenance(results: list[TrialResult]) -> str:
    """How the results' latencies were obtained: their one provenance, or each distinct one."""
    return "; ".join(dict.fromkeys(r.provenance for r in results))


def obtained_again(figures: list[dict]) -> str:
    """How the final front's latencies (``Latency.to_json`` dicts) were obtained after the
    search, in words: "re-measured" only when every one of them was measured."""
    kinds = {figure.get("kind") for figure in figures}
    if kinds == {"measured"}:
        return "re-measured end to end"
    if kinds == {"estimated"}:
        return "estimated again by the cost model"
    return "re-measured where the device was reached, else estimated (each figure's label says which)"


# Trials shown when none meets the budgets.
CLOSEST = 3


def violation(trial: optuna.trial.FrozenTrial) -> float:
    """How far a trial is from meeting every budget: its constraints' summed relative
    violations (0 when it meets them all)."""
    return sum(max(0.0, value) for value in trial.user_attrs.get("constraints", {}).values())


def closest(results: list[TrialResult], trials: dict[int, optuna.trial.FrozenTrial]) -> list[TrialResult]:
    """The CLOSEST results to meeting the budgets, nearest first (most accurate among ties)."""
    return sorted(results, key=lambda r: (violation(trials[r.number]), -r.val_acc))[:CLOSEST]


def _dominates(a: TrialResult, b: TrialResult) -> bool:
    no_worse = (a.val_acc >= b.val_acc and a.latency_s <= b.latency_s and a.size_bytes <= b.size_bytes)
    better = (a.val_acc > b.val_acc or a.latency_s < b.latency_s or a.size_bytes < b.size_bytes)
    return no_worse and better


def pareto_front(results: list[TrialResult]) -> list[TrialResult]:
    """Non-dominated results (accuracy up, latency and deployed size down), by latency."""
    front = [r for r in results if not any(_dominates(o, r) for o in results if o is not r)]
    return sorted(front, key=lambda r: (r.latency_s, -r.val_acc))


def accuracy_latency_front(results: list[TrialResult]) -> list[TrialResult]:
    """The results that no faster result matches in accuracy, by latency."""
    line: list[TrialResult] = []
    for result in sorted(results, key=lambda r: (r.latency_s, -r.val_acc)):
        if not line or result.val_acc > line[-1].val_acc:
            line.append(result)
    return line


def best_feasible(results: list[TrialResult]) -> TrialResult | None:
    """The most accurate trial that meets the budget (fastest among ties)."""
    feasible = [r for r in results if r.feasible]
    return max(feasible, key=lambda r: (r.val_acc, -r.latency_s)) if feasible else None


def format_table(rows: list[TrialResult], baseline_latency_s: float | None = None, *,
                 remeasured_s: dict[int, float] | None = None) -> str:
    """A fixed-width table of results; ``remeasured_s`` (trial -> seconds) adds the final
    front's latency (re-measured, or estimated again) as the column "final"."""
    header = (f"{'trial':>5}  {'val acc':>7}  {'test acc':>8}  {'latency':>10}  {'p10-p90':>17}  "
              + (f"{'final':>11}  " if remeasured_s is not None else "")
              + f"{'speedup':>7}  {'params':>7}  {'MACs':>7}  {'size':>8}  {'budget':>6}  plan")
    lines = [header]
    for r in rows:
        test = f"{r.test_acc:.2%}" if r.test_acc is not None else "-"
        spread = f"{format_seconds(r.latency_p10_s)}-{format_seconds(r.latency_p90_s)}"
        speedup = f"{baseline_latency_s / r.latency_s:.2f}x" if baseline_latency_s else "-"
        again = ""
        if remeasured_s is not None:
            again = f"{format_seconds(remeasured_s[r.number]) if r.number in remeasured_s else '-':>11}  "
        plan = f"{r.label}: {r.plan_summary}" if r.label and r.label != r.plan_summary else r.plan_summary
        lines.append(
            f"{r.number:>5}  {r.val_acc:>7.2%}  {test:>8}  "
            f"{format_seconds(r.latency_s) + ('*' if r.noisy else ''):>10}  "
            f"{spread:>17}  {again}{speedup:>7}  {format_count(r.params):>7}  {format_count(r.macs):>7}  "
            f"{format_bytes(r.size_bytes):>8}  {'ok' if r.feasible else 'over':>6}  {plan}")
    if any(r.noisy for r in rows):
        lines.append("* noisy: the figure never settled (its provenance says what was seen)")
    return "\n".join(lines)


def write_csv(rows: list[TrialResult], path: Path) -> None:
    """The front as CSV, one row per trial, latency provenance included (deploy as JSON)."""
    columns = list(TrialResult.__dataclass_fields__)
    with replacing(path) as temporary, open(temporary, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        for row in rows:
            values = {name: getattr(row, name) for name in columns}
            values["deploy"] = json.dumps(row.deploy, sort_keys=True)
            writer.writerow(values)


def plot_front(results: list[TrialResult], front: list[TrialResult], path: Path, *, title: str,
               budget_s: float | None, baseline: TrialResult | None) -> None:
    """Accuracy against latency: every trial, the front as a step line, the budget, the
    uncompressed model (``baseline``) and the labelled warm-start baselines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5.5))
    largest = max(r.size_bytes for r in results)

    def sizes(rows: list[TrialResult]) -> list[float]:
        return [30 + 220 * r.size_bytes / largest for r in rows]

    def points(rows: list[TrialResult]) -> tuple[list[float], list[float]]:
        return [r.latency_s * 1e3 for r in rows], [r.val_acc * 100 for r in rows]

    uncompressed = baseline or next((r for r in results if r.label == "uncompressed"), None)
    special = uncompressed.number if uncompressed is not None else None
    warm = [r for r in results if r.label and r.number != special]
    sampled = [r for r in results if not r.label and r.number != special]
    for feasible, colour, label in ((True, "tab:blue", "trial within budget"),
                                    (False, "lightgray", "trial over budget")):
        rows = [r for r in sampled if r.feasible == feasible]
        if rows:
            ax.scatter(*points(rows), s=sizes(rows), c=colour, edgecolors="black", linewidths=0.4,
                       alpha=0.8, label=label, zorder=2)
    for feasible, colour, label in ((True, "tab:orange", "warm-start baseline within budget"),
                                    (False, "navajowhite", "warm-start baseline over budget")):
        rows = [r for r in warm if r.feasible == feasible]
        if rows:
            ax.scatter(*points(rows), s=sizes(rows), marker="D", c=colour, edgecolors="black",
                       linewidths=0.6, label=label, zorder=3)
    for r in warm:
        ax.annotate(f"#{r.number} {r.label}", (r.latency_s * 1e3, r.val_acc * 100),
                    textcoords="offset points", xytext=(5, -10), fontsize=7, color="saddlebrown")
    # The line is the accuracy-latency trade-off; circled points are the 3-objective front,
    # which also keeps slower points that win on deployed size.
    line = accuracy_latency_front(front)
    ax.step(*points(line), where="post", color="tab:red", linewidth=1.5,
            label="accuracy-latency front", zorder=4)
    ax.scatter(*points(front), s=sizes(front), facecolors="none", edgecolors="tab:red",
               linewidths=1.5, zorder=5, label="Pareto front (acc, latency, size)")
    if uncompressed is not None:
        ax.scatter(*points([uncompressed]), marker="*", s=260, c="gold", edgecolors="black",
                   label="uncompressed model", zorder=6)
    if budget_s is not None:
        ax.axvline(budget_s * 1e3, color="tab:green", linestyle="--",
                   label=f"budget {format_seconds(budget_s)}")
    for r in front:
        if not r.label:
            ax.annotate(f"#{r.number}", (r.latency_s * 1e3, r.val_acc * 100),
                        textcoords="offset points", xytext=(5, 4), fontsize=8)
    ax.set_xlabel(f"latency, ms: {latency_provenance(results)}", fontsize=8)
    ax.set_ylabel("validation accuracy, %")
    ax.set_title(title + "\n(marker area ~ deployed size)", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    with replacing(path) as temporary:
        fig.savefig(temporary, dpi=120, format="png")
    plt.close(fig)
