"""Fault injection: a search killed with SIGKILL in a random phase, at a random instant, and
resumed each time; its export killed the same way; a runs folder on a full filesystem;
truncated cache files.

Nothing finished may be lost: after every kill the finished trials are a superset of those
before, each with its files; every store passes its integrity check (the study's and the
latency table's SQLite, the tuning database's JSON lines, the cached baseline's weights);
the resumed search ends with exactly the trials asked for. A full filesystem must end in
one line naming what could not be written, and a truncated cache file must be rebuilt or
refused with one line naming it.

The search is small (demo-resnet, 1-epoch baseline, tuned host kernels, latency table on,
short fine-tuning). Each kill aims at one of its phases (PHASES: baseline training, study
creation, tuning, the sensitivity pre-pass, trials, the final front) and lands a random
instant after the phase's log line; then the export is killed.

    .venv/bin/python bench/faults.py --kills 20 --out runs/bench/faults.json
    .venv/bin/python bench/faults.py --kills 3 --export-kills 1   # the short form
    # the test's form (tests/test_faults.py): untuned kernels, trained weights given
    .venv/bin/python bench/faults.py --kills 3 --export-kills 1 --untuned --weights W.pt \
        --trials 2 --window 30
"""

import argparse
import json
import os
import random
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

NAME = "faults"


@dataclass
class Search:
    """The search every kill interrupts, and what the short form leaves out."""

    trials: int
    untuned: bool = False  # plain compiled kernels: no tuning database to kill or damage
    weights: Path | None = None  # trained weights given: no baseline to train and cache

    def command(self, runs: Path, trials: int | None = None, name: str = NAME) -> list[str]:
        return [str(Path(sys.executable).parent / "autocomp"), "search", "--model", "demo-resnet", "--data",
                "fashion-mnist", "--target", "host", "--budget", "90%",
                "--trials", str(trials or self.trials), "--name", name, "--runs-dir", str(runs),
                "--train-subset", "1000", "--val-subset", "300",
                "--finetune-steps", "20", "--baseline-epochs", "1", "--latency-table",
                *(["--untuned"] if self.untuned else []),
                *(["--weights", str(self.weights)] if self.weights else [])]


def _export(runs: Path, out: Path) -> list[str]:
    return [str(Path(sys.executable).parent / "autocomp"), "export", NAME, "--trial", "best", "--runs-dir",
            str(runs), "--out", str(out), "--force"]


# The search's phases, in order, each by the start of the line it logs on reaching it. A kill
# aimed at a phase lands a random instant (up to AIM_S seconds) after that line appears, so
# kills reach every phase, not only the first ones a process passes through after start-up.
# A run resumed after its last trial goes from the baseline lines straight to the final front.
PHASES = {"start-up, baseline training": r"search: compressing", "study creation": r"study:",
          "baseline kernels: tuning and timing": r"baseline: measuring",
          "sensitivity pre-pass": r"budget:", "warm start, first trial": r"warm start:",
          "trials: compile, measure, fine-tune": r"trial +\d",
          "final front": r"search: \d+ trials (finished in|already finished)"}
AIM_S = 12.0


def _run(command: list[str], env: dict, kill_after: float | None = None,
         aim: tuple[str, float] | None = None) -> tuple[int, str, str]:
    """Run ``command``; SIGKILL it (and its workers) ``kill_after`` seconds after start, or
    sooner with ``aim`` (pattern, delay): that many seconds after a line matching the pattern
    appears. Returns the exit status, its output (stdout and stderr as they came) and the last
    output line (where it was)."""
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               start_new_session=True)
    lines: list[str] = []
    seen = threading.Event()

    def read(stream) -> None:
        for line in stream:
            lines.append(line)
            if aim is not None and re.match(aim[0], line):
                seen.set()

    readers = [threading.Thread(target=read, args=(stream,), daemon=True)
               for stream in (process.stdout, process.stderr)]
    for reader in readers:
        reader.start()
    start, deadline = time.monotonic(), None
    while process.poll() is None:
        now = time.monotonic()
        if deadline is None and seen.is_set():
            deadline = now + aim[1]
        timed_out = kill_after is not None and now - start >= kill_after
        if timed_out or (deadline is not None and now >= deadline):
            os.killpg(process.pid, signal.SIGKILL)  # the search and its timing and tuning workers
            process.wait()
            break
        time.sleep(0.1)
    for reader in readers:
        reader.join(timeout=10)
    text = "".join(lines)
    last = next((line.strip() for line in reversed(lines) if line.strip()), "")
    return process.returncode, text, last


