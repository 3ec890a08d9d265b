"""Study storages and the multi-worker trial loop: exactly N finished trials across worker
processes (PostgreSQL, journal file, SQLite), kill-and-resume, one-line storage errors.

Worker processes run this file as a script (see ``_worker``) with a toy objective that
sleeps 0.2 s and returns three values for the search's three directions.
"""

import json
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import optuna
import pytest
from postgres_server import postgres_url, study_name

from autocomp.core.errors import AutocompError, DamagedStore
from autocomp.search.storage import describe_storage, open_storage
from autocomp.search.workers import SURPLUS, run_trials

DIRECTIONS = ["maximize", "minimize", "minimize"]  # like the search: accuracy, latency, size
FINISHED = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
optuna.logging.set_verbosity(optuna.logging.ERROR)


def toy_objective(trial: optuna.Trial, *, hang_at: int = -1, hang_s: float = 60.0,
                  fail_at: int = -1, prune_at: int = -1) -> tuple[float, float, float]:
    x = trial.suggest_float("x", 0.0, 1.0)
    trial.set_constraint("over", x - 0.5)
    print(f"start {trial.number}", flush=True)
    time.sleep(hang_s if trial.number == hang_at else 0.2)
    if trial.number == fail_at:
        raise RuntimeError("boom\nsecond line")
    if trial.number == prune_at:
        raise optuna.TrialPruned()
    return x, 1.0 - x, x * x


def _worker(args: dict) -> None:
    """One worker process: open the study, meet the other workers, run trials."""
    storage = open_storage(args["url"], Path(args["run_dir"]))
    study = optuna.load_study(study_name=args["name"], storage=storage,
                              sampler=optuna.samplers.RandomSampler())
    ready, count = Path(args["ready"]), args["workers"]
    (ready / str(os.getpid())).touch()
    while len(list(ready.iterdir())) < count:  # start together, so that both run trials
        time.sleep(0.02)
    ran = []
    try:
        run_trials(study, lambda t: toy_objective(t, **args["toy"]), args["wanted"],
                   on_finish=lambda trial, _s: ran.append(trial.number),
                   heartbeat_s=args["heartbeat_s"], grace_s=args["grace_s"], poll_s=0.1)
    except KeyboardInterrupt:
        print("interrupted: rerun to resume", flush=True)
        sys.exit(130)
    print(f"ran {len(ran)}", flush=True)


def _create(url: str | None, run_dir: Path) -> tuple[str, optuna.Study]:
    name = study_name()
    study = optuna.create_study(study_name=name, storage=open_storage(url, run_dir),
                                directions=DIRECTIONS)
    return name, study


def _start(url: str | None, run_dir: Path, name: str, wanted: int, tmp: Path, *,
           workers: int = 1, grace_s: float = 30.0, **toy) -> list[subprocess.Popen]:
    ready = tmp / f"ready-{time.monotonic_ns()}"
    ready.mkdir()
    args = {"url": url, "run_dir": str(run_dir), "name": name, "wanted": wanted,
            "ready": str(ready), "workers": workers, "heartbeat_s": 0.3, "grace_s": grace_s,
            "toy": toy}
    return [subprocess.Popen([sys.executable, __file__, json.dumps(args)], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True) for _ in range(workers)]


def _finish(proc: subprocess.Popen, code: int = 0) -> str:
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == code, f"worker exited {proc.returncode}: {err[-2000:]}"
    return out


def _wait_for_line(proc: subprocess.Popen, line: str) -> list[str]:
    seen = []
    for got in proc.stdout:
        seen.append(got.strip())
        if got.strip() == line:
            return seen
    raise AssertionError(f"worker ended before printing {line!r}: {seen} {proc.stderr.read()[-2000:]}")


def _states(study: optuna.Study) -> dict[int, optuna.trial.FrozenTrial]:
    return {t.number: t for t in study.get_trials()}


