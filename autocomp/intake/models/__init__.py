"""Models named by spec strings: built-in demos, torchvision classifiers, or a factory in a file."""

import difflib
import importlib.util
import inspect
from pathlib import Path

import torch
from torch import nn

from autocomp.core.errors import AutocompError
from autocomp.intake.models.demo import DEMO_MODELS

MODEL_SPEC_HELP = ("demo-resnet, demo-mobilenetv2, torchvision:NAME, reference:mobilenet_v1 "
                   "or FILE.py:FACTORY")
# torchvision classifiers whose auxiliary heads only make sense for their own training recipe.
_NO_AUX = {"googlenet", "inception_v3"}


def build_model(spec: str, *, num_classes: int, in_channels: int = 3,
                input_size: int = 224, adapt_stem: bool = False) -> nn.Module:
    """Build the (untrained) model named by ``spec``.

    ``adapt_stem`` rewrites a torchvision model's first conv for ``in_channels``
    and, for inputs of 64 pixels or fewer, removes its early downsampling.
    """
    if spec in DEMO_MODELS:
        return DEMO_MODELS[spec](num_classes=num_classes, in_channels=in_channels)
    if spec.startswith("torchvision:"):
        model = _torchvision_model(spec.removeprefix("torchvision:"), num_classes)
        if adapt_stem:
            _adapt_stem(model, in_channels, small_input=input_size <= 64)
        return model
    if spec.startswith("reference:"):
        from autocomp.intake.models.reference import REFERENCE_MODELS

        name = spec.removeprefix("reference:")
        if name not in REFERENCE_MODELS:
            raise AutocompError(f"unknown reference model {name!r} (known: {', '.join(REFERENCE_MODELS)})")
        return REFERENCE_MODELS[name](num_classes=num_classes, in_channels=in_channels)
    if ":" in spec and spec.rsplit(":", 1)[0].endswith(".py"):
        return _factory_model(spec, num_classes)
    suggestion = difflib.get_close_matches(spec, list(DEMO_MODELS), n=1)
    hint = f" (did you mean {suggestion[0]}?)" if suggestion else ""
    raise AutocompError(f"unknown model {spec!r}{hint}: expected {MODEL_SPEC_HELP}")


def load_weights(model: nn.Module, path: str | Path) -> None:
    """Load a state dict saved with ``torch.save`` (read with ``weights_only=True``)."""
    path = Path(path)
    if not path.is_file():
        raise AutocompError(f"weights file {path} does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise AutocompError(f"cannot read weights {path}: {str(err).splitlines()[0]}") from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise AutocompError(f"weights file {path} does not hold a state dict")
    try:
        model.load_state_dict(state)
    except RuntimeError as err:
        detail = " ".join(line.strip() for line in str(err).splitlines()[1:3])
        raise AutocompError(f"weights {path} do not fit the model: {detail[:300]}") from None


def _torchvision_model(name: str, num_classes: int) -> nn.Module:
    from torchvision import models

    known = models.list_models(module=models)
    if name not in known:
        suggestion = difflib.get_close_matches(name, known, n=1)
        hint = f" (did you mean {suggestion[0]}?)" if suggestion else ""
        raise AutocompError(f"unknown torchvision classifier {name!r}{hint}")
    kwargs: dict = {"weights": None, "num_classes": num_classes}
    if name in _NO_AUX:
        kwargs.update(aux_logits=False, init_weights=True)
    return models.get_model(name, **kwargs)


def _adapt_stem(model: nn.Module, in_channels: int, small_input: bool) -> None:
    """Rewrite the first conv for the data's channels; drop early downsampling for small inputs."""
    names = [name for name, module in model.named_modules() if isinstance(module, nn.Conv2d)]
    if not names:
        raise AutocompError("--adapt-stem: the model has no Conv2d to adapt")
    first_name = names[0]
    first = model.get_submodule(first_name)
    stride = (1, 1) if small_input else first.stride
    stem = nn.Conv2d(in_channels, first.out_channels, first.kernel_size, stride, first.padding,
                     first.dilation, first.groups if first.groups == 1 else in_channels,
                     first.bias is not None)
    model.set_submodule(first_name, stem)
    if small_input:
        # A max-pool between the stem and the second conv (ResNet, GoogLeNet) quarters
        # a 28-64 pixel image before any feature is learnt: remove it.
        second_index = list(dict(model.named_modules())).index(names[1]) if len(names) > 1 else 0
        for index, (name, module) in enumerate(model.named_modules()):
            if isinstance(module, nn.MaxPool2d) and index < second_index:
                model.set_submodule(name, nn.Identity())


def _factory_model(spec: str, num_classes: int) -> nn.Module:
    file_name, factory_name = spec.rsplit(":", 1)
    path = Path(file_name)
    if not path.is_file():
        raise AutocompError(f"model file {path} does not exist")
    module_spec = importlib.util.spec_from_file_location(f"autocomp_user_{path.stem}", path)
    assert module_spec is not None and module_spec.loader is not None
    module = importlib.util.module_from_spec(module_spec)
    try:
        module_spec.loader.exec_module(module)
    except Exception as err:
        raise AutocompError(f"cannot import {path}: {type(err).__name__}: {err}") from None
    factory = getattr(module, factory_name, None)
    if not callable(factory):
        raise AutocompError(f"{path} has no callable {factory_name!r}")
    accepts_classes = "num_classes" in inspect.signature(factory).parameters
    model = factory(num_classes=num_classes) if accepts_classes else factory()
    if not isinstance(model, nn.Module):
        raise AutocompError(f"{spec} returned {type(model).__name__}, not a torch.nn.Module")
    return model
