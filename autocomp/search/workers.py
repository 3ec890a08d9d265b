"""Run a study's trials with ask/tell: one or many workers finish exactly N trials, and
killing a worker at any moment loses no finished trial.

The guarantee
-------------
"Finished" means COMPLETE or PRUNED, except trials with the user attribute ``not_counted``
(plans the objective stopped before paying for them: ``NOT_COUNTED``). Every worker
(process, on any machine) calls :func:`run_trials` on the same study with the same
``wanted``; together they finish exactly ``wanted`` trials, never more, and each returns
once that many have finished.

*Never more.* After ``study.ask()`` has stored a worker's trial T as RUNNING, the worker
reads the study once more and runs T only if

    finished + #{RUNNING or WAITING trials numbered below T} < wanted,

otherwise T is told FAIL ("surplus ...") without being run. Trial numbers follow the
order in which trials are stored (the RDB storage locks the study row while it numbers
a new trial, SQLite and the journal serialise every write), and ``ask`` stores T before
the check reads. Let H be the highest-numbered trial that ever finishes. Every other
trial that finishes is numbered below H, so it was stored before H and was visible to
H's check, as WAITING, RUNNING or finished (FAIL is final, so it was not FAIL then):
H's check counted all of them. H ran, so they number fewer than ``wanted``, and with H
at most ``wanted`` trials finish. WAITING trials (enqueued, e.g. the warm start) are
counted because ``ask`` may pop one later with a number below a trial already checked.

*Not fewer.* A worker returns only when ``finished >= wanted`` (or raises: too many
failures in a row, a damaged store, an interrupt). Before asking it waits (polls) while finished +
running >= wanted, so running trials of other workers are not duplicated; when one fails
or its worker is lost, its slot is free again. A trial is surplus only when the trials
below it that its check counted fill the budget: those are running (and finish, fail or
go stale) or waiting (and ``ask`` pops the lowest waiting trial first), so as long as
one worker keeps going, the study reaches ``wanted``. Surplus trials are rare (two
workers asking at the same moment for the last slot) and do not count as failures.

*Lost workers.* A thread stores the unix time as the user attribute ``heartbeat`` of the
running trial every ``heartbeat_s`` (for every storage; the journal has no heartbeat of
its own). A RUNNING trial whose heartbeat is older than ``grace_s`` is told FAIL
("worker lost ...") by whichever worker sees it, which frees its slot. Telling is
atomic in the storage: the first tell of a trial wins, so a worker that was merely slow
finds its trial failed and goes on, and its result is not counted. Heartbeats compare
clocks, so the workers' clocks must agree to well within ``grace_s - heartbeat_s``. A
RUNNING trial without any heartbeat (a worker killed between ``ask`` and its first beat,
or a trial from an older autocomp) is stale once its start is older than ``grace_s`` and
this worker has watched it for ``grace_s`` without a beat (its start time is local time
of the worker that stored it, so it alone is not trusted across machines).

The running process also stores where it runs (``worker``: host name, boot id, process id).
A RUNNING trial whose worker ran on this machine, in this boot, in a process that has
ended is failed at once: resuming after a crash on the same machine does not wait out
the grace period. Heartbeats the storage refuses are logged and counted.

*Signals.* SIGTERM and SIGINT while a trial runs tell it FAIL ("interrupted") and raise
KeyboardInterrupt; a signal during ``ask`` or ``tell`` waits until that storage call has
finished. The previous handlers are restored on return. SIGKILL loses only the running
trial, which the next worker fails after ``grace_s``.

All workers must use this function (a plain ``study.optimize`` does not check slots).
"""

import gc
import logging
import os
import random
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from datetime import datetime
from pathlib import Path

import optuna
from optuna.exceptions import UpdateFinishedTrialError
from optuna.trial import FrozenTrial, TrialState

from autocomp.core.errors import AutocompError, DamagedStore

logger = logging.getLogger(__name__)

FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)
NOT_COUNTED = "not_counted"  # a finished trial with this user attribute is not one of the ``wanted``
HEARTBEAT_KEY = "heartbeat"
FAIL_REASON_KEY = "fail_reason"
SURPLUS = "surplus: the trial budget was taken by other workers"
INTERRUPTED = "interrupted"
LOST = "worker lost (no heartbeat for {age:.0f} s)"
LOST_HERE = "worker lost (its process {pid} on this machine has ended)"
WORKER_KEY = "worker"  # host, boot id and pid of the process running the trial

