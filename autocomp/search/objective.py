"""One trial: sample a plan, compress, measure latency and memory, fine-tune with distillation
(stopped early when hopeless), score."""

import logging
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import optuna
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from autocomp.core.inventory import Inventory, count_macs
from autocomp.core.staging import replacing, write_json
from autocomp.hardware.costmodel.lut import LatencyTable
from autocomp.hardware.mcu.memory import device_memory
from autocomp.hardware.measure.base import Latency
from autocomp.intake.data import take
from autocomp.methods.apply import apply_plan, count_params, size_bytes
from autocomp.search.early_stop import Checkpoints, DominatedPruner
from autocomp.search.measurers import MeasurerPool
from autocomp.search.space.sampling import SearchSpace
from autocomp.training.distill import finetune
from autocomp.training.train import evaluate

logger = logging.getLogger(__name__)

# Measured trials after which the latency table's in-model correction (VM overhead per
# kernel call, cache effects) is fitted, once per target; later predictions use it.
TABLE_FIT_AFTER = 5
# Validation images scored at each fine-tuning checkpoint (early stopping).
CHECKPOINT_IMAGES = 500


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


class TrialObjective:
    """Optuna objective returning (val accuracy, latency in ms, deployed size in bytes)."""

    def __init__(self, ctx: TrialContext) -> None:
        self.ctx = ctx
        self._known: dict = {}  # the running trial's figures known before fine-tuning

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
        # fine-tuning: a trial that cannot meet the budgets can be stopped early.
        profile, measurer, table = ctx.measurers.get(deploy)
        start = time.perf_counter()
        latency = measurer.measure(model, shape)
        timings["measure_s"] = time.perf_counter() - start
        table_figures = None
        if table is not None:
            start = time.perf_counter()
            table_figures = _predict_from_table(table, model, shape, latency,
                                                f"{ctx.run_dir.name}/trial {trial.number}")
            timings["table_s"] = time.perf_counter() - start
        size = size_bytes(model)
        memory = device_memory(model, shape, profile)
        constraints = _constraints(ctx.budgets, latency, size, memory, profile)
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


def _constraints(budgets: Budgets, latency: Latency, size: int, memory, profile) -> dict[str, float]:
    """Each limit's violation relative to the limit (<= 0: met), so that violations of
    different limits add up to one distance from feasibility."""
    constraints = {"latency_over_budget": 0.0 if budgets.latency_s is None
                   else latency.median_s / budgets.latency_s - 1}
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
    measurement so that the table's error is always known. A table failure is logged and
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
    return {"predicted_s": prediction.latency.median_s,
            "error": prediction.latency.median_s / measured.median_s - 1,
            "kernels": prediction.kernels, "hits": prediction.hits,
            "provenance": prediction.latency.provenance}
