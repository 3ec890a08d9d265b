"""Latency measured on devices reached through a TVM RPC tracker, and a loopback tracker and server.

A TVM RPC tracker hands out devices (phones, boards) that registered with it
under a device key; this is the standard way to spread measurement over many
devices. ``RPCMeasurer`` compiles a model for the profile's target, exports the
library (with the profile's cross compiler), asks the tracker for a session with
the profile's key, uploads and times the module there with the Relax VM. A
device that drops mid-measurement is retried with a fresh session; after the
profile's number of retries the measurement fails with the reason.

``start_local_tracker`` and ``start_local_server`` run a tracker and a server on
this machine (tests, and users who want to try the RPC path). They bind to
127.0.0.1 unless told otherwise and run in their own process group, which is
ended as a whole on ``close()`` or when this process dies.

Command line: ``python -m autocomp.hardware.measure.rpc local --key KEY`` runs a
loopback tracker with one server until interrupted.
"""

import argparse
import contextlib
import json
import logging
import os
import select
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from torch import nn

from autocomp.core.errors import AutocompError
from autocomp.hardware.compile.lower import compile_label, compile_model
from autocomp.hardware.compile.tune import tuning_label
from autocomp.hardware.measure import reference as ab
from autocomp.hardware.measure.base import Latency
from autocomp.hardware.measure.load import Load
from autocomp.hardware.measure.timer_worker import alternating_rounds
from autocomp.hardware.profiles import HardwareProfile, RpcSettings

LOOPBACK = "127.0.0.1"
log = logging.getLogger(__name__)


