import dataclasses
from collections import OrderedDict
from pathlib import Path

import pytest
import torch
from torch import nn

from autocomp.core.errors import AutocompError
from autocomp.hardware.costmodel.kernels import model_kernels
from autocomp.hardware.costmodel.lut import LatencyTable, summarise
from autocomp.hardware.measure.local import LocalMeasurer
from autocomp.hardware.profiles import load_profile

SHAPE = (1, 1, 16, 16)


def quick_profile(**latency):
    """The host profile, untuned (no tuning in unit tests) and with short timings."""
    base = load_profile("host")
    settings = {"tuning": "untuned", "repeat": 9, "min_repeat_ms": 0, **latency}
    return dataclasses.replace(base, latency=dataclasses.replace(base.latency, **settings))


def small_net(width: int = 8) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(OrderedDict(
        conv1=nn.Conv2d(1, width, 3, padding=1), relu1=nn.ReLU(),
        conv2=nn.Conv2d(width, 16, 3, padding=1), relu2=nn.ReLU(),
        pool=nn.AdaptiveAvgPool2d(1), flat=nn.Flatten(), fc=nn.Linear(16, 10))).eval()


def test_kernels_are_the_vm_calls_named_after_their_layers() -> None:
    kernels = model_kernels(small_net(), SHAPE, quick_profile())
    conv_calls = [call for call in kernels.calls if kernels.kernels[call.kernel].op == "conv2d"]
    assert [call.layer for call in conv_calls] == ["conv1", "conv2"]
    layers = {call.layer for call in kernels.calls}
    assert layers == {"conv1", "conv2", "fc"}  # activations and the pool follow their producer
    # each kernel carries its real buffers: conv2 reads 1x8x16x16 and 16x8x3x3
    conv2 = kernels.kernels[conv_calls[1].kernel]
    assert conv2.args[:2] == (((1, 8, 16, 16), "float32"), ((16, 8, 3, 3), "float32"))
    assert conv2.tuning.startswith("untuned@tvm-") and len(conv2.digest) == 16
    assert sum(kernels.counts().values()) == len(kernels.calls)


def test_misses_are_measured_once_and_persist(tmp_path: Path) -> None:
    profile = quick_profile()
    path = tmp_path / "table.sqlite"
    kernels = model_kernels(small_net(), SHAPE, profile)
    with LatencyTable(profile, path) as table:
        first = table.predict_kernels(kernels)
        again = table.predict_kernels(kernels)
        entry = table.lookup(next(iter(kernels.kernels.values())))
    assert first.hits == 0 and first.kernels == len(kernels.kernels) and first.calls == len(kernels.calls)
    assert again.hits == again.kernels and again.latency.median_s == first.latency.median_s
    assert entry is not None and entry.samples == 9 and 0 < entry.p10_s <= entry.median_s <= entry.p90_s
    assert "measured alone" in entry.provenance
    assert f"{profile.latency.threads} threads" in entry.provenance
    assert first.latency.kind == "estimated" and "latency table sum" in first.latency.provenance

    with LatencyTable(profile, path) as reopened:  # another process's view of the same file
        wider = reopened.predict(small_net(width=12), SHAPE)
    # conv1 and its activation change shape, the head does not: part of the model hits
    assert 0 < wider.hits < wider.kernels

    with LatencyTable(quick_profile(threads=1), path) as single:  # threads are part of the key
        assert single.predict_kernels(kernels).hits == 0


def test_prediction_is_recorded_with_the_measurement(tmp_path: Path) -> None:
    profile = quick_profile(repeat=15)
    model = small_net(32)
    measurer = LocalMeasurer(profile)
    try:
        measured = measurer.measure(model, SHAPE)
    finally:
        measurer.close()
    kernels = model_kernels(model, SHAPE, profile)
    with LatencyTable(profile, tmp_path / "table.sqlite") as table:
        predicted = table.predict_kernels(kernels)
        table.record(predicted, measured, "w32")
        records = table.records()
        overhead = table.fit_overhead()
        after = table.predict_kernels(kernels)
        summary = table.error_summary()
    assert [row["label"] for row in records] == ["w32"]
    # a loose band: the machine is shared, but a table that missed a kernel or counted
    # one twice would be off by far more
    assert 0.4 < records[0]["predicted_s"] / records[0]["measured_s"] < 2.5
    assert records[0]["measured_provenance"] == measured.provenance
    assert overhead.models == 1 and "fitted on 1 model measured" in overhead.provenance
    assert overhead.scale == 1.0  # one model: the per-call term alone
    # the fit closes the gap on the model it was fitted to
    assert after.latency.median_s == pytest.approx(measured.median_s, rel=1e-6)
    error = records[0]["predicted_s"] / records[0]["measured_s"] - 1
    assert summary.count == 1 and summary.median_abs == pytest.approx(abs(error))
    assert summary.within_10pct == (1.0 if abs(error) <= 0.1 else 0.0)


