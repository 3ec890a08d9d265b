"""MCU memory figures and the bare-metal C artefact: liveness plan, numerics against PyTorch
(on this machine, and the Cortex-M7 build under qemu-arm), and arm-none-eabi-size against
the tool's own SRAM and flash figures."""

import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import make_plan, require_tool
from torch import nn

from autocomp.core.errors import AutocompError
from autocomp.core.inventory import build_inventory
from autocomp.hardware.mcu.artefact import McuArtefact, export_mcu, run_on_host
from autocomp.hardware.mcu.memory import program_memory
from autocomp.hardware.mcu.program import lower_program, plan_arena
from autocomp.hardware.mcu.toolchain import berkeley_size, size_tool, toolchain
from autocomp.hardware.profiles import MemoryLimits, load_profile
from autocomp.intake.data import DataSplits, make_loader, take
from autocomp.intake.models import build_model
from autocomp.methods.apply import apply_plan

SHAPE = (1, 1, 28, 28)
W8A8 = {"method": "quant", "w_bits": 8, "a_bits": 8}
PROFILE = load_profile("cortex-m7")
COMPILER, CFLAGS = toolchain(PROFILE)
# The linked image holds a little more than the tool counts (newlib's memcpy and memset,
# the harness below) and a little less (static data of the error hook that the linker
# drops when no kernel can call it): 1% plus 512 B either way.
SIZE_TOLERANCE = (0.01, 512)


@pytest.fixture
def arm_toolchain() -> None:
    require_tool(COMPILER, "Debian gcc-arm-none-eabi")


# A bare-metal entry point with no startup code: Linux system calls read the input into
# the arena and write the output, so that qemu-arm can run the Cortex-M7 image as a user
# process (Thumb-2 and FPv5 run unchanged on its "max" ARMv8 CPU).
ARM_HARNESS = """\
#include "autocomp_model.h"

static int linux_call(int number, int a, int b, int c) {
  register int r0 __asm__("r0") = a;
  register int r1 __asm__("r1") = b;
  register int r2 __asm__("r2") = c;
  register int r7 __asm__("r7") = number;
  __asm__ volatile("svc #0" : "+r"(r0) : "r"(r1), "r"(r2), "r"(r7) : "memory");
  return r0;
}

void _start(void) {
  char* in = (char*)autocomp_input();
  int want = AUTOCOMP_INPUT_COUNT * (int)sizeof(autocomp_input_t), got = 0, n = 1;
  while (got < want && n > 0) {
    n = linux_call(3, 0, (int)(in + got), want - got);
    got += n;
  }
  int status = got == want ? autocomp_invoke() : 100;
  if (status == 0)
    linux_call(4, 1, (int)autocomp_output(), AUTOCOMP_OUTPUT_COUNT * (int)sizeof(autocomp_output_t));
  linux_call(1, status, 0, 0);
  for (;;) {
  }
}
"""


