"""Exporting a search trial: its plan, compressed PyTorch weights, and a TVM module for the
target, with the module's outputs checked against PyTorch on real samples."""

import json
import shutil
from pathlib import Path

import numpy as np
import optuna
import torch
from torch import nn

from autocomp.compress import apply_plan
from autocomp.data import DataSplits, calibration_loader, load_data, take
from autocomp.errors import AutocompError
from autocomp.hardware.lower import compile_model, export_library
from autocomp.hardware.profiles import load_profile
from autocomp.inventory import build_inventory
from autocomp.plan import CompressionPlan
from autocomp.search.pareto import best_feasible, collect
from autocomp.search.run import RunSettings
from autocomp.staging import refuse_existing, staged_folder

SAMPLES = 16
# The exported module must agree with PyTorch to this fraction of the largest logit.
RELATIVE_TOLERANCE = 1e-3


def load_trial_model(run_dir: Path, settings: RunSettings, number: int, data: DataSplits) -> nn.Module:
    """Rebuild a trial's compressed model: the plan's structure (calibrated on the same
    training images as in the search), then the trial's fine-tuned weights."""
    folder = run_dir / "trials" / str(number)
    if not (folder / "model.pt").is_file():
        raise AutocompError(f"trial {number} of run {settings.name!r} has no saved model "
                            f"(it did not finish)")
    teacher = settings.model.build()
    inventory = build_inventory(teacher, settings.input_shape)
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


def export_trial(run_dir: Path, settings: RunSettings, number: int, out: Path, *,
                 force: bool = False, log=print) -> dict:
    """Write plan.json, model.pt, model.so and export.json into ``out``, atomically."""
    refuse_existing(out, force)
    profile = load_profile(settings.target)
    data = load_data(settings.data, image_size=settings.model.input_size)
    model = load_trial_model(run_dir, settings, number, data)
    metrics = json.loads((run_dir / "trials" / str(number) / "metrics.json").read_text())
    with staged_folder(out, force=force) as staging:
        shutil.copy(run_dir / "trials" / str(number) / "plan.json", staging / "plan.json")
        torch.save(model.state_dict(), staging / "model.pt")
        log(f"export: compiling trial {number} for {profile.name} with TVM ...")
        library = export_library(compile_model(model, settings.input_shape, profile),
                                 staging / "model.so")
        max_diff, scale = check_numerics(model, library, data)
        log(f"export: max |TVM - PyTorch| over {SAMPLES} validation images: {max_diff:.3g} "
            f"(largest |logit| {scale:.3g})")
        if max_diff > RELATIVE_TOLERANCE * max(scale, 1.0):
            raise AutocompError(f"export refused: the TVM module differs from PyTorch by {max_diff:.3g}, "
                                f"over {RELATIVE_TOLERANCE:g} of the largest logit")
        record = {
            "run": settings.name, "trial": number, "target": profile.name,
            "tvm_target": profile.tvm_target, "input_shape": list(settings.input_shape),
            "model": settings.model.spec, "plan_summary": metrics["plan_summary"],
            "val_acc": metrics["val_acc"], "latency": metrics["latency"],
            "params": metrics["params"], "max_abs_diff": max_diff, "samples_checked": SAMPLES,
            "files": {"plan.json": "the compression plan",
                      "model.pt": "compressed PyTorch state dict (rebuild with the plan)",
                      "model.so": "TVM Relax VM module: tvm.runtime.load_module, then "
                                  "tvm.runtime.vm.VirtualMachine(lib, tvm.cpu())['main'](x)"},
        }
        (staging / "export.json").write_text(json.dumps(record, indent=2) + "\n")
    return record


def check_numerics(model: nn.Module, library: Path, data: DataSplits) -> tuple[float, float]:
    """Largest absolute difference between the TVM module and PyTorch on validation images,
    and the largest absolute PyTorch output (the scale the difference is judged against)."""
    import tvm
    from tvm.runtime.vm import VirtualMachine

    device = tvm.cpu()
    vm = VirtualMachine(tvm.runtime.load_module(str(library)), device)
    samples = take(data.val, SAMPLES, seed=1)
    worst = scale = 0.0
    with torch.no_grad():
        for index in range(len(samples)):
            image = samples[index][0].unsqueeze(0)
            expected = model(image).numpy()
            got = vm["main"](tvm.runtime.tensor(image.numpy(), device))[0].numpy()
            worst = max(worst, float(np.abs(got - expected).max()))
            scale = max(scale, float(np.abs(expected).max()))
    return worst, scale