Objective = Callable[[optuna.Trial], Sequence[float] | float]
OnFinish = Callable[[FrozenTrial, float], None]


def counts(trial: FrozenTrial) -> bool:
    """Whether ``trial`` is one of the finished trials a run asks for."""
    return trial.state in FINISHED and not trial.user_attrs.get(NOT_COUNTED)


def run_trials(study: optuna.Study, objective: Objective, wanted: int, *,
               on_finish: OnFinish | None = None, heartbeat_s: float = 10, grace_s: float = 30,
               max_failures: int | None = None, poll_s: float = 1.0) -> None:
    """Run trials of ``study`` until ``wanted`` have finished (COMPLETE or PRUNED, not
    ``NOT_COUNTED``) in total, counting those of every worker sharing the study; see the
    module docstring.

    ``objective(trial)`` returns the values; ``optuna.TrialPruned`` prunes the trial, any
    other exception fails it (user attribute ``fail_reason``, one line) and the loop goes
    on, until ``max_failures`` (default ``max(3, wanted)``) of this worker's trials have
    failed in a row: then AutocompError with the last reason. A trial failing on a
    ``DamagedStore`` is stored as failed and its error raised at once. ``on_finish(trial,
    seconds)`` is called with each trial this worker ran, as stored (any state).
    One-line notes (stale trials failed, surplus trials, waiting) are logged.
    """
    if wanted < 1:
        raise ValueError("wanted must be at least 1")
    if not 0 < heartbeat_s < grace_s:
        raise ValueError("need 0 < heartbeat_s < grace_s")
    limit = max(3, wanted) if max_failures is None else max_failures
    stale = _StaleWatch(grace_s)
    failures = 0
    waiting = False
    with _Interrupts() as interrupts:
        while True:
            interrupts.check()
            with interrupts.deferred():
                trials = stale.fail_stale(study)
            finished = sum(counts(t) for t in trials)
            running = sum(t.state == TrialState.RUNNING for t in trials)
            if finished >= wanted:
                return
            if finished + running >= wanted:
                if not waiting:
                    logger.info("%d of %d trials finished, %d running elsewhere: waiting for them (a lost "
                                "one is failed after %g s without a heartbeat)",
                                finished, wanted, running, grace_s)
                waiting = True
                time.sleep(poll_s)
                continue
            waiting = False
            result = _run_one(study, objective, wanted, heartbeat_s, interrupts)
            if result is None:  # not run (surplus) or failed by another worker meanwhile
                continue
            trial, seconds = result
            if on_finish is not None:
                on_finish(trial, seconds)
            interrupts.check()
            if trial.state != TrialState.FAIL:
                failures = 0
                continue
            failures += 1
            if failures >= limit:
                reason = trial.user_attrs.get(FAIL_REASON_KEY, "unknown reason")
                raise AutocompError(f"{failures} trials failed in a row; the last: {reason}")


def _run_one(study: optuna.Study, objective: Objective, wanted: int, heartbeat_s: float,
             interrupts: "_Interrupts") -> tuple[FrozenTrial, float] | None:
    """Ask, check the slot, run and tell one trial. None when the trial was not run or
    another worker failed it while it ran."""
    trial: optuna.Trial | None = None
    beat: _Heartbeat | None = None
    told = False
    try:
        with interrupts.deferred():
            trial = study.ask()
            beat = _Heartbeat(study, trial._trial_id, heartbeat_s)
        if not _holds_slot(study, trial.number, wanted):
            with interrupts.deferred():
                beat.stop()
                _fail(study, trial._trial_id, SURPLUS)
                told = True
            logger.info("trial %d: not run, %s", trial.number, SURPLUS)
            time.sleep(random.uniform(0.05, 0.3))  # do not race the same workers again at once
            return None
        start = time.perf_counter()
        state, values, reason, damaged = _evaluate(objective, trial)
        seconds = time.perf_counter() - start
        with interrupts.deferred():
            beat.stop()
            frozen = _tell(study, trial, state, values, reason)
            told = True
        if damaged is not None:  # every later trial would fail on it too
            raise damaged
        gc.collect()  # trials build models; do not let them pile up between trials
        if frozen is None:
            logger.info("trial %d: another worker failed it as lost while it ran (heartbeats late by "
                        "more than the grace period); its result is discarded", trial.number)
            return None
        return frozen, seconds
    except KeyboardInterrupt:
        if trial is not None and not told:
            with interrupts.deferred():
                if beat is not None:
                    beat.stop()
                _fail(study, trial._trial_id, INTERRUPTED)
        raise
    finally:
        if beat is not None:
            beat.stop()


