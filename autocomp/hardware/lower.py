"""PyTorch model -> Relax IRModule -> compiled TVM module for a profile's target."""

import copy
import warnings
from pathlib import Path

import torch
from torch import nn

from autocomp.errors import AutocompError
from autocomp.hardware.profiles import HardwareProfile
from autocomp.inventory import export_model


def fold_batchnorm(model: nn.Module) -> nn.Module:
    """An eval-mode copy with each BatchNorm folded into the conv before it.

    TVM does not fold batch norm by default and would run it as its own kernel.
    FX's fuse matches exact layer types, so sparse layers (plain weights holding
    zeros) are first turned back into plain layers. Models that FX cannot trace
    are returned unfolded (still correct, slower).
    """
    from torch.fx.experimental.optimization import fuse

    from autocomp.methods.sparsity import densify

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return fuse(densify(copy.deepcopy(model).eval()), inplace=True)
    except Exception:
        return model.eval()


def to_relax(model: nn.Module, input_shape: tuple[int, ...]):
    """Import the model into a Relax IRModule (weights embedded as constants)."""
    from tvm.relax.frontend.torch import from_exported_program

    program = export_model(fold_batchnorm(model), torch.zeros(*input_shape))
    try:
        return from_exported_program(program)
    except Exception as err:
        raise AutocompError(f"TVM cannot import the model: {type(err).__name__}: "
                            f"{str(err).strip().splitlines()[0] if str(err).strip() else ''}") from None


def compile_model(model: nn.Module, input_shape: tuple[int, ...], profile: HardwareProfile):
    """Compile ``model`` for the profile's target; returns a ``tvm.relax.Executable``."""
    import tvm

    module = to_relax(model, input_shape)
    target = tvm.target.Target(profile.tvm_target)
    return tvm.compile(module, target=target)


def export_library(executable, path: Path) -> Path:
    """Write the compiled module as a shared library loadable by the TVM runtime."""
    executable.export_library(str(path))
    return path
