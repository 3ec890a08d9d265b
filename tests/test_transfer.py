"""Transferred schedules: a workload the database lacks replays its tuned neighbour's schedule."""

from pathlib import Path

import numpy as np
import pytest
import torch
from test_tune import SHAPE, host, model_a, run
from torch import nn

from autocomp.hardware.compile import tune
from autocomp.hardware.compile.lower import to_relax
from autocomp.hardware.compile.transfer import adapt_tiles


def wider() -> nn.Module:
    """Model A's structure with 12 channels instead of 8: every conv is a new workload."""
    torch.manual_seed(3)
    return nn.Sequential(nn.Conv2d(1, 12, 3, padding=1), nn.ReLU(), nn.Conv2d(12, 12, 3, padding=1),
                         nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(12, 10)).eval()


@pytest.mark.parametrize(("factors", "extent", "expected"), [
    ([2, 4, 8], 64, [2, 4, 8]),  # the same extent keeps the schedule's tiles
    ([2, 4, 8], 24, [1, 3, 8]),  # inner factors kept where they divide
    ([1, 16], 12, [1, 12]),  # an inner factor larger than the extent shrinks to a divisor
    ([4, 1, 7], 7, [1, 1, 7]),
])
def test_tiles_adapt_to_the_new_extent(factors: list[int], extent: int, expected: list[int]) -> None:
    adapted = adapt_tiles(factors, extent)
    assert adapted == expected and int(np.prod(adapted)) == extent


@pytest.mark.slow
def test_new_shape_gets_a_transferred_schedule_that_matches_pytorch(monkeypatch: pytest.MonkeyPatch,
                                                                    tmp_path: Path) -> None:
    monkeypatch.setenv("AUTOCOMP_CACHE", str(tmp_path))
    profile, x = host(), torch.randn(*SHAPE)
    tune.tune(to_relax(model_a(), SHAPE), profile)  # the neighbours: model A's workloads, tuned

    executable = tune.compile_tuned(to_relax(wider(), SHAPE), profile, new_workloads="transfer")
    report = tune.last_report()
    assert report.transferred, report.summary()
    assert report.tasks_tuned == report.tasks_in_model - report.tasks_reused  # no neighbour: tuned
    assert report.tasks_tuned < len(report.transferred)
    assert not report.unscheduled
    np.testing.assert_allclose(run(executable, x), wider()(x).detach().numpy(), atol=1e-5)
    label = tune.schedules_label(profile)
    assert f"transferred schedules for {len(report.transferred)} of {report.tasks_in_model} kernels" in label
    assert (tune.tuning_dir(profile) / tune.TRANSFERRED / tune.RECORDS).is_file()

    # a second compile reuses the transfers; tuning them for real then takes precedence
    tune.compile_tuned(to_relax(wider(), SHAPE), profile, new_workloads="transfer")
    assert tune.last_report().transferred == report.transferred and tune.last_report().tasks_tuned == 0
    executable = tune.compile_tuned(to_relax(wider(), SHAPE), profile)
    tuned = tune.last_report()
    assert tuned.tasks_tuned == len(report.transferred) and not tuned.transferred
    assert tune.schedules_label(profile).startswith(f"tuned schedules (2 trials per workload) for "
                                                   f"{tuned.tasks_in_model} of {tuned.tasks_in_model}")
    np.testing.assert_allclose(run(executable, x), wider()(x).detach().numpy(), atol=1e-5)


def test_unknown_policy_is_refused(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("AUTOCOMP_CACHE", str(tmp_path))
    with pytest.raises(ValueError, match="new_workloads must be one of"):
        tune.compile_tuned(to_relax(model_a(), SHAPE), host(), new_workloads="guess")


def two_new_structures() -> nn.Module:
    """Two 5x5 convs of different widths: a structure (conv2d + relu with a 5x5 kernel's
    shapes) model A never tuned, twice."""
    torch.manual_seed(4)
    return nn.Sequential(nn.Conv2d(1, 8, 5, padding=2), nn.ReLU(), nn.Conv2d(8, 12, 5, padding=2),
                         nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(12, 10)).eval()


@pytest.mark.slow
def test_without_neighbours_one_workload_per_structure_is_tuned_and_lends_its_schedule(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("AUTOCOMP_CACHE", str(tmp_path))
    profile, x = host(), torch.randn(*SHAPE)
    # an empty database: no workload has a neighbour, so only one per structure is tuned
    executable = tune.compile_tuned(to_relax(two_new_structures(), SHAPE), profile, new_workloads="transfer")
    report = tune.last_report()
    assert report.transferred and not report.unscheduled, report.summary()
    assert report.tasks_tuned + len(report.transferred) == report.tasks_in_model
    assert report.tasks_tuned < report.tasks_in_model
    np.testing.assert_allclose(run(executable, x), two_new_structures()(x).detach().numpy(), atol=1e-5)
