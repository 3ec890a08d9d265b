"""``SearchConfig``: what a user asks a search for, as ``autocomp search`` takes it on the command
line, validated when it is created."""

from dataclasses import dataclass
from pathlib import Path

from autocomp.core.errors import AutocompError

SAMPLERS = ("tpe", "nsga2", "random")
TRIAL_SCHEDULES = ("transfer", "tune")


@dataclass(frozen=True, kw_only=True)
class SearchConfig:
    """A search of per-layer compression plans for ``model`` on ``data`` and ``target``.

    ``model`` and ``data`` are spec strings (``autocomp.build_model``, ``autocomp.load_data``);
    without ``weights`` the model is trained for ``baseline_epochs`` first (once, cached).
    ``budget`` limits latency (``20ms`` or ``60%`` of the uncompressed model), ``size`` the
    deployed size, ``sram`` / ``flash`` a microcontroller's memory. Outputs go to
    ``runs_dir / name`` (default name: the model's and the target's); running the same config
    again resumes the run. ``finetune`` False is the data-free mode (calibration only);
    ``space`` defaults to ``default`` (``data-free`` without fine-tuning).
    ``trial_schedules`` says how trials compile workloads the tuning database lacks:
    ``transfer`` a tuned neighbour's schedule (the final front is tuned), or ``tune`` them.
    ``predict`` lets a measured target skip plans predicted far over the latency budget before
    they are compiled (``autocomp.search.prediction``).
    """

    model: str
    data: str
    target: str = "host"
    weights: str | None = None
    num_classes: int | None = None
    adapt_stem: bool = False
    image_size: int = 224
    untuned: bool = False
    budget: str | None = None
    size: str | None = None
    sram: str | None = None
    flash: str | None = None
    trials: int = 20
    sampler: str = "tpe"
    name: str | None = None
    storage: str | None = None
    space: str | None = None
    finetune: bool = True
    finetune_steps: int | None = None
    sensitivity: bool = True
    warm_start: bool = True
    latency_table: bool = False
    trial_schedules: str = "transfer"
    predict: bool = True
    seed: int = 0
    train_subset: int | None = 20000
    val_subset: int | None = None
    baseline_epochs: int = 4
    runs_dir: Path = Path("runs")

    def __post_init__(self) -> None:
        positive = ("trials", "finetune_steps", "train_subset", "val_subset", "baseline_epochs", "image_size")
        for name in positive:
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value <= 0):
                raise AutocompError(f"{name} must be a positive integer, not {value!r}")
        if self.trial_schedules not in TRIAL_SCHEDULES:
            raise AutocompError(f"trial_schedules must be one of {', '.join(TRIAL_SCHEDULES)}, "
                                f"not {self.trial_schedules!r}")
        if not self.finetune and self.finetune_steps:
            raise AutocompError("finetune False (data-free) and finetune_steps contradict each other")
        if self.sampler not in SAMPLERS:
            raise AutocompError(f"unknown sampler {self.sampler!r} (choose from {', '.join(SAMPLERS)})")
