"""One trial: sample a plan, compress, fine-tune with distillation, score, measure latency."""

import json
import time
from dataclasses import dataclass
from pathlib import Path

import optuna
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from autocomp.compress import apply_plan, count_params, size_bytes
from autocomp.distill import finetune
from autocomp.hardware.lut import LatencyTable
from autocomp.hardware.mcu_memory import device_memory
from autocomp.hardware.measure import Latency, Measurer
from autocomp.hardware.profiles import HardwareProfile
from autocomp.inventory import Inventory, build_inventory
from autocomp.search.space import SearchSpace
from autocomp.train import evaluate

# Measured trials after which the latency table's in-model correction (VM overhead per
# kernel call, cache effects) is fitted, once per target; later predictions use it.
TABLE_FIT_AFTER = 5


@dataclass
class TrialContext:
    """What every trial of one search shares."""

    teacher: nn.Module
    inventory: Inventory
    space: SearchSpace
    profile: HardwareProfile
    measurer: Measurer
    train: Dataset
    val: Dataset
    budget_s: float | None
    run_dir: Path
    calib: DataLoader
    seed: int = 0
    table: LatencyTable | None = None  # kernel latency table, for targets measured on this machine


class TrialObjective:
    """Optuna objective returning (val accuracy, latency in ms, parameter count)."""

    def __init__(self, ctx: TrialContext) -> None:
        self.ctx = ctx

    def __call__(self, trial: optuna.Trial) -> tuple[float, float, float]:
        folder = self.ctx.run_dir / "trials" / str(trial.number)
        folder.mkdir(parents=True, exist_ok=True)
        try:
            return self._evaluate(trial, folder)
        except Exception as err:
            # Optuna records the failure but not why: keep the reason with the trial.
            reason = f"{type(err).__name__}: {str(err).strip().splitlines()[0] if str(err).strip() else ''}"
            trial.set_user_attr("fail_reason", reason)
            (folder / "metrics.json").write_text(
                json.dumps({"trial": trial.number, "failed": reason}, indent=2) + "\n")
            raise

    def _evaluate(self, trial: optuna.Trial, folder: Path) -> tuple[float, float, float]:
        ctx = self.ctx
        plan = ctx.space.suggest_plan(trial, ctx.inventory)
        plan.save(folder / "plan.json")
        trial.set_user_attr("plan", plan.to_json())
        trial.set_user_attr("plan_summary", plan.describe())
        timings = {}

        start = time.perf_counter()
        model = apply_plan(ctx.teacher, plan, ctx.inventory,
                           channel_multiple=ctx.profile.channel_multiple, calib=ctx.calib)
        timings["apply_s"] = time.perf_counter() - start
        if plan.layers:
            start = time.perf_counter()
            finetune(model, ctx.teacher, ctx.train, ctx.space.finetune, seed=ctx.seed + trial.number)
            timings["finetune_s"] = time.perf_counter() - start
        start = time.perf_counter()
        accuracy = evaluate(model, ctx.val)
        timings["eval_s"] = time.perf_counter() - start
        start = time.perf_counter()
        latency = ctx.measurer.measure(model, tuple(ctx.inventory.input_shape))
        timings["measure_s"] = time.perf_counter() - start

        if ctx.table is not None:
            start = time.perf_counter()
            table_figures = self._predict_from_table(model, latency, trial.number)
            timings["table_s"] = time.perf_counter() - start
        params = count_params(model)
        macs = build_inventory(model, tuple(ctx.inventory.input_shape), coupling=False).macs
        memory = device_memory(model, tuple(ctx.inventory.input_shape), ctx.profile)
        over_memory = memory.exceeds(ctx.profile.memory) if memory is not None else None
        feasible = (ctx.budget_s is None or latency.median_s <= ctx.budget_s) and over_memory is None
        metrics = {
            "trial": trial.number,
            "plan_digest": plan.digest(),
            "plan_summary": plan.describe(),
            "val_acc": accuracy,
            "latency": latency.to_json(),
            "params": params,
            "macs": macs,
            "size_bytes": size_bytes(model),
            "budget_s": ctx.budget_s,
            "feasible": feasible,
            "memory": memory.as_dict() if memory is not None else None,
            "over_memory": over_memory,
            "latency_table": table_figures if ctx.table is not None else None,
            "finetune_steps": ctx.space.finetune.steps if plan.layers else 0,
            "timings": timings,
        }
        torch.save(model.state_dict(), folder / "model.pt")
        (folder / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
        for key in ("val_acc", "params", "macs", "size_bytes", "feasible"):
            trial.set_user_attr(key, metrics[key])
        trial.set_user_attr("latency", latency.to_json())
        # The budget is an Optuna constraint (feasible when <= 0), which the samplers
        # respect, rather than a penalty folded into the objectives.
        slack = 0.0 if ctx.budget_s is None else latency.median_s - ctx.budget_s
        trial.set_constraint("latency_over_budget_s", slack)
        if memory is not None:
            limits = ctx.profile.memory
            for key, used, limit in (("sram", memory.sram_bytes, limits.sram_bytes),
                                     ("flash", memory.flash_bytes, limits.flash_bytes)):
                if limit:
                    trial.set_constraint(f"{key}_over_limit", (used - limit) / limit)
        return accuracy, latency.median_s * 1e3, float(params)


    def _predict_from_table(self, model: nn.Module, measured: Latency, number: int) -> dict:
        """The latency table's prediction for the trial's model, recorded next to the
        end-to-end measurement so that the table's error is always known. A table failure
        is reported with the trial, not allowed to fail it."""
        ctx = self.ctx
        assert ctx.table is not None
        try:
            prediction = ctx.table.predict(model, tuple(ctx.inventory.input_shape))
            ctx.table.record(prediction, measured, f"{ctx.run_dir.name}/trial {number}")
            if ctx.table.overhead().models == 0 and len(ctx.table.records()) >= TABLE_FIT_AFTER:
                ctx.table.fit_overhead()
        except Exception as err:
            return {"error": f"{type(err).__name__}: {str(err).strip()[:200]}"}
        return {"predicted_s": prediction.latency.median_s,
                "error": prediction.latency.median_s / measured.median_s - 1,
                "kernels": prediction.kernels, "hits": prediction.hits,
                "provenance": prediction.latency.provenance}
