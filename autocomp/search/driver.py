"""Running a search: initialise or join the study, run trials with progress, report the front."""

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import optuna
import sqlalchemy.exc

from autocomp.core.errors import AutocompError
from autocomp.core.inventory import Inventory, build_inventory
from autocomp.core.paths import check_creatable
from autocomp.core.progress import Progress
from autocomp.core.staging import write_json
from autocomp.core.units import LatencyBudget, format_bytes, format_seconds, parse_budget, parse_bytes
from autocomp.hardware.oracle import latency_here
from autocomp.hardware.profiles import HardwareProfile, available_profiles, load_target
from autocomp.intake.data import DataSplits, calibration_loader, load_data, take
from autocomp.intake.source import ModelSource
from autocomp.search.config import SearchConfig
from autocomp.search.early_stop import DominatedPruner
from autocomp.search.measurers import MeasurerPool
from autocomp.search.objective import Budgets, TrialContext, TrialObjective
from autocomp.search.prediction import predictions_summary
from autocomp.search.results.final_front import FinalFront, finalise
from autocomp.search.results.layer_shares import all_target_shares
from autocomp.search.results.pareto import TrialResult, best_feasible, collect
from autocomp.search.sensitivity import Sensitivity, measure_sensitivity
from autocomp.search.settings import (
    RunSettings,
    check_name,
    save_settings,
    unbinding_budget,
    with_memory_limits,
)
from autocomp.search.space.loading import load_space
from autocomp.search.space.sampling import SearchSpace
from autocomp.search.storage import describe_storage, open_storage, refused_write
from autocomp.search.study import adopt, create_study, open_study, shared_settings_json, shared_state
from autocomp.search.workers import NOT_COUNTED, counts, run_trials
from autocomp.training.baseline import cached_baseline
from autocomp.training.train import evaluate

logger = logging.getLogger(__name__)

# Validation images each sensitivity measurement is scored on.
SENSITIVITY_IMAGES = 1000
# A worker's running trial counts as lost after GRACE_S without a heartbeat; generous,
# because a TVM compile can hold the interpreter lock for a while.
HEARTBEAT_S = 10.0
GRACE_S = 120.0
# Plans skipped as predicted over the latency budget, per trial asked for: a bound on how long
# the sampler may keep proposing plans the prediction rules out.
SKIPPED_PER_TRIAL = 2


@dataclass
class SearchOutcome:
    """What a finished search produced."""

    run_dir: Path
    settings: RunSettings
    results: list[TrialResult]
    final: FinalFront

    @property
    def best(self) -> TrialResult | None:
        return best_feasible(self.results)


def run_search(config: SearchConfig) -> SearchOutcome:
    """Run (or resume) the search ``config`` asks for: the baseline trained when no weights
    are given, then the trials, the final front re-measured, and the run folder's reports.
    Progress is logged (``autocomp.core.progress`` draws bars when asked to)."""
    budget = parse_budget(config.budget) if config.budget else None
    size_budget = parse_bytes(config.size) if config.size else None
    profile = with_memory_limits(load_target(config.target, untuned=config.untuned), config.sram,
                                 config.flash)
    space = load_space(config.space or ("default" if config.finetune else "data-free"))
    if config.finetune_steps:
        space = space.with_finetune(steps=config.finetune_steps)
    name = check_name(config.name or f"{config.model.split(':')[-1].replace('.py', '')}-{profile.name}")
    check_creatable(config.runs_dir / name, "the run folder")
    if config.storage:
        open_storage(config.storage, config.runs_dir / name)  # fail fast on a bad URL
    data = load_data(config.data, image_size=config.image_size)
    source = ModelSource.named(config.model, (1, *data.sample_shape), config.num_classes or data.num_classes,
                               adapt_stem=config.adapt_stem, weights=config.weights)
    source.build()  # fail fast on a bad spec or weights, before anything is written
    limits = ", ".join(f"{what} {value}" for what, value in (
        ("latency", config.budget), ("size", config.size), ("SRAM", config.sram), ("flash", config.flash))
        if value)
    logger.info("search: compressing %s on %s for target %s, budgets: %s, %d trials, space %s, sampler %s%s; "
                "latency %s", config.model, config.data, profile.name, limits or "none", config.trials,
                space.name, config.sampler, "" if config.finetune else ", data-free (no fine-tuning)",
                latency_here(profile)[1])
    if source.weights is None:
        source, _ = cached_baseline(source, data, config.baseline_epochs)
    settings = RunSettings(name, source, config.data, profile.name, space.name,
                           budget.text if budget else None, config.trials, config.seed, config.train_subset,
                           config.val_subset, untuned=config.untuned, sampler=config.sampler,
                           storage=config.storage, size_budget=config.size, sram=config.sram,
                           flash=config.flash, finetune=config.finetune, sensitivity=config.sensitivity,
                           warm_start=config.warm_start, latency_table=config.latency_table,
                           trial_schedules=config.trial_schedules, predict=config.predict)
    return run_study(settings, config.runs_dir, data, profile, space, budget, size_budget)


