"""One trial: sample a plan, compress, predict its latency (a plan predicted far over the
budget stops there), measure latency and memory, fine-tune with distillation (stopped early
when hopeless), score."""

import logging
import random
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import optuna
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from autocomp.core.inventory import Inventory, count_macs
from autocomp.core.staging import replacing, write_json
from autocomp.core.units import format_seconds
from autocomp.hardware.costmodel.estimate import EstimateMeasurer
from autocomp.hardware.costmodel.lut import LatencyTable, timed_frame
from autocomp.hardware.mcu.memory import device_memory
from autocomp.hardware.measure.base import Latency
from autocomp.intake.data import take
from autocomp.methods.apply import apply_plan, count_params, size_bytes
from autocomp.search.early_stop import Checkpoints, DominatedPruner
from autocomp.search.measurers import MeasurerPool
from autocomp.search.prediction import FEATURES_KEY, PREDICTION_KEY, Point, features, fit, measured_points
from autocomp.search.space.sampling import SearchSpace
from autocomp.search.workers import NOT_COUNTED
from autocomp.training.distill import finetune
from autocomp.training.train import evaluate

logger = logging.getLogger(__name__)

# Measured trials after which the latency table's in-model correction (VM overhead per
# kernel call, cache effects) is fitted, once per target; later predictions use it.
TABLE_FIT_AFTER = 5
# Validation images scored at each fine-tuning checkpoint (early stopping).
CHECKPOINT_IMAGES = 500
# Share of the plans predicted over the latency budget that are measured all the same, so
# that the run knows how often such a prediction is wrong.
AUDIT_SHARE = 0.1


@dataclass(frozen=True)
class Budgets:
    """Hard limits a trial must meet to be feasible (None: no limit)."""

    latency_s: float | None = None
    size_bytes: int | None = None


@dataclass(frozen=True, kw_only=True)
class TrialContext:
    """What every trial of one search shares."""

    teacher: nn.Module
    inventory: Inventory
    space: SearchSpace
    measurers: MeasurerPool
    train: Dataset
    val: Dataset
    budgets: Budgets
    run_dir: Path
    calib: DataLoader
    seed: int = 0
    finetune: bool = True  # False: data-free, calibration only
    pruner: DominatedPruner | None = None  # early stopping of hopeless fine-tuning
    baseline_s: float | None = None  # the uncompressed model's latency (the profile's own setting)
    predict: bool = True  # predict latency first; skip plans predicted far over the budget
    max_skipped: int = 0  # skipped plans the run may have in all (they do not count as trials)