def _storage_url(kind: str, tmp_path: Path) -> str | None:
    if kind == "postgres":
        return postgres_url()
    if kind == "journal":
        return f"journal:{tmp_path / 'study.journal'}"
    return None  # SQLite in the run folder


@pytest.mark.parametrize("kind", ["postgres", "journal", "sqlite"])
def test_two_workers_finish_exactly_the_wanted_trials(kind: str, tmp_path: Path) -> None:
    url = _storage_url(kind, tmp_path)
    run_dir = tmp_path / "run"
    name, study = _create(url, run_dir)
    procs = _start(url, run_dir, name, 8, tmp_path, workers=2, fail_at=1, prune_at=3)
    ran = [int(_finish(p).split("ran ")[-1]) for p in procs]

    trials = study.get_trials()
    finished = [t for t in trials if t.state in FINISHED]
    assert len(finished) == 8
    assert all(r > 0 for r in ran), f"a worker ran no trial: {ran}"
    assert not [t for t in trials if t.state == optuna.trial.TrialState.RUNNING]
    for t in trials:
        if t.state == optuna.trial.TrialState.FAIL:
            assert t.user_attrs["fail_reason"] in (SURPLUS, "RuntimeError: boom"), t.user_attrs
        if t.state == optuna.trial.TrialState.COMPLETE:  # the constraint survived ask/tell
            assert t.constraints == {"over": pytest.approx(t.params["x"] - 0.5)}
            assert len(t.values) == 3
    assert all(t.number == 3 for t in trials if t.state == optuna.trial.TrialState.PRUNED)


@pytest.mark.parametrize("kind", ["sqlite"])  # the default storage, resumed by --name
def test_sigterm_fails_the_running_trial_and_resume_completes(kind: str, tmp_path: Path) -> None:
    url = _storage_url(kind, tmp_path)
    run_dir = tmp_path / "run"
    name, study = _create(url, run_dir)
    (proc,) = _start(url, run_dir, name, 4, tmp_path, hang_at=2)
    _wait_for_line(proc, "start 2")
    proc.send_signal(signal.SIGTERM)
    assert "interrupted: rerun to resume" in _finish(proc, code=130)
    before = _states(study)
    assert [before[n].state.name for n in range(3)] == ["COMPLETE", "COMPLETE", "FAIL"]
    assert before[2].user_attrs["fail_reason"] == "interrupted"

    (proc,) = _start(url, run_dir, name, 4, tmp_path)
    _finish(proc)
    after = _states(study)
    assert sum(t.state in FINISHED for t in after.values()) == 4
    assert after[2].state == optuna.trial.TrialState.FAIL
    assert [after[n].values for n in (0, 1)] == [before[n].values for n in (0, 1)]


@pytest.mark.parametrize("kind", ["journal"])  # the storage without a heartbeat of Optuna's
def test_sigkill_leaves_a_stale_trial_that_resume_fails(kind: str, tmp_path: Path) -> None:
    url = _storage_url(kind, tmp_path)
    run_dir = tmp_path / "run"
    name, study = _create(url, run_dir)
    (proc,) = _start(url, run_dir, name, 4, tmp_path, hang_at=2)
    _wait_for_line(proc, "start 2")
    proc.kill()
    proc.communicate(timeout=30)
    killed = proc.pid
    assert _states(study)[2].state == optuna.trial.TrialState.RUNNING

    # Resumed on the same machine: the killed process is seen to be gone, so its trial is
    # failed at once instead of after the grace period (10 minutes here, far beyond the
    # minute ``_finish`` waits).
    (proc,) = _start(url, run_dir, name, 4, tmp_path, grace_s=600.0)
    _finish(proc)
    after = _states(study)
    assert sum(t.state in FINISHED for t in after.values()) == 4
    assert after[2].state == optuna.trial.TrialState.FAIL
    reason = after[2].user_attrs["fail_reason"]
    assert reason == f"worker lost (its process {killed} on this machine has ended)"
    assert [after[n].state.name for n in (0, 1)] == ["COMPLETE", "COMPLETE"]


