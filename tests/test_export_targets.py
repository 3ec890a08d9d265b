"""Export per target: the artefacts are written, run where they can run here (the aarch64
library under qemu with TVM's aarch64 runtime), checked against PyTorch, and refused when wrong."""

import copy
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import make_plan, require_tool, unavailable
from torch import nn

from autocomp.core.errors import AutocompError
from autocomp.core.inventory import build_inventory
from autocomp.export import validation_inputs
from autocomp.hardware.deploy import artefacts, runtimes
from autocomp.hardware.profiles import HardwareProfile, load_target
from autocomp.intake.data import DataSplits, calibration_loader
from autocomp.methods.apply import apply_plan

SHAPE = (1, 1, 28, 28)
ELF_MACHINE = {"x86_64": 62, "aarch64": 183}


def _untuned(name: str) -> HardwareProfile:
    """The bundled profile, compiled untuned: these tests check numerics, not speed."""
    return load_target(name, untuned=True)


def _tiny() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3, stride=2), nn.ReLU(), nn.Flatten(),
                         nn.Linear(4 * 13 * 13, 10)).eval()


@pytest.fixture(scope="module")
def compressed(resnet, fmnist: DataSplits) -> nn.Module:
    """demo-resnet with a pruned block and an 8-bit layer: a real compressed model."""
    teacher = resnet[0]
    inventory = build_inventory(teacher, SHAPE)
    plan = make_plan({"layer2.conv1.0": {"method": "prune", "ratio": 0.5, "criterion": "l1"},
                      "layer3.conv1.0": {"method": "quant", "w_bits": 8, "a_bits": 8}})
    return apply_plan(teacher, plan, inventory, calib=calibration_loader(fmnist.train, count=64)).eval()


@pytest.fixture(scope="module")
def images(fmnist: DataSplits) -> np.ndarray:
    return validation_inputs(fmnist, SHAPE)[:6]


def _elf_machine(path: Path) -> int:
    header = path.read_bytes()[:20]
    assert header[:4] == b"\x7fELF"
    return int.from_bytes(header[18:20], "little")


def _require_aarch64_runtime() -> None:
    """CI fetches TVM's aarch64 wheels (.ci/run); elsewhere the check is skipped, saying how."""
    try:
        runtimes.runtime_for("aarch64")
    except runtimes.RuntimeUnavailable as reason:
        unavailable(str(reason))


def test_host_export_writes_and_checks_every_artefact(compressed, images, tmp_path: Path,
                                                     caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="autocomp")
    job = artefacts.make_job(compressed, SHAPE, _untuned("host"), tmp_path, images)
    written = artefacts.write_artefacts(job)
    lines = caplog.messages

    assert {a.kind: a.files for a in written} == {"pytorch-state-dict": ("model.pt",),
                                                   "onnx": ("model.onnx",),
                                                   "shared-library": ("model.so",)}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx", "model.pt", "model.so"]
    for artefact in written:
        check = artefact.to_json(job.samples)["check"]
        assert check["samples"] == 6 and check["max_abs_diff"] <= check["tolerance"], artefact.kind
    library = next(a for a in written if a.kind == "shared-library")
    assert "natively" in library.check.ran and library.details["arch"] == runtimes.host_arch()
    assert _elf_machine(tmp_path / "model.so") == ELF_MACHINE[runtimes.host_arch()]
    assert any("max |TVM - PyTorch| over 6 validation images" in line for line in lines)
    assert any("max |ONNX Runtime - PyTorch|" in line for line in lines)

    # the ONNX file stands on its own: ONNX Runtime's logits match PyTorch's on a new image
    import onnxruntime

    session = onnxruntime.InferenceSession(str(tmp_path / "model.onnx"), providers=["CPUExecutionProvider"])
    image = images[-1]
    with torch.no_grad():
        expected = compressed(torch.from_numpy(image)).numpy()
    got = session.run(None, {session.get_inputs()[0].name: image})[0]
    assert np.abs(got - expected).max() < 1e-4


def test_aarch64_library_runs_under_qemu_and_matches_pytorch(compressed, images, tmp_path: Path) -> None:
    _require_aarch64_runtime()
    profile = _untuned("arm-a53")
    job = artefacts.make_job(compressed, SHAPE, profile, tmp_path, images)
    [library] = artefacts.write_shared_library(job)

    assert _elf_machine(tmp_path / "model.so") == ELF_MACHINE["aarch64"]
    assert library.details["arch"] == "aarch64"
    assert library.check.not_run is None and "qemu-aarch64" in library.check.ran
    assert library.check.max_abs_diff <= job.tolerance
    # the emulated outputs are the model's, not any fixed output: they differ between images
    [logits] = runtimes.run_library(tmp_path / "model.so", images, runtimes.runtime_for("aarch64"))
    assert logits.shape == (6, 1, 10)
    assert np.abs(logits[0] - logits[1]).max() > 1e-3


