"""Exporting a search trial: its plan and the deployable artefacts for the run's target
(PyTorch weights, ONNX, and the target's TVM library or sources), each checked against PyTorch
on real validation images."""

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
from autocomp.hardware.artefacts import make_job, write_artefacts
from autocomp.hardware.profiles import load_profile
from autocomp.inventory import build_inventory
from autocomp.plan import CompressionPlan
from autocomp.search.pareto import best_feasible, collect
from autocomp.search.run import RunSettings
from autocomp.staging import refuse_existing, staged_folder

SAMPLES = 16


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


def validation_inputs(data: DataSplits, input_shape: tuple[int, ...]) -> np.ndarray:
    """``SAMPLES`` validation images, each shaped as the model's input (batch of one)."""
    samples = take(data.val, SAMPLES, seed=1)
    return np.stack([samples[i][0].reshape(input_shape).numpy() for i in range(len(samples))])


def export_trial(run_dir: Path, settings: RunSettings, number: int, out: Path, *,
                 force: bool = False, log=print) -> dict:
    """Write plan.json, the target's artefacts (see ``autocomp.hardware.artefacts``) and
    export.json into ``out``, atomically; refused when an artefact disagrees with PyTorch."""
    refuse_existing(out, force)
    profile = settings.load_target()
    data = load_data(settings.data, image_size=settings.model.input_size)
    model = load_trial_model(run_dir, settings, number, data)
    metrics = json.loads((run_dir / "trials" / str(number) / "metrics.json").read_text())
    with staged_folder(out, force=force) as staging:
        shutil.copy(run_dir / "trials" / str(number) / "plan.json", staging / "plan.json")
        log(f"export: trial {number} for {profile.name} ({profile.target_text()}, "
            f"{profile.export.format}) ...")
        job = make_job(model, settings.input_shape, profile, staging,
                       validation_inputs(data, settings.input_shape))
        artefacts = write_artefacts(job, log=log)
        checked = [a.check.max_abs_diff for a in artefacts if a.check.max_abs_diff is not None]
        record = {
            "run": settings.name, "trial": number, "target": profile.name,
            "tvm_target": profile.tvm_target, "input_shape": list(settings.input_shape),
            "model": settings.model.spec, "plan_summary": metrics["plan_summary"],
            "val_acc": metrics["val_acc"], "latency": metrics["latency"],
            "params": metrics["params"],
            "checked_on": f"{job.samples} validation images, against the PyTorch model's outputs",
            "tolerance": job.tolerance, "max_abs_diff": max(checked, default=None),
            "files": {"plan.json": "the compression plan",
                      **{name: a.kind for a in artefacts for name in a.files}},
            "artefacts": [a.to_json(job.samples) for a in artefacts],
        }
        (staging / "export.json").write_text(json.dumps(record, indent=2) + "\n")
    return record
