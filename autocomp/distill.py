"""Short fine-tuning of a compressed model with distillation from the original (the teacher).

The loss is Hinton et al.'s ``alpha * T^2 * KL(student_T || teacher_T) +
(1 - alpha) * CE(student, labels)`` (``_T``: softmax at temperature T), plus,
when weighted above zero, the feature losses of ``feature_distill`` (FitNets
hints, attention transfer, FSP), a sparsity regulariser from ``regularizers``,
and whatever loss terms compressed modules add themselves (``penalty()``).
``meprop_keep`` < 1 back-propagates only the top-k gradients (``meprop``).
"""

import contextlib
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from autocomp.data import make_loader
from autocomp.feature_distill import FeatureDistiller, FeatureLossWeights
from autocomp.meprop import meprop


@dataclass(frozen=True)
class FinetuneConfig:
    """How long and how hard a compressed model is fine-tuned, and with which losses."""

    steps: int = 200
    batch_size: int = 64
    lr: float = 1e-3
    temperature: float = 4.0
    alpha: float = 0.9
    hint_weight: float = 0.0
    attention_weight: float = 0.0
    fsp_weight: float = 0.0
    feature_points: int = 3
    regularizer: str | None = None
    regularizer_weight: float = 1e-4
    meprop_keep: float = 1.0

    @property
    def feature_weights(self) -> FeatureLossWeights:
        return FeatureLossWeights(self.hint_weight, self.attention_weight, self.fsp_weight)


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor,
            temperature: float, alpha: float) -> torch.Tensor:
    """Distillation loss on softened logits plus cross-entropy on the labels."""
    soft = F.kl_div(F.log_softmax(student_logits / temperature, dim=1),
                    F.softmax(teacher_logits / temperature, dim=1), reduction="batchmean")
    return alpha * temperature**2 * soft + (1 - alpha) * F.cross_entropy(student_logits, labels)


def _call_hooks(model: nn.Module, name: str) -> list:
    results = []
    for module in model.modules():
        hook = getattr(module, name, None)
        if callable(hook):
            results.append(hook())
    return results


def module_penalty(model: nn.Module) -> torch.Tensor | float:
    """Loss terms compressed modules add to fine-tuning (e.g. an ADMM proximity term):
    each may define ``penalty()`` returning a scalar tensor."""
    return sum(_call_hooks(model, "penalty"), 0.0)


def after_step(model: nn.Module) -> None:
    """Let compressed modules restore their invariants after an optimizer step (a sparsity
    mask, an ADMM dual update): each may define ``after_step()``."""
    _call_hooks(model, "after_step")


def finish_training(model: nn.Module) -> None:
    """Let compressed modules settle at the end of fine-tuning (e.g. project onto the
    quantization grid): each may define ``finish_training()``."""
    _call_hooks(model, "finish_training")


def _regularizer(name: str | None) -> Callable[[nn.Module], torch.Tensor] | None:
    if name is None:
        return None
    from autocomp.regularizers import REGULARIZERS

    if name not in REGULARIZERS:
        raise ValueError(f"unknown regularizer {name!r} (known: {', '.join(sorted(REGULARIZERS))})")
    return REGULARIZERS[name]


def finetune(student: nn.Module, teacher: nn.Module, dataset: Dataset, config: FinetuneConfig,
             *, seed: int = 0, on_step: Callable[[int], None] | None = None) -> nn.Module:
    """Fine-tune ``student`` in place for ``config.steps`` steps; the teacher stays frozen."""
    if config.steps <= 0:
        return student.eval()
    torch.manual_seed(seed)
    teacher.eval()
    regularizer = _regularizer(config.regularizer)
    features = None
    if config.feature_weights.active:
        example = dataset[0][0].unsqueeze(0)
        features = FeatureDistiller(teacher, student, example, config.feature_weights,
                                    config.feature_points)
    student.train()
    parameters = list(student.parameters()) + (list(features.parameters()) if features else [])
    optimizer = torch.optim.AdamW(parameters, lr=config.lr, weight_decay=1e-4)
    sparse_backward = meprop(student, config.meprop_keep) if config.meprop_keep < 1.0 \
        else contextlib.nullcontext()
    step = 0
    try:
        with sparse_backward:
            while step < config.steps:
                for images, labels in make_loader(dataset, config.batch_size, shuffle=True,
                                                  seed=seed + step):
                    with torch.no_grad():
                        teacher_logits = teacher(images)
                    loss = kd_loss(student(images), teacher_logits, labels, config.temperature,
                                   config.alpha)
                    if features is not None:
                        loss = loss + features.loss()
                    if regularizer is not None:
                        loss = loss + config.regularizer_weight * regularizer(student)
                    loss = loss + module_penalty(student)
                    if not torch.isfinite(loss):
                        raise FloatingPointError(f"fine-tuning loss became {loss.item()} at step {step}")
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    optimizer.step()
                    after_step(student)
                    step += 1
                    if on_step is not None:
                        on_step(step)
                    if step >= config.steps:
                        break
    finally:
        if features is not None:
            features.close()
    finish_training(student)
    return student.eval()
