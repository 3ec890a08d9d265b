"""A run's report: what was asked, what the search found, how it compares with the obvious
choices and why its plans look the way they do, as ``report.md`` and a self-contained
``report.html`` (plots embedded, styles inline, no external links).

The front comes from ``front.json`` (its latency obtained again, re-measured end to end or
estimated where the target is, and scored on the test split)
when the search finished, else from the study's own figures. Files a run may lack
(sensitivity, layer shares, the plot) make their section say so instead of failing.
"""

import base64
import html
import json
import re
import statistics
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna

from autocomp.core.errors import AutocompError
from autocomp.core.staging import write_text
from autocomp.core.units import format_bytes, format_count, format_seconds
from autocomp.search.prediction import predictions_summary
from autocomp.search.results.method_map import model_layers, write_method_map
from autocomp.search.results.pareto import (
    TrialResult,
    best_feasible,
    closest,
    collect,
    format_table,
    latency_provenance,
    obtained_again,
    pareto_front,
)
from autocomp.search.settings import RunSettings, load_settings, unbinding_budget
from autocomp.search.storage import open_storage
from autocomp.search.workers import NOT_COUNTED

NOT_COMPUTED = "Not computed for this run."
STATES = {"COMPLETE": "complete", "PRUNED": "stopped early (pruned)",
          "SKIPPED": "predicted over the latency budget, not compiled (not counted)", "FAIL": "failed",
          "RUNNING": "running (or killed while running)", "WAITING": "queued, not started"}
CSS = """
body { font-family: system-ui, sans-serif; max-width: 1150px; margin: 2em auto; padding: 0 1em;
       color: #222; line-height: 1.45; }
h1 { border-bottom: 2px solid #ddd; } h2 { margin-top: 1.8em; border-bottom: 1px solid #eee; }
table { border-collapse: collapse; font-size: 13px; margin: 0.8em 0; display: block; overflow-x: auto; }
th, td { border: 1px solid #ccc; padding: 3px 7px; text-align: left; }
th { background: #f4f4f4; } tr:nth-child(even) td { background: #fafafa; }
code, pre { background: #f4f4f4; border-radius: 3px; } pre { padding: 0.7em; overflow-x: auto; }
img { max-width: 100%; border: 1px solid #eee; }
"""


@dataclass
class RunView:
    """A run as the reports see it: its settings, trials, and the front it ends with."""

    run_dir: Path
    settings: RunSettings
    trials: list[optuna.trial.FrozenTrial]
    results: list[TrialResult]
    front: list[TrialResult]  # the Pareto front within budget, or the closest trials when none is
    feasible: bool  # whether ``front`` meets the budgets
    final: dict[str, Any] | None  # front.json: final latencies and test accuracies
    shared: dict[str, Any]  # the study's user attributes (settings and pre-pass shared by workers)

    def __post_init__(self) -> None:
        self._by_number = {t.number: t for t in self.trials}

    def trial(self, number: int) -> optuna.trial.FrozenTrial:
        return self._by_number[number]

    def final_row(self, number: int) -> dict[str, Any] | None:
        rows = self.final["trials"] if self.final else []
        return next((row for row in rows if row["number"] == number), None)

    def plan(self, number: int) -> dict[str, Any]:
        """A trial's plan (CompressionPlan JSON), from the study or its trial folder."""
        plan = self.trial(number).user_attrs.get("plan")
        path = self.run_dir / "trials" / str(number) / "plan.json"
        if plan is None and path.is_file():
            plan = json.loads(path.read_text())
        return plan or {"layers": {}}

    @property
    def baseline_s(self) -> float:
        return self.settings.baseline["latency"]["median_s"]


def open_run_study(run_dir: Path, settings: RunSettings) -> optuna.Study:
    """The run's study; a one-line error when it does not exist (never creates one)."""
    if settings.storage is None and not (run_dir / "study.db").is_file():
        raise AutocompError(f"run {settings.name!r} has no study yet (expected {run_dir / 'study.db'})")
    try:
        return optuna.load_study(study_name=settings.name, storage=open_storage(settings.storage, run_dir))
    except KeyError:
        raise AutocompError(f"the run's storage holds no study named {settings.name!r}") from None


