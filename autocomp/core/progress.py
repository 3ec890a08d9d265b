"""Progress of long phases (training, tuning, the search), shown the way the front end wants.

Library code opens a ``Progress`` per phase and advances it; it never decides how that is
shown. By default (a script, a notebook, a log file) nothing is drawn and the phase ends
with one log line saying how many steps it took and how long; the CLI, when stderr is a
terminal, calls ``show_bars(True)`` and the same phases draw tqdm bars instead.
"""

import logging
import sys
import time
from types import TracebackType

from tqdm import tqdm

logger = logging.getLogger(__name__)
_bars = False


def show_bars(enabled: bool) -> None:
    """Draw progress bars on stderr (the CLI on a terminal) or not (log lines only)."""
    global _bars
    _bars = enabled


def bars_shown() -> bool:
    return _bars


class Progress:
    """One phase of ``total`` steps (None when unknown), counted in ``unit``.

    ``status`` is a short text shown beside the bar (and in the closing log line);
    ``log_end`` False leaves the closing line to the caller, which logs its own summary;
    ``quiet`` shows nothing at all.
    """

    def __init__(self, desc: str, *, total: int | None = None, unit: str = "step", initial: int = 0,
                 log_end: bool = True, quiet: bool = False) -> None:
        self.desc, self.unit, self.log_end = desc, unit, log_end and not quiet
        self.n = initial
        self.status = ""
        self._start = time.perf_counter()
        self._bar = (tqdm(total=total, initial=initial, desc=desc, unit=unit, leave=False, file=sys.stderr,
                          dynamic_ncols=True) if _bars and not quiet else None)

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 trace: TracebackType | None) -> None:
        self.close(finished=kind is None)

    def update(self, n: int = 1) -> None:
        self.moveto(self.n + n)

    def moveto(self, n: int, total: int | None = None) -> None:
        """Set the count (and the total, when it became known) directly; the bar redraws at
        most as often as tqdm's ``mininterval``, so a step of a training loop costs nothing."""
        if self._bar is not None:
            if total is not None:
                self._bar.total = total
            self._bar.update(n - self.n)
        self.n = n

    def set_status(self, status: str) -> None:
        self.status = status
        if self._bar is not None:
            self._bar.set_postfix_str(status, refresh=False)

    def set_description(self, desc: str) -> None:
        if self._bar is not None:
            self._bar.set_description_str(desc)

    def close(self, *, finished: bool = True) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        elif self.log_end and finished:
            seconds = time.perf_counter() - self._start
            status = f", {self.status}" if self.status else ""
            logger.info("%s: %d %s in %.0f s%s", self.desc, self.n, _plural(self.unit, self.n), seconds,
                        status)
        self.log_end = False


def _plural(unit: str, count: int) -> str:
    if count == 1:
        return unit
    return unit + ("es" if unit.endswith(("s", "x", "ch", "sh")) else "s")
