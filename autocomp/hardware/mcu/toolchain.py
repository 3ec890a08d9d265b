"""The MCU cross toolchain: the profile's compiler and flags, compiling the generated C, and
the code and static-data sizes ``size`` reports for it."""

import shutil
import subprocess
import tempfile
from collections.abc import Sequence
from pathlib import Path

from autocomp.core.errors import AutocompError
from autocomp.hardware.mcu.codegen import write_sources
from autocomp.hardware.mcu.program import ArenaPlan, McuProgram
from autocomp.hardware.profiles import HardwareProfile

DEFAULT_COMPILER = "arm-none-eabi-gcc"


DEFAULT_CFLAGS = ("-mcpu=cortex-m7", "-mthumb", "-mfpu=fpv5-d16", "-mfloat-abi=hard", "-O2")


SECTION_FLAGS = ("-ffunction-sections", "-fdata-sections")


def toolchain(profile: HardwareProfile | None = None) -> tuple[str, tuple[str, ...]]:
    """The cross compiler and flags of the profile's export settings (Cortex-M7 defaults)."""
    export = getattr(profile, "export", None)
    if export is not None and export.cross_compiler:
        return export.cross_compiler, tuple(export.cflags)
    return DEFAULT_COMPILER, DEFAULT_CFLAGS


def size_tool(compiler: str) -> str:
    """The binutils ``size`` that goes with a gcc (``arm-none-eabi-gcc`` -> ``arm-none-eabi-size``)."""
    return compiler[:-3] + "size" if compiler.endswith("gcc") else "size"


def berkeley_size(path: Path, tool: str) -> tuple[int, int, int]:
    """(text, data, bss) of an object or executable, as ``size`` reports them."""
    out = subprocess.run([tool, str(path)], capture_output=True, text=True, check=True).stdout
    text, data, bss = out.splitlines()[1].split()[:3]
    return int(text), int(data), int(bss)


def compile_objects(directory: Path, names: Sequence[str], compiler: str,
                    cflags: Sequence[str]) -> list[Path]:
    """Compile the named C files of an artefact folder to objects beside them."""
    objects = []
    for name in names:
        obj = directory / (Path(name).stem + ".o")
        cmd = [compiler, *cflags, *SECTION_FLAGS, f"-I{directory / 'include'}", f"-I{directory}",
               "-c", str(directory / name), "-o", str(obj)]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            raise AutocompError(f"MCU export: {compiler} failed on {name}: "
                                f"{(done.stderr.strip().splitlines() or ['?'])[0]}")
        objects.append(obj)
    return objects


def measure_code(program: McuProgram, plan: ArenaPlan,
                 profile: HardwareProfile | None = None) -> tuple[int, int] | None:
    """(code bytes, static RAM bytes besides the arena) of the kernels and call sequence,
    compiled with the profile's cross compiler; None when it is not installed. Code is
    text + data (with the read-only tensor descriptors), RAM is data + bss."""
    compiler, cflags = toolchain(profile)
    tool = size_tool(compiler)
    if shutil.which(compiler) is None or shutil.which(tool) is None:
        return None
    with tempfile.TemporaryDirectory(prefix="autocomp-mcu-") as tmp:
        directory = Path(tmp)
        write_sources(program, plan, directory, weights=False)
        sizes = [berkeley_size(obj, tool) for obj in
                 compile_objects(directory, ["model.c", "kernels.c"], compiler, cflags)]
    code = sum(text + data for text, data, _ in sizes)
    static = sum(data + bss for _, data, bss in sizes) - plan.size
    return code, static
