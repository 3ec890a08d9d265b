"""Calibrating the cost model against published figures and against measurements."""

import logging
import math
import statistics
import time
from pathlib import Path

import pytest
import torch
import yaml

from autocomp.core.errors import AutocompError
from autocomp.core.paths import cache_dir
from autocomp.hardware.costmodel.estimate import CostModel, aggregate_op, list_ops
from autocomp.hardware.costmodel.fit import (
    CalibrationModel,
    anchors_dir,
    build_spec,
    calibrate,
    compressed_model,
    load_anchors,
)
from autocomp.hardware.measure.base import Latency
from autocomp.hardware.profiles import load_profile


@pytest.fixture(scope="module")
def a76_result(tmp_path_factory: pytest.TempPathFactory):
    out = tmp_path_factory.mktemp("profiles") / "arm-a76.yaml"
    return calibrate(load_profile("arm-a76"), anchors_dir() / "arm-a76.yaml", out=out), out


def test_anchor_fit_reproduces_the_figures_within_its_reported_error(a76_result) -> None:
    result, out = a76_result
    fitted = [row for row in result.rows if row.role == "fit"]
    assert len(fitted) == 4
    worst_out_of_sample = result.summary()["fit (leave-one-out)"]["max_abs_error"]
    for row in fitted:
        assert abs(row.error) <= worst_out_of_sample
        # ... and inside the p10-p90 band that later estimates carry.
        assert abs(math.log(row.estimated_s / row.measured_s)) <= 1.2816 * result.spread_log_sd
    # The written profile gives the same estimates for the anchors' models.
    profile = load_profile(str(out))
    model = CostModel.for_profile(profile)
    ops = list_ops(build_spec("torchvision:resnet18", (1, 3, 224, 224)), (1, 3, 224, 224))
    resnet = next(row for row in fitted if row.label.startswith("resnet18") and row.threads == 4)
    assert model.seconds(ops, 4) == pytest.approx(resnet.estimated_s, rel=1e-4)  # 5 digits written


def test_written_profile_changes_only_the_cost_model(a76_result) -> None:
    result, out = a76_result
    original = yaml.safe_load((Path(load_profile("arm-a76").source)).read_text())
    written = yaml.safe_load(out.read_text())
    assert {k: v for k, v in written.items() if k != "cost_model"} == \
        {k: v for k, v in original.items() if k != "cost_model"}
    cost = load_profile(str(out)).cost_model
    assert "anchors/arm-a76.yaml" in cost.fitted_to
    for name in result.fitted:
        assert cost.sources[name].startswith("fitted by autocomp calibrate on ")
    assert cost.sources["clock_hz"] == load_profile("arm-a76").cost_model.sources["clock_hz"]
    assert cost.constants["spread_log_sd"] == pytest.approx(result.spread_log_sd, rel=1e-4)
    report = result.report()
    assert "leave-one-out" in report and "resnet18 224, 1 thr float32, ncnn" in report


def test_aggregate_figures_fit_one_scale_and_say_so() -> None:
    result = calibrate(load_profile("cortex-m7"), anchors_dir() / "cortex-m7.yaml", write=False)
    assert "aggregate MACs only" in result.fitted_to
    assert any("only aggregate figures" in note for note in result.notes)
    conv = result.constants["efficiency_conv"]
    ratios = [result.constants[f"efficiency_{kind}"] / conv for kind in ("dwconv", "dense")]
    assert ratios == pytest.approx([0.3, 0.6])
    assert {row.role for row in result.rows} == {"fit", "check"}
    assert max(abs(row.error) for row in result.rows if row.role == "fit") < 0.25
    # Published at 480 MHz; the profile's M7 runs at 216 MHz: compute scales with the clock.
    model, ops = CostModel(result.constants), [aggregate_op(6.4e6, "int8")]
    assert model.seconds(ops, 1) / model.seconds(ops, 1, clock_hz=4.8e8) == pytest.approx(480 / 216, rel=1e-3)


