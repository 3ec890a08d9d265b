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


def _time(request: dict) -> dict:
    import numpy as np
    import tvm
    from tvm.runtime.vm import VirtualMachine

    device = tvm.cpu()
    vm = VirtualMachine(tvm.runtime.load_module(request["library"]), device)
    data = np.random.default_rng(0).standard_normal(request["shape"]).astype("float32")
    tensor = tvm.runtime.tensor(data, device)
    vm["main"](tensor)  # warm-up: first-touch of weights and workspace
    evaluator = vm.time_evaluator("main", device, number=1, repeat=request["repeat"],
                                  min_repeat_ms=request["min_repeat_ms"])
    return {"ok": True, "seconds": list(evaluator(tensor).results)}


def serve(handle: Callable[[dict], dict]) -> None:
    """Answer JSON requests from stdin, one reply line each; a failure is a reply, not an exit."""
    for line in sys.stdin:
        try:
            reply = handle(json.loads(line))
        except Exception as err:
            reply = {"ok": False, "error": f"{type(err).__name__}: {err}"}
        sys.stdout.write(json.dumps(reply) + "\n")
        sys.stdout.flush()


class WorkerProcess:
    """The parent's handle on a persistent JSON worker (``python -m MODULE`` running ``serve``).

    A worker that dies on a request (a compiled module crashed it) is restarted and
    asked again, up to ``attempts`` times in all.
    """

    def __init__(self, module: str, name: str, *, threads: int | None = None, attempts: int = 2) -> None:
        self.module, self.name, self.attempts = module, name, attempts
        # Threads that spin while waiting steal the CPU from the timed module (a value the
        # user sets wins); TVM_NUM_THREADS must be fixed before TVM starts in the worker.
        self.env = {"OMP_WAIT_POLICY": "PASSIVE", **os.environ}
        if threads is not None:
            self.env.update(TVM_NUM_THREADS=str(threads), OMP_NUM_THREADS=str(threads))
        self._process: subprocess.Popen | None = None

    def ask(self, request: dict) -> dict:
        """The worker's reply to ``request`` (``ok`` false when the request failed in it)."""
        for _ in range(self.attempts):
            if self._process is None or self._process.poll() is not None:
                self._process = subprocess.Popen([sys.executable, "-m", self.module], stdin=subprocess.PIPE,
                                                 stdout=subprocess.PIPE, text=True, env=self.env)
            try:
                self._process.stdin.write(json.dumps(request) + "\n")
                self._process.stdin.flush()
                line = self._process.stdout.readline()
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