def _read_json(path: Path) -> Any:
    return json.loads(path.read_text()) if path.is_file() else None


def load_run(run_dir: Path) -> RunView:
    """Read a run: settings, study, and its front; a one-line error when there is nothing to show."""
    settings = load_settings(run_dir)
    study = open_run_study(run_dir, settings)
    trials = study.get_trials(deepcopy=False)
    results = collect(study)
    if not results:
        raise AutocompError(f"run {settings.name!r} has no finished trial yet")
    final = _read_json(run_dir / "front.json")
    by_number = {r.number: r for r in results}
    if final is not None:
        rows = [row for row in final["trials"] if row["number"] in by_number]
        front = [by_number[row["number"]] for row in rows]
        for row in rows:
            by_number[row["number"]].test_acc = row.get("test_acc")
        feasible = bool(final.get("feasible", front and all(r.feasible for r in front)))
    else:
        front = pareto_front([r for r in results if r.feasible])
        feasible = bool(front)
        if not front:
            front = closest(results, {t.number: t for t in trials})
    return RunView(run_dir, settings, trials, results, front, feasible, final, dict(study.user_attrs))


def front_json(view: RunView) -> dict[str, Any]:
    """The front as one JSON object: every figure with its provenance."""
    settings = view.settings
    rows = []
    for r in view.front:
        final = view.final_row(r.number) or {}
        remeasured = final.get("remeasured_latency")
        latency_s = (remeasured or {}).get("median_s", r.latency_s)
        rows.append({
            "number": r.number, "label": r.label, "val_acc": r.val_acc, "test_acc": r.test_acc,
            "search_latency": view.trial(r.number).user_attrs["latency"],
            "remeasured_latency": remeasured, "speedup": view.baseline_s / latency_s,
            "size_bytes": r.size_bytes, "params": r.params, "macs": r.macs, "feasible": r.feasible,
            "plan_summary": r.plan_summary, "deploy": r.deploy, "plan": view.plan(r.number)})
    return {
        "run": settings.name, "model": settings.model.spec, "data": settings.data,
        "target": settings.target,
        "objectives": {"val_acc": "maximize", "latency_s": "minimize", "size_bytes": "minimize"},
        "budgets": {"latency": settings.budget, "latency_s": settings.baseline.get("budget_s"),
                    "size": settings.size_budget, "sram": settings.sram, "flash": settings.flash},
        "baseline": settings.baseline,
        "source": (f"front.json: {_again(view)}, test accuracy on the test split"
                   if view.final else "study: search-time figures (the front was not finalised)"),
        "remeasured_provenance": view.final.get("provenance") if view.final else None,
        "feasible": view.feasible,
        "finished_trials": len(view.results),
        "front": rows,
    }


def front_table(view: RunView) -> str:
    """The front as a fixed-width table, with where its figures come from."""
    remeasured = {row["number"]: row["remeasured_latency"]["median_s"]
                  for row in (view.final or {}).get("trials", []) if row.get("remeasured_latency")}
    what = "Pareto front" if view.feasible else f"no trial meets the budgets; the closest {len(view.front)}"
    lines = [f"{view.settings.name}: {what} of {len(view.results)} finished trials",
             f"latency: {latency_provenance(view.front)}"]
    if view.final:
        lines.append(f"{_again(view)}: {view.final.get('provenance')}; test acc on the test split")
    lines.append(format_table(view.front, view.baseline_s,
                              remeasured_s=remeasured if view.final else None))
    return "\n".join(lines)


# ----- the report's sections, each Markdown -----

def _cell(value: Any) -> str:
    return str(value).replace("|", "\\|")


def _table(header: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines.extend("| " + " | ".join(_cell(v) for v in row) + " |" for row in rows)
    return "\n".join(lines)


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value:.2%}"


