"""A finished trial of a run: which one to take (``best`` or a number) and its model rebuilt
from the run folder (the plan applied again, then the trial's fine-tuned weights)."""

from pathlib import Path

import optuna
import torch
from torch import nn

from autocomp.core.errors import AutocompError
from autocomp.core.inventory import Inventory, build_inventory
from autocomp.hardware.profiles import load_profile
from autocomp.intake.data import DataSplits, calibration_loader
from autocomp.methods.apply import apply_plan
from autocomp.methods.plan import CompressionPlan
from autocomp.search.results.pareto import best_feasible, collect
from autocomp.search.settings import RunSettings


def load_trial_model(run_dir: Path, settings: RunSettings, number: int, data: DataSplits,
                     base: tuple[nn.Module, Inventory] | None = None) -> nn.Module:
    """Rebuild a trial's compressed model: the plan's structure (calibrated on the same
    training images as in the search), then the trial's fine-tuned weights. ``base`` is the
    run's uncompressed model and its inventory where the caller holds them already (the
    search does), which saves building them again (a ``torch.export`` each time)."""
    folder = run_dir / "trials" / str(number)
    if not (folder / "model.pt").is_file():
        raise AutocompError(f"trial {number} of run {settings.name!r} has no saved model "
                            f"(it did not finish)")
    if base is None:
        teacher = settings.model.build()
        inventory = build_inventory(teacher, settings.input_shape)
    else:
        teacher, inventory = base
    plan = CompressionPlan.load(folder / "plan.json")
    profile = load_profile(settings.target)
    model = apply_plan(teacher, plan, inventory, channel_multiple=profile.channel_multiple,
                       calib=calibration_loader(data.train, seed=settings.seed))
    model.load_state_dict(torch.load(folder / "model.pt", map_location="cpu", weights_only=True))
    return model.eval()


def choose_trial(study: optuna.Study, which: str) -> int:
    """``best`` (most accurate within budget) or a trial number that completed."""
    results = collect(study)
    if which == "best":
        best = best_feasible(results)
        if best is None:
            raise AutocompError("no trial meets the run's budget: pick one with --trial N")
        return best.number
    if not which.isdigit():
        raise AutocompError(f"--trial takes a trial number or 'best', not {which!r}")
    number = int(which)
    if number not in {r.number for r in results}:
        done = ", ".join(str(r.number) for r in results) or "none"
        raise AutocompError(f"trial {number} did not complete (completed: {done})")
    return number
