"""Early stopping (DominatedPruner, Checkpoints) and the front-quality metrics."""

import copy
from types import SimpleNamespace

import optuna
import pytest
import torch
from optuna.trial import TrialState

from autocomp.intake.data import take
from autocomp.intake.models import build_model
from autocomp.search.early_stop import Checkpoints, DominatedPruner, checkpoint_steps
from autocomp.search.results.front_metrics import best_under_budget, hypervolume, speedup_at_loss
from autocomp.training.config import FinetuneConfig
from autocomp.training.distill import finetune

DIRECTIONS = ["maximize", "minimize", "minimize"]


def latency(seconds: float) -> dict:
    return {"median_s": seconds, "p10_s": seconds, "p90_s": seconds, "samples": 5,
            "kind": "measured", "provenance": "hand-built test trial"}


def add_completed(study: optuna.Study, acc: float, latency_s: float, size: int, *,
                  curve: dict[int, float] | None = None, steps: int = 100, feasible: bool = True) -> None:
    attrs = {"val_acc": acc, "latency": latency(latency_s), "size_bytes": size, "feasible": feasible}
    if curve is not None:
        attrs |= {"intermediate": {str(k): v for k, v in curve.items()}, "finetune_steps": steps}
    study.add_trial(optuna.trial.create_trial(values=[acc, latency_s * 1e3, size], user_attrs=attrs))


def running(study: optuna.Study, *, curve: dict[int, float] | None = None, latency_s: float = 2e-3,
            size: int = 2000, steps: int = 100, **attrs) -> optuna.trial.FrozenTrial:
    trial = study.ask()
    trial.set_user_attr("latency", latency(latency_s))
    trial.set_user_attr("size_bytes", size)
    trial.set_user_attr("finetune_steps", steps)
    if curve is not None:
        trial.set_user_attr("intermediate", {str(k): v for k, v in curve.items()})
    for key, value in attrs.items():
        trial.set_user_attr(key, value)
    return next(t for t in study.get_trials(states=(TrialState.RUNNING,)) if t.number == trial.number)


@pytest.fixture
def history() -> optuna.Study:
    """Four completed trials; the fast small one (#0) ends at 90% and the largest gain seen
    from half-way to the end is +8 points (#1)."""
    study = optuna.create_study(directions=DIRECTIONS)
    add_completed(study, 0.90, 1e-3, 1000, curve={25: 0.80, 50: 0.85, 75: 0.88})
    add_completed(study, 0.86, 3e-3, 3000, curve={25: 0.70, 50: 0.78, 75: 0.84})
    add_completed(study, 0.95, 5e-3, 5000, curve={25: 0.93, 50: 0.94, 75: 0.95})
    add_completed(study, 0.97, 1e-3, 1000, curve={25: 0.97, 50: 0.97, 75: 0.97}, feasible=False)
    return study


def test_prunes_a_dominated_hopeless_trial(history):
    pruner = DominatedPruner()
    trial = running(history, curve={25: 0.60, 50: 0.70})
    why = pruner.reason(history, trial)
    assert why is not None and "trial 0" in why and "78.50%" in why  # 0.70 + 0.08 + 0.005
    assert pruner.prune(history, trial)


def test_keeps_promising_trials(history):
    pruner = DominatedPruner()
    # 0.82 + 0.08 (trial 1's gain, not trial 0's +0.05) + margin could still beat 90%.
    assert not pruner.prune(history, running(history, curve={50: 0.82}))
    # Hopeless accuracy but faster than every feasible trial: it could join the front.
    assert not pruner.prune(history, running(history, curve={50: 0.50}, latency_s=0.5e-3))
    # Only trial 3 beats it at its speed and size, and trial 3 is over the budget.
    study = optuna.create_study(directions=DIRECTIONS)
    for _ in range(4):
        add_completed(study, 0.97, 1e-3, 1000, curve={50: 0.96}, feasible=False)
    assert not pruner.prune(study, running(study, curve={50: 0.50}))


def test_keeps_without_history_and_early_in_fine_tuning(history):
    pruner = DominatedPruner()
    empty = optuna.create_study(directions=DIRECTIONS)
    assert not pruner.prune(empty, running(empty, curve={50: 0.10}))
    few = optuna.create_study(directions=DIRECTIONS)
    for _ in range(3):
        add_completed(few, 0.90, 1e-3, 1000, curve={50: 0.89})
    assert not pruner.prune(few, running(few, curve={50: 0.10}))
    assert DominatedPruner(n_startup=3).prune(few, running(few, curve={50: 0.10}))
    no_curves = optuna.create_study(directions=DIRECTIONS)
    for _ in range(4):
        add_completed(no_curves, 0.90, 1e-3, 1000)
    assert not pruner.prune(no_curves, running(no_curves, curve={50: 0.10}))
    assert not pruner.prune(history, running(history, curve={10: 0.10}))  # before 25%


def test_prunes_infeasible_before_fine_tuning_when_configured():
    study = optuna.create_study(directions=DIRECTIONS)
    trial = running(study, feasible_before_finetune=False)
    assert "budget" in DominatedPruner().reason(study, trial)
    assert not DominatedPruner(prune_infeasible=False).prune(study, trial)
    assert not DominatedPruner().prune(study, running(study, feasible_before_finetune=True))


