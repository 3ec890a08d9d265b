"""Running a search: create or resume the study, run trials with progress, report the front."""

import logging
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import optuna
from tqdm import tqdm

from autocomp.data import DataSplits, calibration_loader, take
from autocomp.errors import AutocompError
from autocomp.hardware.lut import LatencyTable
from autocomp.hardware.measure import Latency, LocalMeasurer, make_measurer
from autocomp.hardware.profiles import HardwareProfile
from autocomp.inventory import build_inventory
from autocomp.search.objective import TrialContext, TrialObjective
from autocomp.search.pareto import (
    TrialResult,
    best_feasible,
    collect,
    format_table,
    pareto_front,
    plot_front,
    write_csv,
)
from autocomp.search.run import RunSettings, check_resumable, load_settings, save_settings
from autocomp.search.space import SearchSpace
from autocomp.train import evaluate
from autocomp.units import LatencyBudget, format_seconds

DIRECTIONS = ["maximize", "minimize", "minimize"]  # val accuracy, latency ms, parameters
FINISHED = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)


@dataclass
class SearchOutcome:
    """What a finished search produced."""

    run_dir: Path
    results: list[TrialResult]
    front: list[TrialResult]
    best: TrialResult | None


def storage_url(run_dir: Path) -> str:
    return f"sqlite:///{(run_dir / 'study.db').resolve()}"


def open_study(run_dir: Path, settings: RunSettings, *, create: bool) -> optuna.Study:
    """The run's Optuna study (SQLite in the run folder).

    The sampler's seed is offset by the trials already stored, so a resumed run
    does not replay the random start-up samples it drew before.
    """
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    storage = optuna.storages.RDBStorage(storage_url(run_dir), heartbeat_interval=30,
                                         grace_period=90)
    stored = 0
    if any(s.study_name == settings.name for s in storage.get_all_studies()):
        stored = storage.get_n_trials(storage.get_study_id_from_name(settings.name))
    sampler = optuna.samplers.TPESampler(seed=settings.seed + stored, multivariate=True,
                                         group=True)
    if create:
        return optuna.create_study(study_name=settings.name, storage=storage, sampler=sampler,
                                   directions=DIRECTIONS, load_if_exists=True)
    return optuna.load_study(study_name=settings.name, storage=storage, sampler=sampler)


def run_search(settings: RunSettings, runs_root: Path, data: DataSplits, profile: HardwareProfile,
               space: SearchSpace, budget: LatencyBudget | None, log=print) -> SearchOutcome:
    """Run (or resume) the search described by ``settings``; returns the final front."""
    # Failed trials are reported on the progress bar with their reason; Optuna's own
    # log lines would repeat them as tracebacks.
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    logging.getLogger("optuna").setLevel(logging.CRITICAL)
    run_dir = runs_root / settings.name
    resuming = (run_dir / "run.json").is_file()
    if resuming:
        saved = load_settings(run_dir)
        check_resumable(saved, settings)
        settings.baseline = saved.baseline

    teacher = settings.model.build()
    inventory = build_inventory(teacher, settings.input_shape)
    measurer = make_measurer(profile, say=log)
    table = LatencyTable(profile) if isinstance(measurer, LocalMeasurer) else None
    try:
        if not resuming:
            settings.baseline.update(_measure_baseline(teacher, data, measurer, settings, budget,
                                                       log))
            run_dir.mkdir(parents=True, exist_ok=True)
            save_settings(run_dir, settings)
        else:
            saved.trials = settings.trials
            save_settings(run_dir, saved)
        budget_s = settings.baseline.get("budget_s")
        study = open_study(run_dir, settings, create=True)
        if not study.trials:
            study.enqueue_trial(space.uncompressed_params(inventory), skip_if_exists=True)
        ctx = TrialContext(teacher, inventory, space, profile, measurer,
                           take(data.train, settings.train_subset, settings.seed),
                           take(data.val, settings.val_subset, settings.seed), budget_s, run_dir,
                           calibration_loader(data.train, seed=settings.seed), settings.seed, table)
        _optimise(study, TrialObjective(ctx), settings.trials, budget_s, log)
        if table is not None:
            _report_table(table, settings.name, log)
    finally:
        measurer.close()
        if table is not None:
            table.close()
    return _report(study, settings, run_dir, data, log)


def _report_table(table: LatencyTable, run_name: str, log) -> None:
    """How well the kernel table predicted this run's measured trials, and how often it hit."""
    rows = table.records(f"{run_name}/")
    if rows:
        log(f"latency table: predictions vs end-to-end measurements over "
            f"{table.error_summary(f'{run_name}/').describe()}")


