"""Bare-metal C artefact for a microcontroller: TVM's C kernels plus our own static runtime.

TVM 0.27 has no microTVM, AOT executor or C runtime, so the call sequence is generated
here from the lowered program (``autocomp.hardware.mcu_memory.lower_program``). The
artefact is a folder of plain C with no C++ runtime and no malloc:

- ``kernels.c``: the kernels from TVM's C code generator (``lib0.c`` of a C-target
  export), one ``__tvm_ffi_NAME(self, args, num_args, result)`` per fused operator,
  taking its tensors as ``TVMFFIAny`` arguments that point to ``DLTensor`` descriptors;
- ``model_weights.c``: the module's constants as ``const`` arrays at their dtype (flash);
- ``model.c``: one static activation arena laid out by ``plan_arena``, a ``const``
  ``DLTensor`` and argument array per kernel call, the call sequence, and the runtime
  symbols the kernels need (workspace from the arena region planned for that call, an
  error hook that keeps the message);
- ``autocomp_model.h``: ``autocomp_run(input, output)`` (copy in, run, copy out), or
  ``autocomp_input()``, ``autocomp_invoke()`` and ``autocomp_output()`` to use the arena
  in place; ``include/``: the C headers of TVM and tvm-ffi the kernels include;
- ``memory.json``: the SRAM and flash figures of ``mcu_memory``.
"""

import json
import re
import shutil
import subprocess
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from autocomp.errors import AutocompError
from autocomp.hardware.mcu_memory import (
    ALIGN,
    ArenaPlan,
    McuMemory,
    McuProgram,
    lower_program,
    plan_arena,
    program_memory,
)
from autocomp.hardware.profiles import HardwareProfile

DEFAULT_COMPILER = "arm-none-eabi-gcc"
DEFAULT_CFLAGS = ("-mcpu=cortex-m7", "-mthumb", "-mfpu=fpv5-d16", "-mfloat-abi=hard", "-O2")
SECTION_FLAGS = ("-ffunction-sections", "-fdata-sections")
ERROR_BYTES = 128
HEADERS = {  # path in the artefact's include/: (package, path inside the package)
    "tvm/ffi/c_api.h": ("tvm_ffi", "include/tvm/ffi/c_api.h"),
    "tvm/ffi/extra/c_env_api.h": ("tvm_ffi", "include/tvm/ffi/extra/c_env_api.h"),
    "dlpack/dlpack.h": ("tvm_ffi", "include/dlpack/dlpack.h"),
    "tvm/runtime/base.h": ("tvm", "include/tvm/runtime/base.h"),
    "tvm/runtime/c_backend_api.h": ("tvm", "include/tvm/runtime/c_backend_api.h"),
}
C_TYPES = {"float32": "float", "float64": "double", "int8": "int8_t", "uint8": "uint8_t",
           "int16": "int16_t", "uint16": "uint16_t", "int32": "int32_t", "uint32": "uint32_t",
           "int64": "int64_t", "uint64": "uint64_t", "bool": "uint8_t"}
DL_CODES = {"int": "kDLInt", "uint": "kDLUInt", "float": "kDLFloat", "bool": "kDLBool"}
RUNTIME_SYMBOLS = ("TVMBackendAllocWorkspace", "TVMBackendFreeWorkspace",
                   "TVMFFIErrorSetRaisedFromCStrParts", "TVMFFIErrorSetRaisedFromCStr")
SOURCES = ("model.c", "kernels.c", "model_weights.c")


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


def _c_type(dtype: str) -> str:
    if dtype not in C_TYPES:
        raise AutocompError(f"MCU export: tensors of dtype {dtype} have no C type here")
    return C_TYPES[dtype]


def _dl_dtype(dtype: str) -> str:
    kind = re.match(r"[a-z]+", dtype).group(0)
    bits = 8 if dtype == "bool" else int(dtype[len(kind):])
    return f"{{{DL_CODES[kind]}, {bits}, 1}}"


def _literal(value, dtype: str) -> str:
    if dtype.startswith("float"):
        if np.isnan(value):
            return "NAN"
        if np.isinf(value):
            return "INFINITY" if value > 0 else "-INFINITY"
        return float(value).hex() + ("f" if dtype == "float32" else "")
    suffix = {"int64": "LL", "uint64": "ULL", "uint32": "U"}.get(dtype, "")
    return f"{int(value)}{suffix}"


def _weights_source(program: McuProgram) -> str:
    lines = ["/* Weights of the model, generated by autocomp (see model.c). */",
             "#include <math.h>", "#include <stdint.h>", ""]
    for index, value in program.constants.items():
        dtype = program.slots[index].dtype
        flat = value.reshape(-1)
        items = [_literal(v, dtype) for v in flat.tolist()] or ["0"]
        body = ",\n".join("  " + ", ".join(items[i:i + 8]) for i in range(0, len(items), 8))
        lines.append(f"const {_c_type(dtype)} autocomp_w{index}[{max(flat.size, 1)}] "
                     f"__attribute__((aligned({ALIGN}))) = {{\n{body}\n}};")
    return "\n".join(lines) + "\n"