def test_a_trial_from_another_machine_is_failed_only_after_the_grace_period(tmp_path: Path) -> None:
    from autocomp.search.workers import HEARTBEAT_KEY, WORKER_KEY, _StaleWatch, this_worker

    _, study = _create(None, tmp_path / "run")
    here = this_worker()
    elsewhere = {**here, "host": here["host"] + "-other"}
    recent, old = study.ask(), study.ask()
    for trial, beat in ((recent, time.time() - 5), (old, time.time() - 100)):
        study._storage.set_trial_user_attr(trial._trial_id, WORKER_KEY, {**elsewhere, "pid": 2**22 + 7})
        study._storage.set_trial_user_attr(trial._trial_id, HEARTBEAT_KEY, beat)
    _StaleWatch(grace_s=30).fail_stale(study)
    after = _states(study)
    assert after[recent.number].state == optuna.trial.TrialState.RUNNING
    assert after[old.number].state == optuna.trial.TrialState.FAIL
    assert after[old.number].user_attrs["fail_reason"].startswith("worker lost (no heartbeat for ")


def test_a_waiting_worker_does_not_fail_a_live_slow_trial(tmp_path: Path) -> None:
    """Heartbeats reach the other worker: a trial running longer than the grace period is
    left alone, and the waiting worker starts none beyond the one slot."""
    run_dir = tmp_path / "run"
    name, study = _create(None, run_dir)
    # 0.3 s heartbeats against a 5 s grace: a loaded machine may delay a few beats, not 16.
    (slow,) = _start(None, run_dir, name, 1, tmp_path, grace_s=5.0, hang_at=0, hang_s=8.0)
    _wait_for_line(slow, "start 0")
    (waiting,) = _start(None, run_dir, name, 1, tmp_path, grace_s=5.0)
    assert _finish(waiting).strip() == "ran 0"
    _finish(slow)
    assert [t.state.name for t in study.get_trials()] == ["COMPLETE"]


class RecordingSampler(optuna.samplers.RandomSampler):
    """Remembers the constraints of each finished trial, as samplers see them."""

    def __init__(self) -> None:
        super().__init__(seed=0)
        self.seen: dict[int, dict[str, float]] = {}

    def after_trial(self, study, trial, state, values) -> None:
        self.seen[trial.number] = dict(trial.constraints)
        super().after_trial(study, trial, state, values)


def test_constraints_reach_the_sampler_and_the_storage(tmp_path: Path) -> None:
    sampler = RecordingSampler()
    study = optuna.create_study(storage=open_storage(None, tmp_path), directions=DIRECTIONS,
                                sampler=sampler)
    finished = []
    run_trials(study, lambda t: toy_objective(t, prune_at=1), 3,
               on_finish=lambda trial, seconds: finished.append((trial, seconds)))
    assert [t.number for t, _ in finished] == [0, 1, 2] and all(s >= 0.2 for _, s in finished)
    assert all("heartbeat" in t.user_attrs for t, _ in finished)
    for trial in study.get_trials():
        expected = {"over": pytest.approx(trial.params["x"] - 0.5)}
        assert sampler.seen[trial.number] == expected
        assert trial.constraints == expected
    assert study.get_trials()[1].state == optuna.trial.TrialState.PRUNED