def _measure_baseline(teacher, data: DataSplits, measurer, settings: RunSettings,
                      budget: LatencyBudget | None, log) -> dict:
    log(f"baseline: measuring the uncompressed model on {settings.target} ...")
    latency: Latency = measurer.measure(teacher, settings.input_shape)
    val = evaluate(teacher, take(data.val, settings.val_subset, settings.seed))
    test = evaluate(teacher, data.test)
    budget_s = budget.resolve(latency.median_s) if budget else None
    log(f"baseline: val {val:.2%}, test {test:.2%} (reported only), latency "
        f"{format_seconds(latency.median_s)} {latency.provenance}")
    if budget is not None:
        log(f"budget: latency <= {format_seconds(budget_s)} ({budget.text})")
    return {"val_acc": val, "test_acc": test, "latency": latency.to_json(), "budget_s": budget_s}


def _optimise(study: optuna.Study, objective: TrialObjective, wanted: int,
              budget_s: float | None, log) -> None:
    done = len(study.get_trials(deepcopy=False, states=FINISHED))
    if done >= wanted:
        log(f"search: {done} trials already finished (asked for {wanted}); reporting")
        return
    if done:
        log(f"search: resuming with {done} finished trials")
    failures = 0
    bar = tqdm(total=wanted, initial=done, desc="search", unit="trial")
    while done < wanted:
        start = time.perf_counter()
        trial = _run_one(study, objective)
        seconds = time.perf_counter() - start
        if trial.state == optuna.trial.TrialState.COMPLETE:
            done += 1
            bar.update(1)
            attrs = trial.user_attrs
            bar.write(
                f"trial {trial.number:>3}: val {attrs['val_acc']:.2%}  latency "
                f"{format_seconds(attrs['latency']['median_s'])}  params {attrs['params']:,}"
                f"  {'within budget' if attrs['feasible'] else 'over budget'}  "
                f"[{attrs['plan_summary']}]  ({seconds:.0f} s)")
        else:
            failures += 1
            reason = trial.user_attrs.get("fail_reason", "unknown reason")
            bar.write(f"trial {trial.number:>3}: failed: {reason}")
            if failures >= max(3, wanted):
                bar.close()
                raise AutocompError(f"{failures} trials failed; the last: {reason}")
        best = best_feasible(collect(study))
        if best is not None:
            bar.set_postfix_str(f"best within budget: #{best.number} {best.val_acc:.2%} "
                                f"@ {format_seconds(best.latency_s)}")
    bar.close()


def _run_one(study: optuna.Study, objective: TrialObjective) -> optuna.trial.FrozenTrial:
    """Run one trial; any exception fails that trial (with its reason) and the search goes on."""
    finished: list[optuna.trial.FrozenTrial] = []
    study.optimize(objective, n_trials=1, catch=(Exception,), gc_after_trial=True,
                   callbacks=[lambda _study, trial: finished.append(trial)])
    return finished[0]


def _report(study: optuna.Study, settings: RunSettings, run_dir: Path, data: DataSplits,
            log) -> SearchOutcome:
    from autocomp.export import load_trial_model

    results = collect(study)
    if not results:
        raise AutocompError("no trial finished, so there is no Pareto front")
    budget_s = settings.baseline.get("budget_s")
    feasible = [r for r in results if r.feasible]
    front = pareto_front(feasible)
    for row in front:  # the test split is only ever reported, never used to choose
        model = load_trial_model(run_dir, settings, row.number, data)
        row.test_acc = evaluate(model, data.test)
    baseline_latency = settings.baseline["latency"]["median_s"]
    provenance = results[0].provenance
    log("")
    if front:
        log(f"Pareto front of {len(results)} trials ({len(feasible)} within budget), "
            f"latency {provenance}:")
        log(format_table(front, baseline_latency))
    else:
        closest = sorted(results, key=lambda r: r.latency_s)[:3]
        log(f"no trial meets the budget of {format_seconds(budget_s)}; the closest, latency "
            f"{provenance}:")
        log(format_table(closest, baseline_latency))
    write_csv(front, run_dir / "pareto.csv")
    uncompressed = next((r for r in results if r.plan_summary == "uncompressed"), None)
    title = (f"{settings.name}: {settings.model.spec} on {settings.data}, target "
             f"{settings.target}")
    plot_front(results, front, run_dir / "pareto.png", title=title, budget_s=budget_s,
               baseline=uncompressed)
    best = best_feasible(results)
    log(f"\nwrote {run_dir / 'pareto.png'} and {run_dir / 'pareto.csv'}")
    if best is not None:
        log(f"best within budget: trial {best.number}, val {best.val_acc:.2%}, latency "
            f"{format_seconds(best.latency_s)} ({baseline_latency / best.latency_s:.2f}x "
            f"the uncompressed {format_seconds(baseline_latency)}); "
            f"export it with: autocomp export {settings.name} --trial {best.number}")
    return SearchOutcome(run_dir, results, front, best)