class TrialObjective:
    """Optuna objective returning (val accuracy, latency in ms, deployed size in bytes)."""

    def __init__(self, ctx: TrialContext) -> None:
        self.ctx = ctx
        self._known: dict = {}  # the running trial's figures known before fine-tuning
        self._teacher_features = None  # the uncompressed model's, for the baseline's point

    def __call__(self, trial: optuna.Trial) -> tuple[float, float, float]:
        folder = self.ctx.run_dir / "trials" / str(trial.number)
        folder.mkdir(parents=True, exist_ok=True)
        self._known = {}
        try:
            return self._evaluate(trial, folder)
        except optuna.TrialPruned as err:
            write_json(folder / "metrics.json", {**self._known, "pruned": str(err)})
            raise
        except Exception as err:
            # Optuna records the failure but not why: keep the reason with the trial.
            text = str(err).strip()
            reason = f"{type(err).__name__}: {text.splitlines()[0] if text else ''}"
            trial.set_user_attr("fail_reason", reason)
            write_json(folder / "metrics.json", {"trial": trial.number, "failed": reason})
            raise

    def _evaluate(self, trial: optuna.Trial, folder: Path) -> tuple[float, float, float]:
        ctx = self.ctx
        shape = tuple(ctx.inventory.input_shape)
        plan = ctx.space.suggest_plan(trial, ctx.inventory)
        deploy = ctx.space.suggest_deploy(trial, ctx.measurers.profile)
        tuning = ctx.space.suggest_finetune(trial)
        if not ctx.finetune or not plan.layers:
            tuning = replace(tuning, steps=0)
        plan.save(folder / "plan.json")
        for key, value in (("plan", plan.to_json()), ("plan_summary", plan.describe()),
                           ("deploy", deploy)):
            trial.set_user_attr(key, value)
        timings = {}

        start = time.perf_counter()
        model = apply_plan(ctx.teacher, plan, ctx.inventory,
                           channel_multiple=ctx.measurers.profile.channel_multiple, calib=ctx.calib)
        timings["apply_s"] = time.perf_counter() - start

        # Latency, size and memory depend on the structure only, so they are known before
        # fine-tuning: a trial that cannot meet the budgets can be stopped early, and one
        # predicted far over the latency budget before it is even compiled.
        profile, measurer, table = ctx.measurers.get(deploy)
        size = size_bytes(model)
        memory = device_memory(model, shape, profile)
        prediction = None
        if ctx.predict and ctx.budgets.latency_s is not None and not isinstance(measurer, EstimateMeasurer):
            start = time.perf_counter()
            prediction = self._predict(trial, model, profile)
            timings["predict_s"] = time.perf_counter() - start
            if prediction.get("skip"):
                self._skip(trial, plan, deploy, prediction, size, memory, profile, timings)
        start = time.perf_counter()
        latency = measurer.measure(model, shape)
        timings["measure_s"] = time.perf_counter() - start
        table_figures = None
        if table is not None:
            start = time.perf_counter()
            table_figures = _predict_from_table(table, model, shape, latency,
                                                f"{ctx.run_dir.name}/trial {trial.number}")
            timings["table_s"] = time.perf_counter() - start
        constraints = _constraints(ctx.budgets, latency.median_s, size, memory, profile)
        if prediction is not None:
            if prediction.get("predicted_s") is not None:
                prediction["error"] = prediction["predicted_s"] / latency.median_s - 1
                prediction["measured_over_budget"] = constraints["latency_over_budget"] > 0
            trial.set_user_attr(PREDICTION_KEY, prediction)
        feasible = all(value <= 0 for value in constraints.values())
        # Constraints are Optuna's (feasible when <= 0), which the samplers respect, rather
        # than penalties folded into the objectives.
        for key, value in constraints.items():
            trial.set_constraint(key, value)
        trial.set_user_attr("constraints", constraints)
        metrics = {
            "trial": trial.number,
            "label": trial.user_attrs.get("label"),
            "plan_digest": plan.digest(),
            "plan_summary": plan.describe(),
            "deploy": deploy,
            "latency": latency.to_json(),
            "params": count_params(model),
            "macs": count_macs(model, shape),
            "size_bytes": size,
            "budgets": {"latency_s": ctx.budgets.latency_s, "size_bytes": ctx.budgets.size_bytes},
            "constraints": constraints,
            "feasible": feasible,
            "memory": memory.as_dict() if memory is not None else None,
            "over_memory": memory.exceeds(profile.memory) if memory is not None else None,
            "latency_table": table_figures,
            "prediction": prediction,
            "finetune": asdict(tuning),
            "timings": timings,  # seconds per step, filled in as the trial goes (a stopped one too)
        }
        for key in ("latency", "params", "macs", "size_bytes"):
            trial.set_user_attr(key, metrics[key])
        trial.set_user_attr("feasible_before_finetune", feasible)
        self._known = metrics

        if tuning.steps:
            start = time.perf_counter()
            checkpoints = None
            if ctx.pruner is not None:
                checkpoints = Checkpoints(trial, ctx.pruner, model,
                                          take(ctx.val, CHECKPOINT_IMAGES, ctx.seed), tuning.steps)
                checkpoints.start()  # a trial over the budgets stops here, before fine-tuning
            try:
                finetune(model, ctx.teacher, ctx.train, tuning, seed=ctx.seed + trial.number,
                         on_step=checkpoints)
            finally:
                timings["finetune_s"] = time.perf_counter() - start
        start = time.perf_counter()
        accuracy = evaluate(model, ctx.val)
        timings["eval_s"] = time.perf_counter() - start
        metrics.update(val_acc=accuracy, intermediate=trial.user_attrs.get("intermediate"))
        with replacing(folder / "model.pt") as temporary:
            torch.save(model.state_dict(), temporary)
        write_json(folder / "metrics.json", metrics)
        trial.set_user_attr("val_acc", accuracy)
        trial.set_user_attr("feasible", feasible)
        return accuracy, latency.median_s * 1e3, float(size)

    def _predict(self, trial: optuna.Trial, model: nn.Module, profile) -> dict:
        """The plan's predicted latency from the run's measured trials (``search.prediction``),
        and whether to skip it: predicted over the latency budget by more than the fit's p90
        error, not drawn for an audit (``AUDIT_SHARE``), and the run's skips not used up."""
        ctx = self.ctx
        shape = tuple(ctx.inventory.input_shape)
        found = features(model, shape, profile)
        trial.set_user_attr(FEATURES_KEY, found.to_json())
        own = profile.latency.threads == ctx.measurers.profile.latency.threads
        baseline = None
        if own and ctx.baseline_s is not None:
            if self._teacher_features is None:
                self._teacher_features = features(ctx.teacher, shape, profile)
            baseline = Point(self._teacher_features, ctx.baseline_s)
        trials = trial.study.get_trials(deepcopy=False)
        fitted = fit(measured_points(trials, baseline))
        predicted = fitted.predict(found) if fitted is not None else None
        if predicted is None:
            why = ("too few measured models yet" if fitted is None else
                   "int8 kernels, and fewer than two models with int8 kernels measured yet")
            return {"predicted_s": None, "why_not": why}
        result = {"predicted_s": predicted, "p90_error": fitted.p90_error, "points": fitted.points,
                  "how": fitted.describe()}
        budget = ctx.budgets.latency_s
        if budget is None or predicted <= budget * (1 + fitted.p90_error):
            return result
        result["over_budget"] = True
        skipped = sum(1 for t in trials if t.user_attrs.get(NOT_COUNTED))
        if skipped >= ctx.max_skipped:
            result["measured_because"] = f"the run's {ctx.max_skipped} skips are used up"
        elif random.Random(f"{ctx.seed}:{trial.number}").random() < AUDIT_SHARE:
            result["measured_because"] = "drawn to check the prediction"
        else:
            result["skip"] = True
        return result

    def _skip(self, trial: optuna.Trial, plan, deploy: dict, prediction: dict, size: int, memory,
              profile, timings: dict) -> None:
        """Record a plan predicted over the latency budget (its constraints from the prediction,
        so the sampler learns from it) and stop it before it is compiled; it does not count as
        one of the run's trials."""
        ctx = self.ctx
        prediction.pop("skip")
        prediction["skipped"] = True
        constraints = _constraints(ctx.budgets, prediction["predicted_s"], size, memory, profile)
        for key, value in constraints.items():
            trial.set_constraint(key, value)
        reason = (f"not compiled: predicted {format_seconds(prediction['predicted_s'])}, over the "
                  f"{format_seconds(ctx.budgets.latency_s)} budget by more than the prediction's p90 "
                  f"error ({prediction['p90_error']:.0%})")
        for key, value in (("constraints", constraints), (PREDICTION_KEY, prediction),
                           ("size_bytes", size), ("pruned_reason", reason), (NOT_COUNTED, True)):
            trial.set_user_attr(key, value)
        self._known = {"trial": trial.number, "label": trial.user_attrs.get("label"),
                       "plan_digest": plan.digest(), "plan_summary": plan.describe(), "deploy": deploy,
                       "prediction": prediction, "size_bytes": size, "constraints": constraints,
                       "feasible": False, "memory": memory.as_dict() if memory is not None else None,
                       "timings": timings}
        raise optuna.TrialPruned(reason)


