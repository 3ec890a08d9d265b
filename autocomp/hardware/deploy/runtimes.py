"""Running an exported TVM library outside Python, as a deployment would: a small C++ loader
(``loaders/vm_loader.cc``) linked against a TVM runtime, run natively for this machine's
libraries and under ``qemu-aarch64`` for aarch64 ones.

The aarch64 runtime comes from the aarch64 ``apache-tvm`` and ``apache-tvm-ffi`` wheels on
PyPI. Nothing is downloaded at run time: the user fetches the two wheels once (the command
is in ``aarch64_runtime_help``) and autocomp extracts the runtime from them into its cache.
"""

import hashlib
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import numpy as np

from autocomp.core.errors import AutocompError
from autocomp.core.paths import cache_dir

LOADER_SOURCE = Path(__file__).resolve().parent / "loaders" / "vm_loader.cc"
WHEELS_ENV = "AUTOCOMP_AARCH64_WHEELS"
AARCH64_SYSROOT = Path("/usr/aarch64-linux-gnu")  # Debian's cross toolchain and libc6-arm64-cross
QEMU = "qemu-aarch64"
RUN_TIMEOUT_S = 600


class RuntimeUnavailable(Exception):
    """The library cannot be run on this machine; the message says why and what to install."""


@dataclass(frozen=True)
class Runtime:
    """A TVM runtime that exported libraries of one architecture run on here."""

    arch: str
    version: str
    lib_dirs: tuple[Path, ...]
    include_dir: Path
    compiler: str
    launcher: tuple[str, ...]  # prefix that runs an executable of this arch (qemu), or ()

    def describe(self) -> str:
        how = f"under {self.launcher[0]} user-mode emulation" if self.launcher else "natively"
        return f"C++ loader linked against TVM runtime {self.version} ({self.arch}), run {how}"


def host_arch() -> str:
    """This machine's CPU architecture as LLVM triples name it (``x86_64``, ``aarch64``)."""
    return platform.machine()


def runtime_for(arch: str, compiler: str | None = None) -> Runtime:
    """The runtime for ``arch`` (``x86_64``, ``aarch64``); raises ``RuntimeUnavailable``."""
    if arch == host_arch():
        return _host_runtime(compiler or "g++")
    if arch == "aarch64":
        return _aarch64_runtime(compiler or "aarch64-linux-gnu-g++")
    raise RuntimeUnavailable(f"no way to run {arch} code on this {host_arch()} machine")


def run_library(library: Path, inputs: np.ndarray, runtime: Runtime) -> list[np.ndarray]:
    """Run the Relax VM library's ``main`` on each of ``inputs`` (float32, shape (N, *input))
    in a separate process; returns each output stacked over the N inputs."""
    loader = build_loader(runtime)
    inputs = np.ascontiguousarray(inputs, dtype="<f4")
    with tempfile.TemporaryDirectory(prefix="autocomp-run-") as tmp:
        source, sink = Path(tmp) / "inputs.bin", Path(tmp) / "outputs.bin"
        inputs.tofile(source)
        command = [*runtime.launcher, str(loader), str(library), str(source), str(sink),
                   str(len(inputs)), *(str(d) for d in inputs.shape[1:])]
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=RUN_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            raise AutocompError(f"{library.name} did not finish within {RUN_TIMEOUT_S} s "
                                f"({runtime.describe()})") from None
        if done.returncode != 0:
            raise AutocompError(f"{library.name} failed to run ({runtime.describe()}): {_failure(done)}")
        return _read_outputs(sink.read_bytes(), done.stdout, len(inputs))


def _failure(done: subprocess.CompletedProcess) -> str:
    """The loader's own error line, or how the process died."""
    lines = done.stderr.strip().splitlines()
    mine = [line for line in lines if line.startswith("vm_loader: ")]
    if mine:
        return mine[-1].removeprefix("vm_loader: ")
    if done.returncode < 0:
        return f"killed by {signal.Signals(-done.returncode).name}"
    if "Segfault encountered" in done.stderr:  # TVM's handler reports it, then exits
        return "segmentation fault"
    return lines[-1] if lines else f"exit status {done.returncode}"


def _read_outputs(raw: bytes, header: str, count: int) -> list[np.ndarray]:
    specs = []
    for line in header.splitlines():
        if line.startswith("output "):
            _, dtype, dims = line.split()
            specs.append((np.dtype(dtype).newbyteorder("<"), tuple(int(d) for d in dims.split("x") if d)))
    per_input = sum(dtype.itemsize * int(np.prod(shape)) for dtype, shape in specs)
    if not specs or len(raw) != per_input * count:
        raise AutocompError(f"the loader wrote {len(raw)} bytes, not {count} x {per_input}")
    outputs: list[list[np.ndarray]] = [[] for _ in specs]
    offset = 0
    for _ in range(count):
        for slot, (dtype, shape) in enumerate(specs):
            size = dtype.itemsize * int(np.prod(shape))
            outputs[slot].append(np.frombuffer(raw, dtype, int(np.prod(shape)), offset).reshape(shape))
            offset += size
    return [np.stack(items) for items in outputs]


