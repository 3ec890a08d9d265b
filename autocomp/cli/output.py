"""How the CLI shows what the library logs: information on stdout as it comes, warnings on
stderr prefixed ``autocomp: warning:``, and progress bars only when stderr is a terminal (in
a log file each phase and each trial is one line instead of a bar's redraws)."""

import logging
import sys
from collections.abc import Iterator
from contextlib import contextmanager

from tqdm import tqdm

from autocomp.core.progress import bars_shown, show_bars


class ConsoleHandler(logging.Handler):
    """Writes each record as one line to the current ``sys.stdout`` (information) or
    ``sys.stderr`` (warnings and errors), above any progress bar on the terminal."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            message = self.format(record)
            if record.levelno >= logging.WARNING:
                stream, message = sys.stderr, f"autocomp: {record.levelname.lower()}: {message}"
            else:
                stream = sys.stdout
            if bars_shown():
                tqdm.write(message, file=stream)
            else:
                stream.write(message + "\n")
                stream.flush()
        except Exception:
            self.handleError(record)


@contextmanager
def console_output(*, quiet: bool = False) -> Iterator[None]:
    """Show autocomp's log records on the console while a command runs; ``quiet`` (for
    ``--json``) keeps stdout for the command's own output and shows warnings only. The
    logging set-up is restored afterwards, so ``main`` can run many times in one process."""
    logger = logging.getLogger("autocomp")
    handler = ConsoleHandler()
    saved = (logger.level, logger.propagate, bars_shown())
    logger.addHandler(handler)
    logger.setLevel(logging.WARNING if quiet else logging.INFO)
    logger.propagate = False
    show_bars(sys.stderr.isatty())
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(saved[0])
        logger.propagate = saved[1]
        show_bars(saved[2])


def silence_optuna() -> None:
    """Keep Optuna's own log lines off the console: the search reports each failed trial with
    its reason, which Optuna would repeat as a traceback."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.ERROR)
    logging.getLogger("optuna").setLevel(logging.CRITICAL)