def test_checkpoint_steps():
    assert checkpoint_steps(30) == [8, 15, 22]
    assert checkpoint_steps(100, (0.25, 0.5, 1.0)) == [25, 50]
    assert checkpoint_steps(1) == []


@pytest.fixture(scope="module")
def tiny_finetune(fmnist):
    torch.manual_seed(0)
    teacher = build_model("demo-resnet", num_classes=10, in_channels=1).eval()
    return teacher, take(fmnist.train, 2000), take(fmnist.val, 200)


def _start(study: optuna.Study) -> optuna.Trial:
    trial = study.ask()
    trial.set_user_attr("latency", latency(2e-3))
    trial.set_user_attr("size_bytes", 2000)
    return trial


def test_checkpoints_prune_a_real_fine_tune(tiny_finetune):
    teacher, train, val = tiny_finetune
    study = optuna.create_study(directions=DIRECTIONS)
    add_completed(study, 0.99, 1e-3, 1000, curve={8: 0.98}, steps=30)
    trial = _start(study)
    student = copy.deepcopy(teacher)
    hook = Checkpoints(trial, DominatedPruner(n_startup=1), student, val, 30)
    hook.start()  # feasible: nothing to stop before fine-tuning
    with pytest.raises(optuna.TrialPruned, match=r"step 8: .*trial 0 is as fast and as small"):
        finetune(student, teacher, train, FinetuneConfig(steps=30, batch_size=32), on_step=hook)
    assert student.training  # evaluation did not leave the student in eval mode
    stored = study.get_trials(states=(TrialState.RUNNING,))[0].user_attrs
    assert list(stored["intermediate"]) == ["8"] and 0.0 <= stored["intermediate"]["8"] < 0.5
    assert stored["finetune_steps"] == 30 and "trial 0 is as fast" in stored["pruned_reason"]
    study.tell(trial, state=TrialState.PRUNED)
    assert study.trials[-1].state == TrialState.PRUNED


def test_checkpoints_record_every_checkpoint_when_kept(tiny_finetune):
    teacher, train, val = tiny_finetune
    study = optuna.create_study(directions=DIRECTIONS)
    trial = _start(study)
    student = copy.deepcopy(teacher)
    steps_seen = []
    hook = Checkpoints(trial, DominatedPruner(), student, val, 30)

    def on_step(step: int) -> None:
        hook(step)
        steps_seen.append((step, student.training))

    finetune(student, teacher, train, FinetuneConfig(steps=30, batch_size=32), on_step=on_step)
    assert all(training for _, training in steps_seen) and len(steps_seen) == 30
    curve = study.get_trials(states=(TrialState.RUNNING,))[0].user_attrs["intermediate"]
    assert list(curve) == ["8", "15", "22"] and all(0.0 <= acc <= 1.0 for acc in curve.values())
    infeasible = _start(study)
    infeasible.set_user_attr("feasible_before_finetune", False)
    with pytest.raises(optuna.TrialPruned, match="step 0: over the latency or memory budget"):
        Checkpoints(infeasible, DominatedPruner(), student, val, 30).start()


def result(acc: float, latency_s: float, test_acc: float | None = None) -> SimpleNamespace:
    return SimpleNamespace(val_acc=acc, test_acc=test_acc, latency_s=latency_s)


def test_hypervolume_hand_computed():
    ref = (0.7, 2.0)
    # (0.8 - 0.7) x (1.0 - 0.5) + (0.9 - 0.7) x (2.0 - 1.0) = 0.05 + 0.2
    assert hypervolume([(0.9, 1.0), (0.8, 0.5)], ref) == pytest.approx(0.25)
    dominated_and_outside = [(0.9, 1.0), (0.8, 0.5), (0.75, 1.5), (0.6, 0.1), (0.95, 2.5), (0.8, 1.0)]
    assert hypervolume(dominated_and_outside, ref) == pytest.approx(0.25)
    assert hypervolume([(0.9, 1.0)], ref) == pytest.approx(0.2)
    assert hypervolume([], ref) == 0.0
    # Three steps: 0.1 x 0.5 + 0.15 x 0.5 + 0.2 x 0.5; (0.82, 1.0) is dominated by (0.85, 1.0)
    assert hypervolume([(0.9, 1.5), (0.82, 1.0), (0.8, 0.5), (0.85, 1.0)], ref) == \
        pytest.approx(0.225)


def test_best_under_budget_and_speedup_at_loss():
    rows = [result(0.90, 10e-3), result(0.897, 4e-3), result(0.93, 5e-3, test_acc=0.88),
            result(0.85, 2e-3)]
    assert best_under_budget(rows, 5e-3) is rows[1]  # test accuracy 0.88 counts for row 2
    assert best_under_budget(rows, 3e-3) is rows[3]
    assert best_under_budget(rows, 1e-3) is None
    assert speedup_at_loss(rows, 0.90, 10e-3) == pytest.approx(2.5)
    assert speedup_at_loss(rows, 0.90, 10e-3, max_loss=0.05) == pytest.approx(5.0)
    assert speedup_at_loss(rows, 0.99, 10e-3) == 0.0
