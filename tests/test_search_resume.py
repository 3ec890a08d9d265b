"""Kill safety: a search stopped by SIGTERM mid-run keeps every finished trial and resumes to
exactly the requested number."""

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import optuna

FINISHED = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)


def _args(weights: Path, trials: int) -> list[str]:
    return ["search", "--model", "demo-resnet", "--weights", str(weights), "--data", "fashion-mnist",
            "--untuned", "--budget", "90%", "--trials", str(trials), "--name", "killed",
            "--sampler", "nsga2", "--no-sensitivity", "--finetune-steps", "60",
            "--train-subset", "1000", "--val-subset", "300"]


def _trials(run: Path) -> list[optuna.trial.FrozenTrial]:
    try:
        study = optuna.load_study(study_name="killed", storage=f"sqlite:///{run / 'study.db'}")
    except KeyError:  # the database exists before the study is created in it
        return []
    return study.get_trials(deepcopy=False)


def _finished_states(db: Path) -> bool:
    """Whether a trial finished, read without Optuna: opening the storage while the search
    creates it would race its schema creation."""
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as connection:
            states = [row[0] for row in connection.execute("select state from trials")]
    except sqlite3.Error:  # not created yet
        return False
    return any(state in ("COMPLETE", "PRUNED") for state in states)


def test_sigterm_mid_search_loses_nothing_and_resumes(cli, tmp_path: Path, trained_resnet: Path) -> None:
    run = tmp_path / "runs" / "killed"
    log = tmp_path / "search.log"
    with open(log, "w") as output:
        process = subprocess.Popen([sys.executable, "-m", "autocomp", *_args(trained_resnet, 4)],
                                   cwd=tmp_path, stdout=output, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and process.poll() is None:
        if _finished_states(run / "study.db"):
            break  # the next trial starts at once: stop the search while it runs
        time.sleep(0.2)
    assert process.poll() is None, log.read_text()[-2000:]
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 130, err
    assert "rerun the same command to resume" in err

    before = _trials(run)
    finished = {t.number: t.values for t in before if t.state in FINISHED}
    assert finished
    assert not [t for t in before if t.state == optuna.trial.TrialState.RUNNING]
    interrupted = [t for t in before if t.state == optuna.trial.TrialState.FAIL]
    assert all(t.user_attrs.get("fail_reason") == "interrupted" for t in interrupted)

    code, out, err = cli(*_args(trained_resnet, 4))
    assert code == 0, err
    assert f"resuming with {len(finished)} finished trials" in out
    after = _trials(run)
    assert sum(t.state in FINISHED for t in after) == 4
    assert {t.number: t.values for t in after if t.number in finished} == finished


def test_two_workers_share_one_postgresql_study(tmp_path: Path, trained_resnet: Path) -> None:
    """Two ``autocomp search`` processes on one PostgreSQL study finish exactly the trials asked."""
    from postgres_server import postgres_url, study_name
    from sqlalchemy.engine import make_url

    from autocomp.search.storage import open_storage

    url, name, wanted = postgres_url(), study_name("workers"), 5
    command = [sys.executable, "-m", "autocomp", *_args(trained_resnet, wanted)]
    command[command.index("--name") + 1] = name
    command += ["--storage", url, "--sampler", "random"]
    folders = [tmp_path / f"worker{i}" for i in range(2)]
    workers = []
    for folder in folders:
        folder.mkdir()
        workers.append(subprocess.Popen(command, cwd=folder, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                        text=True))
    for worker in workers:
        _, err = worker.communicate(timeout=600)
        assert worker.returncode == 0, err[-2000:]
    study = optuna.load_study(study_name=name, storage=open_storage(url, tmp_path))
    finished = [t for t in study.trials if t.state in FINISHED]
    assert len(finished) == wanted
    # each worker kept its own trials' files; both use the baseline of the study's creator
    ran = [{int(p.name) for p in (folder / "runs" / name / "trials").glob("*")} for folder in folders]
    assert not ran[0] & ran[1] and len(ran[0] | ran[1]) >= wanted
    saved = [json.loads((folder / "runs" / name / "run.json").read_text()) for folder in folders]
    assert len({run["baseline"]["budget_s"] for run in saved}) == 1
    # no password on disk: a later command gets it as libpq does (here PGPASSWORD)
    given = make_url(url)
    for run in saved:
        kept = make_url(run["storage"])
        assert kept.password is None and f":{given.password}@" not in run["storage"]
        where = (kept.username, kept.host, kept.port, kept.database)
        assert where == (given.username, given.host, given.port, given.database)
    password = given.password
    assert password
    report = subprocess.run([sys.executable, "-m", "autocomp", "report", name], cwd=folders[0],
                            capture_output=True, text=True, env={**os.environ, "PGPASSWORD": password})
    assert report.returncode == 0, report.stderr