def _reached(text: str) -> list[str]:
    """The phases whose lines ``text`` (a search's output) holds."""
    lines = text.splitlines()
    return [phase for phase, pattern in PHASES.items() if any(re.match(pattern, line) for line in lines)]


def _finished(run: Path) -> dict[int, str]:
    """Finished trials (COMPLETE or PRUNED) of the run's study that count as trials (not plans
    skipped as predicted over the budget), by number."""
    path = run / "study.db"
    if not path.is_file():
        return {}
    with sqlite3.connect(path) as db:
        if not db.execute("SELECT name FROM sqlite_master WHERE name='trials'").fetchone():
            return {}
        return dict(db.execute(
            "SELECT number, state FROM trials WHERE state IN ('COMPLETE', 'PRUNED') AND trial_id NOT IN "
            "(SELECT trial_id FROM trial_user_attributes WHERE key = 'not_counted')"))


def _sqlite_ok(path: Path) -> str | None:
    """None when the SQLite file passes its integrity check, else why not."""
    try:
        with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as db:
            result = db.execute("PRAGMA integrity_check").fetchone()[0]
    except sqlite3.DatabaseError as err:
        return f"{path}: {err}"
    return None if result == "ok" else f"{path}: {result}"


def _stores(work: Path, run: Path) -> list[str]:
    """Every store's problems (empty when all pass their checks)."""
    import torch

    problems = []
    for path in [run / "study.db", *work.glob("cache/latency/**/*.sqlite")]:
        if path.is_file() and (problem := _sqlite_ok(path)):
            problems.append(problem)
    for path in work.glob("cache/tuning/**/*.json"):
        for number, line in enumerate(path.read_text().splitlines(), 1):
            try:
                json.loads(line)
            except json.JSONDecodeError as err:
                problems.append(f"{path}:{number}: {err}")
    for weights in work.glob("cache/baselines/*.pt"):
        if weights.with_suffix(".json").is_file():
            try:
                torch.load(weights, weights_only=True)
            except Exception as err:
                problems.append(f"{weights}: {type(err).__name__}: {err}")
    for number in _finished(run):
        metrics = run / "trials" / str(number) / "metrics.json"
        try:
            json.loads(metrics.read_text())
        except (OSError, json.JSONDecodeError) as err:
            problems.append(f"finished trial {number}: {metrics}: {err}")
    return problems


