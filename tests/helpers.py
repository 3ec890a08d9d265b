"""Small helpers shared by the tests."""

import os
import shutil

import pytest
import torch
from torch import nn

from autocomp.core.inventory import Inventory, build_inventory
from autocomp.intake.models import build_model
from autocomp.methods.plan import CompressionPlan


def make_plan(layers: dict) -> CompressionPlan:
    """A plan from its JSON ``layers`` object."""
    return CompressionPlan.from_json({"version": 1, "layers": layers})


def relative_error(got: torch.Tensor, expected: torch.Tensor) -> float:
    """||got - expected|| / ||expected||."""
    return ((got - expected).norm() / expected.norm()).item()


def seeded_model(spec: str, shape: tuple[int, ...], **kwargs) -> tuple[nn.Module, Inventory]:
    """A seeded model in eval mode and its inventory, without channel coupling (the methods
    that do not prune need none, and tracing it is slow on factorised layers)."""
    torch.manual_seed(0)
    model = build_model(spec, num_classes=10, **kwargs).eval()
    return model, build_inventory(model, shape, coupling=False)


def require_tool(tool: str, what: str) -> None:
    """Skip the test when ``tool`` is not on PATH, saying what provides it; in CI (``CI`` set,
    as ``.ci/run`` does, which installs every tool) its absence is a failure instead."""
    if shutil.which(tool) is None:
        unavailable(f"{tool} ({what}) is not installed")


def unavailable(reason: str) -> None:
    """Skip with ``reason`` here; fail with it in CI, where nothing may be missing."""
    if os.environ.get("CI"):
        pytest.fail(f"CI lacks what this test needs: {reason}")
    pytest.skip(reason)