def test_bundled_profiles_hold_fitted_constants() -> None:
    for name in ("arm-a53", "arm-a76", "cortex-m7"):
        cost = load_profile(name).cost_model
        assert f"anchors/{name}.yaml" in cost.fitted_to
        assert any(source.startswith("fitted by autocomp calibrate") for source in cost.sources.values())
        assert 0.0 < cost.constants["spread_log_sd"] < 1.0


@pytest.mark.parametrize(("change", "message"), [
    ({"latency": "fast"}, r"bad\.yaml: anchors\[1\]\.latency: cannot read"),
    ({"macs": 1e6}, r"bad\.yaml: anchors\[1\]\.model: give either model"),
    ({"dtype": "fp16"}, r"bad\.yaml: anchors\[1\]\.dtype: 'fp16' is not one of"),
    ({"colour": "red"}, r"bad\.yaml: anchors\[1\]\.colour: unknown key"),
    ({"source": None}, r"bad\.yaml: anchors\[1\]\.source: missing"),
])
def test_bad_anchors_file_names_the_file_and_key(tmp_path: Path, change: dict, message: str) -> None:
    data = yaml.safe_load((anchors_dir() / "arm-a76.yaml").read_text())
    data["anchors"][1].update(change)
    data["anchors"][1] = {k: v for k, v in data["anchors"][1].items() if v is not None}
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(AutocompError, match=message) as error:
        calibrate(load_profile("arm-a76"), path, write=False)
    assert "\n" not in str(error.value)


def test_anchors_for_another_target_are_refused() -> None:
    with pytest.raises(AutocompError, match=r"arm-a53\.yaml: target: 'arm-a53': these figures are not for"):
        load_anchors(anchors_dir() / "arm-a53.yaml", "arm-a76")


class TorchEagerMeasurer:
    """Times PyTorch eager inference here: a real, fast measurement for exercising the
    device path of the calibration (the TVM measurer compiles for minutes)."""

    def measure(self, model: torch.nn.Module, input_shape: tuple[int, ...]) -> Latency:
        x = torch.randn(*input_shape)
        times = []
        with torch.no_grad():
            model(x)
            for _ in range(7):
                start = time.perf_counter()
                model(x)
                times.append(time.perf_counter() - start)
        times.sort()
        return Latency(statistics.median(times), times[1], times[-2], len(times), "measured",
                       "measured (this machine, PyTorch eager, test)")

    def close(self) -> None:
        pass


def test_device_calibration_reports_held_out_error(caplog: pytest.LogCaptureFixture, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    # The calibrated profile goes to the default place, in a cache of this test's own: later
    # tests load calibrated profiles from the shared cache, and must not get this one.
    monkeypatch.setenv("AUTOCOMP_CACHE", str(tmp_path))
    shape = (1, 1, 28, 28)

    def plain(spec: str) -> CalibrationModel:
        return CalibrationModel(spec, "fit", lambda: (build_spec(spec, shape, 10), shape))

    prune = {"method": "prune", "ratio": 0.5}
    models = [plain("demo-resnet"), plain("demo-mobilenetv2"),
              CalibrationModel("demo-resnet pruned", "held-out",
                               lambda: (compressed_model("demo-resnet", shape, prune), shape))]
    caplog.set_level(logging.INFO, logger="autocomp")
    result = calibrate(load_profile("host"), "device", measurer=TorchEagerMeasurer(), models=models)
    lines = [record.getMessage() for record in caplog.records
             if record.name == "autocomp.hardware.costmodel.fit"]
    assert len(lines) == 3 and "PyTorch eager" in lines[0]
    assert result.out == cache_dir() / "profiles" / "host.yaml" == tmp_path / "profiles" / "host.yaml"
    fitted_to = load_profile(str(result.out)).cost_model.fitted_to
    assert fitted_to == ("2 models (demo-resnet, demo-mobilenetv2), "
                         "measured (this machine, PyTorch eager, test)")
    summary = result.summary()
    assert summary["held-out"]["count"] == 1 and summary["fit (leave-one-out)"]["count"] == 2
    held_out = next(row for row in result.rows if row.role == "held-out")
    assert held_out.out_of_sample_s is None and held_out.measured_s > 0
    assert "held-out: 1 figures" in result.report()