def _runtime_symbols(source: str) -> set[str]:
    """The TVM runtime functions the kernels call; anything beyond our stubs is refused."""
    called = set(re.findall(r"\b(TVM\w+)\(", source))
    unknown = called - set(RUNTIME_SYMBOLS)
    if unknown:
        raise AutocompError(f"MCU export: the kernels call TVM runtime functions with no bare-metal "
                            f"stub: {', '.join(sorted(unknown))}")
    return called


def _runtime_source(symbols: set[str]) -> list[str]:
    lines = [f"static char autocomp_error[{ERROR_BYTES}];", "",
             "static void autocomp_append(size_t* n, const char* text) {",
             "  for (; text && *text && *n + 1 < sizeof autocomp_error; ++text)",
             "    autocomp_error[(*n)++] = *text;",
             "}", "",
             "static void autocomp_set_error(const char* kind, const char** parts, int32_t num_parts) {",
             "  size_t n = 0;",
             "  autocomp_append(&n, kind);",
             '  autocomp_append(&n, ": ");',
             "  for (int32_t i = 0; i < num_parts; ++i) autocomp_append(&n, parts[i]);",
             "  autocomp_error[n] = 0;",
             "}", "",
             "const char* autocomp_last_error(void) { return autocomp_error; }", ""]
    if "TVMFFIErrorSetRaisedFromCStrParts" in symbols:
        lines += ["void TVMFFIErrorSetRaisedFromCStrParts(const char* kind, const char** parts,",
                  "                                       int32_t num_parts) {",
                  "  autocomp_set_error(kind, parts, num_parts);", "}", ""]
    if "TVMFFIErrorSetRaisedFromCStr" in symbols:
        lines += ["void TVMFFIErrorSetRaisedFromCStr(const char* kind, const char* message) {",
                  "  autocomp_set_error(kind, &message, 1);", "}", ""]
    if symbols & {"TVMBackendAllocWorkspace", "TVMBackendFreeWorkspace"}:
        lines += ["/* Kernel workspace: the arena region planned for the running call; allocations nest. */",
                  "static uint8_t* autocomp_ws_next;", "static uint8_t* autocomp_ws_end;", "",
                  "void* TVMBackendAllocWorkspace(int device_type, int device_id, uint64_t nbytes,",
                  "                               int dtype_code_hint, int dtype_bits_hint) {",
                  "  (void)device_type; (void)device_id; (void)dtype_code_hint; (void)dtype_bits_hint;",
                  f"  uint64_t size = (nbytes + {ALIGN - 1}u) & ~(uint64_t){ALIGN - 1}u;",
                  "  if (size > (uint64_t)(autocomp_ws_end - autocomp_ws_next)) return NULL;",
                  "  void* ptr = autocomp_ws_next;", "  autocomp_ws_next += size;", "  return ptr;", "}", "",
                  "int TVMBackendFreeWorkspace(int device_type, int device_id, void* ptr) {",
                  "  (void)device_type; (void)device_id;", "  autocomp_ws_next = (uint8_t*)ptr;",
                  "  return 0;", "}", ""]
    return lines


