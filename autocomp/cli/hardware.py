"""The hardware commands of the ``autocomp`` CLI: ``targets``, ``latency``, ``profile``, ``calibrate``."""

import argparse
import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from autocomp.cli.common import add_model_args, input_shape, model_source
from autocomp.core.errors import AutocompError
from autocomp.core.units import format_bytes, format_count, format_memory, format_seconds
from autocomp.hardware.profiles import HardwareProfile

if TYPE_CHECKING:
    from torch import nn


def add_hardware_commands(commands: argparse._SubParsersAction) -> None:
    """Register the hardware subcommands on the CLI's subparsers."""
    targets = commands.add_parser("targets", help="list hardware profiles and how each gets latency")
    targets.add_argument("--json", action="store_true", help="print JSON")
    targets.set_defaults(handler=cmd_targets)

    calibrate = commands.add_parser(
        "calibrate", help="fit a target's cost model to a reachable device or to published figures")
    calibrate.add_argument("--target", required=True, help="hardware profile (autocomp targets)")
    calibrate.add_argument("--anchors", nargs="?", const="", default=None, metavar="FILE",
                           help="fit published figures instead of measuring (default file: "
                                "hw_profiles/anchors/TARGET.yaml)")
    calibrate.add_argument("--out", type=Path, help="profile YAML to write (default: the user copy "
                                                    "in the cache, which autocomp then uses)")
    calibrate.add_argument("--untuned", action="store_true",
                           help="measure with TVM's default schedules (a device calibration only)")
    calibrate.add_argument("--json", action="store_true", help="print one JSON object")
    calibrate.set_defaults(handler=cmd_calibrate)

    profile = commands.add_parser("profile", help="per-layer latency breakdown on a target")
    _add_model_and_target_args(profile)
    profile.add_argument("--json", action="store_true", help="print one JSON object")
    profile.set_defaults(handler=cmd_profile)

    latency = commands.add_parser("latency", help="a model's (or a compressed model's) latency on a target")
    _add_model_and_target_args(latency)
    latency.add_argument("--json", action="store_true", help="print one JSON object")
    latency.set_defaults(handler=cmd_latency)


def _add_model_and_target_args(parser: argparse.ArgumentParser) -> None:
    add_model_args(parser, model_required=True)
    parser.add_argument("--input-shape", help="e.g. 1,3,224,224 (default: the data's shape with "
                                              "--data, else 1,1,28,28 for demo models)")
    parser.add_argument("--plan", type=Path, help="compression plan (JSON) to apply first")
    parser.add_argument("--data", help="images to calibrate the plan's methods on (quantization, "
                                       "substitution need them)")
    parser.add_argument("--target", default="host", help="hardware profile (autocomp targets)")
    parser.add_argument("--untuned", action="store_true",
                        help="compile with TVM's default schedules instead of tuned kernels "
                             "(fast, but far slower kernels; labelled 'untuned')")


@dataclass
class TargetModel:
    """A model prepared for a target, with what the user should know about how it was built."""

    model: "nn.Module"
    input_shape: tuple[int, ...]
    profile: HardwareProfile
    plan_summary: str


def prepare(args: argparse.Namespace) -> TargetModel:
    """Build the named model, apply ``--plan``, and load the target profile (``--untuned`` applied)."""
    from autocomp.hardware.profiles import load_target

    profile = load_target(args.target, untuned=args.untuned)
    data = None
    if args.data:
        from autocomp.intake.data import load_data

        data = load_data(args.data)
    shape = input_shape(args, data)
    model = model_source(args, shape, data).build()
    summary = "none"
    if args.plan:
        from autocomp.core.inventory import build_inventory
        from autocomp.intake.data import calibration_loader
        from autocomp.methods.apply import apply_plan
        from autocomp.methods.plan import CompressionPlan

        plan = CompressionPlan.load(args.plan)
        calib = calibration_loader(data.train) if data is not None else None
        model = apply_plan(model, plan, build_inventory(model, shape),
                           channel_multiple=profile.channel_multiple, calib=calib)
        summary = plan.describe()
    return TargetModel(model.eval(), shape, profile, summary)