def _holds_slot(study: optuna.Study, number: int, wanted: int) -> bool:
    trials = study.get_trials(deepcopy=False)
    finished = sum(counts(t) for t in trials)
    ahead = sum(t.state in (TrialState.RUNNING, TrialState.WAITING) and t.number < number
                for t in trials)
    return finished + ahead < wanted


def _evaluate(objective: Objective, trial: optuna.Trial
              ) -> tuple[TrialState, Sequence[float] | float | None, str | None, DamagedStore | None]:
    """The trial's state, values and failure reason, and the damaged store it met, if any."""
    try:
        values = objective(trial)
    except optuna.TrialPruned:
        return TrialState.PRUNED, None, None, None
    except Exception as err:
        reason = trial.user_attrs.get(FAIL_REASON_KEY) or one_line(err)
        return TrialState.FAIL, None, reason, err if isinstance(err, DamagedStore) else None
    return TrialState.COMPLETE, values, None, None


def _tell(study: optuna.Study, trial: optuna.Trial, state: TrialState,
          values: Sequence[float] | float | None, reason: str | None) -> FrozenTrial | None:
    """Store the trial's outcome; None when it was already finished by another worker."""
    if state == TrialState.COMPLETE:
        try:
            return study.tell(trial, values, state=TrialState.COMPLETE)
        except UpdateFinishedTrialError:
            return None
        except (ValueError, TypeError) as err:  # values the study cannot take (count, NaN)
            if _finished(study, trial._trial_id):
                return None
            state, reason = TrialState.FAIL, f"the objective returned {values!r}: {one_line(err)}"
    if state == TrialState.FAIL and not _set_reason(study, trial._trial_id, reason or "unknown"):
        return None
    try:
        return study.tell(trial, state=state)
    except (UpdateFinishedTrialError, ValueError):
        if _finished(study, trial._trial_id):
            return None
        raise


def _fail(study: optuna.Study, trial_id: int, reason: str) -> None:
    """Tell a trial FAIL with its reason, unless someone finished it first."""
    if _set_reason(study, trial_id, reason):
        with suppress(UpdateFinishedTrialError):
            study.tell(study._storage.get_trial(trial_id).number, state=TrialState.FAIL,
                       skip_if_finished=True)


def _set_reason(study: optuna.Study, trial_id: int, reason: str) -> bool:
    try:
        study._storage.set_trial_user_attr(trial_id, FAIL_REASON_KEY, reason)
    except UpdateFinishedTrialError:
        return False
    return True


def _finished(study: optuna.Study, trial_id: int) -> bool:
    return study._storage.get_trial(trial_id).state.is_finished()


def one_line(err: BaseException) -> str:
    """``Type: first line of the message``, for fail reasons."""
    text = str(err).strip()
    return f"{type(err).__name__}: {text.splitlines()[0]}" if text else type(err).__name__


def _boot_id() -> str | None:
    """This machine's boot id (Linux), so that a process id is only compared within one boot."""
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return None


def this_worker() -> dict:
    """Where this worker runs: host name, boot id and process id, stored with its trials."""
    return {"host": socket.gethostname(), "boot": _boot_id(), "pid": os.getpid()}


def _gone_here(worker: object) -> bool:
    """True when ``worker`` (``this_worker()`` of the process that runs a trial) ran on this
    machine, in this boot, and its process no longer exists."""
    if not isinstance(worker, dict) or worker.get("boot") is None:
        return False
    here = this_worker()
    same_boot = (worker.get("host"), worker.get("boot")) == (here["host"], here["boot"])
    if not same_boot or worker.get("pid") == here["pid"]:
        return False
    try:
        os.kill(int(worker["pid"]), 0)
    except ProcessLookupError:
        return True
    except (OSError, ValueError, TypeError):
        return False
    return False


