"""Running a search: initialise or join the study, run trials with progress, report the front."""

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import optuna
from tqdm import tqdm

from autocomp.data import DataSplits, calibration_loader, take
from autocomp.hardware.profiles import HardwareProfile, available_profiles
from autocomp.inventory import Inventory, build_inventory
from autocomp.search.final_front import FinalFront, finalise
from autocomp.search.layer_shares import all_target_shares
from autocomp.search.measurers import MeasurerPool
from autocomp.search.objective import Budgets, TrialContext, TrialObjective
from autocomp.search.pareto import TrialResult, best_feasible, collect
from autocomp.search.pruning import DominatedPruner
from autocomp.search.run import RunSettings, save_settings
from autocomp.search.sensitivity import Sensitivity, measure_sensitivity
from autocomp.search.space import SearchSpace
from autocomp.search.storage import describe_storage
from autocomp.search.study import adopt, create_study, open_study, shared_settings_json, shared_state
from autocomp.search.workers import run_trials
from autocomp.train import evaluate
from autocomp.units import LatencyBudget, format_bytes, format_seconds

# Validation images each sensitivity measurement is scored on.
SENSITIVITY_IMAGES = 1000
# A worker's running trial counts as lost after GRACE_S without a heartbeat; generous,
# because a TVM compile can hold the interpreter lock for a while.
HEARTBEAT_S = 10.0
GRACE_S = 120.0


@dataclass
class SearchOutcome:
    """What a finished search produced."""

    run_dir: Path
    results: list[TrialResult]
    final: FinalFront

    @property
    def best(self) -> TrialResult | None:
        return best_feasible(self.results)


def run_search(settings: RunSettings, runs_root: Path, data: DataSplits, profile: HardwareProfile,
               space: SearchSpace, budget: LatencyBudget | None, size_budget: int | None,
               log=print) -> SearchOutcome:
    """Run the search described by ``settings``: create its study or join (resume) it, then
    finish ``settings.trials`` trials together with any other workers, and report."""
    # Failed trials are reported on the progress bar with their reason; Optuna's own
    # log lines would repeat them as tracebacks.
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    logging.getLogger("optuna").setLevel(logging.CRITICAL)
    run_dir = runs_root / settings.name
    run_dir.mkdir(parents=True, exist_ok=True)
    log(f"study: {describe_storage(settings.storage, run_dir)}")
    teacher = settings.model.build()
    inventory = build_inventory(teacher, settings.input_shape)
    measurers = MeasurerPool(profile, say=log, check_table=settings.latency_table)
    val = take(data.val, settings.val_subset, settings.seed)
    calib = calibration_loader(data.train, seed=settings.seed)
    try:
        shared = shared_state(settings, run_dir)
        if shared is None:
            settings.baseline = _measure_baseline(teacher, data, val, measurers, settings, budget, log)
            sensitivity = (_sensitivity(teacher, inventory, space, val, calib, profile, settings, log)
                           if settings.sensitivity else None)
            shared = {"settings": shared_settings_json(settings),
                      "sensitivity": sensitivity.to_json() if sensitivity else None}
            study, created = create_study(settings, run_dir, shared)
            if not created:
                log("study: another worker created it first; joining it with its baseline")
                shared = dict(study.user_attrs)
        else:
            study, created = open_study(run_dir, settings), False
        adopt(settings, shared)
        sensitivity = Sensitivity.from_json(shared["sensitivity"]) if shared.get("sensitivity") else None
        if not created:
            _log_baseline(settings, log)
        save_settings(run_dir, settings)
        if sensitivity is not None:
            (run_dir / "sensitivity.json").write_text(json.dumps(sensitivity.to_json(), indent=2) + "\n")
            excluded = sensitivity.excluded()
            space = space.narrowed(excluded)
            dropped = sum(len(methods) for methods in excluded.values())
            if dropped:
                log(f"sensitivity: {dropped} layer/method choices ruled out before the search "
                    f"({', '.join(f'{layer}: {sorted(m)}' for layer, m in excluded.items() if m)})")
        if created and settings.warm_start:
            _enqueue_warm_start(study, space, inventory, sensitivity, profile, log)
        _write_layer_shares(teacher, settings, run_dir, log)

        budgets = Budgets(settings.baseline.get("budget_s"), size_budget)
        ctx = TrialContext(teacher, inventory, space, measurers,
                           take(data.train, settings.train_subset, settings.seed), val, budgets, run_dir,
                           calib, settings.seed, settings.finetune,
                           DominatedPruner() if settings.finetune else None)
        _optimise(study, TrialObjective(ctx), settings.trials, log)
        for table in measurers.tables():
            rows = table.records(f"{settings.name}/")
            if rows:
                log(f"latency table: predictions vs end-to-end measurements over "
                    f"{table.error_summary(f'{settings.name}/').describe()}")
        results = collect(study)
        final = finalise(study, results, settings, run_dir, data, measurers, log)
    finally:
        measurers.close()
    return SearchOutcome(run_dir, results, final)


