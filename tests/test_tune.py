"""MetaSchedule tuning: a per-target database, tasks tuned once, shared by processes."""

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from autocomp.hardware.compile import tune
from autocomp.hardware.compile.lower import to_relax
from autocomp.hardware.profiles import HardwareProfile, load_profile

SHAPE = (1, 1, 12, 12)
TRIALS = 2
TESTS = Path(__file__).resolve().parent


def model_a() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1),
                         nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10)).eval()


def model_b() -> nn.Module:
    """Shares model A's two convolutions and pooling; its classifier has another shape."""
    torch.manual_seed(1)
    return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1),
                         nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 6)).eval()


def model_c() -> nn.Module:
    torch.manual_seed(2)
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU()).eval()


def host(trials: int = TRIALS, tuning: str = "metaschedule") -> HardwareProfile:
    profile = load_profile("host")
    return dataclasses.replace(profile, latency=dataclasses.replace(
        profile.latency, trials_per_task=trials, tuning=tuning, threads=2))


def report_in_new_process(name: str, cache: Path) -> dict:
    """Tune model ``name`` in a fresh Python process; returns its TuningReport."""
    code = (f"import sys, json, dataclasses; sys.path.insert(0, {str(TESTS)!r})\n"
            "import test_tune as t\nfrom autocomp.hardware.compile import tune\n"
            f"report = tune.tune(t.to_relax(t.model_{name}(), t.SHAPE), t.host())\n"
            "print(json.dumps(dataclasses.asdict(report)))\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600,
                          env=dict(os.environ, AUTOCOMP_CACHE=str(cache)))
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def scheduled_functions(module) -> dict[str, bool]:
    import tvm

    return {gv.name_hint: bool(func.attrs and func.attrs.get("tirx.is_scheduled", False))
            for gv, func in module.functions.items() if isinstance(func, tvm.tirx.PrimFunc)}


def run(executable, x: torch.Tensor) -> np.ndarray:
    import tvm
    from tvm.runtime.vm import VirtualMachine

    vm = VirtualMachine(executable, tvm.cpu())
    return vm["main"](tvm.runtime.tensor(x.numpy(), tvm.cpu()))[0].numpy()


def new_task_count(old: nn.Module, new: nn.Module) -> int:
    """Tasks of ``new`` that are structurally different from every task of ``old``."""
    from tvm_ffi import structural_equal

    profile = host()
    known = [t.dispatched[0] for t in tune.extract_tasks(tune.fuse(to_relax(old, SHAPE), profile), profile)]
    fresh = tune.extract_tasks(tune.fuse(to_relax(new, SHAPE), profile), profile)
    return sum(not any(structural_equal(t.dispatched[0], k) for k in known) for t in fresh)


def test_tuning_dir_is_per_target(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("AUTOCOMP_CACHE", str(tmp_path))
    profile = host()
    other = dataclasses.replace(profile, tvm_target={**profile.tvm_target, "mcpu": "cortex-a53",
                                                     "mtriple": "aarch64-linux-gnu"})
    assert tune.tuning_dir(profile) == tmp_path / "tuning" / profile.target_key
    assert tune.tuning_dir(profile) != tune.tuning_dir(other) and tune.tuning_dir(other).is_dir()


def test_untuned_keeps_plain_compile_and_says_so(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("AUTOCOMP_CACHE", str(tmp_path))
    model, x = model_c(), torch.randn(*SHAPE)
    for profile, flag in ((host(), True), (host(tuning="untuned"), False)):
        lowered = tune.lower_for_build(to_relax(model, SHAPE), profile, untuned=flag)
        assert scheduled_functions(lowered) and not any(scheduled_functions(lowered).values())
        got = run(tune.compile_tuned(to_relax(model, SHAPE), profile, untuned=flag), x)
        np.testing.assert_allclose(got, model(x).detach().numpy(), atol=1e-5)
        assert tune.tuning_label(profile, flag).startswith("untuned")
    assert not list((tmp_path / "tuning").rglob("*.json"))  # nothing was tuned
    assert tune.tuning_label(host()).startswith("MetaSchedule-tuned (2 trials")


def test_a_module_with_kernels_left_unscheduled_is_not_labelled_tuned(
        monkeypatch: pytest.MonkeyPatch) -> None:
    profile = host()
    report = tune.TuningReport(profile.target_key, 5, 0, 5, 0.0, TRIALS, unscheduled=("fused_conv2d",),
                               transferred=("fused_conv2d1",))
    monkeypatch.setattr(tune, "_last_report", report)
    label = tune.schedules_label(profile)
    assert label == (f"tuned schedules ({TRIALS} trials per workload) for 3, transferred schedules for 1, "
                     "untuned for 1 of 5 kernels")
    assert "MetaSchedule-tuned" not in label


@pytest.mark.slow
def test_each_workload_is_tuned_once(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("AUTOCOMP_CACHE", str(tmp_path))
    profile, x = host(), torch.randn(*SHAPE)

    lowered = tune.lower_for_build(to_relax(model_a(), SHAPE), profile)
    first = tune.last_report()
    assert first is not None and first.tasks_in_model >= 3
    assert (first.tasks_tuned, first.tasks_reused) == (first.tasks_in_model, 0) and first.seconds > 0
    # the returned module holds the tuned TIR, and it computes what PyTorch does
    assert all(scheduled_functions(lowered).values()) and not first.unscheduled
    np.testing.assert_allclose(run(tune.compile_tuned(to_relax(model_a(), SHAPE), profile), x),
                               model_a()(x).detach().numpy(), atol=1e-5)
    assert tune.last_report().tasks_tuned == 0  # compiling again tuned nothing

    # a second model sharing layers: only its new workloads are tuned
    expected = new_task_count(model_a(), model_b())
    second = tune.tune(to_relax(model_b(), SHAPE), profile)
    assert 0 < expected < second.tasks_in_model
    assert second.tasks_tuned == expected and second.tasks_reused == second.tasks_in_model - expected

    # a fresh process reuses the database file and tunes nothing
    database = tune.tuning_dir(profile) / tune.WORKLOADS
    before = database.read_text()
    for name in ("a", "b"):
        again = report_in_new_process(name, tmp_path)
        assert again["tasks_tuned"] == 0 and again["seconds"] == 0
        assert again["tasks_reused"] == again["tasks_in_model"]
    assert database.read_text() == before
    assert len(before.splitlines()) == first.tasks_in_model + expected  # one line per workload


@pytest.mark.slow
def test_concurrent_tuners_share_one_database(tmp_path: Path) -> None:
    """Two processes tune the same model at once: one tunes, the other waits and reuses."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(2) as pool:
        reports = list(pool.map(lambda _: report_in_new_process("c", tmp_path), range(2)))
    tasks = reports[0]["tasks_in_model"]
    assert sorted(r["tasks_tuned"] for r in reports) == [0, tasks]
    folder = tmp_path / "tuning" / host().target_key
    assert len((folder / tune.WORKLOADS).read_text().splitlines()) == tasks
    assert len((folder / tune.RECORDS).read_text().splitlines()) <= tasks
    database = tune._open_database(folder)
    assert len(database.get_all_tuning_records()) == len((folder / tune.RECORDS).read_text().splitlines())
