"""The ``autocomp`` command line."""

import argparse
import json
import signal
import sys
from pathlib import Path

from autocomp.cli_codesign import add_codesign_command, cmd_codesign
from autocomp.cli_hardware import (
    add_hardware_commands,
    cmd_calibrate,
    cmd_latency,
    cmd_profile,
    cmd_targets,
)
from autocomp.cli_reports import add_report_commands, cmd_pareto, cmd_report
from autocomp.cli_search import add_search_command, cmd_search
from autocomp.errors import AutocompError
from autocomp.units import format_bytes, format_count, format_seconds


class _Parser(argparse.ArgumentParser):
    """argparse with usage errors as one line and exit status 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise AutocompError(f"{message} (see {self.prog} --help)")


def _add_model_args(parser: argparse.ArgumentParser, *, model_required: bool) -> None:
    from autocomp.models import MODEL_SPEC_HELP

    parser.add_argument("--model", required=model_required, help=MODEL_SPEC_HELP)
    parser.add_argument("--weights", help="state dict to load (torch.load, weights_only=True)")
    parser.add_argument("--num-classes", type=int,
                        help="classifier outputs (default: the dataset's class count)")
    parser.add_argument("--adapt-stem", action="store_true",
                        help="fit a torchvision model's first conv to the data's channels and, "
                             "for inputs <= 64 px, drop its early downsampling")


def _add_data_args(parser: argparse.ArgumentParser, *, required: bool) -> None:
    from autocomp.data import DATA_SPEC_HELP

    parser.add_argument("--data", required=required, help=DATA_SPEC_HELP)
    parser.add_argument("--image-size", type=int, default=224,
                        help="side of the square images imagefolder data is resized to")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="autocomp", description="Hardware-aware automatic model compression.")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    train = commands.add_parser("train", help="train a baseline model")
    _add_model_args(train, model_required=True)
    _add_data_args(train, required=True)
    train.add_argument("--epochs", type=int, default=3)
    train.add_argument("--lr", type=float, default=2e-3)
    train.add_argument("--batch-size", type=int, default=128)
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--out", required=True, type=Path, help="where to save the state dict")

    inspect = commands.add_parser("inspect", help="per-layer inventory: shapes, params, MACs")
    _add_model_args(inspect, model_required=True)
    inspect.add_argument("--input-shape", required=True, help="e.g. 1,3,224,224")
    inspect.add_argument("--json", action="store_true", help="print one JSON object")

    add_hardware_commands(commands, _add_model_args)

    add_search_command(commands, _add_model_args, _add_data_args)
    add_report_commands(commands)
    add_codesign_command(commands)

    compress = commands.add_parser("compress", help="apply a plan (JSON) to a model and fine-tune it")
    _add_model_args(compress, model_required=True)
    _add_data_args(compress, required=True)
    compress.add_argument("--plan", required=True, type=Path, help="compression plan (JSON)")
    compress.add_argument("--out", required=True, type=Path, help="output folder")
    compress.add_argument("--space", default="default",
                          help="search space whose 'finetune' section sets the losses and schedule")
    compress.add_argument("--finetune-steps", type=int,
                          help="override the fine-tuning steps (0: no fine-tuning)")
    compress.add_argument("--calib-images", type=int,
                          help="training images used for calibration and initialisation (default 512)")
    compress.add_argument("--channel-multiple", type=int, default=1,
                          help="round kept channel counts to this multiple")
    compress.add_argument("--seed", type=int, default=0)
    compress.add_argument("--force", action="store_true", help="replace an existing output folder")

    export = commands.add_parser("export", help="export a trial as a deployable TVM module")
    export.add_argument("run", help="run name (a folder under --runs-dir)")
    export.add_argument("--trial", default="best", help="trial number or 'best' (default)")
    export.add_argument("--out", type=Path, help="output folder (default RUNS/RUN/export/trial-N)")
    export.add_argument("--force", action="store_true", help="replace an existing output folder")
    export.add_argument("--runs-dir", type=Path, default=Path("runs"))
    return parser


def _interrupt(signum: int, _frame) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    """Entry point: run a subcommand; user errors become one line and exit status 2.

    SIGTERM (a job scheduler stopping us) is handled like Ctrl-C: outputs are written
    atomically and finished trials are in the study, so the command can be rerun.
    """
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        args = build_parser().parse_args(argv)
        handler = {"train": cmd_train, "inspect": cmd_inspect, "targets": cmd_targets,
                   "latency": cmd_latency, "calibrate": cmd_calibrate, "profile": cmd_profile,
                   "search": lambda a: cmd_search(a, _model_source, _setup_torch),
                   "pareto": cmd_pareto, "report": cmd_report, "codesign": cmd_codesign,
                   "compress": cmd_compress, "export": cmd_export}[args.command]
        return handler(args) or 0
    except AutocompError as err:
        print(f"autocomp: error: {err}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # output piped into head and the like
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except KeyboardInterrupt:
        print("autocomp: interrupted (finished trials are kept; rerun the same command to resume)",
              file=sys.stderr)
        return 130
    finally:
        signal.signal(signal.SIGTERM, previous)


def _positive(value: int | None, option: str) -> None:
    if value is not None and value <= 0:
        raise AutocompError(f"{option} must be positive, not {value}")


def _model_source(args: argparse.Namespace, spec: str, data):
    """The model named on the command line, shaped for ``data``, weights path made absolute."""
    from autocomp.baseline import ModelSource

    weights = str(Path(args.weights).resolve()) if args.weights else None
    return ModelSource(spec, args.num_classes or data.num_classes, data.sample_shape[0],
                       data.sample_shape[-1], args.adapt_stem, weights)


def _setup_torch() -> None:
    import os

    import torch

    torch.set_num_threads(os.cpu_count() or 1)


def cmd_train(args: argparse.Namespace) -> int:
    import torch

    from autocomp.data import load_data
    from autocomp.train import evaluate, train

    _positive(args.epochs, "--epochs")
    _setup_torch()
    data = load_data(args.data, image_size=args.image_size)
    model = _model_source(args, args.model, data).build()
    if args.out.is_dir():
        raise AutocompError(f"--out {args.out} is a folder; give a file path such as model.pt")
    print(f"training {args.model} on {args.data}: {len(data.train)} train / {len(data.val)} val "
          f"/ {len(data.test)} test images, {args.epochs} epochs")
    train(model, data.train, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
          seed=args.seed)
    val, test = evaluate(model, data.val), evaluate(model, data.test)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), args.out)
    print(f"val accuracy {val:.2%}, test accuracy {test:.2%}; saved {args.out}")
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    from autocomp.baseline import ModelSource
    from autocomp.inventory import build_inventory
    from autocomp.units import parse_shape

    shape = parse_shape(args.input_shape)
    default_classes = 10 if args.model.startswith("demo-") else 1000
    source = ModelSource(args.model, args.num_classes or default_classes, shape[1], shape[-1],
                         args.adapt_stem, args.weights)
    inventory = build_inventory(source.build(), shape)
    if args.json:
        print(json.dumps(inventory.to_json(), indent=2))
        return 0
    rows = [("layer", "kind", "input", "output", "params", "MACs", "act bytes", "prune group")]
    for layer in inventory.layers:
        group = "output" if layer.is_output else (layer.prune_group or "-")
        rows.append((layer.name, layer.kind, "x".join(map(str, layer.in_shape)),
                     "x".join(map(str, layer.out_shape)), format_count(layer.params),
                     format_count(layer.macs), format_bytes(layer.act_bytes), group))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)))
    print(f"\ntotal: {inventory.params:,} params ({format_count(inventory.params)}), "
          f"{inventory.macs:,} MACs ({format_count(inventory.macs)}) in conv/linear layers, "
          f"{format_bytes(inventory.act_bytes)} of layer outputs, {len(inventory.layers)} layers")
    for note in inventory.notes:
        print(f"note: {note}")
    return 0


def cmd_compress(args: argparse.Namespace) -> int:
    from dataclasses import asdict, replace

    import torch

    from autocomp.compress import apply_plan, count_params, size_bytes
    from autocomp.data import calibration_loader, load_data
    from autocomp.distill import finetune
    from autocomp.inventory import build_inventory
    from autocomp.plan import CompressionPlan
    from autocomp.search.space import load_space
    from autocomp.staging import refuse_existing, staged_folder
    from autocomp.train import evaluate

    for value, option in ((args.calib_images, "--calib-images"),
                          (args.channel_multiple, "--channel-multiple")):
        _positive(value, option)
    if args.finetune_steps is not None and args.finetune_steps < 0:
        raise AutocompError(f"--finetune-steps must be 0 or more, not {args.finetune_steps}")
    refuse_existing(args.out, args.force)
    ft = load_space(args.space).finetune
    if args.finetune_steps is not None:
        ft = replace(ft, steps=args.finetune_steps)
    plan = CompressionPlan.load(args.plan)
    _setup_torch()
    data = load_data(args.data, image_size=args.image_size)
    source = _model_source(args, args.model, data)
    model = source.build()
    shape = (1, *data.sample_shape)
    inventory = build_inventory(model, shape)
    calib = calibration_loader(data.train, args.calib_images, args.seed)
    compressed = apply_plan(model, plan, inventory, channel_multiple=args.channel_multiple,
                            calib=calib)
    rows = {"before": (model, evaluate(model, data.val)),
            "compressed": (compressed, evaluate(compressed, data.val))}
    if ft.steps:
        print(f"fine-tuning {ft.steps} steps with distillation from the original ...")
        torch.manual_seed(args.seed)
        finetune(compressed, model, data.train, ft, seed=args.seed)
        rows["fine-tuned"] = (compressed, evaluate(compressed, data.val))
    report = {}
    print(f"{'':<11} {'params':>9} {'MACs':>9} {'size':>9} {'val acc':>8}")
    for label, (net, accuracy) in rows.items():
        figures = {"params": count_params(net), "macs": build_inventory(net, shape, coupling=False).macs,
                   "size_bytes": size_bytes(net), "val_acc": accuracy}
        report[label] = figures
        print(f"{label:<11} {format_count(figures['params']):>9} {format_count(figures['macs']):>9} "
              f"{format_bytes(figures['size_bytes']):>9} {accuracy:>8.2%}")
    with staged_folder(args.out, force=args.force) as staging:
        plan.save(staging / "plan.json")
        torch.save(compressed.state_dict(), staging / "model.pt")
        (staging / "compress.json").write_text(json.dumps(
            {"model": source.spec, "weights": source.weights, "data": args.data,
             "plan_summary": plan.describe(), "finetune": asdict(ft), "figures": report}, indent=2) + "\n")
    print(f"wrote {args.out}/plan.json, model.pt and compress.json")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from autocomp.export import choose_trial, export_trial
    from autocomp.search.run import load_settings, run_dir
    from autocomp.search.study import open_study

    folder = run_dir(args.runs_dir, args.run)
    settings = load_settings(folder)
    number = choose_trial(open_study(folder, settings), args.trial)
    out = args.out or folder / "export" / f"trial-{number}"
    record = export_trial(folder, settings, number, out, force=args.force)
    latency = record["latency"]
    print(f"exported trial {number} of {args.run} to {out}: val {record['val_acc']:.2%}, "
          f"latency {format_seconds(latency['median_s'])} {latency['provenance']}")
    return 0
