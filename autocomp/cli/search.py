"""``autocomp search``: the command line of the search (and of the demo it runs by default)."""

import argparse
from pathlib import Path

from autocomp.cli.common import add_data_args, add_model_args, positive, setup_torch
from autocomp.cli.output import silence_optuna
from autocomp.core.errors import AutocompError

DEMO_MODEL = "demo-resnet"
DEMO_DATA = "fashion-mnist"
DEMO_TRIALS = 12
DEMO_BUDGET = "70%"
DEMO_BASELINE_EPOCHS = 2


def add_search_command(commands: argparse._SubParsersAction) -> None:
    """Register ``search``."""
    from autocomp.search.config import SAMPLERS

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
    search.add_argument("--trial-schedules", choices=("transfer", "tune"), default="transfer",
                        help="kernels of workloads the tuning database lacks, in trials: transfer "
                             "(default: a tuned neighbour's schedule, no tuning on the trial's critical "
                             "path; the final front is tuned) or tune (each trial tunes them: slower)")
    search.add_argument("--no-predict", action="store_true",
                        help="compile and time every plan, also those whose latency the run's measured "
                             "trials predict to be far over the budget (by default such plans are "
                             "skipped before compiling and do not count as trials)")
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
    search.add_argument("--baseline-epochs", type=int,
                        help=f"epochs to train the baseline when no --weights are given (default 4; "
                             f"demo: {DEMO_BASELINE_EPOCHS}, which reaches about 90%% on Fashion-MNIST in "
                             "a minute on 2 cores)")
    search.add_argument("--no-export", action="store_true",
                        help="demo only: skip exporting the best trial")
    search.add_argument("--runs-dir", type=Path, default=Path("runs"))
    search.set_defaults(handler=cmd_search)


def cmd_search(args: argparse.Namespace) -> int:
    from autocomp.core.units import format_seconds
    from autocomp.export import export_trial
    from autocomp.search.config import SearchConfig
    from autocomp.search.driver import run_search

    demo = args.model is None and args.data is None
    trials = args.trials if args.trials is not None else (DEMO_TRIALS if demo else 20)
    epochs = (args.baseline_epochs if args.baseline_epochs is not None
              else DEMO_BASELINE_EPOCHS if demo else 4)
    for value, option in ((trials, "--trials"), (args.finetune_steps, "--finetune-steps"),
                          (args.train_subset, "--train-subset"), (args.val_subset, "--val-subset"),
                          (epochs, "--baseline-epochs")):
        positive(value, option)
    if args.no_finetune and args.finetune_steps:
        raise AutocompError("--no-finetune and --finetune-steps contradict each other")
    budget = args.budget if args.budget is not None else (DEMO_BUDGET if demo else None)
    config = SearchConfig(
        model=args.model or DEMO_MODEL, data=args.data or DEMO_DATA, target=args.target, weights=args.weights,
        num_classes=args.num_classes, adapt_stem=args.adapt_stem, image_size=args.image_size,
        untuned=args.untuned, budget=budget,
        size=args.size, sram=args.sram, flash=args.flash, trials=trials, sampler=args.sampler, name=args.name,
        storage=args.storage, space=args.space, finetune=not args.no_finetune,
        finetune_steps=args.finetune_steps, sensitivity=not args.no_sensitivity,
        warm_start=not args.no_warm_start, latency_table=args.latency_table,
        trial_schedules=args.trial_schedules, predict=not args.no_predict, seed=args.seed,
        train_subset=args.train_subset, val_subset=args.val_subset, baseline_epochs=epochs,
        runs_dir=args.runs_dir)
    setup_torch()
    silence_optuna()
    outcome = run_search(config)
    best = outcome.best
    if best is not None:
        baseline_s = outcome.settings.baseline["latency"]["median_s"]
        print(f"best within budget: trial {best.number}, val {best.val_acc:.2%}, latency "
              f"{format_seconds(best.latency_s)} ({baseline_s / best.latency_s:.2f}x the uncompressed "
              f"{format_seconds(baseline_s)}); export it with: autocomp export {outcome.settings.name} "
              f"--trial {best.number}")
    if demo and not args.no_export and best is not None:
        out = outcome.run_dir / "export" / f"trial-{best.number}"
        export_trial(outcome.run_dir, outcome.settings, best.number, out, force=True)
        print(f"exported trial {best.number} to {out}")
    return 0
