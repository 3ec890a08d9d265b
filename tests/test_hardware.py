from pathlib import Path

import numpy as np
import pytest
import torch

from autocomp.core.errors import AutocompError
from autocomp.hardware.compile.lower import compile_model, export_library
from autocomp.hardware.oracle import make_measurer
from autocomp.hardware.profiles import available_profiles, load_profile, load_target
from autocomp.intake.models import build_model


def test_host_profile_is_measured_locally() -> None:
    profile = load_profile("host")
    assert "host" in available_profiles()
    assert profile.measured and profile.latency.threads >= 1
    assert profile.tvm_target["kind"] == "llvm" and profile.tvm_target["mcpu"] != "auto"


def test_every_bundled_profile_loads_with_its_facts() -> None:
    profiles = {name: load_profile(name) for name in available_profiles()}
    assert {"host", "arm-a53", "arm-a76", "cortex-m7", "gpu"} <= set(profiles)
    m7 = profiles["cortex-m7"]
    assert m7.memory.sram_bytes == 320 * 1024 and m7.memory.flash_bytes == 1024 * 1024
    assert m7.dtypes == ("int8",) and m7.export.format == "c-sources"
    assert profiles["arm-a53"].tvm_target["mtriple"] == "aarch64-linux-gnu"
    assert profiles["arm-a53"].export.cross_compiler == "aarch64-linux-gnu-g++"
    for profile in profiles.values():
        assert profile.cost_model.constants, profile.name
        assert set(profile.cost_model.constants) == set(profile.cost_model.sources)
        if not profile.measured:
            assert profile.how().startswith("estimated by the")
    assert len({p.target_key for p in profiles.values()}) == len(profiles)


def test_unknown_target() -> None:
    with pytest.raises(AutocompError, match="unknown target 'phone'"):
        load_profile("phone")


_GOOD = ("description: x\ntvm_target: {kind: llvm}\n"
         "latency: {method: local, threads: 1, tuning: untuned}\n"
         "export: {format: shared-library}\ndtypes: [float32]\nchannel_multiple: 1\n"
         "cost_model: {version: v1, fitted_to: nothing, constants: {}}\n")


@pytest.mark.parametrize(("text", "message"), [
    ("name: bad\n", r"bad\.yaml: channel_multiple: missing"),
    ("name: other\n" + _GOOD, "name: 'other' does not match"),
    ("name: bad\n" + _GOOD.replace("threads: 1", "threads: 0"), "latency.threads: must be"),
    ("name: bad\n" + _GOOD.replace("{kind: llvm}", "{kind: llvm, colour: red}"),
     "tvm_target.colour: unknown key"),
    ("name: bad\n" + _GOOD.replace("{kind: llvm}", "{kind: toaster}"), "tvm_target: TVM rejects"),
    ("name: bad\n" + _GOOD.replace("method: local", "method: rpc"), "latency.rpc: missing"),
    ("name: bad\n" + _GOOD.replace("method: local", "method: phone"), "latency.method: 'phone'"),
    ("name: bad\n" + _GOOD + "memory: {sram: lots}\n", "memory.sram: cannot read memory size"),
    ("name: bad\n" + _GOOD.replace("[float32]", "[float16]"), r"dtypes\[0\]: 'float16'"),
    ("name: bad\n" + _GOOD.replace("constants: {}", "constants: {clock_hz: {value: fast, source: me}}"),
     "cost_model.constants.clock_hz.value: must be a number"),
    ("name: bad\ndescription: [x\n", "not valid YAML"),
])
def test_bad_profiles_name_the_file_and_key(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(AutocompError, match=message):
        load_profile(str(path))


def test_compiled_module_matches_pytorch(tmp_path: Path) -> None:
    import tvm
    from tvm.runtime.vm import VirtualMachine

    torch.manual_seed(0)
    model = build_model("demo-mobilenetv2", num_classes=10, in_channels=1).eval()
    library = export_library(compile_model(model, (1, 1, 28, 28), load_target("host", untuned=True)),
                             tmp_path / "m.so")
    vm = VirtualMachine(tvm.runtime.load_module(str(library)), tvm.cpu())
    x = torch.randn(1, 1, 28, 28)
    got = vm["main"](tvm.runtime.tensor(x.numpy(), tvm.cpu()))[0].numpy()
    np.testing.assert_allclose(got, model(x).detach().numpy(), atol=1e-4)


def test_measured_latency_carries_its_provenance() -> None:
    profile = load_target("host", untuned=True)
    measurer = make_measurer(profile)
    try:
        small = measurer.measure(build_model("demo-mobilenetv2", num_classes=10, in_channels=1),
                                 (1, 1, 28, 28))
        large = measurer.measure(build_model("demo-resnet", num_classes=10, in_channels=1),
                                 (1, 1, 56, 56))
    finally:
        measurer.close()
    assert small.kind == "measured" and small.samples == profile.latency.repeat
    assert 0 < small.p10_s <= small.median_s <= small.p90_s
    assert "untuned" in small.provenance and "host" in small.provenance
    assert f"{profile.latency.threads} threads" in small.provenance
    # the ResNet at 4x the pixels does about 7x the MACs: it must measure slower
    assert large.median_s > small.median_s


class _ShapeBranch(torch.nn.Module):
    """Conv + batch norm, then a branch on the input's shape: torch.export traces it (static
    shapes), FX's symbolic trace, which folding uses, cannot."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(1, 4, 3)
        self.bn = torch.nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn(self.conv(x))
        return y.relu() if x.shape[-1] > 8 else y


def test_batch_norm_left_unfolded_is_said_in_the_label(caplog: pytest.LogCaptureFixture) -> None:
    torch.manual_seed(0)
    model = _ShapeBranch().train()
    measurer = make_measurer(load_target("host", untuned=True))
    try:
        latency = measurer.measure(model, (1, 1, 12, 12))
        assert model.training  # the caller's model is left as it was
        assert "batch norm left unfolded: FX cannot trace the model" in latency.provenance
        assert "batch norm left unfolded" in caplog.text
        plain = measurer.measure(build_model("demo-resnet", num_classes=10, in_channels=1), (1, 1, 28, 28))
        assert "unfolded" not in plain.provenance
    finally:
        measurer.close()