def test_a_reference_relative_figure_is_checked_as_timed(tmp_path: Path) -> None:
    """The search's figures are ratio x the run's baseline, timed at another moment: with the
    baseline timed on a busy machine they are 2x what the kernels, timed alone now, sum to. The
    table is checked, and its in-model correction fitted, against the candidate's own median in
    its rounds, so a busy baseline does not become a 2x correction for every later run."""
    from autocomp.hardware.costmodel.lut import Prediction
    from autocomp.hardware.measure.base import Latency

    profile = quick_profile()
    timed = {"ratio": 2.0, "raw_median_s": 1e-4, "reference_s": 1e-4, "baseline_s": 2e-4, "level_s": 1e-4}
    figure = Latency(2e-4, 1.8e-4, 2.2e-4, 15, "measured", "reference-relative", reference=timed)
    predicted = Latency(1.1e-4, 1e-4, 1.2e-4, 9, "estimated", "table sum")
    with LatencyTable(profile, tmp_path / "table.sqlite") as table:
        table.record(Prediction(predicted, "d", 3, 3, 3, 1e-4, 1e-5), figure, "run/trial 1")
        rows = table.records()
        overhead = table.fit_overhead()
        summary = table.error_summary()
    assert [(row["measured_s"], row["measured_p10_s"]) for row in rows] == [
        (pytest.approx(1e-4), pytest.approx(0.9e-4))]
    assert "as timed" in rows[0]["measured_provenance"]
    # the kernels sum to what was timed: no per-call term (the busy baseline's would be 33 us)
    assert overhead.per_call_s == pytest.approx(0.0, abs=1e-12)
    assert summary.median_signed == pytest.approx(0.1)


def test_a_failed_prediction_is_recorded_apart_from_the_error(tmp_path: Path,
                                                              caplog: pytest.LogCaptureFixture) -> None:
    from autocomp.search.objective import _predict_from_table

    profile = quick_profile()
    measurer = LocalMeasurer(profile)
    try:
        measured = measurer.measure(small_net(), SHAPE)
    finally:
        measurer.close()
    with LatencyTable(profile, tmp_path / "table.sqlite") as table:
        fine = _predict_from_table(table, small_net(), SHAPE, measured, "run/trial 0")
        # a model that does not run at this shape: the prediction fails, the trial goes on
        wrong = nn.Sequential(nn.Flatten(), nn.Linear(256, 4), nn.Unflatten(1, (2, 3)))
        broken = _predict_from_table(table, wrong, SHAPE, measured, "run/trial 1")
    assert isinstance(fine["error"], float) and "failed" not in fine
    assert set(broken) == {"failed"} and "run/trial 1: latency table prediction failed" in caplog.text


def test_a_damaged_table_is_set_aside_and_started_again(tmp_path: Path,
                                                       caplog: pytest.LogCaptureFixture) -> None:
    profile = quick_profile()
    path = tmp_path / "table.sqlite"
    with LatencyTable(profile, path) as table:
        table.predict_kernels(model_kernels(small_net(), SHAPE, profile))  # fills it
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])  # a copy cut short
    with LatencyTable(profile, path) as table:
        assert table.records() == []
    assert (tmp_path / "table.sqlite.damaged").is_file()
    assert "latency table" in caplog.text and "is damaged" in caplog.text


def test_error_summary_figures() -> None:
    summary = summarise([0.0, 0.05, -0.05, 0.2, -0.08])
    assert summary.count == 5
    assert summary.median_abs == pytest.approx(0.05)
    assert summary.within_10pct == pytest.approx(0.8)
    assert summary.median_signed == pytest.approx(0.0)
    assert 0.08 < summary.p95_abs <= 0.2


def test_only_local_profiles_have_a_table(tmp_path: Path) -> None:
    with pytest.raises(AutocompError, match=r"cortex-m7.*'estimate'"):
        LatencyTable(load_profile("cortex-m7"), tmp_path / "t.sqlite")