class LocalService:
    """A tracker or server started by this process, running in its own process group."""

    def __init__(self, role: str, host: str, port: int, process: subprocess.Popen) -> None:
        self.role = role
        self.host = host
        self.port = port
        self.process = process

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def group_pids(self) -> list[int]:
        """Every running process of this service's group (TVM starts worker processes of its own)."""
        import psutil

        pids = []
        for proc in psutil.process_iter():
            try:
                if os.getpgid(proc.pid) == self.process.pid and proc.status() != psutil.STATUS_ZOMBIE:
                    pids.append(proc.pid)
            except (ProcessLookupError, psutil.Error):
                continue
        return pids

    def kill(self) -> None:
        """End the whole group at once with SIGKILL, as a device that loses power would."""
        self._signal_group(signal.SIGKILL)
        self.process.wait()
        self._close_pipes()

    def close(self, timeout_s: float = 10.0) -> None:
        """Stop the service: its worker ends its group when stdin closes; SIGKILL what remains."""
        if self.process.poll() is None:
            with contextlib.suppress(BrokenPipeError):
                self.process.stdin.close()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(timeout=timeout_s)
        self._signal_group(signal.SIGKILL)
        self.process.wait()
        self._close_pipes()

    def _signal_group(self, sig: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, sig)

    def _close_pipes(self) -> None:
        for pipe in (self.process.stdin, self.process.stdout):
            if pipe is not None and not pipe.closed:
                pipe.close()

    def __enter__(self) -> "LocalService":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def free_port(host: str = LOOPBACK) -> int:
    """A TCP port that was free on ``host`` a moment ago (the services search onwards from it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def _spawn(args: list[str], host: str, port: int | None, env: dict[str, str],
           timeout_s: float) -> tuple[subprocess.Popen, int]:
    start = port or free_port(host)
    env.setdefault("TVM_USE_RUNTIME_LIB", "1")  # serving needs only TVM's runtime: faster start
    command = [sys.executable, "-m", "autocomp.hardware.measure.rpc_worker", *args,
               "--host", host, "--port", str(start), "--port-end", str(start + 1 if port else start + 64)]
    process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                               env=env, start_new_session=True)
    ready, _, _ = select.select([process.stdout], [], [], timeout_s)
    line = process.stdout.readline() if ready else ""
    if not line:
        service = LocalService(args[0], host, start, process)
        service.close(timeout_s=1)
        raise AutocompError(f"the RPC {args[0]} did not start on {host} within {timeout_s:g} s "
                            f"(exit status {process.returncode})")
    return process, int(json.loads(line)["port"])


def start_local_tracker(host: str = LOOPBACK, port: int | None = None,
                        timeout_s: float = 60.0) -> LocalService:
    """Start a TVM RPC tracker on ``host`` (loopback by default); ``port`` None or 0 picks a free one."""
    process, bound = _spawn(["tracker"], host, port, dict(os.environ), timeout_s)
    return LocalService("tracker", host, bound, process)


def start_local_server(tracker_host: str, tracker_port: int, key: str, host: str = LOOPBACK,
                       port: int | None = None, threads: int | None = None,
                       timeout_s: float = 60.0) -> LocalService:
    """Start a TVM RPC server registered with a tracker under ``key``; returns once registered.

    ``threads`` sets TVM_NUM_THREADS for the modules it runs.
    """
    env = dict(os.environ)
    if threads is not None:
        env["TVM_NUM_THREADS"] = env["OMP_NUM_THREADS"] = str(threads)
    process, bound = _spawn(["server", "--tracker", f"{tracker_host}:{tracker_port}", "--key", key],
                            host, port, env, timeout_s)
    service = LocalService("server", host, bound, process)
    deadline = time.monotonic() + timeout_s
    while registered_servers(tracker_host, tracker_port, key) == 0:
        if time.monotonic() > deadline or process.poll() is not None:
            service.close(timeout_s=1)
            raise AutocompError(f"the RPC server for key {key!r} did not register with the tracker "
                                f"{tracker_host}:{tracker_port} within {timeout_s:g} s")
        time.sleep(0.2)
    return service


def _tracker_call(host: str, port: int, message: list, timeout_s: float):
    """One request to a tracker over a fresh connection, bounded by ``timeout_s``."""
    from tvm.rpc import base

    with socket.create_connection((host, port), timeout=timeout_s) as sock:
        sock.sendall(struct.pack("<i", base.RPC_TRACKER_MAGIC))
        if struct.unpack("<i", base.recvall(sock, 4))[0] != base.RPC_TRACKER_MAGIC:
            raise ConnectionError(f"{host}:{port} is not a TVM RPC tracker")
        base.sendjson(sock, message)
        return base.recvjson(sock)


def tracker_summary(host: str, port: int, timeout_s: float = 10.0) -> dict:
    """The tracker's summary: ``queue_info`` (free and pending per key) and ``server_info``."""
    from tvm.rpc import base

    code, summary = _tracker_call(host, port, [base.TrackerCode.SUMMARY], timeout_s)
    if code != base.TrackerCode.SUCCESS:
        raise ConnectionError(f"tracker {host}:{port} refused the summary request")
    return summary


def registered_servers(host: str, port: int, key: str) -> int:
    """How many servers are registered with the tracker under ``key``."""
    servers = tracker_summary(host, port)["server_info"]
    return sum(1 for info in servers if info.get("key") == f"server:{key}")


def request_session(settings: RpcSettings):
    """A session on a free device with the key; fails after ``timeout_s`` without one."""
    from tvm import rpc
    from tvm.rpc import base

    where = f"tracker {settings.tracker_host}:{settings.tracker_port}"
    try:
        reply = _tracker_call(settings.tracker_host, settings.tracker_port,
                              [base.TrackerCode.REQUEST, settings.key, "", 1], settings.timeout_s)
    except TimeoutError:
        try:
            count = registered_servers(settings.tracker_host, settings.tracker_port, settings.key)
        except OSError:
            count = 0
        raise TimeoutError(f"no device with key {settings.key!r} became free within "
                           f"{settings.timeout_s:g} s ({where} lists {count} such servers)") from None
    except OSError as err:
        raise ConnectionError(f"cannot reach {where}: {err}") from None
    if reply[0] != base.TrackerCode.SUCCESS:
        raise ConnectionError(f"{where} refused the request for key {settings.key!r}: {reply}")
    url, port, match_key = reply[1]
    return rpc.connect(url, port, match_key, session_timeout=settings.timeout_s)


