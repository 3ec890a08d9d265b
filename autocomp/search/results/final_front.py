"""The end of a search: the front's latency obtained again (re-measured end to end, or estimated
where the target is), scored on the test split, and written out (front.json, pareto.csv,
pareto.png, report)."""

import logging
from dataclasses import dataclass
from pathlib import Path

import optuna
from torch import nn

from autocomp.core.errors import AutocompError
from autocomp.core.inventory import Inventory
from autocomp.core.staging import write_json
from autocomp.core.units import format_bytes, format_seconds
from autocomp.intake.data import DataSplits
from autocomp.search.measurers import MeasurerPool
from autocomp.search.results.pareto import (
    TrialResult,
    closest,
    obtained_again,
    pareto_front,
    plot_front,
    violation,
    write_csv,
)
from autocomp.search.results.report import write_report
from autocomp.search.results.trials import load_trial_model
from autocomp.search.settings import RunSettings
from autocomp.training.train import evaluate

logger = logging.getLogger(__name__)


@dataclass
class FinalFront:
    """The trials the search ends with: its feasible Pareto front, or when no trial meets
    the budgets, the closest ones (``feasible`` False)."""

    feasible: bool
    rows: list[dict]
    path: Path


def finalise(study: optuna.Study, results: list[TrialResult], settings: RunSettings, run_dir: Path,
             data: DataSplits, measurers: MeasurerPool, base: tuple[nn.Module, Inventory]) -> FinalFront:
    """Re-measure the front end to end (with the schedules its trials ran, which the export
    uses too; estimated again where the target is estimated) and score it on the test split
    (which no choice ever used), then write front.json, pareto.csv, pareto.png and the
    report, and log the front as a table. ``base``: the uncompressed model and its inventory."""
    if not results:
        raise AutocompError("no trial finished, so there is no Pareto front")
    trials = {t.number: t for t in study.get_trials(deepcopy=False)}
    front = pareto_front([r for r in results if r.feasible])
    chosen = front or closest(results, trials)
    rows = []
    for result in chosen:
        row = {"number": result.number, "label": result.label, "val_acc": result.val_acc,
               "test_acc": None, "search_latency": trials[result.number].user_attrs["latency"],
               "remeasured_latency": None, "size_bytes": result.size_bytes, "params": result.params,
               "macs": result.macs, "plan_summary": result.plan_summary,
               "plan": trials[result.number].user_attrs.get("plan"), "deploy": result.deploy,
               "violation": violation(trials[result.number])}
        if (run_dir / "trials" / str(result.number) / "model.pt").is_file():
            model = load_trial_model(run_dir, settings, result.number, data, base)
            _, measurer, _ = measurers.get(result.deploy)
            row["remeasured_latency"] = measurer.measure(model, settings.input_shape).to_json()
            result.test_acc = row["test_acc"] = evaluate(model, data.test)
        else:
            row["note"] = "weights saved by another worker's machine: not re-measured here"
        rows.append(row)
    final = FinalFront(bool(front), rows, run_dir / "front.json")
    provenance = _common_provenance(rows, measurers.how())
    again = obtained_again([row["remeasured_latency"] for row in rows if row["remeasured_latency"]])
    write_json(final.path, {"feasible": final.feasible, "provenance": provenance, "obtained": again,
                             "budget_s": settings.baseline.get("budget_s"), "trials": rows})
    write_csv(chosen, run_dir / "pareto.csv")
    uncompressed = next((r for r in results if r.plan_summary == "uncompressed"), None)
    plot_front(results, front, run_dir / "pareto.png",
               title=f"{settings.name}: {settings.model.spec} on {settings.data}, target {settings.target}",
               budget_s=settings.baseline.get("budget_s"), baseline=uncompressed)
    feasible_count = sum(r.feasible for r in results)
    if front:
        heading = (f"Pareto front of {len(results)} finished trials ({feasible_count} within budget), "
                   f"{again}, latency {provenance}:")
    else:
        budget_s = settings.baseline.get("budget_s")
        limits = ", ".join(text for text in (
            f"latency {format_seconds(budget_s)}" if budget_s is not None else "",
            f"size {settings.size_budget}" if settings.size_budget else "",
            f"SRAM {settings.sram}" if settings.sram else "",
            f"flash {settings.flash}" if settings.flash else "",
        ) if text) or "the target's memory limits"
        heading = (f"no trial meets the budgets ({limits}); the closest {len(rows)}, {again}, "
                   f"latency {provenance}:")
    logger.info("\n%s\n%s", heading, format_rows(rows, settings.baseline["latency"]["median_s"]))
    report_md, report_html = write_report(run_dir)
    logger.info("\nwrote %s, %s, %s, %s and %s", final.path, run_dir / "pareto.csv", run_dir / "pareto.png",
                report_md, report_html)
    return final


def _common_provenance(rows: list[dict], how: str) -> str:
    """What the front's figures share, for a heading: how the profile obtains latency, and
    whether they are reference-relative. Each figure's own label (which schedules its
    kernels ran, its ratio, any noise) stays with it in front.json."""
    figures = [row["remeasured_latency"] or row["search_latency"] for row in rows]
    relative = bool(figures) and all(figure.get("reference") for figure in figures)
    return how + (", reference-relative (A/B against the uncompressed model)" if relative else "") + \
        "; each figure's schedules and label in front.json"


def format_rows(rows: list[dict], baseline_s: float) -> str:
    """The final trials as a fixed-width table: final latency, test accuracy."""
    lines = [f"{'trial':>5}  {'val acc':>7}  {'test acc':>8}  {'latency':>10}  {'search':>10}  "
             f"{'speedup':>7}  {'size':>9}  plan"]
    for row in rows:
        figure = row["remeasured_latency"] or row["search_latency"]
        latency = figure["median_s"]
        test = f"{row['test_acc']:.2%}" if row["test_acc"] is not None else "-"
        label = f" ({row['label']})" if row.get("label") else ""
        lines.append(f"{row['number']:>5}  {row['val_acc']:>7.2%}  {test:>8}  "
                     f"{format_seconds(latency) + ('*' if figure.get('noisy') else ''):>10}  "
                     f"{format_seconds(row['search_latency']['median_s']):>10}  "
                     f"{baseline_s / latency:>6.2f}x  {format_bytes(row['size_bytes']):>9}  "
                     f"{row['plan_summary']}{label}")
    if any((row["remeasured_latency"] or row["search_latency"]).get("noisy") for row in rows):
        lines.append("* noisy: the figure never settled (see its provenance in front.json)")
    return "\n".join(lines)
