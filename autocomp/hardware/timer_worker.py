"""Timing worker: a separate process that loads compiled TVM modules and times them.

It runs apart from the search so that PyTorch's OpenMP threads do not compete
with TVM's thread pool (they made TVM up to 2x slower in one process), and so
that TVM_NUM_THREADS is fixed before TVM starts. Protocol: one JSON request
per line on stdin, one JSON reply per line on stdout.
"""

import json
import sys
from collections.abc import Callable


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


if __name__ == "__main__":
    serve(_time)