def _model_source(program: McuProgram, plan: ArenaPlan) -> str:
    slots = program.slots
    symbols = _runtime_symbols(program.kernel_source)
    in_slot, out_slot = slots[program.input], slots[program.output]
    lines = [
        "/* Static runtime of the model, generated by autocomp: one activation arena, the tensor",
        "   descriptors and the call sequence of TVM's C kernels (kernels.c). No heap, no C++. */",
        "#include <math.h>", "#include <stddef.h>", "#include <stdint.h>", "#include <string.h>", "",
        '#include "tvm/ffi/c_api.h"', '#include "autocomp_model.h"', "",
        f"static uint8_t autocomp_arena[AUTOCOMP_ARENA_BYTES] __attribute__((aligned({ALIGN})));", ""]
    for index in program.constants:
        lines.append(f"extern const {_c_type(slots[index].dtype)} autocomp_w{index}[];")
    kernels = list(dict.fromkeys(step.kernel for step in program.steps))
    signature = "(void* self_handle, void* args, int32_t num_args, void* result);"
    lines += [""] + [f"int32_t __tvm_ffi_{name}{signature}" for name in kernels] + [""]
    used = sorted({arg for step in program.steps for arg in step.args})
    shapes: dict[tuple[int, ...], str] = {}
    for index in used:
        shape = slots[index].shape
        if shape not in shapes:
            shapes[shape] = f"autocomp_shape{len(shapes)}"
            values = ", ".join(str(d) for d in shape) or "0"
            lines.append(f"static const int64_t {shapes[shape]}[{max(len(shape), 1)}] = {{{values}}};")
    lines.append("")
    for index in used:
        slot = slots[index]
        root = slot.storage
        data = (f"(void*)autocomp_w{root}" if slots[root].kind == "constant"
                else f"autocomp_arena + {plan.offsets[root]}")
        lines.append(f"static const DLTensor autocomp_t{index} = {{.data = {data}, .device = {{kDLCPU, 0}}, "
                     f".ndim = {len(slot.shape)}, .dtype = {_dl_dtype(slot.dtype)}, "
                     f".shape = (int64_t*){shapes[slot.shape]}, .strides = NULL, .byte_offset = 0}};"
                     f"  /* {slot.name} {slot.dtype}{list(slot.shape)} */")
    lines.append("")
    for number, step in enumerate(program.steps):
        args = ", ".join(f"{{.type_index = kTVMFFIDLTensorPtr, .v_ptr = (void*)&autocomp_t{a}}}"
                         for a in step.args)
        lines.append(f"static const TVMFFIAny autocomp_args{number}[{len(step.args)}] = {{{args}}};")
    lines.append("")
    lines += _runtime_source(symbols)
    workspace = "TVMBackendAllocWorkspace" in symbols
    lines += ["int autocomp_invoke(void) {"]
    for number, step in enumerate(program.steps):
        if workspace:
            start = plan.offsets[step.workspace] if step.workspace is not None else 0
            size = slots[step.workspace].nbytes if step.workspace is not None else 0
            lines.append(f"  autocomp_ws_next = autocomp_arena + {start}; "
                         f"autocomp_ws_end = autocomp_ws_next + {size};")
        call = f"__tvm_ffi_{step.kernel}(NULL, (void*)autocomp_args{number}, {len(step.args)}, NULL)"
        lines.append(f"  if ({call} != 0) return {number + 1};")
    in_offset, out_offset = plan.offsets[in_slot.storage], plan.offsets[out_slot.storage]
    lines += ["  return 0;", "}", "",
              "autocomp_input_t* autocomp_input(void) {",
              f"  return (autocomp_input_t*)(autocomp_arena + {in_offset});", "}", "",
              "const autocomp_output_t* autocomp_output(void) {",
              f"  return (const autocomp_output_t*)(autocomp_arena + {out_offset});", "}", "",
              "int autocomp_run(const autocomp_input_t* input, autocomp_output_t* output) {",
              f"  memcpy(autocomp_input(), input, {in_slot.nbytes});",
              "  int status = autocomp_invoke();",
              f"  if (status == 0) memcpy(output, autocomp_output(), {out_slot.nbytes});",
              "  return status;", "}"]
    return "\n".join(lines) + "\n"


def _header(program: McuProgram, plan: ArenaPlan) -> str:
    slots = program.slots
    in_slot, out_slot = slots[program.input], slots[program.output]
    return "\n".join([
        "/* Bare-metal model generated by autocomp. Compile model.c, kernels.c and model_weights.c",
        "   with -Iinclude; link with -lm. autocomp_run returns 0, or 1 + the index of the kernel",
        "   call that failed (autocomp_last_error() then says why). Not reentrant: one arena. */",
        "#ifndef AUTOCOMP_MODEL_H_", "#define AUTOCOMP_MODEL_H_", "", "#include <stdint.h>", "",
        f"#define AUTOCOMP_ARENA_BYTES {plan.size}",
        f"#define AUTOCOMP_INPUT_COUNT {int(np.prod(in_slot.shape))}  /* shape {list(in_slot.shape)} */",
        f"#define AUTOCOMP_OUTPUT_COUNT {int(np.prod(out_slot.shape))}  /* shape {list(out_slot.shape)} */",
        f"typedef {_c_type(in_slot.dtype)} autocomp_input_t;",
        f"typedef {_c_type(out_slot.dtype)} autocomp_output_t;", "",
        "int autocomp_run(const autocomp_input_t* input, autocomp_output_t* output);",
        "/* In place: write the input at autocomp_input(), call autocomp_invoke(), read",
        "   autocomp_output() (valid until the next call; the input is overwritten). */",
        "autocomp_input_t* autocomp_input(void);", "int autocomp_invoke(void);",
        "const autocomp_output_t* autocomp_output(void);", "const char* autocomp_last_error(void);", "",
        "#endif", ""])


def _copy_headers(include: Path) -> None:
    import importlib.util

    for dest, (package, inside) in HEADERS.items():
        spec = importlib.util.find_spec(package)
        source = Path(spec.origin).parent / inside if spec and spec.origin else None
        if source is None or not source.is_file():
            raise AutocompError(f"MCU export: the {package} package lacks its C header {inside}")
        (include / dest).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, include / dest)


def write_sources(program: McuProgram, plan: ArenaPlan, directory: Path, *, weights: bool = True) -> None:
    """Write the artefact's C files and headers into ``directory``."""
    directory.mkdir(parents=True, exist_ok=True)
    _copy_headers(directory / "include")
    (directory / "kernels.c").write_text(program.kernel_source)
    (directory / "model.c").write_text(_model_source(program, plan))
    (directory / "autocomp_model.h").write_text(_header(program, plan))
    if weights:
        (directory / "model_weights.c").write_text(_weights_source(program))


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
    (directory / "memory.json").write_text(json.dumps(memory.as_dict(), indent=2) + "\n")
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