def _spread(latency: dict[str, Any] | None) -> str:
    if not latency:
        return "-"
    return (f"{format_seconds(latency['median_s'])} ({format_seconds(latency['p10_s'])}-"
            f"{format_seconds(latency['p90_s'])})" + (" noisy" if latency.get("noisy") else ""))


def _name(r: TrialResult) -> str:
    return f"#{r.number}" + (f" ({r.label})" if r.label else "")


def _budgets(settings: RunSettings) -> str:
    parts = []
    if settings.budget:
        parts.append(f"latency <= {format_seconds(settings.baseline['budget_s'])} ({settings.budget})")
    parts += [f"{what} <= {value}" for what, value in (("size", settings.size_budget),
                                                          ("SRAM", settings.sram),
                                                          ("flash", settings.flash)) if value]
    return ", ".join(parts) or "none"


def _states(view: RunView) -> Counter:
    """Trials per state, plans skipped as predicted over the budget (``SKIPPED``) apart from
    the trials stopped early."""
    return Counter("SKIPPED" if t.user_attrs.get(NOT_COUNTED) else t.state.name for t in view.trials)


def _settings_section(view: RunView) -> str:
    s = view.settings
    states = _states(view)
    skipped = states.get("SKIPPED", 0)
    storage = s.storage or f"{(view.run_dir / 'study.db').resolve()} (SQLite)"
    weights = f" (weights {s.model.weights})" if s.model.weights else ""
    rows = [
        ["model", f"`{s.model.spec}`{weights}, input {'x'.join(map(str, s.input_shape))}"],
        ["data", f"`{s.data}`: fine-tuning on {s.train_subset or 'all'} training images, "
                 f"scored on {s.val_subset or 'all'} validation images"],
        ["target", f"`{s.target}`" + (" (untuned: TVM default schedules)" if s.untuned else "")],
        ["latency", s.baseline["latency"]["provenance"]],
        ["budgets", _budgets(s)],
        ["sampler", s.sampler],
        ["search space", f"`{s.space}`"],
        ["trials", f"{s.trials} asked; {states.get('COMPLETE', 0)} complete, "
                   f"{states.get('PRUNED', 0)} stopped early, {states.get('FAIL', 0)} failed"
                   + (f"; {skipped} more plans predicted over the latency budget and not compiled"
                      if skipped else "")],
        ["fine-tuning", "on (distillation from the uncompressed model)" if s.finetune
         else "off (data-free: calibration only)"],
        ["sensitivity pre-pass", "on" if s.sensitivity else "off"],
        ["warm start", "on (uncompressed model and uniform baselines enqueued)" if s.warm_start else "off"],
        ["seed", s.seed],
        ["storage", f"`{storage}`, study `{s.name}`"],
    ]
    return "## Run settings\n\n" + _table(["setting", "value"], rows)


def _baseline_section(view: RunView) -> str:
    base = view.settings.baseline
    row = [_pct(base.get("val_acc")), _pct(base.get("test_acc")), _spread(base["latency"])]
    return ("## Baseline (uncompressed model)\n\n"
            + _table(["val acc", "test acc", "latency, median (p10-p90)"], [row])
            + f"\n\nLatency {base['latency']['provenance']}. Budgets: {_budgets(view.settings)}."
            + (f" Note: {note}." if (note := unbinding_budget(base)) else ""))


def _front_rows(view: RunView, rows: list[TrialResult]) -> str:
    table = []
    for r in rows:
        final = view.final_row(r.number) or {}
        remeasured = final.get("remeasured_latency")
        latency_s = (remeasured or {}).get("median_s", r.latency_s)
        table.append([_name(r), _pct(r.val_acc), _pct(r.test_acc),
                      _spread(view.trial(r.number).user_attrs["latency"]), _spread(remeasured),
                      f"{view.baseline_s / latency_s:.2f}x", format_bytes(r.size_bytes),
                      format_count(r.params), format_count(r.macs), "yes" if r.feasible else "no",
                      r.plan_summary])
    return _table(["trial", "val acc", "test acc", "search latency", "final latency", "speedup",
                   "size", "params", "MACs", "within budget", "plan"], table)