def run_study(settings: RunSettings, runs_root: Path, data: DataSplits, profile: HardwareProfile,
              space: SearchSpace, budget: LatencyBudget | None, size_budget: int | None) -> SearchOutcome:
    """Run the search described by ``settings``: create its study or join (resume) it, then
    finish ``settings.trials`` trials together with any other workers, and report. Each
    phase and each trial is logged as one line."""
    run_dir = runs_root / settings.name
    run_dir.mkdir(parents=True, exist_ok=True)
    logger.info("study: %s", describe_storage(settings.storage, run_dir))
    teacher = settings.model.build()
    inventory = build_inventory(teacher, settings.input_shape)
    for note in inventory.notes:
        logger.info("inventory: %s", note)
    measurers = MeasurerPool(profile, teacher, settings.input_shape, check_table=settings.latency_table,
                             new_workloads=settings.trial_schedules)
    val = take(data.val, settings.val_subset, settings.seed)
    calib = calibration_loader(data.train, seed=settings.seed)
    try:
        shared = shared_state(settings, run_dir)
        if shared is None:
            settings.baseline = _measure_baseline(teacher, data, val, measurers, settings, budget)
            sensitivity = (_sensitivity(teacher, inventory, space, val, calib, profile, settings)
                           if settings.sensitivity else None)
            shared = {"settings": shared_settings_json(settings),
                      "sensitivity": sensitivity.to_json() if sensitivity else None}
            study, created = create_study(settings, run_dir, shared)
            if not created:
                logger.info("study: another worker created it first; joining it with its baseline")
                shared = dict(study.user_attrs)
        else:
            study, created = open_study(run_dir, settings), False
        adopt(settings, shared)
        measurers.anchor(settings.baseline["latency"]["median_s"])
        sensitivity = Sensitivity.from_json(shared["sensitivity"]) if shared.get("sensitivity") else None
        if not created:
            _log_baseline(settings)
        save_settings(run_dir, settings)
        if sensitivity is not None:
            write_json(run_dir / "sensitivity.json", sensitivity.to_json())
            excluded = sensitivity.excluded()
            space = space.narrowed(excluded)
            dropped = sum(len(methods) for methods in excluded.values())
            if dropped:
                logger.info("sensitivity: %d layer/method choices ruled out before the search (%s)", dropped,
                            ", ".join(f"{layer}: {sorted(m)}" for layer, m in excluded.items() if m))
        if created and settings.warm_start:
            _enqueue_warm_start(study, space, inventory, sensitivity, profile)
        _write_layer_shares(teacher, settings, run_dir)

        budgets = Budgets(settings.baseline.get("budget_s"), size_budget)
        ctx = TrialContext(teacher=teacher, inventory=inventory, space=space, measurers=measurers,
                           train=take(data.train, settings.train_subset, settings.seed), val=val,
                           budgets=budgets, run_dir=run_dir, calib=calib, seed=settings.seed,
                           finetune=settings.finetune,
                           pruner=DominatedPruner() if settings.finetune else None,
                           baseline_s=settings.baseline["latency"]["median_s"], predict=settings.predict,
                           max_skipped=SKIPPED_PER_TRIAL * settings.trials)
        _optimise(study, TrialObjective(ctx), settings.trials)
        _log_predictions(study)
        for table in measurers.tables():
            rows = table.records(f"{settings.name}/")
            if rows:
                logger.info("latency table: predictions vs end-to-end measurements over %s",
                            table.error_summary(f"{settings.name}/").describe())
        results = collect(study)
        final = finalise(study, results, settings, run_dir, data, measurers, (teacher, inventory))
    except (optuna.exceptions.StorageInternalError, sqlalchemy.exc.OperationalError) as err:
        if (reason := refused_write(err)) is None:
            raise
        raise AutocompError(f"cannot write the study ({describe_storage(settings.storage, run_dir)}): "
                            f"{reason}") from None
    finally:
        measurers.close()
    return SearchOutcome(run_dir, settings, results, final)


def _measure_baseline(teacher, data: DataSplits, val, measurers: MeasurerPool, settings: RunSettings,
                      budget: LatencyBudget | None) -> dict:
    logger.info("baseline: measuring the uncompressed model on %s ...", settings.target)
    latency = measurers.baseline()
    baseline = {"val_acc": evaluate(teacher, val), "test_acc": evaluate(teacher, data.test),
                "latency": latency.to_json(),
                "budget_s": budget.resolve(latency.median_s) if budget else None}
    settings.baseline = baseline
    _log_baseline(settings)
    return baseline


def _log_baseline(settings: RunSettings) -> None:
    base = settings.baseline
    logger.info("baseline: val %.2f%%, test %.2f%% (reported only), latency %s %s", 100 * base["val_acc"],
                100 * base["test_acc"], format_seconds(base["latency"]["median_s"]),
                base["latency"]["provenance"])
    if base.get("budget_s") is not None:
        logger.info("budget: latency <= %s (%s)", format_seconds(base["budget_s"]), settings.budget)
    if note := unbinding_budget(base):
        logger.info("budget: %s", note)


