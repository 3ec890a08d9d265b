"""Commands on one model: ``train`` a baseline, ``inspect`` its layers, ``compress`` it by a plan."""

import argparse
import json
from pathlib import Path

from autocomp.cli.common import (
    add_data_args,
    add_model_args,
    input_shape,
    model_source,
    positive,
    setup_torch,
)
from autocomp.core.errors import AutocompError
from autocomp.core.staging import replacing
from autocomp.core.units import format_bytes, format_count


def add_model_commands(commands: argparse._SubParsersAction) -> None:
    """Register ``train``, ``inspect`` and ``compress``."""
    train = commands.add_parser("train", help="train a baseline model")
    add_model_args(train, model_required=True)
    add_data_args(train, required=True)
    train.add_argument("--epochs", type=int, default=3)
    train.add_argument("--lr", type=float, default=2e-3)
    train.add_argument("--batch-size", type=int, default=128)
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--out", required=True, type=Path, help="where to save the state dict")
    train.set_defaults(handler=cmd_train)

    inspect = commands.add_parser("inspect", help="per-layer inventory: shapes, params, MACs")
    add_model_args(inspect, model_required=True)
    inspect.add_argument("--input-shape", help="e.g. 1,3,224,224 (default for demo models: 1,1,28,28)")
    inspect.add_argument("--json", action="store_true", help="print one JSON object")
    inspect.set_defaults(handler=cmd_inspect)

    compress = commands.add_parser("compress", help="apply a plan (JSON) to a model and fine-tune it")
    add_model_args(compress, model_required=True)
    add_data_args(compress, required=True)
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
    compress.set_defaults(handler=cmd_compress)


def cmd_train(args: argparse.Namespace) -> int:
    import torch

    from autocomp.intake.data import load_data
    from autocomp.training.train import evaluate, train

    positive(args.epochs, "--epochs")
    setup_torch()
    data = load_data(args.data, image_size=args.image_size)
    model = model_source(args, (1, *data.sample_shape), data).build()
    if args.out.is_dir():
        raise AutocompError(f"--out {args.out} is a folder; give a file path such as model.pt")
    print(f"training {args.model} on {args.data}: {len(data.train)} train / {len(data.val)} val "
          f"/ {len(data.test)} test images, {args.epochs} epochs")
    train(model, data.train, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
          seed=args.seed)
    val, test = evaluate(model, data.val), evaluate(model, data.test)
    with replacing(args.out) as temporary:
        torch.save(model.state_dict(), temporary)
    print(f"val accuracy {val:.2%}, test accuracy {test:.2%}; saved {args.out}")
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    from autocomp.core.inventory import build_inventory

    shape = input_shape(args)
    inventory = build_inventory(model_source(args, shape).build(), shape)
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

    from autocomp.core.inventory import build_inventory
    from autocomp.core.staging import refuse_existing, staged_folder, write_json
    from autocomp.intake.data import calibration_loader, load_data
    from autocomp.methods.apply import apply_plan, count_params, size_bytes
    from autocomp.methods.plan import CompressionPlan
    from autocomp.search.space.loading import load_space
    from autocomp.training.distill import finetune
    from autocomp.training.train import evaluate

    for value, option in ((args.calib_images, "--calib-images"),
                          (args.channel_multiple, "--channel-multiple")):
        positive(value, option)
    if args.finetune_steps is not None and args.finetune_steps < 0:
        raise AutocompError(f"--finetune-steps must be 0 or more, not {args.finetune_steps}")
    refuse_existing(args.out, args.force)
    ft = load_space(args.space).finetune
    if args.finetune_steps is not None:
        ft = replace(ft, steps=args.finetune_steps)
    plan = CompressionPlan.load(args.plan)
    setup_torch()
    data = load_data(args.data, image_size=args.image_size)
    source = model_source(args, (1, *data.sample_shape), data)
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
        write_json(staging / "compress.json",
                   {"model": source.spec, "weights": source.weights, "data": args.data,
                    "plan_summary": plan.describe(), "finetune": asdict(ft), "figures": report})
    print(f"wrote {args.out}/plan.json, model.pt and compress.json")
    return 0
