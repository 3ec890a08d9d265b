"""The bare-metal MCU artefact: the generated C sources (``codegen``) with their memory figures,
written to a folder, and run on this machine against PyTorch to check its numerics."""

import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from autocomp.core.errors import AutocompError
from autocomp.core.staging import write_json
from autocomp.hardware.mcu.codegen import SOURCES, write_sources
from autocomp.hardware.mcu.memory import McuMemory, program_memory
from autocomp.hardware.mcu.program import lower_program, plan_arena
from autocomp.hardware.profiles import HardwareProfile


@dataclass(frozen=True)
class McuArtefact:
    """An exported artefact: its folder, the C files to compile, and its memory figures."""

    directory: Path
    memory: McuMemory
    input_shape: tuple[int, ...]
    output_shape: tuple[int, ...]
    input_dtype: str
    output_dtype: str

    @property
    def sources(self) -> list[Path]:
        return [self.directory / name for name in SOURCES]

    @property
    def include_dir(self) -> Path:
        return self.directory / "include"


def export_mcu(model: nn.Module, input_shape: tuple[int, ...], directory: Path,
               profile: HardwareProfile | None = None, *, checks: bool = False,
               measure: bool = True) -> McuArtefact:
    """Write the bare-metal artefact of ``model`` for the profile's C target into ``directory``.

    ``checks`` keeps TVM's argument checks in the kernels (larger code; a descriptor
    that does not match its kernel then fails with a message instead of computing
    garbage). ``measure`` compiles the code with the profile's cross compiler for the
    memory figures in ``memory.json``.
    """
    target = profile.tvm_target if profile is not None else None
    program = lower_program(model, input_shape, target, checks=checks)
    plan = plan_arena(program)
    directory = Path(directory)
    write_sources(program, plan, directory)
    memory = program_memory(program, model, profile, code=measure)
    write_json(directory / "memory.json", memory.as_dict())
    slots = program.slots
    return McuArtefact(directory, memory, slots[program.input].shape, slots[program.output].shape,
                       slots[program.input].dtype, slots[program.output].dtype)


HOST_HARNESS = """\
#include <stdio.h>
#include "autocomp_model.h"

int main(void) {
  static autocomp_input_t input[AUTOCOMP_INPUT_COUNT];
  static autocomp_output_t output[AUTOCOMP_OUTPUT_COUNT];
  while (fread(input, sizeof input, 1, stdin) == 1) {
    int status = autocomp_run(input, output);
    if (status != 0) {
      fprintf(stderr, "kernel call %d failed: %s\\n", status - 1, autocomp_last_error());
      return 1;
    }
    fwrite(output, sizeof output, 1, stdout);
  }
  return 0;
}
"""


def run_on_host(artefact: McuArtefact, inputs: np.ndarray, *, compiler: str = "cc") -> np.ndarray:
    """Compile the artefact for this machine and run it on each sample of ``inputs``
    (shaped like the model's input with any batch size): the only way to check the MCU
    code's numerics here."""
    if shutil.which(compiler) is None:
        raise AutocompError(f"MCU export: no host C compiler {compiler!r} to run the artefact")
    per_sample = artefact.input_shape
    samples = inputs.astype(artefact.input_dtype).reshape(-1, *per_sample[1:])
    with tempfile.TemporaryDirectory(prefix="autocomp-mcu-host-") as tmp:
        harness = Path(tmp) / "main.c"
        harness.write_text(HOST_HARNESS)
        exe = Path(tmp) / "model"
        cmd = [compiler, "-O2", f"-I{artefact.include_dir}", f"-I{artefact.directory}", str(harness),
               *map(str, artefact.sources), "-lm", "-o", str(exe)]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            raise AutocompError(f"MCU export: host build failed: {done.stderr.strip()[:500]}")
        done = subprocess.run([str(exe)], input=np.ascontiguousarray(samples).tobytes(), capture_output=True)
        if done.returncode != 0:
            raise AutocompError(f"MCU export: the host run failed: {done.stderr.decode().strip()}")
    out = np.frombuffer(done.stdout, dtype=artefact.output_dtype)
    return out.reshape(len(samples), *artefact.output_shape[1:])


def check_numerics(artefact: McuArtefact, model: nn.Module, inputs: torch.Tensor) -> float:
    """Largest absolute difference between the artefact run on this machine and PyTorch."""
    with torch.no_grad():
        expected = model.eval()(inputs).numpy()
    got = run_on_host(artefact, inputs.numpy())
    return float(np.abs(got - expected.reshape(got.shape)).max())