class _Heartbeat:
    """Stores the time on the trial now and every ``every_s`` seconds until stopped, and once
    where its worker runs (``WORKER_KEY``). Beats the storage refuses are logged and counted:
    a worker that cannot beat for ``grace_s`` has its trial failed as lost by the others."""

    def __init__(self, study: optuna.Study, trial_id: int, every_s: float) -> None:
        self._storage = study._storage
        self._trial_id = trial_id
        self._every_s = every_s
        self._stop = threading.Event()
        self.failed = 0  # beats the storage refused
        with suppress(UpdateFinishedTrialError):
            self._storage.set_trial_user_attr(trial_id, WORKER_KEY, this_worker())
        self._beat()
        self._thread = threading.Thread(target=self._run, name=f"heartbeat-{trial_id}",
                                        daemon=True)
        self._thread.start()

    def _beat(self) -> bool:
        try:
            self._storage.set_trial_user_attr(self._trial_id, HEARTBEAT_KEY, time.time())
        except UpdateFinishedTrialError:
            return False  # told, or failed as lost by another worker: nothing to keep alive
        except Exception as err:  # the storage is unreachable: the next beat tries again
            self.failed += 1
            logger.warning("heartbeat of trial id %d not stored (%d so far): %s", self._trial_id,
                           self.failed, one_line(err))
        return True

    def _run(self) -> None:
        while not self._stop.wait(self._every_s) and self._beat():
            pass

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            # A beat stuck on the network is harmless: once the trial is told, beats are refused.
            self._thread.join(timeout=5)


class _StaleWatch:
    """Finds RUNNING trials whose worker is gone and fails them, freeing their slots."""

    def __init__(self, grace_s: float) -> None:
        self.grace_s = grace_s
        self._unbeaten_since: dict[int, float] = {}  # trial id -> when first seen without a beat

    def fail_stale(self, study: optuna.Study) -> list[FrozenTrial]:
        """The study's trials, after failing the stale ones."""
        trials = study.get_trials(deepcopy=False)
        lost = [(t, reason) for t in trials if t.state == TrialState.RUNNING
                for reason in [self._lost(t)] if reason]
        for trial, reason in lost:
            _fail(study, trial._trial_id, reason)
            logger.info("trial %d: failed, %s; its slot is free again", trial.number, reason)
        return study.get_trials(deepcopy=False) if lost else trials

    def _lost(self, trial: FrozenTrial) -> str | None:
        """Why a RUNNING trial's worker is gone: its process ended on this machine, or no
        heartbeat came for ``grace_s``; None while it may be alive."""
        worker = trial.user_attrs.get(WORKER_KEY)
        if _gone_here(worker):
            return LOST_HERE.format(pid=worker["pid"])
        age = self._age(trial)
        return LOST.format(age=age) if age > self.grace_s else None

    def _age(self, trial: FrozenTrial) -> float:
        """Seconds since the trial's worker last showed it was alive."""
        beat = trial.user_attrs.get(HEARTBEAT_KEY)
        if isinstance(beat, (int, float)):
            return time.time() - beat
        watched = time.monotonic() - self._unbeaten_since.setdefault(trial._trial_id,
                                                                     time.monotonic())
        started = trial.datetime_start
        since_start = (datetime.now() - started).total_seconds() if started else watched
        return min(watched, since_start)


class _Interrupts:
    """SIGTERM and SIGINT raise KeyboardInterrupt in the main thread, except inside
    ``deferred()`` (storage calls that must not be cut short): there the signal is held
    and raised when the block ends. The previous handlers come back on exit."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __enter__(self) -> "_Interrupts":
        self._depth = 0
        self._pending: int | None = None
        self.received: int | None = None
        self._previous: dict[int, object] = {}
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, kind, value, traceback) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)
        if kind is None and self._pending is not None:
            self._raise()

    def _handle(self, signum: int, _frame) -> None:
        self.received = signum
        if self._depth:
            self._pending = signum
            return
        raise KeyboardInterrupt(signal.Signals(signum).name)

    def _raise(self) -> None:
        signum, self._pending = self._pending, None
        raise KeyboardInterrupt(signal.Signals(signum).name)

    def check(self) -> None:
        """Raise KeyboardInterrupt if a signal came since ``__enter__``: native code that
        checks for signals itself (TVM's FFI does, while compiling) can swallow the
        exception the handler raised, so the loop looks again between trials."""
        if self.received is not None:
            raise KeyboardInterrupt(signal.Signals(self.received).name)

    @contextmanager
    def deferred(self) -> Iterator[None]:
        self._depth += 1
        try:
            yield
        finally:
            self._depth -= 1
        if not self._depth and self._pending is not None:
            self._raise()
