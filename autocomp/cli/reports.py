"""``autocomp pareto RUN [--json]`` and ``autocomp report RUN``: a finished or running
search's front and its report."""

import argparse
import json
from pathlib import Path


def add_report_commands(commands: argparse._SubParsersAction) -> None:
    """Add the ``pareto`` and ``report`` subcommands."""
    pareto = commands.add_parser("pareto", help="print a run's Pareto front (table or --json)")
    pareto.add_argument("run", help="run name (a folder under --runs-dir)")
    pareto.add_argument("--json", action="store_true",
                        help="print one JSON object: every figure with its provenance")
    pareto.add_argument("--runs-dir", type=Path, default=Path("runs"))
    pareto.set_defaults(handler=cmd_pareto)

    report = commands.add_parser("report", help="write a run's report (report.md, report.html)")
    report.add_argument("run", help="run name (a folder under --runs-dir)")
    report.add_argument("--runs-dir", type=Path, default=Path("runs"))
    report.set_defaults(handler=cmd_report)


def cmd_pareto(args: argparse.Namespace) -> int:
    from autocomp.search.results.report import front_json, front_table, load_run
    from autocomp.search.settings import run_dir

    view = load_run(run_dir(args.runs_dir, args.run))
    print(json.dumps(front_json(view), indent=2) if args.json else front_table(view))
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from autocomp.search.results.report import write_report
    from autocomp.search.settings import run_dir

    markdown, page = write_report(run_dir(args.runs_dir, args.run))
    print(f"wrote {markdown}")
    print(f"wrote {page}")
    return 0
