"""A search run's folder and its settings file (``runs/RUN/run.json``)."""

import json
import re
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from autocomp.core.errors import AutocompError
from autocomp.core.staging import write_json
from autocomp.core.units import format_seconds, parse_bytes
from autocomp.hardware.profiles import HardwareProfile, load_target
from autocomp.intake.source import ModelSource
from autocomp.search.storage import without_password

RUN_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
# Settings that must not change when a run is resumed: they define what the trials mean.
FIXED_ON_RESUME = ("model", "data", "target", "untuned", "space", "budget", "size_budget", "sram",
                   "flash", "finetune", "sensitivity", "warm_start", "seed", "train_subset", "val_subset")


@dataclass
class RunSettings:
    """What a search run was asked to do; saved so it can be resumed and exported."""

    name: str
    model: ModelSource
    data: str
    target: str
    space: str
    budget: str | None
    trials: int
    seed: int = 0
    train_subset: int | None = None
    val_subset: int | None = None
    untuned: bool = False  # compiled with TVM's default schedules (--untuned), not tuned kernels
    sampler: str = "tpe"
    storage: str | None = None  # Optuna storage URL; None: runs/RUN/study.db
    size_budget: str | None = None  # e.g. "1MB": deployed model size limit
    sram: str | None = None  # MCU SRAM limit overriding the profile's
    flash: str | None = None  # MCU flash limit overriding the profile's
    finetune: bool = True  # False: data-free (--no-finetune), calibration only
    sensitivity: bool = True  # the sensitivity pre-pass narrows and seeds the space
    warm_start: bool = True  # enqueue the uncompressed model and the uniform baselines
    latency_table: bool = False  # record the kernel latency table's prediction per trial
    trial_schedules: str = "transfer"  # new workloads in trials: a neighbour's schedule, or tuned
    predict: bool = True  # skip plans predicted far over the latency budget before compiling them
    baseline: dict[str, Any] = field(default_factory=dict)  # accuracy, latency, budget_s

    @property
    def input_shape(self) -> tuple[int, ...]:
        return (1, self.model.in_channels, self.model.input_size, self.model.input_size)

    def load_target(self) -> HardwareProfile:
        """The run's hardware profile, untuned when the run was, with its memory overrides."""
        return with_memory_limits(load_target(self.target, untuned=self.untuned), self.sram, self.flash)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "RunSettings":
        return cls(**{**data, "model": ModelSource(**data["model"])})


def unbinding_budget(baseline: dict) -> str | None:
    """The sentence saying that the uncompressed model already meets the latency budget (so the
    budget rules nothing out), or None when it does not or there is no budget."""
    budget_s, latency_s = baseline.get("budget_s"), baseline.get("latency", {}).get("median_s")
    if budget_s is None or latency_s is None or latency_s > budget_s:
        return None
    return (f"the uncompressed model already meets the latency budget ({format_seconds(latency_s)} <= "
            f"{format_seconds(budget_s)}): the budget rules no plan out, so the search trades size "
            "against accuracy (and latency below the budget); a tighter --budget makes it bind")


def with_memory_limits(profile: HardwareProfile, sram: str | None, flash: str | None) -> HardwareProfile:
    """``profile`` with its SRAM / flash limits replaced (``--sram``, ``--flash``); only MCU
    profiles (C-source targets) have them."""
    if sram is None and flash is None:
        return profile
    if profile.tvm_target.get("kind") != "c":
        raise AutocompError(f"--sram and --flash apply to microcontroller profiles; {profile.name} "
                            f"is a {profile.tvm_target.get('kind')} target (use --size for model size)")
    limits = profile.memory
    if sram is not None:
        limits = replace(limits, sram_bytes=parse_bytes(sram))
    if flash is not None:
        limits = replace(limits, flash_bytes=parse_bytes(flash))
    return replace(profile, memory=limits)


def check_name(name: str) -> str:
    if not RUN_NAME.match(name):
        raise AutocompError(f"run name {name!r} may hold only letters, digits, '.', '_' and '-'")
    return name


def run_dir(runs_root: Path, name: str) -> Path:
    return runs_root / check_name(name)


def load_settings(folder: Path) -> RunSettings:
    """The settings of an existing run; a one-line error when there is none."""
    path = folder / "run.json"
    if not path.is_file():
        raise AutocompError(f"no search run at {folder} (expected {path})")
    return RunSettings.from_json(json.loads(path.read_text()))


def save_settings(folder: Path, settings: RunSettings) -> None:
    """Write ``run.json``; a storage URL is kept without its password (no secret on disk)."""
    write_json(folder / "run.json", {**settings.to_json(), "storage": without_password(settings.storage)})


def check_resumable(saved: RunSettings, wanted: RunSettings) -> None:
    """Refuse to resume a run with settings that would change what its trials mean."""
    old, new = saved.to_json(), wanted.to_json()
    for key in FIXED_ON_RESUME:
        if old.get(key) != new.get(key):
            raise AutocompError(
                f"run {saved.name!r} exists with {key} = {json.dumps(old.get(key))}, not "
                f"{json.dumps(new.get(key))}: rerun with the same settings to resume, or pick a new --name"
            )
