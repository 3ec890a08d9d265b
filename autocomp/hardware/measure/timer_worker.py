"""Timing worker: a separate process that loads compiled TVM modules and times them.

It runs apart from the search so that PyTorch's OpenMP threads do not compete
with TVM's thread pool (they made TVM up to 2x slower in one process), and so
that TVM_NUM_THREADS is fixed before TVM starts. Protocol: one JSON request
per line on stdin, one JSON reply per line on stdout.
"""

import json
import os
import subprocess
import sys
from collections.abc import Callable

from autocomp.core.errors import AutocompError

CPUS_VARIABLE = "AUTOCOMP_TIMING_CPUS"


def timing_cpus(threads: int) -> list[int]:
    """The CPUs a worker timing with ``threads`` threads is pinned to: the last ``threads`` of
    those this process may use (the first CPU takes most interrupts)."""
    allowed = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    return allowed[-threads:] if threads <= len(allowed) else allowed


_loaded: dict[str, object] = {}  # the reference's VM, kept loaded between requests


def _vm(library: str, device, keep: bool = False):
    import tvm
    from tvm.runtime.vm import VirtualMachine

    if library in _loaded:
        return _loaded[library]
    vm = VirtualMachine(tvm.runtime.load_module(library), device)
    if keep:
        _loaded.clear()
        _loaded[library] = vm
    return vm


def _time(request: dict) -> dict:
    """Time ``library`` in ``rounds`` rounds; with a ``reference`` library, each round times the
    candidate and then the reference (A B A B ...), so both see the same machine."""
    import numpy as np
    import tvm

    device = tvm.cpu()
    data = np.random.default_rng(0).standard_normal(request["shape"]).astype("float32")
    tensor = tvm.runtime.tensor(data, device)
    modules = [_vm(request["library"], device)]
    if request.get("reference"):
        modules.append(_vm(request["reference"], device, keep=True))
    evaluators = []
    for vm in modules:
        vm["main"](tensor)  # warm-up: first-touch of weights and workspace
        evaluators.append(vm.time_evaluator("main", device, number=1, repeat=1,
                                            min_repeat_ms=request["min_repeat_ms"]))
    readings = alternating_rounds([lambda e=evaluator: e(tensor).results[0] for evaluator in evaluators],
                                  request["rounds"])
    return {"ok": True, "candidate": readings[0], "reference": readings[1] if len(readings) > 1 else []}


def alternating_rounds(timers: list[Callable[[], float]], rounds: int) -> list[list[float]]:
    """Seconds per round of each timer, the timers taking turns in every round (A B A B ...).

    One untimed round comes first: a module just loaded runs its first repeats slower
    (caches, page faults, the pool's threads waking), which failed the first attempt's
    spread check in most trials and cost a second attempt.
    """
    readings: list[list[float]] = [[] for _ in timers]
    for round_number in range(rounds + 1):
        for timer, seconds in zip(timers, readings, strict=True):
            reading = timer()
            if round_number:
                seconds.append(reading)
    return readings


def serve(handle: Callable[[dict], dict]) -> None:
    """Answer JSON requests from stdin, one reply line each; a failure is a reply, not an exit.

    The process first pins itself to the CPUs listed in ``AUTOCOMP_TIMING_CPUS`` (its
    parent chose them), before TVM starts its threads, and keeps PyTorch out.
    """
    # TVM's FFI imports PyTorch whenever it is installed (5 s of a worker's start here); the
    # workers only load and run compiled modules, so they make it unimportable.
    sys.modules.setdefault("torch", None)
    cpus = os.environ.get(CPUS_VARIABLE)
    if cpus and hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {int(cpu) for cpu in cpus.split(",")})
    for line in sys.stdin:
        try:
            reply = handle(json.loads(line))
        except Exception as err:
            reply = {"ok": False, "error": f"{type(err).__name__}: {err}"}
        sys.stdout.write(json.dumps(reply) + "\n")
        sys.stdout.flush()


def time_in_fresh_worker(library: str, shape: list[int], *, rounds: int, min_repeat_ms: int,
                         env: dict[str, str], timeout_s: float = 1800) -> list[float]:
    """Seconds per round of ``library`` timed alone by a new worker process started with ``env``
    (benchmarks comparing thread settings, where each setting needs its own process)."""
    request = {"library": library, "shape": shape, "rounds": rounds, "min_repeat_ms": min_repeat_ms}
    done = subprocess.run([sys.executable, "-m", "autocomp.hardware.measure.timer_worker"],
                          input=json.dumps(request) + "\n", capture_output=True, text=True, env=env,
                          timeout=timeout_s, check=True)
    reply = json.loads(done.stdout.splitlines()[-1])
    if not reply["ok"]:
        raise AutocompError(f"timing failed: {reply['error']}")
    return reply["candidate"]


class WorkerProcess:
    """The parent's handle on a persistent JSON worker (``python -m MODULE`` running ``serve``).

    A worker that dies on a request (a compiled module crashed it) is restarted and
    asked again, up to ``attempts`` times in all.
    """

    def __init__(self, module: str, name: str, *, threads: int | None = None, attempts: int = 2) -> None:
        self.module, self.name, self.attempts = module, name, attempts
        # Threads that spin while waiting steal the CPU from the timed module (a value the
        # user sets wins). TVM binds each pool thread to one core by default: when another
        # process holds that core, the other threads spin at every barrier until the
        # scheduler gives it a slice, which made one measurement 200x slower (36-52 ms
        # instead of 0.2 ms with a busy loop on one of 2 cores, 0.5-1.1 ms unbound). The
        # process is pinned to its CPUs instead and the threads float among them.
        # TVM_NUM_THREADS must be fixed before TVM starts in the worker.
        self.env = {"OMP_WAIT_POLICY": "PASSIVE", "TVM_BIND_THREADS": "0", **os.environ}
        if threads is not None:
            self.env.update(TVM_NUM_THREADS=str(threads), OMP_NUM_THREADS=str(threads))
            cpus = timing_cpus(threads)
            if cpus:
                self.env[CPUS_VARIABLE] = ",".join(map(str, cpus))
        self._process: subprocess.Popen | None = None

    def start(self) -> subprocess.Popen:
        """The running worker process, started now when there is none (or it died)."""
        if self._process is None or self._process.poll() is not None:
            self._process = subprocess.Popen([sys.executable, "-m", self.module], stdin=subprocess.PIPE,
                                             stdout=subprocess.PIPE, text=True, env=self.env)
        return self._process

    def ask(self, request: dict) -> dict:
        """The worker's reply to ``request`` (``ok`` false when the request failed in it)."""
        for _ in range(self.attempts):
            process = self.start()
            try:
                process.stdin.write(json.dumps(request) + "\n")
                process.stdin.flush()
                line = process.stdout.readline()
            except BrokenPipeError:
                line = ""
            if line:
                return json.loads(line)
            self._process = None
        again = "" if self.attempts == 1 else f" {self.attempts} times"
        raise AutocompError(f"the {self.name} died{again} while running the module")

    def close(self) -> None:
        if self._process is not None:
            self._process.stdin.close()
            self._process.wait(timeout=30)
            self._process = None


if __name__ == "__main__":
    serve(_time)