def test_failures_in_a_row_stop_the_loop(tmp_path: Path) -> None:
    study = optuna.create_study(storage=f"sqlite:///{tmp_path / 'f.db'}", directions=DIRECTIONS)

    def broken(trial: optuna.Trial):
        raise ValueError("bad layer\nmore detail")

    with pytest.raises(AutocompError, match=r"^2 trials failed in a row; the last: ValueError: "
                                            r"bad layer$"):
        run_trials(study, broken, 5, max_failures=2)
    assert [t.user_attrs["fail_reason"] for t in study.get_trials()] == ["ValueError: bad layer"] * 2

    def bad_values(trial: optuna.Trial):  # values the study cannot take fail the trial
        return (1.0, float("nan"), 0.0) if trial.number == 2 else (1.0, 2.0)

    with pytest.raises(AutocompError, match=r"the last: the objective returned \(1.0, 2.0\): "
                                            r"ValueError: The number of the values 2 did not"):
        run_trials(study, bad_values, 1, max_failures=2)
    assert study.get_trials()[2].user_attrs["fail_reason"].startswith(
        "the objective returned (1.0, nan, 0.0): ValueError: The value nan is not acceptable")


def test_a_damaged_store_stops_the_loop_at_the_first_trial(tmp_path: Path) -> None:
    """No later trial can succeed on a damaged store: the first failure is stored with its
    reason and raised, instead of failing every trial in turn."""
    study = optuna.create_study(storage=f"sqlite:///{tmp_path / 'f.db'}", directions=DIRECTIONS)

    def damaged(trial: optuna.Trial):
        raise DamagedStore("tuning database /x is unreadable")

    with pytest.raises(DamagedStore, match=r"^tuning database /x is unreadable$"):
        run_trials(study, damaged, 5, max_failures=5)
    assert [(t.state, t.user_attrs["fail_reason"]) for t in study.get_trials()] == [
        (optuna.trial.TrialState.FAIL, "DamagedStore: tuning database /x is unreadable")]


def test_a_full_study_database_is_told_apart_from_other_storage_errors(tmp_path: Path) -> None:
    """SQLite at its size limit says what a full disk says; Optuna wraps it. The search turns
    that one (and only that kind) into a one-line error naming the study."""
    from sqlalchemy import event

    from autocomp.search.storage import refused_write

    storage = open_storage(None, tmp_path)
    study = optuna.create_study(storage=storage, directions=DIRECTIONS)
    with sqlite3.connect(tmp_path / "study.db") as db:
        pages = db.execute("PRAGMA page_count").fetchone()[0]

    @event.listens_for(storage.engine, "connect")
    def _cap(connection, _record) -> None:
        connection.execute(f"PRAGMA max_page_count = {pages}")

    storage.engine.dispose()  # new connections, each capped
    with pytest.raises(Exception) as caught:
        for _ in range(50):
            study.enqueue_trial({"x": 0.5}, user_attrs={"label": "x" * 4000})
    assert refused_write(caught.value) == "database or disk is full"
    assert refused_write(RuntimeError("database or disk is full")) is None  # not the storage's


def test_a_trial_that_lost_the_race_is_not_run(tmp_path: Path, monkeypatch) -> None:
    """Another worker's trial stored just before ours takes the last slot: ours is told FAIL
    unrun, and the loop waits for the other one instead of starting more."""
    study = optuna.create_study(storage=open_storage(f"journal:{tmp_path / 'j.journal'}",
                                                     tmp_path), directions=DIRECTIONS)
    storage = study._storage
    create = storage.create_new_trial
    rival = []

    def racing_create(study_id, template_trial=None):
        if not rival:
            rival.append(create(study_id))
            threading.Timer(0.5, lambda: study.tell(0, (0.5, 0.5, 0.25))).start()
        return create(study_id, template_trial)

    monkeypatch.setattr(storage, "create_new_trial", racing_create)
    calls = []
    run_trials(study, lambda t: calls.append(t.number) or (1.0, 0.0, 0.0), 1, poll_s=0.05)
    trials = study.get_trials()
    assert calls == []
    assert [t.state.name for t in trials] == ["COMPLETE", "FAIL"]
    assert trials[1].user_attrs["fail_reason"] == SURPLUS


