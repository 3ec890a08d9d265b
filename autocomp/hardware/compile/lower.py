"""PyTorch model -> Relax IRModule -> compiled TVM module for a profile's target."""

import copy
import functools
import logging
import warnings
from pathlib import Path

import torch
from torch import nn

from autocomp.core.errors import AutocompError
from autocomp.core.graph import export_model
from autocomp.hardware.profiles import HardwareProfile

logger = logging.getLogger(__name__)


# Why the last ``fold_batchnorm`` left batch norms unfolded (None: it folded them, or there
# were none); ``compile_label`` adds it to the label of the module compiled from it.
_unfolded: str | None = None


def fold_batchnorm(model: nn.Module) -> nn.Module:
    """An eval-mode copy with each BatchNorm folded into the conv before it (``model`` itself is
    left as it was).

    TVM does not fold batch norm by default and would run it as its own kernel.
    FX's fuse matches exact layer types, so sparse layers (plain weights holding
    zeros) are first turned back into plain layers. A model with batch norms that FX
    cannot trace is returned unfolded (still correct, slower): a warning says so, and so
    does ``compile_label`` for what is compiled from it.
    """
    global _unfolded
    from torch.fx.experimental.optimization import fuse

    from autocomp.methods.sparsity import densify

    _unfolded = None
    copied = densify(copy.deepcopy(model).eval())
    if not any(isinstance(module, nn.modules.batchnorm._BatchNorm) for module in copied.modules()):
        return copied
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return fuse(copied, inplace=True)  # tracing fails before anything is changed
    except Exception as err:
        first = (str(err).strip().splitlines() or [""])[0][:160]
        _unfolded = f"batch norm left unfolded: FX cannot trace the model ({type(err).__name__}: {first})"
        logger.warning("%s; its latency includes separate batch-norm kernels", _unfolded)
        return copied


def compile_label(profile: HardwareProfile, untuned: bool = False) -> str:
    """Which schedules the last compile for ``profile`` used (``tune.schedules_label``), and what
    its lowering could not do (batch norm left unfolded), for provenance strings."""
    from autocomp.hardware.compile.tune import schedules_label

    return schedules_label(profile, untuned) + (f", {_unfolded}" if _unfolded else "")


@functools.cache
def _decompositions():
    return torch.export.default_decompositions()


def to_relax(model: nn.Module, input_shape: tuple[int, ...]):
    """Import the model into a Relax IRModule (weights embedded as constants).

    Quantized layers with integer activations become uint8 x int8 -> int32 convs and
    matmuls with requantization (``autocomp.hardware.compile.int8``); batch norms are folded.
    """
    from tvm.relax.frontend.torch import from_exported_program

    from autocomp.hardware.compile.int8 import CONVERT_MAP, integer_model

    program = export_model(fold_batchnorm(integer_model(model).module), torch.zeros(*input_shape))
    try:
        # The importer's own decomposition rebuilds PyTorch's default table on every call
        # (0.4 s); the same table, built once, gives the same graph.
        program = program.run_decompositions(_decompositions())
        return from_exported_program(program, custom_convert_map=CONVERT_MAP, run_ep_decomposition=False)
    except Exception as err:
        raise AutocompError(f"TVM cannot import the model: {type(err).__name__}: "
                            f"{str(err).strip().splitlines()[0] if str(err).strip() else ''}") from None


def compile_model(model: nn.Module, input_shape: tuple[int, ...], profile: HardwareProfile, *,
                  untuned: bool = False, new_workloads: str = "tune"):
    """Compile ``model`` for the profile's target; returns a ``tvm.relax.Executable``.

    Kernels are MetaSchedule-tuned through the target's persistent database
    (``autocomp.hardware.compile.tune``), tuning only workloads it lacks. ``untuned`` (or the
    profile's ``latency.tuning: untuned``) keeps plain ``tvm.compile``; callers label
    the result with ``compile_label``. ``new_workloads="transfer"`` replays tuned
    neighbours' schedules on workloads the database lacks instead of tuning them now.
    """
    from autocomp.hardware.compile.tune import compile_tuned

    return compile_tuned(to_relax(model, input_shape), profile, untuned=untuned, new_workloads=new_workloads)


def export_library(executable, path: Path) -> Path:
    """Write the compiled module as a shared library loadable by the TVM runtime."""
    executable.export_library(str(path))
    return path