def _front_section(view: RunView) -> str:
    what = ("The Pareto front of the trials within budget (val accuracy up, latency and deployed "
            "size down)" if view.feasible else
            f"No trial meets the budgets; the {len(view.front)} closest")
    if view.final:
        again = _again(view)
        source = (f"Final latency {again} after the search: {view.final.get('provenance')}. Test "
                  "accuracy is on the test split, which the search never saw.")
    else:
        source = ("From the study's search-time figures: the front was not re-measured or scored on "
                  "the test split (front.json is missing: the search did not finish).")
    return (f"## Final front\n\n{what}, of {len(view.results)} finished trials. {source} Search latency "
            f"{latency_provenance(view.front)}. Speedup: the uncompressed model's "
            f"{format_seconds(view.baseline_s)} ({view.settings.baseline['latency']['kind']} before the "
            "search) over the final latency where there is one, else the search latency.\n\n"
            + _front_rows(view, view.front))


def _again(view: RunView) -> str:
    """How the final front's latencies were obtained after the search ("re-measured end to end"
    only when all were measured)."""
    return view.final.get("obtained") or obtained_again(
        [row["remeasured_latency"] for row in view.final.get("trials", []) if row.get("remeasured_latency")])


def _again_one(figure: dict) -> str:
    return "re-measured" if figure.get("kind") == "measured" else "estimated again"


def _export_hint(view: RunView, number: int) -> str:
    runs = view.run_dir.parent
    extra = "" if runs == Path("runs") else f" --runs-dir {runs}"
    return f"`autocomp export {view.settings.name} --trial {number}{extra}`"


def _over(view: RunView, r: TrialResult) -> str:
    """How far a trial misses the budgets, in words."""
    budget_s = view.settings.baseline.get("budget_s")
    misses = []
    if budget_s and r.latency_s > budget_s:
        misses.append(f"{r.latency_s / budget_s - 1:.0%} over the {format_seconds(budget_s)} latency budget")
    misses += [f"{key.replace('_', ' ')} {value:+.0%}" for key, value
               in view.trial(r.number).user_attrs.get("constraints", {}).items()
               if value > 0 and not key.startswith("latency")]
    return "; ".join(misses) or "over a budget"


def _best_section(view: RunView) -> str:
    best = best_feasible(view.results)
    if best is None:
        closest = "\n".join(f"- {_name(r)}: val {_pct(r.val_acc)}, latency {format_seconds(r.latency_s)}, "
                             f"{format_bytes(r.size_bytes)}: {_over(view, r)}" for r in view.front)
        return (f"## Best within budget\n\n**No trial meets the budgets** ({_budgets(view.settings)}). "
                f"The closest (also in the table above):\n\n{closest}")
    final = view.final_row(best.number) or {}
    test = f", test {_pct(best.test_acc)}" if best.test_acc is not None else ""
    again = (f", {_again_one(final['remeasured_latency'])} {_spread(final['remeasured_latency'])}"
             if final.get("remeasured_latency") else "")
    return (f"## Best within budget\n\nTrial {_name(best)}: val {_pct(best.val_acc)}{test}, latency "
            f"{_spread(view.trial(best.number).user_attrs['latency'])}{again}, "
            f"{view.baseline_s / best.latency_s:.2f}x the uncompressed model, "
            f"{format_bytes(best.size_bytes)}; plan: {best.plan_summary}. Export it with "
            f"{_export_hint(view, best.number)}.")