def build_loader(runtime: Runtime) -> Path:
    """Compile the loader for the runtime once; cached by source, runtime and compiler."""
    source = LOADER_SOURCE.read_bytes()
    key = hashlib.sha256(b"\0".join([source, runtime.compiler.encode(), runtime.version.encode(),
                                     *(str(d).encode() for d in runtime.lib_dirs)])).hexdigest()[:16]
    target = cache_dir() / "runtimes" / "loaders" / f"vm_loader-{runtime.arch}-{key}"
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(f".{target.name}.{os.getpid()}")
    link = [arg for d in runtime.lib_dirs for arg in (f"-L{d}", f"-Wl,-rpath,{d}")]
    command = [runtime.compiler, "-std=c++17", "-O2", str(LOADER_SOURCE), f"-I{runtime.include_dir}",
               *link, "-Wl,--no-as-needed", "-ltvm_runtime", "-ltvm_ffi", "-o", str(partial)]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        partial.unlink(missing_ok=True)
        raise AutocompError(f"building the TVM loader with {runtime.compiler} failed: "
                            f"{(done.stderr.strip().splitlines() or ['?'])[-1]}")
    partial.replace(target)
    return target


def _require_tool(name: str, debian_package: str) -> None:
    if shutil.which(name) is None:
        raise RuntimeUnavailable(f"{name} is not installed (Debian: apt-get install {debian_package})")


def _host_runtime(compiler: str) -> Runtime:
    import tvm
    import tvm_ffi

    _require_tool(compiler, "g++")
    tvm_lib = Path(tvm.__file__).resolve().parent / "lib"
    ffi_root = Path(tvm_ffi.__file__).resolve().parent
    return Runtime(host_arch(), tvm.__version__, (tvm_lib, ffi_root / "lib"), ffi_root / "include",
                   compiler, ())


def wheel_dir() -> Path:
    """Where the aarch64 wheels are looked for: ``$AUTOCOMP_AARCH64_WHEELS`` or the cache."""
    return Path(os.environ.get(WHEELS_ENV) or cache_dir() / "runtimes" / "aarch64-wheels")


def _versions() -> tuple[str, str]:
    return metadata.version("apache-tvm"), metadata.version("apache-tvm-ffi")


def aarch64_runtime_help() -> str:
    """The one-time command that puts the aarch64 TVM runtime where autocomp looks for it."""
    tvm_version, ffi_version = _versions()
    python = f"{sys.version_info.major}.{sys.version_info.minor}"
    return (f"pip download apache-tvm=={tvm_version} apache-tvm-ffi=={ffi_version} --no-deps "
            f"--only-binary=:all: --platform manylinux_2_28_aarch64 --python-version {python} "
            f"-d {wheel_dir()}")


def _aarch64_runtime(compiler: str) -> Runtime:
    _require_tool(compiler, "g++-aarch64-linux-gnu")
    _require_tool(QEMU, "qemu-user")
    sysroot = Path(os.environ.get("QEMU_LD_PREFIX") or AARCH64_SYSROOT)
    if not (sysroot / "lib" / "libstdc++.so.6").is_file():
        raise RuntimeUnavailable(f"no aarch64 libstdc++ under {sysroot} "
                                 "(Debian: apt-get install g++-aarch64-linux-gnu)")
    tvm_version, ffi_version = _versions()
    root = cache_dir() / "runtimes" / f"aarch64-tvm{tvm_version}-ffi{ffi_version}"
    if not (root / "lib" / "libtvm_runtime.so").is_file():
        _extract_aarch64(root, tvm_version, ffi_version)
    return Runtime("aarch64", tvm_version, (root / "lib",), root / "include", compiler,
                   (QEMU, "-L", str(sysroot)))


def _find_wheel(project: str, version: str) -> Path:
    folder = wheel_dir()
    found = sorted(folder.glob(f"{project}-*aarch64*.whl")) if folder.is_dir() else []
    matching = [w for w in found if w.name.split("-")[1] == version]
    if not matching:
        have = f" (found {', '.join(w.name for w in found)})" if found else ""
        name = project.replace("_", "-")
        raise RuntimeUnavailable(f"TVM's aarch64 runtime ({name} {version}) is not in {folder}{have}; "
                                 f"fetch it once with: {aarch64_runtime_help()}")
    return matching[-1]


def _extract_aarch64(root: Path, tvm_version: str, ffi_version: str) -> None:
    """Copy the two runtime libraries and the tvm-ffi headers out of the wheels, atomically."""
    tvm_wheel = _find_wheel("apache_tvm", tvm_version)
    ffi_wheel = _find_wheel("apache_tvm_ffi", ffi_version)
    root.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{root.name}-", dir=root.parent))
    try:
        (staging / "lib").mkdir()
        wanted = [(tvm_wheel, "tvm/lib/libtvm_runtime.so"), (ffi_wheel, "tvm_ffi/lib/libtvm_ffi.so")]
        for wheel, member in wanted:
            with zipfile.ZipFile(wheel) as archive, archive.open(member) as src, \
                    open(staging / "lib" / Path(member).name, "wb") as dst:
                shutil.copyfileobj(src, dst)
        with zipfile.ZipFile(ffi_wheel) as archive:
            for member in archive.namelist():
                if member.startswith("tvm_ffi/include/") and not member.endswith("/"):
                    archive.extract(member, staging)
        (staging / "tvm_ffi" / "include").rename(staging / "include")
        shutil.rmtree(staging / "tvm_ffi")
        try:
            staging.replace(root)
        except OSError:  # another process finished first
            shutil.rmtree(staging)
    except KeyError as err:
        shutil.rmtree(staging, ignore_errors=True)
        raise RuntimeUnavailable(f"the aarch64 wheels lack {err}: are they apache-tvm's?") from None
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
