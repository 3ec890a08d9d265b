"""autocomp search vs Optuna random sampling vs the uniform baselines (issue 5's benchmark).

For each demo network on Fashion-MNIST (the trained baseline comes from the cache, see
``autocomp.training.baseline.cached_baseline``), with the same number of trials each:

- autocomp: ``autocomp search`` as shipped (TPE sampler, warm start, sensitivity pre-pass);
- random: ``autocomp search --sampler random --no-warm-start --no-sensitivity``;
- each uniform baseline (uniform int8, prune 30% / 50%, rank 50%): the warm-start trials
  the autocomp run enqueues (user attribute ``label``), so with identical fine-tuning.

Every completed trial is then scored on the test split (which no search sees; cached in
``RUN/bench_test_acc.json``) and each method reports: the best test accuracy within 70%,
50% and 30% of the uncompressed model's latency, the speedup reachable at <= 0.5 point
test-accuracy loss (goal >= 2.5x), and the hypervolume of its (test accuracy, latency)
front (goal: autocomp >= 1.1x the best alternative).

    python bench/search_vs_baselines.py --trials 20               # tuned kernels: slow
    python bench/search_vs_baselines.py --trials 20 --untuned     # TVM default schedules
    python bench/search_vs_baselines.py --reuse --doc '' --json ''  # re-analyse finished runs
"""

import argparse
import json
import shlex
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import optuna

from autocomp.intake.data import DataSplits, load_data
from autocomp.search.results.front_metrics import best_under_budget, hypervolume, speedup_at_loss
from autocomp.search.results.trials import load_trial_model
from autocomp.search.settings import RunSettings, load_settings
from autocomp.training.train import evaluate

MODELS = ("demo-resnet", "demo-mobilenetv2")
DATA = "fashion-mnist"
BUDGETS = (0.7, 0.5, 0.3)
MAX_LOSS = 0.005  # half a percentage point of test accuracy
HV_FLOOR = 0.10  # hypervolume reference: 10 points below the uncompressed test accuracy
SPEEDUP_GOAL, HV_GOAL = 2.5, 1.1
SEARCHES = {
    "autocomp": ("autocomp search (TPE, warm start, sensitivity pre-pass)", ["--sampler", "tpe"]),
    "random": ("Optuna random sampling", ["--sampler", "random", "--no-warm-start", "--no-sensitivity"]),
}
TEST_CACHE = "bench_test_acc.json"
RESULTS_START, RESULTS_END = "<!-- results:start -->", "<!-- results:end -->"


@dataclass
class Point:
    """A completed trial as the benchmark sees it."""

    number: int
    label: str | None
    plan_summary: str
    val_acc: float
    test_acc: float
    latency_s: float
    size_bytes: int
    provenance: str


def run_name(model: str, method: str, untuned: bool) -> str:
    return f"{model}-{method}{'-untuned' if untuned else ''}"


def search_command(model: str, method: str, args: argparse.Namespace) -> list[str]:
    command = [sys.executable, "-m", "autocomp", "search", "--model", model, "--data", DATA,
               "--trials", str(args.trials), "--name", run_name(model, method, args.untuned),
               "--runs-dir", str(args.runs_dir), *SEARCHES[method][1]]
    return command + (["--untuned"] if args.untuned else []) + shlex.split(args.search_args)


def open_study(run_dir: Path, settings: RunSettings) -> optuna.Study:
    """The run's study: ``RUN/study.db`` unless run.json names another storage."""
    url = getattr(settings, "storage", None)
    if url is None:
        storage = f"sqlite:///{(run_dir / 'study.db').resolve()}"
    else:
        from autocomp.search.storage import open_storage

        storage = open_storage(url, run_dir)
    return optuna.load_study(study_name=settings.name, storage=storage)


def finished(run_dir: Path) -> int:
    """Trials the run finished (completed or stopped early), 0 when it has not started."""
    if not (run_dir / "run.json").is_file():
        return 0
    study = open_study(run_dir, load_settings(run_dir))
    states = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
    return len(study.get_trials(deepcopy=False, states=states))