def export_for_device(executable, directory: Path, profile: HardwareProfile) -> Path:
    """Export a shared library for the profile's device, with its cross compiler when set."""
    if profile.export.format != "shared-library":
        raise AutocompError(f"target {profile.name} exports {profile.export.format}; measuring through "
                            "RPC needs a shared library the TVM runtime on the device can load")
    path = directory / "model.so"
    if profile.export.cross_compiler:
        from tvm.support import cc

        fcompile = cc.cross_compiler(profile.export.cross_compiler, options=list(profile.export.cflags))
        executable.export_library(str(path), fcompile=fcompile)
    else:
        executable.export_library(str(path))
    return path


class DeviceFailure(RuntimeError):
    """The device or its session failed during one measurement attempt (retried)."""


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return f"{type(err).__name__}: {text.splitlines()[0] if text else ''}"


class RPCMeasurer:
    """Compiles for the profile's target and times the module on a device handed out by a
    tracker; after ``set_reference`` each measurement alternates it with the reference on
    the same device in the same session (``autocomp.hardware.measure.reference``)."""

    def __init__(self, profile: HardwareProfile, new_workloads: str = "tune") -> None:
        if profile.latency.rpc is None:
            raise AutocompError(f"target {profile.name}: latency.rpc (tracker and key) is not set")
        self.profile = profile
        self.new_workloads = new_workloads  # as in ``LocalMeasurer``
        self.settings = profile.latency.rpc
        self.failures: list[str] = []  # reasons of the attempts retried in the last measurement
        self._reference: ab.Reference | None = None
        self._reference_dir: Path | None = None
        self._schedules = tuning_label(profile)  # of the last compile; a library timed alone keeps it

    @property
    def reference(self) -> ab.Reference | None:
        return self._reference

    def set_reference(self, model: nn.Module, input_shape: tuple[int, ...],
                      baseline_s: float | None = None) -> Latency:
        """Compile ``model`` as the reference and time it against itself on the device; later
        figures are reference-relative (see ``LocalMeasurer.set_reference``)."""
        self.close()
        self._reference_dir = Path(tempfile.mkdtemp(prefix="autocomp-rpc-reference-"))
        library = export_for_device(compile_model(model, input_shape, self.profile), self._reference_dir,
                                    self.profile)
        self._schedules = compile_label(self.profile)
        attempt, attempts = ab.timed(lambda: self._rounds(library, input_shape, library), None,
                                     _no_watch, _device_load)
        level = ab.summarise(attempt, attempts, None, "").median_s
        self._reference = ab.Reference(level, baseline_s or level)
        return ab.summarise(attempt, attempts, self._reference, self._label("reference against itself"))

    def measure(self, model: nn.Module, input_shape: tuple[int, ...]) -> Latency:
        executable = compile_model(model, input_shape, self.profile, new_workloads=self.new_workloads)
        self._schedules = compile_label(self.profile)
        with tempfile.TemporaryDirectory(prefix="autocomp-rpc-") as tmp:
            library = export_for_device(executable, Path(tmp), self.profile)
            return self.time_library(library, input_shape)

    def time_library(self, library: Path, input_shape: tuple[int, ...]) -> Latency:
        """Time an exported library on the device (beside the reference when one is set)."""
        reference = self._reference_dir / "model.so" if self._reference_dir is not None else None
        self.failures = []  # over every attempt: a noisy one is timed again, its retries still count
        attempt, attempts = ab.timed(lambda: self._rounds(library, input_shape, reference), self._reference,
                                     _no_watch, _device_load)
        return ab.summarise(attempt, attempts, self._reference, self._label())

    def close(self) -> None:
        """Drop the reference; no session is held between measurements (each gets its own)."""
        if self._reference_dir is not None:
            shutil.rmtree(self._reference_dir, ignore_errors=True)
        self._reference_dir, self._reference = None, None

    def _rounds(self, library: Path, input_shape: tuple[int, ...], reference: Path | None) -> ab.Rounds:
        """One timed attempt, with a fresh session for each retry of a failing device."""
        attempts = self.settings.retries + 1
        for attempt in range(1, attempts + 1):
            try:
                return self._time_once(library, input_shape, reference)
            except Exception as err:  # a dropped device surfaces as many error types
                reason = str(err) if isinstance(err, DeviceFailure) else _first_line(err)
                self.failures.append(reason)
                log.warning("RPC measurement on key %s failed (attempt %d of %d): %s",
                            self.settings.key, attempt, attempts, reason)
        raise AutocompError(f"RPC device {self.settings.key!r} via tracker {self.settings.tracker_host}:"
                            f"{self.settings.tracker_port} failed {attempts} times; last: "
                            f"{reason}")

    def _time_once(self, library: Path, input_shape: tuple[int, ...], reference: Path | None) -> ab.Rounds:
        import numpy as np
        import tvm
        from tvm.runtime.vm import VirtualMachine

        session = request_session(self.settings)
        stage = "uploading the library"
        try:
            # The reference travels under its own name; timed against itself, the one
            # library is loaded twice.
            uploads = {"model.so": library}
            if reference is not None and reference != library:
                uploads["reference.so"] = reference
            for name, path in uploads.items():
                session.upload(str(path), target=name)
            stage = "loading the module"
            device = session.device(self.profile.latency.device)
            names = ["model.so", *([] if reference is None else [list(uploads)[-1]])]
            vms = [VirtualMachine(session.load_module(name), device) for name in names]
            stage = "running the model"
            data = np.random.default_rng(0).standard_normal(input_shape).astype("float32")
            lat = self.profile.latency
            evaluators = []
            for vm in vms:
                vm.set_input("main", tvm.runtime.tensor(data, device))
                vm.invoke_stateful("main")  # warm-up: first touch of weights and workspace
                evaluators.append(vm.time_evaluator("invoke_stateful", device, number=1, repeat=1,
                                                    min_repeat_ms=lat.min_repeat_ms))
            stage = "timing the model"
            timers = [lambda e=evaluator: e("main").results[0] for evaluator in evaluators]
            readings = alternating_rounds(timers, lat.repeat)
        except Exception as err:
            raise DeviceFailure(f"device failed while {stage}: {_first_line(err)}") from err
        return ab.Rounds(readings[0], readings[1] if len(readings) > 1 else [])

    def _label(self, what: str = "") -> str:
        rpc = self.settings
        label = (f"{self.profile.name} via RPC tracker {rpc.tracker_host}:{rpc.tracker_port} key {rpc.key}: "
                 f"TVM {self.profile.target_text()}, {self._schedules}")
        return label + (f", {what}" if what else "")


def _no_watch() -> None:
    return None


def _device_load(before: None, after: None) -> Load:
    return Load("the device's load is not visible through RPC", False)


def main(argv: list[str] | None = None) -> int:
    """``local``: run a tracker and one server until interrupted."""
    parser = argparse.ArgumentParser(prog="python -m autocomp.hardware.measure.rpc")
    sub = parser.add_subparsers(dest="command", required=True)
    local = sub.add_parser("local", help="a tracker and one server on this machine")
    local.add_argument("--key", required=True, help="device key the server registers under")
    local.add_argument("--host", default=LOOPBACK, help="address to bind (default: loopback only)")
    local.add_argument("--port", type=int, default=9190, help="tracker port (0: any free one)")
    local.add_argument("--threads", type=int, help="TVM_NUM_THREADS of the server")
    args = parser.parse_args(argv)

    def stop(*_: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)  # also where a background job inherited SIGINT ignored
    with contextlib.suppress(KeyboardInterrupt), start_local_tracker(args.host, args.port) as tracker, \
            start_local_server(tracker.host, tracker.port, args.key, host=args.host, threads=args.threads):
        print(f"tracker {tracker.address}, server key {args.key!r}; Ctrl-C stops both", flush=True)
        signal.pause()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