def _measure_baseline(teacher, data: DataSplits, val, measurers: MeasurerPool, settings: RunSettings,
                      budget: LatencyBudget | None, log) -> dict:
    log(f"baseline: measuring the uncompressed model on {settings.target} ...")
    latency = measurers.get({})[1].measure(teacher, settings.input_shape)
    baseline = {"val_acc": evaluate(teacher, val), "test_acc": evaluate(teacher, data.test),
                "latency": latency.to_json(),
                "budget_s": budget.resolve(latency.median_s) if budget else None}
    settings.baseline = baseline
    _log_baseline(settings, log)
    return baseline


def _log_baseline(settings: RunSettings, log) -> None:
    base = settings.baseline
    log(f"baseline: val {base['val_acc']:.2%}, test {base['test_acc']:.2%} (reported only), latency "
        f"{format_seconds(base['latency']['median_s'])} {base['latency']['provenance']}")
    if base.get("budget_s") is not None:
        log(f"budget: latency <= {format_seconds(base['budget_s'])} ({settings.budget})")


def _sensitivity(teacher, inventory: Inventory, space: SearchSpace, val, calib, profile: HardwareProfile,
                 settings: RunSettings, log) -> Sensitivity:
    bar = tqdm(desc="sensitivity", unit="eval", leave=False)

    def progress(done: int, total: int) -> None:
        bar.total = total
        bar.n = done
        bar.refresh()

    try:
        result = measure_sensitivity(teacher, inventory, space, val, calib,
                                     channel_multiple=profile.channel_multiple,
                                     images=SENSITIVITY_IMAGES, seed=settings.seed, progress=progress)
    finally:
        bar.close()
    log(f"sensitivity: {len(result.rows)} single-layer compressions scored without fine-tuning on "
        f"{result.images} validation images in {result.seconds:.0f} s")
    return result


def _enqueue_warm_start(study: optuna.Study, space: SearchSpace, inventory: Inventory,
                        sensitivity: Sensitivity | None, profile: HardwareProfile, log) -> None:
    """The uncompressed model and the uniform baselines first, so the front is never worse
    than the obvious choices; then the plans the sensitivity pre-pass suggests. They run
    with every thread the target has."""
    seeds = space.uniform_baselines(inventory)
    if sensitivity is not None:
        seeds += sensitivity.seed_params(space, inventory)
    deploy = {f"deploy.{knob}": max(choices) for knob, choices in space.deploy_knobs(profile).items()}
    for label, params in seeds:
        study.enqueue_trial({**params, **deploy}, user_attrs={"label": label}, skip_if_exists=True)
    log(f"warm start: {', '.join(label for label, _ in seeds)}")


def _write_layer_shares(teacher, settings: RunSettings, run_dir: Path, log) -> None:
    """Each layer's share of the uncompressed model's latency on every bundled target: why
    the same search ends in different plans on different targets."""
    path = run_dir / "layer_shares.json"
    if path.is_file():
        return
    targets = [settings.target] + [name for name in available_profiles() if name != settings.target]
    try:
        shares = all_target_shares(teacher, settings.input_shape, targets)
    except Exception as err:  # a report figure; the search does not depend on it
        log(f"layer shares: not computed ({type(err).__name__}: {str(err).strip()[:120]})")
        return
    path.write_text(json.dumps(shares, indent=2) + "\n")


def _optimise(study: optuna.Study, objective: TrialObjective, wanted: int, log) -> None:
    """Finish ``wanted`` trials in the study (counting other workers'), with a progress bar."""
    states = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
    done = len(study.get_trials(deepcopy=False, states=states))
    if done >= wanted:
        log(f"search: {done} trials already finished (asked for {wanted}); reporting")
        return
    if done:
        log(f"search: resuming with {done} finished trials")
    bar = tqdm(total=wanted, initial=done, desc="search", unit="trial")

    def on_finish(trial: optuna.trial.FrozenTrial, seconds: float) -> None:
        bar.n = min(wanted, len(study.get_trials(deepcopy=False, states=states)))
        attrs = trial.user_attrs
        label = f" ({attrs['label']})" if attrs.get("label") else ""
        if trial.state == optuna.trial.TrialState.COMPLETE:
            bar.write(f"trial {trial.number:>3}{label}: val {attrs['val_acc']:.2%}  latency "
                      f"{format_seconds(attrs['latency']['median_s'])}  size "
                      f"{format_bytes(attrs['size_bytes'])}  "
                      f"{'within budget' if attrs['feasible'] else 'over budget'}  "
                      f"[{attrs['plan_summary']}]  ({seconds:.0f} s)")
        elif trial.state == optuna.trial.TrialState.PRUNED:
            bar.write(f"trial {trial.number:>3}{label}: stopped early: "
                      f"{attrs.get('pruned_reason', 'hopeless')} ({seconds:.0f} s)")
        else:
            bar.write(f"trial {trial.number:>3}{label}: failed: "
                      f"{attrs.get('fail_reason', 'unknown reason')}")
        best = best_feasible(collect(study))
        if best is not None:
            bar.set_postfix_str(f"best within budget: #{best.number} {best.val_acc:.2%} "
                                f"@ {format_seconds(best.latency_s)}")
        bar.refresh()

    start = time.perf_counter()
    try:
        run_trials(study, objective, wanted, on_finish=on_finish, heartbeat_s=HEARTBEAT_S,
                   grace_s=GRACE_S, log=bar.write)
    finally:
        bar.close()
    log(f"search: {wanted} trials finished in {time.perf_counter() - start:.0f} s")