def _constraints(budgets: Budgets, latency_s: float, size: int, memory, profile) -> dict[str, float]:
    """Each limit's violation relative to the limit (<= 0: met), so that violations of
    different limits add up to one distance from feasibility."""
    constraints = {"latency_over_budget": 0.0 if budgets.latency_s is None
                   else latency_s / budgets.latency_s - 1}
    if budgets.size_bytes is not None:
        constraints["size_over_budget"] = (size - budgets.size_bytes) / budgets.size_bytes
    if memory is not None:
        limits = profile.memory
        for key, used, limit in (("sram", memory.sram_bytes, limits.sram_bytes),
                                 ("flash", memory.flash_bytes, limits.flash_bytes)):
            if limit:
                constraints[f"{key}_over_limit"] = (used - limit) / limit
    return constraints


def _predict_from_table(table: LatencyTable, model: nn.Module, shape: tuple[int, ...],
                        measured: Latency, label: str) -> dict:
    """The latency table's prediction for the trial's model, recorded next to the end-to-end
    measurement (as timed, the frame of kernels timed alone: ``lut.timed_frame``) so that the
    table's error is always known. A table failure is logged and
    recorded with the trial (``failed``, where a prediction has its relative ``error``), not
    allowed to fail it."""
    try:
        prediction = table.predict(model, shape)
        table.record(prediction, measured, label)
        if table.overhead().models == 0 and len(table.records()) >= TABLE_FIT_AFTER:
            table.fit_overhead()
    except Exception as err:
        logger.warning("%s: latency table prediction failed: %s: %s", label, type(err).__name__,
                       str(err).strip()[:200])
        return {"failed": f"{type(err).__name__}: {str(err).strip()[:200]}"}
    timed_s = timed_frame(measured).median_s
    return {"predicted_s": prediction.latency.median_s, "measured_as_timed_s": timed_s,
            "error": prediction.latency.median_s / timed_s - 1,
            "kernels": prediction.kernels, "hits": prediction.hits,
            "provenance": prediction.latency.provenance}
