"""The ``autocomp`` command line: one parser, one handler per subcommand, user errors as one line."""

import argparse
import errno
import os
import signal
import sys

from autocomp.cli.codesign import add_codesign_command
from autocomp.cli.common import Parser
from autocomp.cli.export import add_export_command
from autocomp.cli.hardware import add_hardware_commands
from autocomp.cli.models import add_model_commands
from autocomp.cli.output import console_output
from autocomp.cli.reports import add_report_commands
from autocomp.cli.search import add_search_command
from autocomp.core.errors import AutocompError


def build_parser() -> argparse.ArgumentParser:
    """Every subcommand, each with its handler in ``args.handler``."""
    parser = Parser(prog="autocomp", description="Hardware-aware automatic model compression.")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=Parser)
    add_model_commands(commands)
    add_hardware_commands(commands)
    add_search_command(commands)
    add_report_commands(commands)
    add_codesign_command(commands)
    add_export_command(commands)
    return parser


def _interrupt(signum: int, _frame) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


# What the machine refuses to store (a full disk or quota, a read-only mount): the user's to fix.
_WRITE_ERRORS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS}


def main(argv: list[str] | None = None) -> int:
    """Entry point: run a subcommand; user errors become one line and exit status 2.

    SIGTERM (a job scheduler stopping us) is handled like Ctrl-C: outputs are written
    atomically and finished trials are in the study, so the command can be rerun.
    """
    # OpenMP threads that spin while waiting for work steal the CPU from TVM's timing
    # workers and from each other: on a loaded 2-core machine the sensitivity pre-pass ran
    # 15x slower with spinning (91.8 s) than without (6.6 s). Set before torch loads its
    # OpenMP runtime (the CLI's modules import torch only inside the commands); a value the
    # user sets wins.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        args = build_parser().parse_args(argv)
        with console_output(quiet=getattr(args, "json", False)):
            return args.handler(args) or 0
    except AutocompError as err:
        print(f"autocomp: error: {err}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # output piped into head and the like (an OSError: caught first)
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except OSError as err:
        if err.errno not in _WRITE_ERRORS:
            raise
        # Outputs are written whole or not at all (core/staging.py), so nothing is left half-written.
        where = f" {err.filename}" if err.filename else ""
        print(f"autocomp: error: cannot write{where}: {err.strerror or err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("autocomp: interrupted (finished trials are kept; rerun the same command to resume)",
              file=sys.stderr)
        return 130
    finally:
        signal.signal(signal.SIGTERM, previous)
