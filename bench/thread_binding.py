"""Why timing workers run with TVM_BIND_THREADS=0: TVM's thread pool with its default binding
(one pool thread per core) against the same pool unbound, on a quiet machine and with a busy
loop holding the last core.

With binding, the thread bound to the busy core waits for the scheduler's slice while the
others spin at every barrier; the model then measured up to 200x slower. Each setting is
timed in a fresh timer worker process (``autocomp.hardware.measure.timer_worker``) with
``--threads`` threads; the settings alternate, ``--repeats`` times each.

    .venv/bin/python bench/thread_binding.py --repeats 3 --out runs/bench/thread-binding.json
"""

import argparse
import json
import multiprocessing
import os
import statistics
import tempfile
from pathlib import Path

from autocomp.hardware.measure.timer_worker import time_in_fresh_worker


def _spin(cpu: int) -> None:
    os.sched_setaffinity(0, {cpu})
    while True:
        pass


def _time(library: Path, shape: tuple[int, ...], threads: int, bind: str) -> float:
    """Median seconds of one timing request in a fresh worker with TVM_BIND_THREADS=``bind``."""
    env = {key: value for key, value in os.environ.items() if key != "AUTOCOMP_TIMING_CPUS"}
    env.update(TVM_NUM_THREADS=str(threads), OMP_NUM_THREADS=str(threads), TVM_BIND_THREADS=bind)
    return statistics.median(time_in_fresh_worker(str(library), list(shape), rounds=9, min_repeat_ms=40,
                                                  env=env, timeout_s=600))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3, help="fresh workers per setting and condition")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()

    from autocomp import load_profile
    from autocomp.hardware.compile.lower import compile_model, export_library
    from autocomp.intake.source import ModelSource

    shape = (1, 1, 28, 28)
    model = ModelSource.named("demo-resnet", shape, 10).build().eval()
    folder = Path(tempfile.mkdtemp(prefix="autocomp-binding-"))
    library = export_library(compile_model(model, shape, load_profile("host")), folder / "model.so")
    settings = {"bound (TVM default)": "1", "unbound (autocomp's workers)": "0"}
    result: dict = {}
    for condition in ("quiet", "busy loop on the last core"):
        loop = None
        if condition != "quiet":
            cpu = sorted(os.sched_getaffinity(0))[-1]
            loop = multiprocessing.get_context("spawn").Process(target=_spin, args=(cpu,), daemon=True)
            loop.start()
        try:
            readings: dict[str, list[float]] = {name: [] for name in settings}
            for _ in range(args.repeats):
                for name, bind in settings.items():
                    readings[name].append(_time(library, shape, args.threads, bind))
        finally:
            if loop is not None:
                loop.terminate()
                loop.join()
        result[condition] = readings
        for name, values in readings.items():
            figures = "  ".join(f"{v * 1e6:9.1f} us" for v in values)
            print(f"{condition:>28}  {name:<30} {figures}", flush=True)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"threads": args.threads, "model": "demo-resnet 1x1x28x28",
                                        "seconds": result}, indent=1))


if __name__ == "__main__":
    main()