def ensure_run(model: str, method: str, args: argparse.Namespace) -> dict:
    """Run (or, with --reuse, resume or skip) one search; returns how it was obtained."""
    name = run_name(model, method, args.untuned)
    folder = args.runs_dir / name
    command = search_command(model, method, args)
    record = {"run": name, "command": "autocomp " + shlex.join(command[3:]), "ran": False, "wall_s": None}
    if folder.exists() and not args.reuse:
        sys.exit(f"{folder} exists: pass --reuse to use (or resume) it, or pick another --runs-dir")
    if finished(folder) >= args.trials:
        print(f"{name}: reusing the finished run in {folder}", file=sys.stderr)
        return record
    print(f"{name}: {record['command']}", file=sys.stderr, flush=True)
    start = time.perf_counter()
    code = subprocess.run(command, stdout=sys.stderr).returncode
    if code != 0:
        sys.exit(f"{name}: the search ended with exit status {code} (its output is above); rerun with "
                 f"--reuse to resume it")
    record.update(ran=True, wall_s=time.perf_counter() - start)
    return record


def test_accuracies(run_dir: Path, settings: RunSettings, data: DataSplits,
                    numbers: list[int]) -> dict[int, float]:
    """Test accuracy of each trial, computed once per trial and cached in the run folder."""
    path = run_dir / TEST_CACHE
    cached = {int(k): v for k, v in json.loads(path.read_text()).items()} if path.is_file() else {}
    for number in numbers:
        if number not in cached:
            print(f"{settings.name}: test accuracy of trial {number}", file=sys.stderr, flush=True)
            cached[number] = evaluate(load_trial_model(run_dir, settings, number, data), data.test)
            path.write_text(json.dumps({str(k): v for k, v in sorted(cached.items())}, indent=2) + "\n")
    return {number: cached[number] for number in numbers}


def load_points(run_dir: Path, data: DataSplits) -> tuple[RunSettings, list[Point], dict]:
    """A run's settings, its completed trials with test accuracy, and trial counts and time."""
    settings = load_settings(run_dir)
    study = open_study(run_dir, settings)
    trials = study.get_trials(deepcopy=False)
    complete = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
    tests = test_accuracies(run_dir, settings, data, [t.number for t in complete])
    points = [Point(t.number, t.user_attrs.get("label"), t.user_attrs["plan_summary"],
                    t.user_attrs["val_acc"], tests[t.number], t.user_attrs["latency"]["median_s"],
                    t.user_attrs["size_bytes"], t.user_attrs["latency"]["provenance"]) for t in complete]
    times = [t for t in trials if t.datetime_start and t.datetime_complete]
    span = (max(t.datetime_complete for t in times) - min(t.datetime_start for t in times)).total_seconds() \
        if times else None
    counts = {"complete": len(complete),
              "pruned": sum(t.state == optuna.trial.TrialState.PRUNED for t in trials),
              "failed": sum(t.state == optuna.trial.TrialState.FAIL for t in trials),
              "trials_span_s": span, "sampler": getattr(settings, "sampler", "tpe"),
              "warm_start": getattr(settings, "warm_start", True),
              "sensitivity": getattr(settings, "sensitivity", True)}
    return settings, points, counts


def figures(points: list[Point], baseline_acc: float, reference_s: float) -> dict:
    """The benchmark's figures for one method's trials (latency relative to ``reference_s``)."""
    budgets = {}
    for fraction in BUDGETS:
        best = best_under_budget(points, fraction * reference_s)
        budgets[f"{fraction:.0%}"] = None if best is None else {
            "trial": best.number, "test_acc": best.test_acc, "latency_s": best.latency_s}
    ref = (baseline_acc - HV_FLOOR, reference_s)
    volume = hypervolume([(p.test_acc, p.latency_s) for p in points], ref)
    return {"trials": len(points), "best_under_budget": budgets,
            "speedup_at_loss": speedup_at_loss(points, baseline_acc, reference_s, MAX_LOSS),
            "hypervolume": volume, "hypervolume_normalised": volume / (HV_FLOOR * reference_s)}