def _warm_section(view: RunView) -> str:
    warm = [r for r in view.results if r.label]
    if not warm:
        return "## Warm-start baselines against the best\n\nNo labelled warm-start trial in this run."
    best = best_feasible(view.results)
    rows = []
    for r in sorted(warm, key=lambda r: r.number):
        versus = (f"{(r.val_acc - best.val_acc) * 100:+.1f} pt, "
                  f"{r.latency_s / best.latency_s:.2f}x its latency" if best else "-")
        latency = format_seconds(r.latency_s) + (" noisy" if r.noisy else "")
        rows.append([r.number, r.label, _pct(r.val_acc), latency,
                     f"{view.baseline_s / r.latency_s:.2f}x", format_bytes(r.size_bytes),
                     "yes" if r.feasible else "no", versus])
    text = _table(["trial", "baseline", "val acc", "latency", "speedup", "size", "within budget",
                   f"vs best {_name(best) if best else ''}".strip()], rows)
    feasible_warm = [r for r in warm if r.feasible]
    if best is None:
        verdict = "No trial meets the budgets, so there is no best to compare with."
    elif best.label:
        verdict = f"The best trial within budget is a warm-start baseline ({best.label})."
    elif feasible_warm:
        top = max(feasible_warm, key=lambda r: (r.val_acc, -r.latency_s))
        verdict = (f"The search's best within budget ({_name(best)}) is "
                   f"{(best.val_acc - top.val_acc) * 100:+.1f} points against the best warm-start "
                   f"baseline within budget ({_name(top)}), at {best.latency_s / top.latency_s:.2f}x "
                   "its latency.")
    else:
        verdict = f"No warm-start baseline meets the budgets; the search's best ({_name(best)}) does."
    return (f"## Warm-start baselines against the best\n\nLatency {latency_provenance(warm)}; speedup "
            f"against the uncompressed model.\n\n{text}\n\n{verdict}")


def _plot_section(view: RunView) -> str:
    if not (view.run_dir / "pareto.png").is_file():
        return f"## Pareto plot\n\n{NOT_COMPUTED}"
    return ("## Pareto plot\n\nEvery trial's validation accuracy against its latency; warm-start "
            "baselines are diamonds, the uncompressed model a star, the budget a dashed line.\n\n"
            "![Pareto plot](pareto.png)")


def _method_map_section(view: RunView) -> str:
    try:
        layers, note = model_layers(view.settings), ""
    except (AutocompError, OSError) as err:  # e.g. the weights file was moved since the search
        layers, note = [], f" (layers in plan order: the model could not be rebuilt: {err})"
    plans = [(f"#{r.number}" + (f" {r.label}" if r.label else ""), view.plan(r.number))
             for r in view.front]
    which = "Pareto plans" if view.feasible else "closest plans (none meets the budgets)"
    markdown, _ = write_method_map(view.run_dir, f"{view.settings.name}: per-layer methods of the {which}",
                                   layers, plans)
    table = markdown.read_text().split("\n\n", 2)[-1].strip()
    return (f"## Method map\n\nEach layer's method and setting in each plan of the front{note}; "
            f"keep: unchanged. Also in `method_map.md`.\n\n![Method map](method_map.png)\n\n{table}")


def _sensitivity_section(view: RunView) -> str:
    from autocomp.search.sensitivity import Sensitivity

    data = _read_json(view.run_dir / "sensitivity.json") or view.shared.get("sensitivity")
    if not data:
        return f"## Layer sensitivity\n\n{NOT_COMPUTED}"
    try:
        sensitivity = Sensitivity.from_json(data)
    except (ValueError, KeyError, TypeError) as err:
        return f"## Layer sensitivity\n\nsensitivity.json cannot be read ({err})."
    return (f"## Layer sensitivity\n\n{sensitivity.describe()}\n\n{sensitivity.table()}\n\n"
            f"Measured in {sensitivity.seconds:.0f} s before the first trial.")


def _shares_section(view: RunView) -> str:
    from autocomp.search.results.layer_shares import OTHER, shares_table

    shares = _read_json(view.run_dir / "layer_shares.json")
    if not shares or not shares.get("targets"):
        return f"## Latency share per layer and target\n\n{NOT_COMPUTED}"
    tops = []
    for target, entry in shares["targets"].items():
        ranked = sorted(((share, layer) for layer, share in entry["layers"].items() if layer != OTHER),
                        reverse=True)[:2]
        tops.append(f"{target}: " + ", ".join(f"{layer} {share:.0%}" for share, layer in ranked))
    return ("## Latency share per layer and target\n\nEach layer's share of the uncompressed model's "
            "estimated latency on each target. Compressing a layer pays in proportion to its share on "
            f"the run's target (`{view.settings.target}`), and the shares differ between targets, which "
            "is why the same search yields different plans on different targets. Largest shares: "
            + "; ".join(tops) + ".\n\n" + shares_table(shares))


