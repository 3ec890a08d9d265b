"""The gpu profile: CUDA compilation and export on a machine without a GPU, measurement where one exists."""

import numpy as np
import pytest
import torch
from torch import nn

from autocomp.hardware.compile.cuda import compile_cuda, compile_kernels, cuda_source, export_cuda
from autocomp.hardware.measure.cuda import CudaMeasurer, GpuUnavailableError, gpu_count
from autocomp.hardware.profiles import load_profile

SHAPE = (1, 1, 28, 28)


def small_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU6(),
                         nn.Conv2d(8, 8, 3, groups=8), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(8, 10)).eval()


@pytest.fixture(scope="module")
def gpu_profile():
    return load_profile("gpu")


@pytest.fixture(scope="module")
def executable(gpu_profile):
    return compile_cuda(small_net(), SHAPE, gpu_profile)


def test_compiles_and_exports_for_cuda_without_a_gpu(executable, tmp_path) -> None:
    library = export_cuda(executable, tmp_path / "model.so")
    assert library.is_file() and library.stat().st_size > 0
    source = cuda_source(executable)
    kernels = source.count('extern "C" __global__')
    assert kernels >= 3
    assert source.count("threadIdx.x") >= kernels, "every kernel is bound to GPU threads"


def test_kernels_compile_to_device_code_for_the_profile_arch(executable, gpu_profile) -> None:
    cubin = compile_kernels(executable, gpu_profile.tvm_target["arch"])
    assert cubin[:4] == b"\x7fELF", "NVRTC gives a cubin (an ELF image)"


@pytest.mark.skipif(gpu_count() > 0, reason="this machine has a GPU")
def test_measuring_without_a_gpu_signals_the_fallback(gpu_profile) -> None:
    with pytest.raises(GpuUnavailableError, match="no CUDA GPU"):
        CudaMeasurer(gpu_profile)


@pytest.mark.skipif(gpu_count() == 0, reason="no CUDA GPU on this machine")
def test_measures_on_the_gpu_and_matches_pytorch(executable, gpu_profile, tmp_path) -> None:
    library = export_cuda(executable, tmp_path / "model.so")
    measurer = CudaMeasurer(gpu_profile)
    try:
        latency = measurer.time_library(library, SHAPE)
        data = np.random.default_rng(1).standard_normal(SHAPE).astype("float32")
        output = measurer.run_library(library, data)
    finally:
        measurer.close()
    assert latency.kind == "measured" and latency.median_s > 0
    assert "gpu: " in latency.provenance
    with torch.no_grad():
        expected = small_net()(torch.from_numpy(data)).numpy()
    np.testing.assert_allclose(output, expected, rtol=1e-4, atol=1e-4)