def analyse_model(model: str, args: argparse.Namespace, runs: dict[str, dict]) -> dict:
    """Figures for every method on one model, against one reference: the uncompressed model."""
    folders = {method: args.runs_dir / run_name(model, method, args.untuned) for method in SEARCHES}
    data = load_data(DATA, image_size=28)
    loaded = {method: load_points(folder, data) for method, folder in folders.items()}
    settings, autocomp_points, _ = loaded["autocomp"]
    for method, (other, _, _) in loaded.items():
        if other.model.spec != model or other.untuned != args.untuned:
            sys.exit(f"run {folders[method]} is {other.model.spec}, untuned={other.untuned}: not this "
                     f"benchmark's {model}, untuned={args.untuned}")
    base = settings.baseline
    uncompressed = next((p for p in autocomp_points
                         if p.label == "uncompressed" or p.plan_summary == "uncompressed"), None)
    # The uncompressed model timed as a trial, between the other trials, is the fairest
    # reference; run.json's baseline was timed once, first, before anything was warm.
    if uncompressed is not None:
        reference_s = uncompressed.latency_s
        reference = f"trial {uncompressed.number} (uncompressed) of run {settings.name}"
    else:
        reference_s = base["latency"]["median_s"]
        reference = f"the baseline measurement in run {settings.name}'s run.json"
    baseline_acc = base["test_acc"]
    methods = {}
    for method, (run_settings, points, counts) in loaded.items():
        methods[method] = {"title": SEARCHES[method][0], "run": run_settings.name, **counts,
                           "own_baseline_latency_s": run_settings.baseline["latency"]["median_s"],
                           **figures(points, baseline_acc, reference_s),
                           "points": [asdict(p) for p in points]}
    for point in autocomp_points:
        if point.label and point.label.startswith("uniform"):
            methods[point.label] = {"title": f"{point.label} (trial {point.number} of the autocomp run)",
                                    "run": settings.name, **figures([point], baseline_acc, reference_s)}
    alternatives = {name: m["hypervolume"] for name, m in methods.items() if name != "autocomp"}
    best_alternative = max(alternatives, key=alternatives.get) if alternatives else None
    ratio = (methods["autocomp"]["hypervolume"] / alternatives[best_alternative]
             if best_alternative and alternatives[best_alternative] > 0 else None)
    provenances = sorted({p["provenance"] for m in methods.values() for p in m.get("points", [])})
    return {"model": model, "data": DATA, "untuned": args.untuned,
            "baseline": {"test_acc": baseline_acc, "val_acc": base["val_acc"], "latency_s": reference_s,
                         "latency_from": reference, "run_json_latency": base["latency"]},
            "hypervolume_ref": {"test_acc": baseline_acc - HV_FLOOR, "latency_s": reference_s},
            "latency_provenance": provenances, "methods": methods,
            "best_alternative": best_alternative, "hypervolume_ratio": ratio,
            "searches": {method: runs.get(f"{model}/{method}") for method in SEARCHES}}


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:.3g} ms"


def _cell(entry: dict | None) -> str:
    if entry is None:
        return "none"
    return f"{entry['test_acc']:.2%} (#{entry['trial']}, {_ms(entry['latency_s'])})"


