"""Short fine-tuning of a compressed model with distillation from the original (the teacher).

The loss is Hinton et al.'s ``alpha * T^2 * KL(student_T || teacher_T) +
(1 - alpha) * CE(student, labels)`` (``_T``: softmax at temperature T), plus,
when weighted above zero, the feature losses of ``features`` (FitNets
hints, attention transfer, FSP), a sparsity regulariser from ``regularizers``,
and whatever loss terms compressed modules add themselves (``FinetuneHooks.penalty``).
``meprop_keep`` < 1 back-propagates only the top-k gradients (``meprop``).
"""

import contextlib
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from autocomp.intake.data import make_loader
from autocomp.methods.hooks import FinetuneHooks
from autocomp.training.config import FinetuneConfig
from autocomp.training.features import FeatureDistiller
from autocomp.training.meprop import meprop


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor,
            temperature: float, alpha: float) -> torch.Tensor:
    """Distillation loss on softened logits plus cross-entropy on the labels."""
    soft = F.kl_div(F.log_softmax(student_logits / temperature, dim=1),
                    F.softmax(teacher_logits / temperature, dim=1), reduction="batchmean")
    return alpha * temperature**2 * soft + (1 - alpha) * F.cross_entropy(student_logits, labels)


def hooked_modules(model: nn.Module) -> list[FinetuneHooks]:
    """The modules of ``model`` that fine-tuning must call (``FinetuneHooks``): their loss terms
    (an ADMM proximity term), their updates after each optimizer step (a sparsity mask, an
    ADMM dual update) and their settling when training ends (projection onto the grid)."""
    return [module for module in model.modules() if isinstance(module, FinetuneHooks)]


def _regularizer(name: str | None) -> Callable[[nn.Module], torch.Tensor] | None:
    if name is None:
        return None
    from autocomp.training.regularizers import REGULARIZERS

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
    hooked = hooked_modules(student)
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
                    loss = loss + sum((module.penalty() for module in hooked), 0.0)
                    if not torch.isfinite(loss):
                        raise FloatingPointError(f"fine-tuning loss became {loss.item()} at step {step}")
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    optimizer.step()
                    for module in hooked:
                        module.after_step()
                    step += 1
                    if on_step is not None:
                        on_step(step)
                    if step >= config.steps:
                        break
    finally:
        if features is not None:
            features.close()
    for module in hooked:
        module.finish_training()
    return student.eval()
