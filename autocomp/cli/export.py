"""``autocomp export RUN``: a search trial as deployable artefacts for the run's target."""

import argparse
from pathlib import Path

from autocomp.core.units import format_seconds


def add_export_command(commands: argparse._SubParsersAction) -> None:
    """Register ``export``."""
    export = commands.add_parser("export", help="export a trial as a deployable TVM module")
    export.add_argument("run", help="run name (a folder under --runs-dir)")
    export.add_argument("--trial", default="best", help="trial number or 'best' (default)")
    export.add_argument("--out", type=Path, help="output folder (default RUNS/RUN/export/trial-N)")
    export.add_argument("--force", action="store_true", help="replace an existing output folder")
    export.add_argument("--runs-dir", type=Path, default=Path("runs"))
    export.set_defaults(handler=cmd_export)


def cmd_export(args: argparse.Namespace) -> int:
    from autocomp.export import export_trial
    from autocomp.search.results.trials import choose_trial
    from autocomp.search.settings import load_settings, run_dir
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
