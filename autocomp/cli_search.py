"""``autocomp search``: the command line of the search (and of the demo it runs by default)."""

import argparse
from pathlib import Path

from autocomp.errors import AutocompError

DEMO_MODEL = "demo-resnet"
DEMO_DATA = "fashion-mnist"
DEMO_TRIALS = 12
DEMO_BUDGET = "70%"


def add_search_command(commands: argparse._SubParsersAction, add_model_args, add_data_args) -> None:
    from autocomp.search.study import SAMPLERS

    search = commands.add_parser(
        "search", help="search per-layer compression plans (no --model/--data: the demo)")
    add_model_args(search, model_required=False)
    add_data_args(search, required=False)
    search.add_argument("--target", default="host", help="hardware profile (autocomp targets)")
    search.add_argument("--untuned", action="store_true",
                        help="compile with TVM's default schedules instead of tuned kernels (fast to "
                             "compile, far slower kernels; every latency is labelled 'untuned')")
    search.add_argument("--budget", help="latency limit: 20ms, 1.5s, 800us, or 60%% of the "
                                         f"uncompressed model (demo: {DEMO_BUDGET.replace('%', '%%')})")
    search.add_argument("--size", help="deployed model size limit: 1MB, 300KB")
    search.add_argument("--sram", help="peak SRAM limit for microcontroller targets (default: the profile's)")
    search.add_argument("--flash", help="flash limit for microcontroller targets (default: the profile's)")
    search.add_argument("--trials", type=int, help=f"trials to finish (demo: {DEMO_TRIALS}; default 20)")
    search.add_argument("--sampler", choices=SAMPLERS, default="tpe",
                        help="Optuna sampler: tpe (default, multivariate, constraint-aware), nsga2, random")
    search.add_argument("--name", help="run name: outputs go to RUNS/NAME (rerun to resume)")
    search.add_argument("--storage",
                        help="shared Optuna storage so several workers run one study: "
                             "postgresql://user:pass@host/db, mysql://..., sqlite:///file.db or "
                             "journal:FILE (default: RUNS/NAME/study.db)")
    search.add_argument("--space", help="search space name or YAML path (default: default; with "
                                        "--no-finetune: data-free)")
    search.add_argument("--no-finetune", action="store_true",
                        help="data-free: no fine-tuning and no training labels, only calibration on "
                             "unlabelled training images")
    search.add_argument("--no-sensitivity", action="store_true",
                        help="skip the sensitivity pre-pass that narrows and seeds the space")
    search.add_argument("--no-warm-start", action="store_true",
                        help="do not enqueue the uncompressed model and the uniform baselines")
    search.add_argument("--latency-table", action="store_true",
                        help="also record the kernel latency table's prediction next to each measured "
                             "latency (metrics.json), and its error at the end (host targets)")
    search.add_argument("--seed", type=int, default=0)
    search.add_argument("--finetune-steps", type=int,
                        help="override the space's fine-tuning steps per trial")
    search.add_argument("--train-subset", type=int, default=20000,
                        help="training images fine-tuning draws from (default 20000)")
    search.add_argument("--val-subset", type=int,
                        help="validation images each trial is scored on (default: all)")
    search.add_argument("--baseline-epochs", type=int, default=4,
                        help="epochs to train the baseline when no --weights are given")
    search.add_argument("--no-export", action="store_true",
                        help="demo only: skip exporting the best trial")
    search.add_argument("--runs-dir", type=Path, default=Path("runs"))


def cmd_search(args: argparse.Namespace, model_source, setup_torch) -> int:
    from autocomp.baseline import cached_baseline
    from autocomp.data import load_data
    from autocomp.export import export_trial
    from autocomp.search.driver import run_search
    from autocomp.search.run import RunSettings, check_name, with_memory_limits
    from autocomp.search.space import load_space
    from autocomp.units import format_seconds, parse_budget, parse_bytes

    demo = args.model is None and args.data is None
    model_spec = args.model or DEMO_MODEL
    data_spec = args.data or DEMO_DATA
    trials = args.trials if args.trials is not None else (DEMO_TRIALS if demo else 20)
    budget_text = args.budget if args.budget is not None else (DEMO_BUDGET if demo else None)
    for value, option in ((trials, "--trials"), (args.finetune_steps, "--finetune-steps"),
                          (args.train_subset, "--train-subset"), (args.val_subset, "--val-subset"),
                          (args.baseline_epochs, "--baseline-epochs")):
        if value is not None and value <= 0:
            raise AutocompError(f"{option} must be positive, not {value}")
    if args.no_finetune and args.finetune_steps:
        raise AutocompError("--no-finetune and --finetune-steps contradict each other")
    budget = parse_budget(budget_text) if budget_text else None
    size_budget = parse_bytes(args.size) if args.size else None
    profile = with_memory_limits(_load_target(args), args.sram, args.flash)
    space = load_space(args.space or ("data-free" if args.no_finetune else "default"))
    if args.finetune_steps:
        space = space.with_finetune(steps=args.finetune_steps)
    name = check_name(args.name or f"{model_spec.split(':')[-1].replace('.py', '')}-{profile.name}")
    if args.storage:
        from autocomp.search.storage import open_storage

        open_storage(args.storage, args.runs_dir / name)  # fail fast on a bad URL
    setup_torch()
    data = load_data(data_spec, image_size=args.image_size)
    source = model_source(args, model_spec, data)
    source.build()  # fail fast on a bad spec or weights, before anything is written
    limits = ", ".join(text for text in (
        f"latency {budget_text}" if budget_text else "", f"size {args.size}" if args.size else "",
        f"SRAM {args.sram}" if args.sram else "", f"flash {args.flash}" if args.flash else "") if text)
    print(f"{'demo' if demo else 'search'}: compressing {model_spec} on {data_spec} for target "
          f"{profile.name}, budgets: {limits or 'none'}, {trials} trials, space {space.name}, sampler "
          f"{args.sampler}{', data-free (no fine-tuning)' if args.no_finetune else ''}; latency "
          f"{profile.how()}")
    if source.weights is None:
        source, _ = cached_baseline(source, data, args.baseline_epochs)
    settings = RunSettings(name, source, data_spec, profile.name, space.name,
                           budget.text if budget else None, trials, args.seed, args.train_subset,
                           args.val_subset, untuned=args.untuned, sampler=args.sampler,
                           storage=args.storage, size_budget=args.size, sram=args.sram, flash=args.flash,
                           finetune=not args.no_finetune, sensitivity=not args.no_sensitivity,
                           warm_start=not args.no_warm_start, latency_table=args.latency_table)
    outcome = run_search(settings, args.runs_dir, data, profile, space, budget, size_budget)
    best = outcome.best
    if best is not None:
        baseline_s = settings.baseline["latency"]["median_s"]
        print(f"best within budget: trial {best.number}, val {best.val_acc:.2%}, latency "
              f"{format_seconds(best.latency_s)} ({baseline_s / best.latency_s:.2f}x the uncompressed "
              f"{format_seconds(baseline_s)}); export it with: autocomp export {name} --trial {best.number}")
    if demo and not args.no_export and best is not None:
        out = outcome.run_dir / "export" / f"trial-{best.number}"
        export_trial(outcome.run_dir, settings, best.number, out, force=True)
        print(f"exported trial {best.number} to {out}")
    return 0


def _load_target(args: argparse.Namespace):
    from autocomp.hardware.profiles import load_target

    return load_target(args.target, untuned=args.untuned)