def test_sigterm_in_process_restores_the_previous_handler(tmp_path: Path) -> None:
    study = optuna.create_study(storage=open_storage(None, tmp_path), directions=DIRECTIONS)
    mine = lambda *_: None  # noqa: E731
    signal.signal(signal.SIGTERM, mine)
    try:
        def objective(trial: optuna.Trial):
            if trial.number == 1:
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(5)
            return 1.0, 0.0, 0.0

        with pytest.raises(KeyboardInterrupt):
            run_trials(study, objective, 3)
        assert signal.getsignal(signal.SIGTERM) is mine
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
    trials = study.get_trials()
    assert [t.state.name for t in trials] == ["COMPLETE", "FAIL"]
    assert trials[1].user_attrs["fail_reason"] == "interrupted"


@pytest.mark.parametrize("url, message", [
    ("redis://localhost/0", r"^unknown storage 'redis://localhost/0': use postgresql://"),
    ("postgresql://me:s3cret@127.0.0.1:1/db",
     r"^cannot open the storage postgresql://me:\*\*\*@127\.0\.0\.1:1/db: .*refused"),
    ("mysql://me:s3cret@127.0.0.1:1/db", r"(pip install pymysql|cannot open the storage)"),
    ("sqlite:////nonexistent-dir/x/study.db", r"^cannot open the storage .*: unable to open"),
    ("journal:", r"^storage 'journal:' names no file"),
])
def test_bad_storage_urls_give_one_line(url: str, message: str, tmp_path: Path) -> None:
    with pytest.raises(AutocompError, match=message) as info:
        open_storage(url, tmp_path)
    assert "\n" not in str(info.value) and "s3cret" not in str(info.value)
    assert info.value.__cause__ is None
    assert info.value.__context__ is None or info.value.__suppress_context__


def test_bad_postgres_password_gives_one_line(tmp_path: Path) -> None:
    from sqlalchemy.engine import make_url

    url = make_url(postgres_url()).set(password="wrong-password")
    with pytest.raises(AutocompError, match=r"password authentication failed") as info:
        open_storage(url.render_as_string(hide_password=False), tmp_path)
    assert "\n" not in str(info.value) and "wrong-password" not in str(info.value)


def test_urls_written_to_disk_keep_no_password() -> None:
    from autocomp.search.storage import without_password

    assert without_password("postgresql://me:s3cret@db:5432/x") == "postgresql://me@db:5432/x"
    assert without_password("postgresql://me@db/x") == "postgresql://me@db/x"
    assert without_password("journal:runs/a.journal") == "journal:runs/a.journal"
    assert without_password(None) is None


def test_describe_storage_masks_passwords(tmp_path: Path) -> None:
    assert describe_storage("postgresql://me:s3cret@db/x", tmp_path) == "postgresql://me:***@db/x"
    assert describe_storage(None, tmp_path) == f"SQLite {tmp_path / 'study.db'}"
    assert describe_storage("runs/a.journal", tmp_path).startswith("journal file /")


if __name__ == "__main__":
    _worker(json.loads(sys.argv[1]))


def test_heartbeats_the_storage_refuses_are_logged_and_counted(tmp_path: Path, monkeypatch,
                                                               caplog: pytest.LogCaptureFixture) -> None:
    from autocomp.search.workers import HEARTBEAT_KEY, _Heartbeat

    _, study = _create(None, tmp_path / "run")
    trial = study.ask()
    storage = study._storage
    store = storage.set_trial_user_attr

    def outage(trial_id: int, key: str, value) -> None:
        if key == HEARTBEAT_KEY:
            raise OSError("database is locked")
        store(trial_id, key, value)

    monkeypatch.setattr(storage, "set_trial_user_attr", outage)
    beat = _Heartbeat(study, trial._trial_id, 0.05)
    time.sleep(0.5)
    beat.stop()
    assert beat.failed >= 3
    assert "heartbeat of trial id" in caplog.text and "OSError: database is locked" in caplog.text