def cmd_targets(args: argparse.Namespace) -> int:
    from autocomp.hardware.oracle import latency_here
    from autocomp.hardware.profiles import available_profiles, load_profile

    profiles = [load_profile(name) for name in available_profiles()]
    here = {p.name: latency_here(p) for p in profiles}  # what a search would do on this machine
    if args.json:
        print(json.dumps([{"name": p.name, "description": p.description, "source": str(p.source),
                           "latency": "measured" if here[p.name][0] else "estimated",
                           "how": here[p.name][1], "tvm_target": p.tvm_target,
                           "export": p.export.format, "dtypes": list(p.dtypes),
                           "memory": {"ram": p.memory.ram_bytes, "sram": p.memory.sram_bytes,
                                      "flash": p.memory.flash_bytes}} for p in profiles], indent=2))
        return 0
    for p in profiles:
        measured, how = here[p.name]
        print(f"{p.name:<10} {'measured' if measured else 'estimated':<9} {how}")
        limits = ", ".join(f"{key} {format_memory(value)}" for key, value in
                           (("RAM", p.memory.ram_bytes), ("SRAM", p.memory.sram_bytes),
                            ("flash", p.memory.flash_bytes)) if value)
        print(f"{'':<10} {p.description}")
        print(f"{'':<10} export {p.export.format}"
              f"{' via ' + p.export.cross_compiler if p.export.cross_compiler else ''}; "
              f"dtypes {', '.join(p.dtypes)}{'; ' + limits if limits else ''}")
        print(f"{'':<10} profile {p.source}")
    return 0


def cmd_latency(args: argparse.Namespace) -> int:
    import torch

    from autocomp.core.inventory import build_inventory
    from autocomp.hardware.mcu.memory import device_memory
    from autocomp.hardware.oracle import measure_latency
    from autocomp.methods.apply import count_params, size_bytes

    target = prepare(args)
    latency = measure_latency(target.model, torch.zeros(target.input_shape), target.profile)
    figures = {
        "model": args.model, "plan": target.plan_summary, "target": target.profile.name,
        "input_shape": list(target.input_shape), "latency": latency.to_json(),
        "params": count_params(target.model),
        "macs": build_inventory(target.model, target.input_shape, coupling=False).macs,
        "size_bytes": size_bytes(target.model),
    }
    memory = device_memory(target.model, target.input_shape, target.profile)
    if memory is not None:
        figures["memory"] = memory.as_dict()
        figures["over_memory"] = memory.exceeds(target.profile.memory)
    if args.json:
        print(json.dumps(figures, indent=2))
        return 0
    shape = "x".join(map(str, target.input_shape))
    print(f"{args.model} ({shape}) on {target.profile.name}, plan: {target.plan_summary}")
    print(f"latency   {format_seconds(latency.median_s)} (p10 {format_seconds(latency.p10_s)}, "
          f"p90 {format_seconds(latency.p90_s)}): {latency.provenance}")
    print(f"model     {format_count(figures['params'])} params, {format_count(figures['macs'])} MACs, "
          f"{format_bytes(figures['size_bytes'])} of weights as stored")
    if memory is not None:
        limits = target.profile.memory
        print(f"memory    peak SRAM {format_memory(memory.sram_bytes)} of "
              f"{format_memory(limits.sram_bytes)}, flash {format_memory(memory.flash_bytes)} of "
              f"{format_memory(limits.flash_bytes)} "
              f"({'; '.join(memory.notes)})")
        print(f"          {'does not fit: ' + figures['over_memory'] if figures['over_memory'] else 'fits'}")
    return 0


def cmd_calibrate(args: argparse.Namespace) -> int:
    from autocomp.hardware.costmodel.fit import anchors_dir, calibrate
    from autocomp.hardware.profiles import load_target

    profile = load_target(args.target, untuned=args.untuned)
    against: str | Path = "device"
    if args.anchors is not None:
        against = Path(args.anchors) if args.anchors else anchors_dir() / f"{profile.name}.yaml"
        if not Path(against).is_file():
            raise AutocompError(f"no published figures for {profile.name} at {against}")
    elif not profile.measured:
        raise AutocompError(f"target {profile.name} has no reachable device to measure: fit it to "
                            f"published figures with --anchors")
    result = calibrate(profile, against, out=args.out)
    print(json.dumps(result.to_json(), indent=2) if args.json else result.report())
    return 0


def cmd_profile(args: argparse.Namespace) -> int:
    from autocomp.hardware.costmodel.breakdown import profile_model
    from autocomp.hardware.costmodel.estimate import estimate

    target = prepare(args)
    lat = target.profile.latency
    if not (lat.method == "local" and lat.device == "cpu"):
        # Kernels are timed in place only on this machine's CPU; elsewhere the cost model's
        # per-op figures are the breakdown (each line says it is estimated).
        result = estimate(target.model, target.input_shape, target.profile)
        print(json.dumps(result.to_json(), indent=2) if args.json else result.table())
        return 0
    breakdown = profile_model(target.model, target.input_shape, target.profile)
    if args.json:
        print(json.dumps(breakdown.to_json(), indent=2))
        return 0
    print(breakdown.table())
    print("\nper layer:")
    for layer, seconds, share in breakdown.by_layer():
        print(f"  {layer or '(outside layers)':<40} {format_seconds(seconds):>10} {share:>6.1%}")
    return 0