def test_a_library_that_disagrees_with_pytorch_is_refused(compressed, images, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    from autocomp.hardware.compile import lower

    real_compile = lower.compile_model

    def compile_perturbed(model, shape, profile, **options):
        """What a broken lowering would give: the same network with a shifted output bias."""
        broken = copy.deepcopy(model)
        with torch.no_grad():
            broken.fc.bias += 0.5
        return real_compile(broken, shape, profile, **options)

    monkeypatch.setattr(lower, "compile_model", compile_perturbed)
    job = artefacts.make_job(compressed, SHAPE, _untuned("host"), tmp_path, images)
    with pytest.raises(AutocompError, match=r"export refused: model\.so differs from PyTorch by 0\.5"):
        artefacts.write_artefacts(job)


def test_a_nan_or_misshapen_output_fails_the_check(compressed, images, tmp_path: Path) -> None:
    job = artefacts.make_job(compressed, SHAPE, _untuned("host"), tmp_path, images)
    nan = [np.full_like(job.expected[0], np.nan)]
    assert job.compare(nan, "test").failed
    misshapen = job.compare([job.expected[0][:, :, :5]], "test")
    assert misshapen.failed and "shapes [(6, 1, 5)], PyTorch's [(6, 1, 10)]" in misshapen.problem
    assert not job.compare(job.expected, "test").failed


def test_without_the_aarch64_runtime_the_check_says_how_to_get_it(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AUTOCOMP_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv(runtimes.WHEELS_ENV, str(tmp_path / "wheels"))
    with pytest.raises(runtimes.RuntimeUnavailable) as reason:
        runtimes.runtime_for("aarch64")
    message = str(reason.value)
    assert f"is not in {tmp_path / 'wheels'}" in message
    assert "pip download apache-tvm==0.27.0.post1 apache-tvm-ffi==" in message
    assert "--platform manylinux_2_28_aarch64" in message
    check = artefacts.Check.skipped(message)
    assert not check.failed and check.to_json(6) == {"not_run_here": message}


def test_the_mcu_target_exports_c_sources_checked_on_this_machine(images, tmp_path: Path) -> None:
    require_tool("arm-none-eabi-gcc", "Debian gcc-arm-none-eabi")
    profile = load_target("cortex-m7")
    assert artefacts.target_writer(profile) is artefacts.write_c_sources
    job = artefacts.make_job(_tiny(), SHAPE, profile, tmp_path, images)
    [sources] = artefacts.write_c_sources(job)
    assert sources.kind == "c-sources" and (tmp_path / "mcu" / "model.c").is_file()
    assert "built for this machine" in sources.check.ran and not sources.check.failed
    assert sources.details["memory"]["flash_bytes"] > 4 * 4 * 13 * 13 * 10


def test_the_gpu_target_exports_a_cuda_module_and_checks_it_only_on_a_gpu(images, tmp_path: Path) -> None:
    from autocomp.hardware.measure.cuda import gpu_count

    profile = load_target("gpu")
    assert artefacts.target_writer(profile) is artefacts.write_cuda_module
    job = artefacts.make_job(_tiny(), SHAPE, profile, tmp_path, images)
    [module] = artefacts.write_cuda_module(job)
    assert module.kind == "cuda-module" and (tmp_path / "model.so").stat().st_size > 0
    if gpu_count():
        assert "GPU" in module.check.ran and not module.check.failed
    else:
        assert module.check.not_run == "no CUDA GPU on this machine"


def test_quantized_activations_allow_a_rounding_step_and_nothing_near_a_broken_kernel(
        compressed, resnet, images, tmp_path: Path) -> None:
    """A value on a rounding tie may round the other way in another runtime's integer kernels;
    the tolerance allows that much where activations are quantized, and only there."""
    quantized = artefacts.make_job(compressed, SHAPE, _untuned("host"), tmp_path / "q", images)
    plain = artefacts.make_job(resnet[0].eval(), SHAPE, _untuned("host"), tmp_path / "f", images)
    for job, relative in ((quantized, artefacts.QUANTIZED_RELATIVE_TOLERANCE),
                          (plain, artefacts.RELATIVE_TOLERANCE)):
        scale = max(float(np.abs(job.expected[0]).max()), 1.0)
        assert job.tolerance == pytest.approx(relative * scale)
    shifted = [job_output + 0.05 * max(float(np.abs(quantized.expected[0]).max()), 1.0)
               for job_output in quantized.expected]  # 5% of the output: a broken kernel
    assert quantized.compare(shifted, "test").failed
