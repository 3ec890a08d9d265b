"""Kernel timing worker: times single TVM kernels, and every kernel call inside a model.

Like ``timer_worker`` it runs in its own process, started with ``TVM_NUM_THREADS``
set to the profile's thread count and with no PyTorch loaded, so the timings are
those the model would see. Protocol: one JSON request per line on stdin, one JSON
reply per line on stdout. Requests:

- ``{"op": "kernels", "library", "device", "repeat", "min_repeat_ms", "kernels":
  [{"symbol", "args": [[shape, dtype], ...]}]}``: each kernel alone on random
  inputs of its real shapes and dtypes; replies ``{"seconds": {symbol: [...]},
  "errors": {symbol: reason}}``.
- ``{"op": "profile", "library", "device", "shape", "dtype", "kernels": [symbol],
  "runs"}``: the model's ``main`` run ``runs`` times with the VM calling back around
  each call; replies ``{"calls": [[symbol, [seconds per run]], ...]}`` in call order.

``WorkerClient`` is the parent's side: it starts the worker, restarts it once
when a kernel crashes it, and turns its errors into ``AutocompError``.
``shared_worker`` keeps one per thread count for the whole process (starting
one imports TVM, several seconds).
"""

import atexit

from autocomp.core.errors import AutocompError
from autocomp.hardware.measure.timer_worker import WorkerProcess, serve


def _device(name: str):
    import tvm

    return tvm.cuda() if name == "cuda" else tvm.cpu()


def random_tensor(shape: list[int], dtype: str, device, rng):
    """Inputs no kernel trips over: normal floats, and ones for integers (valid divisors;
    integer arithmetic takes the same time whatever the values)."""
    import numpy as np
    import tvm

    if dtype.startswith(("float", "bfloat")):
        data = rng.standard_normal(shape).astype(dtype)
    elif dtype == "bool":
        data = rng.integers(0, 2, shape).astype(bool)
    else:
        data = np.ones(shape, dtype=dtype)
    return tvm.runtime.tensor(data, device)


def _time_kernels(request: dict) -> dict:
    import numpy as np
    import tvm

    device = _device(request["device"])
    library = tvm.runtime.load_module(request["library"])
    rng = np.random.default_rng(0)
    seconds, errors = {}, {}
    for kernel in request["kernels"]:
        symbol = kernel["symbol"]
        try:
            args = [random_tensor(shape, dtype, device, rng) for shape, dtype in kernel["args"]]
            function = library[symbol]
            function(*args)  # warm-up: first touch of the buffers
            evaluator = library.time_evaluator(symbol, device, number=1, repeat=request["repeat"],
                                               min_repeat_ms=request["min_repeat_ms"])
            seconds[symbol] = list(evaluator(*args).results)
        except Exception as err:
            first = str(err).strip().splitlines()[0] if str(err).strip() else ""
            errors[symbol] = f"{type(err).__name__}: {first}"
    return {"ok": True, "seconds": seconds, "errors": errors}


def _profile(request: dict) -> dict:
    import time

    import numpy as np
    import tvm
    from tvm.runtime.vm import VirtualMachine

    device = _device(request["device"])
    vm = VirtualMachine(tvm.runtime.load_module(request["library"]), device)
    data = np.random.default_rng(0).standard_normal(request["shape"]).astype(request["dtype"])
    tensor = tvm.runtime.tensor(data, device)
    kernels = set(request["kernels"])
    run: list[tuple[str, float]] = []
    started: list[float] = []

    def instrument(func, symbol, before, ret, *args):
        if symbol in kernels:
            if before:
                started.append(time.perf_counter())
            else:
                device.sync()
                run.append((symbol, time.perf_counter() - started.pop()))
        return 0

    vm["main"](tensor)  # warm-up without the instrument
    vm.set_instrument(instrument)
    runs: list[list[tuple[str, float]]] = []
    for _ in range(request["runs"]):
        run = []
        vm["main"](tensor)
        runs.append(run)
    symbols = [symbol for symbol, _ in runs[0]]
    if any([symbol for symbol, _ in other] != symbols for other in runs):
        raise RuntimeError("the VM called the kernels in a different order between runs")
    calls = [[symbol, [other[i][1] for other in runs]] for i, symbol in enumerate(symbols)]
    return {"ok": True, "calls": calls}


def _handle(request: dict) -> dict:
    return {"kernels": _time_kernels, "profile": _profile}[request["op"]](request)


class WorkerClient:
    """The parent's handle on one persistent kernel worker running with ``threads`` threads."""

    def __init__(self, threads: int) -> None:
        self.threads = threads
        self._worker = WorkerProcess("autocomp.hardware.measure.kernel_worker", "kernel timing worker",
                                     threads=threads)

    def ask(self, request: dict) -> dict:
        """Send one request; a worker that dies (a kernel crashed it) is restarted once."""
        reply = self._worker.ask(request)
        if not reply["ok"]:
            raise AutocompError(f"kernel timing failed: {reply['error']}")
        return reply

    def close(self) -> None:
        self._worker.close()


_shared: dict[int, WorkerClient] = {}


def shared_worker(threads: int) -> WorkerClient:
    """This process's kernel worker for ``threads`` threads, started on first use and
    closed when the process exits."""
    if not _shared:
        atexit.register(_close_shared)
    if threads not in _shared:
        _shared[threads] = WorkerClient(threads)
    return _shared[threads]


def _close_shared() -> None:
    for worker in _shared.values():
        worker.close()
    _shared.clear()


if __name__ == "__main__":
    serve(_handle)