def _kills(work: Path, env: dict, kills: int, search: Search, window: float, rng: random.Random) -> dict:
    runs = work / "runs"
    run = runs / NAME
    records, lost, broken = [], [], []
    before: dict[int, str] = {}
    phases = list(PHASES)[:2]
    for kill in range(kills):
        # Aim at a phase the last run passed through, or the one after the last it reached
        # (not further: the run would go through every phase before it); a phase passed for
        # good (the baseline, once in the study) logs no line again.
        aim = rng.choice(phases)
        started = time.monotonic()
        code, text, last = _run(search.command(runs), env, kill_after=window,
                                aim=(PHASES[aim], rng.uniform(0.0, AIM_S)))
        seconds = time.monotonic() - started
        reached = _reached(text)
        after = _finished(run)
        gone = sorted(set(before) - set(after))
        problems = _stores(work, run)
        landed = reached[-1] if reached else "start-up"
        records.append({"kill": kill + 1, "aimed_at": aim, "landed_in": landed,
                        "after_s": round(seconds, 1), "exit": code, "last_line": last[:160],
                        "finished": len(after), "lost": gone, "problems": problems})
        print(f"kill {kill + 1}/{kills} aimed at {aim}, landed in {landed} after {seconds:.1f} s "
              f"(exit {code}): {len(after)} finished, lost {gone or 'none'}, stores {problems or 'ok'}; "
              f"at: {last[:100]}",
              flush=True)
        last_phase = max((list(PHASES).index(p) for p in reached), default=0)
        phases = [p for i, p in enumerate(PHASES) if p in reached or i == last_phase + 1]
        lost += gone
        broken += problems
        before = after
    code, text, last = _run(search.command(runs), env)
    final = _finished(run)
    print(f"resumed to the end: exit {code}, {len(final)} finished of {search.trials}", flush=True)
    return {"kills": records, "final_exit": code, "final_tail": text[-1500:], "finished": len(final),
            "wanted": search.trials, "exact": len(final) == search.trials, "lost": lost,
            "problems": broken + _stores(work, run)}


def _export_kills(work: Path, env: dict, kills: int, rng: random.Random) -> dict:
    runs, out = work / "runs", work / "export"
    records = []
    for kill in range(kills):
        delay = rng.uniform(0.5, 15.0)
        code, _, last = _run(_export(runs, out), env, kill_after=delay)
        half = [str(p) for p in out.rglob("*") if p.is_file() and p.stat().st_size == 0]
        records.append({"kill": kill + 1, "after_s": round(delay, 1), "exit": code, "last_line": last[:160],
                        "empty_files": half})
        print(f"export kill {kill + 1}/{kills} after {delay:.1f} s (exit {code}); at: {last[:100]}",
              flush=True)
    code, text, _ = _run(_export(runs, out), env)
    written = json.loads((out / "export.json").read_text()) if (out / "export.json").is_file() else None
    print(f"export to the end: exit {code}, export.json {'written' if written else 'missing'}", flush=True)
    return {"kills": records, "final_exit": code, "export_json": written is not None, "tail": text[-800:]}


def _full_disk(work: Path, env: dict, search: Search) -> dict:
    """A new search (baseline and kernels cached) with its runs folder on a 1 MB tmpfs, which a
    few trials' weights fill: one line naming what could not be written, and every file that
    was written whole."""
    mount = work / "full"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)], capture_output=True,
                          text=True)
    if done.returncode != 0:
        return {"run": False, "reason": f"mount refused: {done.stderr.strip()[:200]}"}
    try:
        code, text, last = _run(search.command(mount, name="full"), env)
        errors = [line for line in text.splitlines() if line.startswith("autocomp: error:")]
        unreadable = []
        for path in (mount / "full").rglob("*.json"):
            try:
                json.loads(path.read_text())
            except (OSError, json.JSONDecodeError) as err:
                unreadable.append(f"{path}: {err}")
        study = mount / "full" / "study.db"
        if study.is_file() and (problem := _sqlite_ok(study)):
            unreadable.append(problem)
        return {"run": True, "exit": code, "one_line": len(errors) == 1 and "Traceback" not in text,
                "error": errors[-1] if errors else last, "half_written": unreadable}
    finally:
        subprocess.run(["umount", "--lazy", str(mount)], check=False)