def _sensitivity(teacher, inventory: Inventory, space: SearchSpace, val, calib, profile: HardwareProfile,
                 settings: RunSettings) -> Sensitivity:
    with Progress("sensitivity", unit="eval", log_end=False) as bar:
        result = measure_sensitivity(teacher, inventory, space, val, calib,
                                     channel_multiple=profile.channel_multiple,
                                     images=SENSITIVITY_IMAGES, seed=settings.seed,
                                     progress=lambda done, total: bar.moveto(done, total))
    logger.info("sensitivity: %d single-layer compressions scored without fine-tuning on %d validation "
                "images in %.0f s", len(result.rows), result.images, result.seconds)
    failed = [row for row in result.rows if row.error is not None]
    if failed:
        logger.info("sensitivity: %d of them failed to apply (e.g. %s %s: %s); each reason is in "
                    "sensitivity.json", len(failed), failed[0].layer, failed[0].method, failed[0].error)
    return result


def _enqueue_warm_start(study: optuna.Study, space: SearchSpace, inventory: Inventory,
                        sensitivity: Sensitivity | None, profile: HardwareProfile) -> None:
    """The uncompressed model and the uniform baselines first, so the front is never worse
    than the obvious choices; then the plans the sensitivity pre-pass suggests. They run
    with every thread the target has."""
    seeds = space.uniform_baselines(inventory)
    if sensitivity is not None:
        seeds += sensitivity.seed_params(space, inventory)
    deploy = {f"deploy.{knob}": max(choices) for knob, choices in space.deploy_knobs(profile).items()}
    for label, params in seeds:
        study.enqueue_trial({**params, **deploy}, user_attrs={"label": label}, skip_if_exists=True)
    logger.info("warm start: %s", ", ".join(label for label, _ in seeds))


def _write_layer_shares(teacher, settings: RunSettings, run_dir: Path) -> None:
    """Each layer's share of the uncompressed model's latency on every bundled target: why
    the same search ends in different plans on different targets."""
    path = run_dir / "layer_shares.json"
    if path.is_file():
        return
    targets = [settings.target] + [name for name in available_profiles() if name != settings.target]
    try:
        shares = all_target_shares(teacher, settings.input_shape, targets)
    except Exception as err:  # a report figure; the search does not depend on it
        logger.info("layer shares: not computed (%s: %s)", type(err).__name__, str(err).strip()[:120])
        return
    write_json(path, shares)


def _optimise(study: optuna.Study, objective: TrialObjective, wanted: int) -> None:
    """Finish ``wanted`` trials in the study (counting other workers'): a progress phase, and a
    log line per trial."""
    done = sum(counts(t) for t in study.get_trials(deepcopy=False))
    if done >= wanted:
        logger.info("search: %d trials already finished (asked for %d); reporting", done, wanted)
        return
    if done:
        logger.info("search: resuming with %d finished trials", done)
    bar = Progress("search", total=wanted, initial=done, unit="trial", log_end=False)

    def on_finish(trial: optuna.trial.FrozenTrial, seconds: float) -> None:
        bar.moveto(min(wanted, sum(counts(t) for t in study.get_trials(deepcopy=False))))
        attrs = trial.user_attrs
        label = f" ({attrs['label']})" if attrs.get("label") else ""
        if trial.state == optuna.trial.TrialState.COMPLETE:
            noisy = " (noisy)" if attrs["latency"].get("noisy") else ""
            logger.info(f"trial {trial.number:>3}{label}: val {attrs['val_acc']:.2%}  latency "
                        f"{format_seconds(attrs['latency']['median_s'])}{noisy}  size "
                        f"{format_bytes(attrs['size_bytes'])}  "
                        f"{'within budget' if attrs['feasible'] else 'over budget'}  "
                        f"[{attrs['plan_summary']}]  ({seconds:.0f} s)")
        elif attrs.get(NOT_COUNTED):
            logger.info(f"trial {trial.number:>3}{label}: {attrs['pruned_reason']} "
                        f"[{attrs['plan_summary']}]  ({seconds:.0f} s; not counted)")
        elif trial.state == optuna.trial.TrialState.PRUNED:
            logger.info(f"trial {trial.number:>3}{label}: stopped early: "
                        f"{attrs.get('pruned_reason', 'hopeless')} ({seconds:.0f} s)")
        else:
            logger.info(f"trial {trial.number:>3}{label}: failed: "
                        f"{attrs.get('fail_reason', 'unknown reason')}")
        best = best_feasible(collect(study))
        if best is not None:
            bar.set_status(f"best within budget: #{best.number} {best.val_acc:.2%} "
                           f"@ {format_seconds(best.latency_s)}")

    start = time.perf_counter()
    try:
        run_trials(study, objective, wanted, on_finish=on_finish, heartbeat_s=HEARTBEAT_S,
                   grace_s=GRACE_S)
    finally:
        bar.close()
    logger.info("search: %d trials finished in %.0f s", wanted, time.perf_counter() - start)


def _log_predictions(study: optuna.Study) -> None:
    text = predictions_summary(study.get_trials(deepcopy=False))
    if text:
        logger.info("prediction: %s", text)