class TinyNet(nn.Module):
    """Conv, batch norm, max pool, strided conv, flatten (a view) and a linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                                      nn.MaxPool2d(2), nn.Conv2d(4, 8, 3, stride=2), nn.ReLU())
        self.head = nn.Linear(8 * 6 * 6, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).flatten(1))


def _tiny() -> nn.Module:
    torch.manual_seed(0)
    model = TinyNet().eval()
    batchnorm = model.features[1]
    batchnorm.running_mean.uniform_(-0.5, 0.5)
    batchnorm.running_var.uniform_(0.5, 1.5)
    return model


def _trained_resnet(weights: Path) -> nn.Module:
    model = build_model("demo-resnet", num_classes=10, in_channels=1)
    model.load_state_dict(torch.load(weights, weights_only=True))
    return model.eval()


def _w8a8_resnet(weights: Path, fmnist: DataSplits) -> nn.Module:
    model = _trained_resnet(weights)
    inventory = build_inventory(model, SHAPE, coupling=False)
    plan = make_plan({name: W8A8 for name in inventory.names})
    calib = make_loader(take(fmnist.train, 256), 64, shuffle=False)
    return apply_plan(model, plan, inventory, calib=calib).eval()


MODELS = {"tiny-fp32": lambda weights, data: _tiny(),
          "demo-resnet-fp32": lambda weights, data: _trained_resnet(weights),
          "demo-resnet-w8a8": _w8a8_resnet}


@pytest.fixture(scope="module")
def exported(tmp_path_factory, trained_resnet: Path, fmnist: DataSplits):
    """A function giving a test model (the demo-resnets trained on Fashion-MNIST) and its
    artefact by name, each exported once."""
    done: dict[str, tuple[nn.Module, McuArtefact]] = {}

    def get(name: str) -> tuple[nn.Module, McuArtefact]:
        if name not in done:
            model = MODELS[name](trained_resnet, fmnist)
            done[name] = model, export_mcu(model, SHAPE, tmp_path_factory.mktemp(name), PROFILE)
        return done[name]

    return get


@pytest.fixture(scope="module")
def images(fmnist: DataSplits) -> torch.Tensor:
    """Eight Fashion-MNIST test images."""
    return torch.stack([fmnist.test[i][0] for i in range(8)])


def _expected(model: nn.Module, x: torch.Tensor) -> np.ndarray:
    with torch.no_grad():
        return model(x).numpy()


def _assert_matches(got: np.ndarray, expected: np.ndarray, integer: bool) -> None:
    error = np.abs(got - expected).max() / np.abs(expected).max()
    print(f"max |C - PyTorch| / max |PyTorch| = {error:.1e}")
    # fp32: only summation order differs. int8: an activation on a rounding boundary may
    # land one level apart when C and PyTorch compute x / scale a hair differently.
    assert error < (1e-4 if integer else 1e-5), error
    assert (got.argmax(1) == expected.argmax(1)).all()


def test_arena_plan_keeps_live_tensors_apart() -> None:
    program = lower_program(build_model("demo-resnet", num_classes=10, in_channels=1), SHAPE)
    plan = plan_arena(program)
    sizes = {root: program.slots[root].nbytes for root in plan.offsets}
    for a in plan.offsets:
        for b in plan.offsets:
            overlap_in_time = a < b and plan.lifetimes[a][0] <= plan.lifetimes[b][1] \
                and plan.lifetimes[b][0] <= plan.lifetimes[a][1]
            if overlap_in_time:
                assert (plan.offsets[a] + sizes[a] <= plan.offsets[b]
                        or plan.offsets[b] + sizes[b] <= plan.offsets[a]), (a, b)
    # The first residual block's second conv holds its input, the block input (the
    # shortcut) and its output at once: three 16x14x14 fp32 maps.
    assert plan.peak_live == 3 * 16 * 14 * 14 * 4
    assert plan.size == plan.peak_live
    assert program.slots[program.input].storage == program.input
    assert plan.lifetimes[program.input] == (0, 1)  # read by the stem only, then reused
    assert all(step.workspace is None for step in program.steps)


def test_memory_figures_and_limits() -> None:
    model = _tiny()
    program = lower_program(model, SHAPE)
    plan = plan_arena(program)
    memory = program_memory(program, model, PROFILE, code=False)
    assert memory.code_bytes is None and any("excludes code" in note for note in memory.notes)
    assert memory.sram_bytes == memory.arena_bytes == plan.size
    # The batch norm folds into the conv before it, which has a bias already; at stored
    # bit-widths it counts as the one vector it folds into when a conv has none.
    params = sum(p.numel() * 4 for p in model.parameters())
    assert memory.flash_bytes == memory.artefact_weight_bytes == params - 2 * 4 * 4
    assert memory.packed_flash_bytes == memory.weight_bytes == params - 4 * 4
    assert memory.exceeds(PROFILE.memory) is None
    assert memory.exceeds(MemoryLimits(sram_bytes=plan.size - 1)) == f"SRAM {plan.size} B > {plan.size - 1} B"
    assert "flash" in memory.exceeds(MemoryLimits(flash_bytes=memory.flash_bytes - 1))


def test_a_non_c_target_is_refused() -> None:
    with pytest.raises(AutocompError, match="'c' target"):
        lower_program(_tiny(), SHAPE, {"kind": "llvm"})


@pytest.mark.parametrize("name", list(MODELS))
def test_host_build_matches_pytorch(name: str, exported, images: torch.Tensor) -> None:
    model, artefact = exported(name)
    got = run_on_host(artefact, images.numpy())
    _assert_matches(got, _expected(model, images), integer=name.endswith("w8a8"))


def test_kernel_checks_accept_the_generated_descriptors(tmp_path: Path, images: torch.Tensor) -> None:
    """With TVM's argument checks kept, every kernel validates the shape, dtype and strides
    of each DLTensor the call sequence passes it."""
    model = _tiny()
    artefact = export_mcu(model, SHAPE, tmp_path, PROFILE, checks=True, measure=False)
    assert "Invalid" in (tmp_path / "kernels.c").read_text()
    _assert_matches(run_on_host(artefact, images.numpy()), _expected(model, images), integer=False)


def test_int8_model_computes_in_integers_in_c(exported) -> None:
    _, artefact = exported("demo-resnet-w8a8")
    weights = (artefact.directory / "model_weights.c").read_text()
    assert weights.count("const int8_t ") == 10  # nine convs and the linear layer
    kernels = (artefact.directory / "kernels.c").read_text()
    assert "int8_t*" in kernels and "uint8_t*" in kernels
    assert artefact.input_dtype == "float32"  # quantized inside the first kernel


def _link(artefact: McuArtefact, tmp: Path) -> Path:
    harness = tmp / "start.c"
    harness.write_text(ARM_HARNESS)
    elf = tmp / "model.elf"
    cmd = [COMPILER, *CFLAGS, "-ffunction-sections", "-fdata-sections", "-fomit-frame-pointer",
           f"-I{artefact.include_dir}", f"-I{artefact.directory}", str(harness), *map(str, artefact.sources),
           "-nostartfiles", "--specs=nano.specs", "--specs=nosys.specs", "-Wl,--gc-sections", "-lm",
           "-o", str(elf)]
    subprocess.run(cmd, check=True, capture_output=True)
    return elf


@pytest.mark.usefixtures("arm_toolchain")
@pytest.mark.parametrize("name", list(MODELS))
def test_cortex_m7_image_matches_the_tools_figures(name: str, exported, images: torch.Tensor,
                                                   tmp_path: Path) -> None:
    model, artefact = exported(name)
    elf = _link(artefact, tmp_path)
    text, data, bss = berkeley_size(elf, size_tool(COMPILER))
    memory = artefact.memory
    assert memory.code_bytes is not None
    relative, absolute = SIZE_TOLERANCE
    print(f"{name}: flash tool {memory.flash_bytes} B, image {text + data} B; "
          f"SRAM tool {memory.sram_bytes} B, image {data + bss} B")
    assert abs(text + data - memory.flash_bytes) <= relative * memory.flash_bytes + absolute
    assert abs(data + bss - memory.sram_bytes) <= relative * memory.sram_bytes + absolute
    assert data + bss >= memory.arena_bytes
    require_tool("qemu-arm", "Debian qemu-user")
    x = images[:3]
    outputs = []
    for sample in x:
        run = subprocess.run(["qemu-arm", "-cpu", "max", str(elf)], input=sample.numpy().tobytes(),
                             capture_output=True, timeout=120)
        assert run.returncode == 0, run.stderr
        outputs.append(np.frombuffer(run.stdout, dtype=artefact.output_dtype))
    _assert_matches(np.stack(outputs), _expected(model, x), integer=name.endswith("w8a8"))