def _truncated(work: Path, env: dict, search: Search) -> list[dict]:
    """Each cache file cut to half its size, then the search resumed for one more trial: the
    file rebuilt (exit 0), or refused with one line naming it. The file is restored after."""
    results = []
    targets = {"tuning database": "cache/tuning/*/database_tuning_record.json",
               "latency table": "cache/latency/**/*.sqlite", "cached baseline": "cache/baselines/*.pt",
               "study": f"runs/{NAME}/study.db"}
    for index, (what, pattern) in enumerate(targets.items()):
        found = sorted(work.glob(pattern))
        if not found:
            reason = ("untuned kernels" if search.untuned and what == "tuning database" else
                      "weights given" if search.weights and what == "cached baseline" else f"no {pattern}")
            results.append({"file": what, "run": False, "reason": reason})
            print(f"truncated {what}: not run ({reason})", flush=True)
            continue
        path = found[0]
        backup = path.with_name(path.name + ".bench-backup")
        shutil.copy2(path, backup)
        try:
            with open(path, "r+b") as handle:
                handle.truncate(path.stat().st_size // 2)
            code, text, last = _run(search.command(work / "runs", search.trials + 1 + index), env)
        finally:
            backup.replace(path)
        errors = [line for line in text.splitlines() if line.startswith("autocomp: error:")]
        named = bool(errors) and (path.name in errors[-1] or str(path.parent) in errors[-1])
        outcome = ("rebuilt" if code == 0 else "refused, naming the file" if code == 2 and named
                   and len(errors) == 1 and "Traceback" not in text else "failed badly")
        results.append({"file": what, "path": str(path.relative_to(work)), "run": True, "exit": code,
                        "outcome": outcome, "error": errors[-1] if errors else last[:300],
                        "traceback": "Traceback" in text})
        print(f"truncated {what}: {outcome} (exit {code}): {(errors[-1] if errors else last)[:160]}",
              flush=True)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kills", type=int, default=20, help="SIGKILLs during the search")
    parser.add_argument("--export-kills", type=int, default=3, help="SIGKILLs during the export")
    parser.add_argument("--trials", type=int, default=6)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--window", type=float, default=300.0,
                        help="a search not killed in its aimed-at phase is killed after WINDOW seconds")
    parser.add_argument("--untuned", action="store_true",
                        help="plain compiled kernels: no tuning and no tuning database (for CI)")
    parser.add_argument("--weights", type=Path,
                        help="trained demo-resnet weights: no baseline to train and cache (for CI)")
    parser.add_argument("--out", type=Path, help="JSON file for every kill and check")
    args = parser.parse_args()

    rng = random.Random(args.seed)
    work = Path(tempfile.mkdtemp(prefix="autocomp-faults-"))
    env = {**os.environ, "AUTOCOMP_CACHE": str(work / "cache")}
    started = time.perf_counter()
    search = Search(args.trials, args.untuned, args.weights.resolve() if args.weights else None)
    try:
        result = {"command": " ".join(sys.argv), "search": search.command(work / "runs")[1:],
                  "kills": _kills(work, env, args.kills, search, args.window, rng)}
        result["export"] = _export_kills(work, env, args.export_kills, rng)
        result["full_disk"] = _full_disk(work, env, search)
        print(f"full filesystem: {result['full_disk']}", flush=True)
        result["truncated"] = _truncated(work, env, search)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    result["seconds"] = time.perf_counter() - started
    kills = result["kills"]
    landed = Counter(kill["landed_in"] for kill in kills["kills"])
    print("kills landed in: " + ", ".join(f"{phase} {landed[phase]}" for phase in PHASES if landed[phase]),
          flush=True)
    summary = (f"{args.kills} kills: {len(kills['lost'])} finished trials lost, final "
               f"{kills['finished']} of {kills['wanted']} ({'exact' if kills['exact'] else 'NOT exact'}), "
               f"store problems "
               f"{len(kills['problems'])}; export after {args.export_kills} kills: "
               f"{'complete' if result['export']['export_json'] else 'INCOMPLETE'}")
    print(summary, flush=True)
    result["summary"] = summary
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2))
    ok = (not kills["lost"] and kills["exact"] and not kills["problems"]
          and result["export"]["export_json"]
          and (not result["full_disk"]["run"] or (result["full_disk"]["one_line"]
                                                  and not result["full_disk"]["half_written"]))
          and all(t.get("outcome") != "failed badly" for t in result["truncated"]))
    raise SystemExit(0 if ok else 1)


if __name__ == "__main__":
    main()
