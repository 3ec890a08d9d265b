"""Exporting a search trial: its plan, compressed PyTorch weights, and a TVM module for the
target, with the module's outputs checked against PyTorch on real samples."""

import json
import shutil
import tempfile
from pathlib import Path

import numpy as np
import optuna
import torch
from torch import nn

from autocomp.compress import apply_plan
from autocomp.data import load_data, take
from autocomp.errors import AutocompError
from autocomp.hardware.lower import compile_model, export_library
from autocomp.hardware.profiles import load_profile
from autocomp.inventory import build_inventory
from autocomp.plan import CompressionPlan
from autocomp.search.pareto import best_feasible, collect
from autocomp.search.run import RunSettings

SAMPLES = 16


def load_trial_model(run_dir: Path, settings: RunSettings, number: int) -> nn.Module:
    """Rebuild a trial's compressed model: the plan's structure, the trial's fine-tuned weights."""
    folder = run_dir / "trials" / str(number)
    if not (folder / "model.pt").is_file():
        raise AutocompError(f"trial {number} of run {settings.name!r} has no saved model "
                            f"(it did not finish)")
    teacher = settings.model.build()
    inventory = build_inventory(teacher, settings.input_shape)
    plan = CompressionPlan.load(folder / "plan.json")
    profile = load_profile(settings.target)
    model = apply_plan(teacher, plan, inventory, channel_multiple=profile.channel_multiple)
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
    if out.exists() and any(out.iterdir()) and not force:
        raise AutocompError(f"{out} exists and is not empty (use --force to replace it)")
    profile = load_profile(settings.target)
    model = load_trial_model(run_dir, settings, number)
    metrics = json.loads((run_dir / "trials" / str(number) / "metrics.json").read_text())
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        shutil.copy(run_dir / "trials" / str(number) / "plan.json", staging / "plan.json")
        torch.save(model.state_dict(), staging / "model.pt")
        log(f"export: compiling trial {number} for {profile.name} with TVM ...")
        library = export_library(compile_model(model, settings.input_shape, profile),
                                 staging / "model.so")
        max_diff = check_numerics(model, library, settings)
        log(f"export: max |TVM - PyTorch| over {SAMPLES} validation images: {max_diff:.3g}")
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
        if out.exists():
            shutil.rmtree(out)
        staging.replace(out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return record


def check_numerics(model: nn.Module, library: Path, settings: RunSettings) -> float:
    """Largest absolute difference between the TVM module and PyTorch on validation images."""
    import tvm
    from tvm.runtime.vm import VirtualMachine

    device = tvm.cpu()
    vm = VirtualMachine(tvm.runtime.load_module(str(library)), device)
    samples = take(load_data(settings.data, image_size=settings.model.input_size).val, SAMPLES,
                   seed=1)
    worst = 0.0
    with torch.no_grad():
        for index in range(len(samples)):
            image = samples[index][0].unsqueeze(0)
            expected = model(image).numpy()
            got = vm["main"](tvm.runtime.tensor(image.numpy(), device))[0].numpy()
            worst = max(worst, float(np.abs(got - expected).max()))
    return worst