def markdown(report: dict) -> str:
    """The report as Markdown: one table per model, the goals, provenance and commands."""
    lines = [f"Command: `{report['command']}`", ""]
    for model in report["models"]:
        base = model["baseline"]
        kind = "untuned (TVM default schedules)" if model["untuned"] else "tuned kernels"
        lines += [f"### {model['model']} on {model['data']}, {kind}", "",
                  f"Uncompressed: test accuracy {base['test_acc']:.2%}, latency {_ms(base['latency_s'])} "
                  f"({base['latency_from']}; its run.json baseline measurement: "
                  f"{_ms(base['run_json_latency']['median_s'])}). Latency: "
                  f"{'; '.join(model['latency_provenance'])}.", "",
                  "| method | trials (pruned) | " + " | ".join(
                      f"best test acc <= {f:.0%} ({_ms(f * base['latency_s'])})" for f in BUDGETS)
                  + f" | speedup at <= {MAX_LOSS * 100:.1f} pt loss | hypervolume | autocomp / this |",
                  "| --- " * (5 + len(BUDGETS)) + "|"]
        auto = model["methods"]["autocomp"]["hypervolume"]
        for name, m in model["methods"].items():
            count = f"{m['trials']} ({m['pruned']})" if "pruned" in m else "1"
            speedup = f"{m['speedup_at_loss']:.2f}x" if m["speedup_at_loss"] else "none"
            versus = f"{auto / m['hypervolume']:.2f}x" if name != "autocomp" and m["hypervolume"] > 0 else "-"
            lines.append(f"| {m['title']} | {count} | "
                         + " | ".join(_cell(m["best_under_budget"][f"{f:.0%}"]) for f in BUDGETS)
                         + f" | {speedup} | {m['hypervolume_normalised']:.3f} | {versus} |")
        ref = model["hypervolume_ref"]
        speed = model["methods"]["autocomp"]["speedup_at_loss"]
        ratio = model["hypervolume_ratio"]
        lines += ["", f"Hypervolume: area of the (test accuracy, latency) region the method's trials "
                      f"dominate, bounded by the reference point ({ref['test_acc']:.2%}, "
                      f"{_ms(ref['latency_s'])}), divided by the reference box (10 points x "
                      f"{_ms(ref['latency_s'])}).",
                  f"Goals: speedup at <= 0.5 point loss {speed:.2f}x (goal >= {SPEEDUP_GOAL}x: "
                  f"{'met' if speed >= SPEEDUP_GOAL else 'not met'}); hypervolume autocomp / best "
                  f"alternative ({model['best_alternative']}) "
                  + (f"{ratio:.2f}x (goal >= {HV_GOAL}x: {'met' if ratio >= HV_GOAL else 'not met'})."
                     if ratio is not None else "undefined (the alternatives dominate nothing)."), ""]
        for method, search in model["searches"].items():
            if search:
                m = model["methods"][method]
                took = f"ran {search['wall_s'] / 60:.1f} min" if search["wall_s"] else "reused"
                lines.append(f"- {method}: `{search['command']}` ({took}; run {m['run']}, sampler "
                             f"{m['sampler']}, {m['failed']} failed trials, its run.json baseline "
                             f"latency {_ms(m['own_baseline_latency_s'])})")
        lines.append("")
    return "\n".join(lines)


def write_doc(path: Path, text: str) -> None:
    """Replace the results section of ``path`` (between the markers), or create it."""
    block = f"{RESULTS_START}\n{text}\n{RESULTS_END}"
    if path.is_file() and RESULTS_START in (old := path.read_text()) and RESULTS_END in old:
        head, _, rest = old.partition(RESULTS_START)
        path.write_text(head + block + rest.partition(RESULTS_END)[2])
    else:
        path.write_text(block + "\n")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=20, help="trials per search (default 20)")
    parser.add_argument("--models", default=",".join(MODELS), help="comma-separated demo networks")
    parser.add_argument("--untuned", action="store_true",
                        help="TVM default schedules (much faster compiles, slower kernels; labelled)")
    parser.add_argument("--runs-dir", type=Path, default=Path("runs/bench-search"))
    parser.add_argument("--reuse", action="store_true",
                        help="use runs already in --runs-dir (finished ones are not rerun, others resume)")
    parser.add_argument("--search-args", default="",
                        help="extra arguments for every search, e.g. '--finetune-steps 20 --val-subset 500'")
    parser.add_argument("--doc", default="docs/bench-search.md",
                        help="Markdown file whose results section is replaced ('' for none)")
    parser.add_argument("--json", default="docs/bench-search.json", help="JSON results ('' for none)")
    args = parser.parse_args(argv)
    if args.trials <= 0:
        parser.error("--trials must be positive")
    args.models = [m for m in args.models.split(",") if m]
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.runs_dir.mkdir(parents=True, exist_ok=True)
    runs = {f"{model}/{method}": ensure_run(model, method, args)
            for model in args.models for method in SEARCHES}
    given = sys.argv[1:] if argv is None else argv
    report = {"command": shlex.join(["python", "bench/search_vs_baselines.py", *given]),
              "trials": args.trials, "models": [analyse_model(model, args, runs) for model in args.models]}
    text = markdown(report)
    print(text)
    if args.doc:
        write_doc(Path(args.doc), text)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
