"""autocomp: hardware-aware automatic compression of PyTorch models.

The public API, in the order a compression runs (the CLI does the same through it):

- intake: ``build_model`` and ``load_data`` from spec strings, ``build_inventory`` of the
  compressible layers;
- methods: a ``CompressionPlan`` of per-layer configs (``PruneConfig``, ``LowRankConfig``,
  ``QuantConfig`` ...) and ``apply_plan``, the one transform verb; ``size_bytes``;
- fine-tuning: ``finetune`` with distillation from the original (``FinetuneConfig``),
  ``train``, ``evaluate``;
- hardware: ``load_profile``, ``measure_latency`` (measured, or estimated and labelled),
  ``export_model`` (deployable artefacts checked against PyTorch);
- search: ``run_search`` of a ``SearchConfig`` (``load_space`` for its spaces), and
  ``export_trial`` of a finished run.

Names load on first use, so ``import autocomp`` stays light: the timing workers import
parts of the package without PyTorch.
"""

from importlib import import_module
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_HOMES = {
    "autocomp.core.errors": ("AutocompError",),
    "autocomp.core.inventory": ("Inventory", "LayerInfo", "build_inventory"),
    "autocomp.intake.models": ("build_model",),
    "autocomp.intake.data": ("DataSplits", "load_data"),
    "autocomp.intake.source": ("ModelSource",),
    "autocomp.methods.registry": ("MethodConfig", "Stage", "register_method"),
    "autocomp.methods.hooks": ("FinetuneHooks", "StoredSize"),
    "autocomp.methods.plan": ("CompressionPlan",),
    "autocomp.methods.apply": ("apply_plan", "count_params", "size_bytes"),
    "autocomp.methods.prune": ("PruneConfig",),
    "autocomp.methods.lowrank": ("LowRankConfig",),
    "autocomp.methods.quant": ("BinaryConfig", "QuantConfig", "TernaryConfig"),
    "autocomp.methods.sparsity": ("SparsityConfig",),
    "autocomp.methods.substitute": ("SubstituteConfig",),
    "autocomp.training.config": ("FinetuneConfig",),
    "autocomp.training.distill": ("finetune",),
    "autocomp.training.train": ("evaluate", "train"),
    "autocomp.hardware.profiles": ("HardwareProfile", "available_profiles", "load_profile"),
    "autocomp.hardware.measure.base": ("Latency", "Measurer"),
    "autocomp.hardware.oracle": ("make_measurer", "measure_latency"),
    "autocomp.search.space.sampling": ("SearchSpace",),
    "autocomp.search.space.loading": ("available_spaces", "load_space"),
    "autocomp.search.config": ("SearchConfig",),
    "autocomp.search.driver": ("SearchOutcome", "run_search"),
    "autocomp.export": ("export_model", "export_trial"),
}
_HOME = {name: module for module, names in _HOMES.items() for name in names}
__all__ = sorted(_HOME)


def __getattr__(name: str) -> Any:
    """Import a public name's module on first use (PEP 562)."""
    if name not in _HOME:
        raise AttributeError(f"module 'autocomp' has no attribute {name!r}")
    value = getattr(import_module(_HOME[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})


if TYPE_CHECKING:
    from autocomp.core.errors import AutocompError
    from autocomp.core.inventory import Inventory, LayerInfo, build_inventory
    from autocomp.export import export_model, export_trial
    from autocomp.hardware.measure.base import Latency, Measurer
    from autocomp.hardware.oracle import make_measurer, measure_latency
    from autocomp.hardware.profiles import HardwareProfile, available_profiles, load_profile
    from autocomp.intake.data import DataSplits, load_data
    from autocomp.intake.models import build_model
    from autocomp.intake.source import ModelSource
    from autocomp.methods.apply import apply_plan, count_params, size_bytes
    from autocomp.methods.hooks import FinetuneHooks, StoredSize
    from autocomp.methods.lowrank import LowRankConfig
    from autocomp.methods.plan import CompressionPlan
    from autocomp.methods.prune import PruneConfig
    from autocomp.methods.quant import BinaryConfig, QuantConfig, TernaryConfig
    from autocomp.methods.registry import MethodConfig, Stage, register_method
    from autocomp.methods.sparsity import SparsityConfig
    from autocomp.methods.substitute import SubstituteConfig
    from autocomp.search.config import SearchConfig
    from autocomp.search.driver import SearchOutcome, run_search
    from autocomp.search.space.loading import available_spaces, load_space
    from autocomp.search.space.sampling import SearchSpace
    from autocomp.training.config import FinetuneConfig
    from autocomp.training.distill import finetune
    from autocomp.training.train import evaluate, train
