import pytest
from test_lut import SHAPE, quick_profile, small_net

from autocomp.core.errors import AutocompError
from autocomp.hardware.costmodel.breakdown import profile_model
from autocomp.hardware.costmodel.kernels import model_kernels
from autocomp.hardware.profiles import load_profile


def test_every_kernel_call_is_timed_in_place_and_named_to_its_layer() -> None:
    profile = quick_profile()
    model = small_net(width=32)
    breakdown = profile_model(model, SHAPE, profile, runs=7)
    calls = model_kernels(model, SHAPE, profile).calls
    assert sum(row.calls for row in breakdown.rows) == len(calls)
    assert sum(row.share for row in breakdown.rows) == pytest.approx(1.0)
    assert breakdown.total_s == pytest.approx(sum(row.median_s for row in breakdown.rows))
    assert all(row.median_s > 0 for row in breakdown.rows)
    # conv2 (32 -> 16 channels, 3x3) does 32x the MACs of conv1 (1 -> 32): it leads
    layers = breakdown.by_layer()
    assert layers[0][0] == "conv2" and layers[0][2] > 0.5
    assert {layer for layer, _, _ in layers} == {"conv1", "conv2", "fc"}
    assert "7 runs" in breakdown.provenance and "untuned" in breakdown.provenance
    assert "conv2" in breakdown.table().splitlines()[1]


def test_profiles_without_a_local_device_are_refused() -> None:
    with pytest.raises(AutocompError, match=r"arm-a53.*'(rpc|estimate)'"):
        profile_model(small_net(), SHAPE, load_profile("arm-a53"))
