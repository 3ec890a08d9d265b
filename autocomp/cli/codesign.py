"""``autocomp codesign``: a search run's front re-evaluated over device variants of a target."""

import argparse
from pathlib import Path


def add_codesign_command(commands: argparse._SubParsersAction) -> None:
    """Register ``codesign`` on the CLI's subparsers."""
    codesign = commands.add_parser(
        "codesign", help="which device variants (clock, cores, SRAM, flash) run a run's front within budget")
    codesign.add_argument("run", help="run name (a folder under --runs-dir)")
    codesign.add_argument("--target", required=True,
                          help="hardware profile whose variants are swept (may differ from the run's)")
    codesign.add_argument("--sweep", action="extend", nargs="+", default=[], metavar="KEY=V1,V2,...",
                          help="device variants: clock=1.2GHz,1.8GHz,cores=1,2,4,sram=256KB,512KB "
                               "(keys clock, cores, sram, flash; repeatable)")
    codesign.add_argument("--budget", help="latency limit: 20ms, or 60%% of the uncompressed model on each "
                                           "variant (default: the run's budget)")
    codesign.add_argument("--runs-dir", type=Path, default=Path("runs"))
    codesign.set_defaults(handler=cmd_codesign)


def cmd_codesign(args: argparse.Namespace) -> int:
    from autocomp.core.units import parse_budget
    from autocomp.intake.data import load_data
    from autocomp.search.results.codesign import codesign, parse_sweep
    from autocomp.search.settings import load_settings, run_dir

    sweep = parse_sweep(args.sweep)
    if args.budget:
        parse_budget(args.budget)  # a bad budget fails before any model is loaded
    folder = run_dir(args.runs_dir, args.run)
    settings = load_settings(folder)
    data = load_data(settings.data, image_size=settings.model.input_size)
    result = codesign(folder, args.target, sweep, budget=args.budget, data=data)
    print(result.table())
    print("wrote " + " and ".join(str(path) for path in result.paths))
    return 0
