"""Early stopping for the multi-objective search.

Optuna's ``Trial.report``/``should_prune`` refuse multi-objective studies, so a trial's
intermediate validation accuracies live in its user attribute ``"intermediate"``
(``{"STEP": accuracy}``) with ``"finetune_steps"`` (the steps planned), and
``DominatedPruner`` is asked directly. A trial's latency and size are known before it is
fine-tuned (the objective measures them first and stores the user attributes ``latency``
and ``size_bytes``), so only its accuracy is uncertain: the pruner stops the trial when
even an optimistic final accuracy could not put it on the feasible front.

How the samplers see a pruned trial (Optuna 5): TPE puts pruned trials with no violated
constraint in its "above" (worse) group, and a pruned trial whose constraints were set
before it was pruned (``trial.set_constraint``, which the objective can do once latency
is measured) among the infeasible trials, ranked by its violation; so both still steer
the sampler away from that region. NSGA-II selects from completed trials only.
"""

from collections.abc import Sequence

import optuna
from optuna.trial import FrozenTrial, TrialState
from torch import nn
from torch.utils.data import Dataset

from autocomp.training.train import evaluate

INTERMEDIATE = "intermediate"
STEPS = "finetune_steps"
CHECKPOINT_FRACTIONS = (0.25, 0.5, 0.75)


def intermediate(trial: FrozenTrial) -> dict[int, float]:
    """A trial's intermediate accuracies by fine-tuning step (empty when it has none)."""
    return {int(step): float(acc) for step, acc in trial.user_attrs.get(INTERMEDIATE, {}).items()}


def _progress(trial: FrozenTrial, step: int) -> float | None:
    steps = trial.user_attrs.get(STEPS)
    return step / steps if steps else None


def _final_accuracy(trial: FrozenTrial) -> float:
    return float(trial.user_attrs.get("val_acc", trial.values[0]))


def _gain_after(trial: FrozenTrial, progress: float) -> float | None:
    """How much a completed trial's accuracy rose from its last checkpoint at or before
    ``progress`` (a fraction of its fine-tuning) to its final accuracy."""
    curve = intermediate(trial)
    done = {step: _progress(trial, step) for step in curve}
    earlier = [step for step, part in done.items() if part is not None and part <= progress + 1e-9]
    if not earlier:
        return None
    return _final_accuracy(trial) - curve[max(earlier)]


class DominatedPruner(optuna.pruners.BasePruner):
    """Stops a fine-tuning trial that cannot reach the feasible front.

    Pruned when (a) ``prune_infeasible`` and the trial's user attribute
    ``feasible_before_finetune`` is False (over the latency or memory budget, measured
    before fine-tuning: its accuracy cannot put it on the feasible front), at any step; or
    (b) at least ``min_fraction`` of its fine-tuning is done, at least ``n_startup`` trials
    completed, some of them have intermediate curves, and a completed feasible trial is at
    least as fast, at least as small and more accurate than this trial's optimistic final
    accuracy: its latest intermediate accuracy plus the largest gain completed trials made
    from the same point of their fine-tuning to its end, plus ``margin``.
    """

    def __init__(self, *, n_startup: int = 4, min_fraction: float = 0.25, margin: float = 0.005,
                 prune_infeasible: bool = True) -> None:
        if not 0.0 <= min_fraction <= 1.0:
            raise ValueError(f"min_fraction must be within [0, 1], not {min_fraction}")
        self.n_startup = n_startup
        self.min_fraction = min_fraction
        self.margin = margin
        self.prune_infeasible = prune_infeasible

    def prune(self, study: optuna.Study, trial: FrozenTrial) -> bool:
        return self.reason(study, trial) is not None

    def reason(self, study: optuna.Study, trial: FrozenTrial) -> str | None:
        """Why ``trial`` should stop, or None when it should go on."""
        attrs = trial.user_attrs
        if self.prune_infeasible and attrs.get("feasible_before_finetune") is False:
            return "over the latency or memory budget before fine-tuning"
        curve = intermediate(trial)
        if not curve or "latency" not in attrs or "size_bytes" not in attrs:
            return None
        step = max(curve)
        progress = _progress(trial, step)
        if progress is None or progress < self.min_fraction:
            return None
        completed = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        if len(completed) < self.n_startup:
            return None
        gains = [g for g in (_gain_after(t, progress) for t in completed) if g is not None]
        if not gains:
            return None
        optimistic = curve[step] + max(0.0, max(gains)) + self.margin
        latency_s, size = float(attrs["latency"]["median_s"]), float(attrs["size_bytes"])
        for other in completed:
            theirs = other.user_attrs
            if theirs.get("feasible") is not True or "latency" not in theirs or "size_bytes" not in theirs:
                continue
            accuracy = _final_accuracy(other)
            if (theirs["latency"]["median_s"] <= latency_s and theirs["size_bytes"] <= size
                    and accuracy > optimistic):
                return (f"at step {step} ({progress:.0%} of fine-tuning) val {curve[step]:.2%}, at "
                        f"best {optimistic:.2%} by the end (largest gain seen {max(gains):+.2%}); "
                        f"trial {other.number} is as fast and as small at {accuracy:.2%}")
        return None


def checkpoint_steps(steps: int, fractions: Sequence[float] = CHECKPOINT_FRACTIONS) -> list[int]:
    """The fine-tuning steps (1..steps-1) at which ``fractions`` of ``steps`` are done."""
    return sorted({s for s in (round(f * steps) for f in fractions) if 0 < s < steps})


class Checkpoints:
    """``on_step`` hook for ``autocomp.training.distill.finetune``: at each checkpoint step it scores
    the student on ``val``, records the accuracy in the trial's ``intermediate`` user
    attribute, asks ``pruner`` and, when told to stop, stores the reason in the user
    attribute ``pruned_reason`` and raises ``optuna.TrialPruned``.

    ``val`` should be a small subset (a few hundred images): it is evaluated at every
    checkpoint. ``start()`` asks the pruner before fine-tuning (only its budget rule can
    fire then)."""

    def __init__(self, trial: optuna.Trial, pruner: DominatedPruner, student: nn.Module,
                 val: Dataset, steps: int, fractions: Sequence[float] = CHECKPOINT_FRACTIONS) -> None:
        self.trial = trial
        self.pruner = pruner
        self.student = student
        self.val = val
        self.steps = checkpoint_steps(steps, fractions)
        self.curve: dict[str, float] = {}
        trial.set_user_attr(STEPS, steps)

    def start(self) -> None:
        self._ask(0)

    def __call__(self, step: int) -> None:
        if step not in self.steps:
            return
        was_training = self.student.training
        try:
            self.curve[str(step)] = evaluate(self.student, self.val)
        finally:
            self.student.train(was_training)
        self.trial.set_user_attr(INTERMEDIATE, dict(self.curve))
        self._ask(step)

    def _ask(self, step: int) -> None:
        study = self.trial.study
        frozen = next(t for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
                      if t.number == self.trial.number)
        why = self.pruner.reason(study, frozen)
        if why is not None:
            message = f"pruned at fine-tuning step {step}: {why}"
            self.trial.set_user_attr("pruned_reason", message)
            raise optuna.TrialPruned(message)
