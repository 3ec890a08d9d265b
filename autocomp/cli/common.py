"""What several commands share: the argparse parser class, the model and data options, and torch set-up."""

import argparse

from autocomp.core.errors import AutocompError


class Parser(argparse.ArgumentParser):
    """argparse with usage errors as one line and exit status 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise AutocompError(f"{message} (see {self.prog} --help)")


def add_model_args(parser: argparse.ArgumentParser, *, model_required: bool) -> None:
    from autocomp.intake.models import MODEL_SPEC_HELP

    parser.add_argument("--model", required=model_required, help=MODEL_SPEC_HELP)
    parser.add_argument("--weights", help="state dict to load (torch.load, weights_only=True)")
    parser.add_argument("--num-classes", type=int,
                        help="classifier outputs (default: the dataset's class count)")
    parser.add_argument("--adapt-stem", action="store_true",
                        help="fit a torchvision model's first conv to the data's channels and, "
                             "for inputs <= 64 px, drop its early downsampling")


def add_data_args(parser: argparse.ArgumentParser, *, required: bool) -> None:
    from autocomp.intake.data import DATA_SPEC_HELP

    parser.add_argument("--data", required=required, help=DATA_SPEC_HELP)
    parser.add_argument("--image-size", type=int, default=224,
                        help="side of the square images imagefolder data is resized to")


def positive(value: int | None, option: str) -> None:
    if value is not None and value <= 0:
        raise AutocompError(f"{option} must be positive, not {value}")


DEMO_INPUT_SHAPE = (1, 1, 28, 28)  # the demo models' inputs: Fashion-MNIST images


def input_shape(args: argparse.Namespace, data=None) -> tuple[int, ...]:
    """``--input-shape``, else the data's shape (with ``data``), else the demo models' shape;
    a one-line error for another model without either."""
    from autocomp.core.units import parse_shape

    if args.input_shape:
        return parse_shape(args.input_shape)
    if data is not None:
        return (1, *data.sample_shape)
    if args.model.startswith("demo-"):
        return DEMO_INPUT_SHAPE
    also = " or --data" if hasattr(args, "data") else ""
    raise AutocompError(f"give --input-shape (e.g. 1,3,224,224){also} for this model")


def model_source(args: argparse.Namespace, input_shape: tuple[int, ...], data=None):
    """The model ``--model`` names, for inputs of ``input_shape``: ``--num-classes`` outputs, else
    the data's classes, else 10 for the demo models and 1000 (ImageNet) for the others."""
    from autocomp.intake.source import ModelSource

    classes = args.num_classes or (data.num_classes if data is not None
                                   else 10 if args.model.startswith("demo-") else 1000)
    return ModelSource.named(args.model, input_shape, classes, adapt_stem=args.adapt_stem,
                             weights=args.weights)


def setup_torch() -> None:
    import os

    import torch

    torch.set_num_threads(os.cpu_count() or 1)