def _statistics_section(view: RunView) -> str:
    states = _states(view)
    rows = [[STATES.get(name, name.lower()), count] for name, count in sorted(states.items())]
    durations = [(t.datetime_complete - t.datetime_start).total_seconds() for t in view.trials
                 if t.state == optuna.trial.TrialState.COMPLETE and t.datetime_start and t.datetime_complete]
    text = "## Trial statistics\n\n" + _table(["state", "trials"], rows)
    if durations:
        text += (f"\n\nA complete trial took {statistics.median(durations):.0f} s (median), "
                 f"{sum(durations) / 60:.1f} min in all.")
    reasons = Counter(t.user_attrs.get("fail_reason", "no reason recorded") for t in view.trials
                      if t.state == optuna.trial.TrialState.FAIL)
    text += ("\n\nFailure reasons:\n\n" + _table(["reason", "trials"], reasons.most_common())
             if reasons else "\n\nNo trial failed.")
    stopped = Counter(t.user_attrs.get("pruned_reason", "no reason recorded") for t in view.trials
                      if t.state == optuna.trial.TrialState.PRUNED and not t.user_attrs.get(NOT_COUNTED))
    if stopped:
        text += "\n\nTrials stopped early:\n\n" + _table(["reason", "trials"], stopped.most_common())
    predictions = predictions_summary(view.trials)
    if predictions:
        text += ("\n\nLatency predicted before compiling (the cost model corrected by the run's measured "
                 f"trials): {predictions}.")
    return text


def _export_section(view: RunView) -> str:
    best = best_feasible(view.results)
    which = (f"the most accurate within budget is trial {best.number}" if best else
             f"no trial meets the budgets; the closest is trial {view.front[0].number}")
    name = view.settings.name
    storage = view.settings.storage or f"sqlite:///{(view.run_dir / 'study.db').resolve()}"
    command = _export_hint(view, (best or view.front[0]).number).strip("`")
    return ("## Export and explore\n\nExport a trial as the target's deployable artefact "
            f"({which}), list the front, or browse the study:\n\n"
            f"```\n{command}\nautocomp pareto {name} --json\noptuna-dashboard {storage}\n```")


def report_markdown(view: RunView) -> str:
    """The whole report as Markdown (images referenced by their file names in the run folder)."""
    s = view.settings
    title = (f"# Compression report: {s.name}\n\n`{s.model.spec}` on `{s.data}` for target "
             f"`{s.target}`, {len(view.results)} finished trials.")
    sections = [title, _settings_section(view), _baseline_section(view), _front_section(view),
                _best_section(view), _warm_section(view), _plot_section(view), _method_map_section(view),
                _sensitivity_section(view), _shares_section(view), _statistics_section(view),
                _export_section(view)]
    return "\n\n".join(sections) + "\n"


def _data_uri(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode("ascii")


def report_html(markdown_text: str, run_dir: Path, title: str) -> str:
    """The Markdown report as one HTML page: styles inline, PNGs embedded as data URIs."""
    import markdown

    body = markdown.markdown(markdown_text, extensions=["tables", "fenced_code"])
    body = re.sub(r'src="([^"/]+\.png)"', lambda m: f'src="{_data_uri(run_dir / m.group(1))}"', body)
    return (f"<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
            f"<title>{html.escape(title)}</title>\n<style>{CSS}</style>\n</head>\n<body>\n{body}\n"
            "</body>\n</html>\n")


def write_report(run_dir: Path) -> tuple[Path, Path]:
    """Write ``report.md`` and ``report.html`` (plus the method map) into the run folder."""
    view = load_run(run_dir)
    text = report_markdown(view)
    markdown_path, html_path = run_dir / "report.md", run_dir / "report.html"
    write_text(markdown_path, text)
    write_text(html_path, report_html(text, run_dir, f"autocomp report: {view.settings.name}"))
    return markdown_path, html_path
