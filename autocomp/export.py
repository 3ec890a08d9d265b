"""Exporting: a model, or a search trial, as the deployable artefacts for a target (PyTorch
weights, ONNX, and the target's TVM library or C sources), each checked against PyTorch, with
``export.json`` saying what was written and how each file was checked."""

import json
import logging
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from autocomp.core.staging import refuse_existing, staged_folder, write_json
from autocomp.hardware.deploy.artefacts import make_job, write_artefacts
from autocomp.hardware.profiles import HardwareProfile, load_target
from autocomp.intake.data import DataSplits, load_data, take
from autocomp.search.results.trials import load_trial_model
from autocomp.search.settings import RunSettings

logger = logging.getLogger(__name__)

SAMPLES = 16


def export_model(model: nn.Module, example_inputs: torch.Tensor, target: str | HardwareProfile,
                 out: str | Path, *, check_inputs: torch.Tensor | None = None, untuned: bool = False,
                 force: bool = False) -> dict[str, Any]:
    """Write ``model``'s artefacts for ``target`` (a profile name, path or profile) and
    export.json into ``out``, atomically; refused when an artefact disagrees with PyTorch.

    ``example_inputs`` is one input (batch of one); each of ``check_inputs`` (a batch of
    such inputs, default the example) is run through every artefact and compared with
    PyTorch. ``untuned`` compiles with TVM's default schedules (fast to build, slow to run).
    Returns the export.json record.
    """
    profile = target if isinstance(target, HardwareProfile) else load_target(target, untuned=untuned)
    out = Path(out)
    shape = tuple(example_inputs.shape)
    checks = example_inputs if check_inputs is None else check_inputs
    inputs = checks.detach().cpu().numpy().reshape(-1, *shape)
    with staged_folder(out, force=force) as staging:
        logger.info("export: %s (%s, %s) ...", profile.name, profile.target_text(), profile.export.format)
        return _write_export(model, shape, profile, staging, inputs, "given inputs")


def validation_inputs(data: DataSplits, input_shape: tuple[int, ...]) -> np.ndarray:
    """``SAMPLES`` validation images, each shaped as the model's input (batch of one)."""
    samples = take(data.val, SAMPLES, seed=1)
    return np.stack([samples[i][0].reshape(input_shape).numpy() for i in range(len(samples))])


def export_trial(run_dir: Path, settings: RunSettings, number: int, out: Path, *,
                 force: bool = False) -> dict[str, Any]:
    """Write plan.json, the target's artefacts (see ``autocomp.hardware.deploy.artefacts``) and
    export.json into ``out``, atomically, checked on validation images; refused when an
    artefact disagrees with PyTorch."""
    refuse_existing(out, force)
    profile = settings.load_target()
    data = load_data(settings.data, image_size=settings.model.input_size)
    model = load_trial_model(run_dir, settings, number, data)
    trial = run_dir / "trials" / str(number)
    metrics = json.loads((trial / "metrics.json").read_text())
    with staged_folder(out, force=force) as staging:
        shutil.copy(trial / "plan.json", staging / "plan.json")
        logger.info("export: trial %d for %s (%s, %s) ...", number, profile.name, profile.target_text(),
                    profile.export.format)
        about = {"run": settings.name, "trial": number, "model": settings.model.spec,
                 "plan_summary": metrics["plan_summary"], "val_acc": metrics["val_acc"],
                 "latency": metrics["latency"], "params": metrics["params"]}
        return _write_export(model, settings.input_shape, profile, staging,
                             validation_inputs(data, settings.input_shape), "validation images", about=about,
                             files={"plan.json": "the compression plan"})


def _write_export(model: nn.Module, shape: tuple[int, ...], profile: HardwareProfile, folder: Path,
                  inputs: np.ndarray, inputs_are: str, *, about: dict[str, Any] | None = None,
                  files: dict[str, str] | None = None) -> dict[str, Any]:
    """Write and check the artefacts into ``folder``, and export.json describing them (``about``
    first: what was exported; ``files``: other files already in the folder)."""
    job = make_job(model, shape, profile, folder, inputs)
    artefacts = write_artefacts(job)
    checked = [a.check.max_abs_diff for a in artefacts if a.check.max_abs_diff is not None]
    record = {
        **(about or {}), "target": profile.name, "tvm_target": profile.tvm_target, "input_shape": list(shape),
        "checked_on": f"{job.samples} {inputs_are}, against the PyTorch model's outputs",
        "tolerance": job.tolerance, "max_abs_diff": max(checked, default=None),
        "files": {**(files or {}), **{name: a.kind for a in artefacts for name in a.files}},
        "artefacts": [a.to_json(job.samples) for a in artefacts],
    }
    write_json(folder / "export.json", record)
    return record
