"""Baseline training and accuracy evaluation."""

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from autocomp.core.progress import Progress
from autocomp.intake.data import make_loader


@torch.no_grad()
def evaluate(model: nn.Module, dataset: Dataset, batch_size: int = 256) -> float:
    """Top-1 accuracy of ``model`` on ``dataset`` (0..1)."""
    model.eval()
    correct = total = 0
    for images, labels in make_loader(dataset, batch_size, shuffle=False):
        correct += (model(images).argmax(1) == labels).sum().item()
        total += len(labels)
    return correct / max(total, 1)


def train(model: nn.Module, dataset: Dataset, *, epochs: int, batch_size: int = 128,
          lr: float = 2e-3, seed: int = 0, progress: bool = True) -> nn.Module:
    """Train ``model`` in place with AdamW and a cosine schedule; with ``progress``, each epoch
    is a progress phase (a bar on a terminal, else one log line with its last loss).

    Convolutions train in the channels-last layout (about 20% faster per batch on CPUs
    here); the model is returned in the default layout."""
    torch.manual_seed(seed)
    model.to(memory_format=torch.channels_last)
    loader = make_loader(dataset, batch_size, shuffle=True, seed=seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=5e-4)
    total = epochs * len(loader)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: 0.5 * (1 + math.cos(math.pi * step / total)))
    model.train()
    for epoch in range(epochs):
        with Progress(f"train epoch {epoch + 1}/{epochs}", total=len(loader), unit="batch",
                      quiet=not progress) as bar:
            for images, labels in loader:
                images = images.contiguous(memory_format=torch.channels_last)
                loss = F.cross_entropy(model(images), labels)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                schedule.step()
                bar.set_status(f"loss {loss.item():.3f}")
                bar.update()
    return model.to(memory_format=torch.contiguous_format).eval()
