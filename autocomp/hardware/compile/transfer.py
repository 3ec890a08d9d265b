"""Transferred schedules: a new workload borrows the tuned schedule of its nearest neighbour.

Pruned and factorised layers create workloads (shapes) the tuning database lacks.
Tuning one takes seconds per workload, on a trial's critical path. Instead, the best
schedule of the nearest tuned workload with the same op structure (same arguments:
count, dtypes and ranks; nearest shapes in log distance) is replayed on the new shape.
Its tile sizes are adapted to the new loop extents (each split keeps the neighbour's
inner factors where they divide the extent, the outermost takes the rest), the
target's post-processors run again, and the kernel is compiled and checked against
the unscheduled kernel on random inputs. A workload no neighbour fits is left to
tuning (``tune`` tunes one workload per new op structure, then transfers again).

Transferred schedules live in a database of their own (``transferred/`` in the target's
tuning folder), so a later real tuning of the workload takes precedence and the label
of every figure can say how many kernels ran transferred schedules.
"""

import logging
import math
from dataclasses import dataclass

logger = logging.getLogger(__name__)

# Neighbours tried per workload, nearest first, before it is left to tuning.
CANDIDATES = 5
TOLERANCE = 1e-3  # max |scheduled - unscheduled| relative to the output's largest value


@dataclass(frozen=True)
class Transfer:
    """A schedule transferred to one workload: from which neighbour, and how far it was."""

    task_name: str
    distance: float


def _arg_shapes(args) -> list[tuple[str, tuple[int, ...]]]:
    return [(str(arg.dtype), tuple(int(x) for x in arg.shape)) for arg in args]


def structure(args) -> tuple[tuple[str, int], ...]:
    """What two workloads must share for one's schedule to be tried on the other: each
    argument's dtype and rank."""
    return tuple((dtype, len(shape)) for dtype, shape in _arg_shapes(args))


def _distance(old: list[tuple[str, tuple[int, ...]]], new: list[tuple[str, tuple[int, ...]]]) -> float | None:
    """Log distance between two workloads' argument shapes; None when their structures differ."""
    if len(old) != len(new):
        return None
    if any(a[0] != b[0] or len(a[1]) != len(b[1]) for a, b in zip(old, new, strict=True)):
        return None
    return sum(abs(math.log(max(x, 1) / max(y, 1))) for a, b in zip(old, new, strict=True)
               for x, y in zip(a[1], b[1], strict=True))


def adapt_tiles(factors: list[int], extent: int) -> list[int]:
    """Tile factors for ``extent`` close to ``factors`` (a split of another extent): inner
    factors are kept where they divide what remains, else the largest divisor below them."""
    adapted = [1] * len(factors)
    rest = extent
    for i in range(len(factors) - 1, 0, -1):
        adapted[i] = max(d for d in range(1, min(rest, max(factors[i], 1)) + 1) if rest % d == 0)
        rest //= adapted[i]
    adapted[0] = rest
    return adapted


def _replay(record, mod, postprocs):
    """The neighbour's trace replayed on ``mod`` with tiles adapted; None when it does not fit."""
    from tvm.s_tir.schedule import Schedule

    schedule = Schedule(mod)

    def decide(instruction, inputs, attrs, decision):
        if instruction.kind.name == "SamplePerfectTile":
            return adapt_tiles([int(d) for d in decision], int(schedule.get(inputs[0]).extent))
        return decision

    try:
        record.trace.apply_to_schedule(schedule, remove_postproc=True, decision_provider=decide)
        if not all(postproc.apply(schedule) for postproc in postprocs):
            return None
    except Exception:  # a trace of another op structure fails on its first block lookup
        return None
    return schedule


class _Check:
    """Random inputs for one workload and its unscheduled kernel's outputs on them (computed on
    first use, once per workload), against which transferred schedules are checked."""

    def __init__(self, mod, target) -> None:
        import numpy as np
        from tvm.s_tir import meta_schedule as ms

        self.mod, self.target = mod, target
        rng = np.random.default_rng(0)
        self.arrays = []
        for dtype, shape in _arg_shapes(ms.arg_info.ArgInfo.from_prim_func(mod["main"])):
            if dtype.startswith("float"):
                self.arrays.append(rng.standard_normal(shape).astype(dtype))
            else:
                self.arrays.append(rng.integers(-8, 8, shape).astype(dtype))
        self._expected: list | None = None

    def _run(self, module) -> list:
        import tvm

        tensors = [tvm.runtime.tensor(array.copy()) for array in self.arrays]
        tvm.compile(module, target=self.target)["main"](*tensors)
        return [tensor.numpy() for tensor in tensors]

    def matches(self, scheduled) -> bool:
        """The scheduled kernel computes what the unscheduled one does."""
        import numpy as np

        if self._expected is None:
            self._expected = self._run(self.mod)
        for got, want in zip(self._run(scheduled), self._expected, strict=True):
            scale = max(float(np.abs(want).max()), 1.0)
            if float(np.abs(got.astype("float64") - want.astype("float64")).max()) > TOLERANCE * scale:
                return False
        return True


def transfer(tasks: list, tuned, store, target) -> dict[str, Transfer]:
    """Transfer schedules from the ``tuned`` database to ``tasks`` (workloads it lacks) and
    commit them to ``store``; returns what was transferred, by task name. Tasks that no
    neighbour fits are left out (they need tuning)."""
    from tvm.s_tir import meta_schedule as ms

    records = [(record, _arg_shapes(record.args_info)) for record in tuned.get_all_tuning_records()]
    done: dict[str, Transfer] = {}
    for task in tasks:
        mod = task.dispatched[0]
        args = ms.arg_info.ArgInfo.from_prim_func(mod["main"])
        shapes = _arg_shapes(args)
        near = sorted(((d, record) for record, old in records if (d := _distance(old, shapes)) is not None),
                      key=lambda pair: pair[0])
        context = ms.TuneContext(mod=mod, target=target, space_generator="post-order-apply",
                                 task_name=task.task_name)
        postprocs = context.space_generator.postprocs
        check = _Check(mod, target)
        for distance, record in near[:CANDIDATES]:
            schedule = _replay(record, mod, postprocs)
            if schedule is None:
                continue
            try:
                fits = check.matches(schedule.mod)
            except Exception as err:
                logger.debug("transfer to %s failed to build: %s", task.task_name, err)
                fits = False
            if not fits:
                continue
            # run_secs only ranks records inside this database, which holds one per workload.
            store.commit_tuning_record(ms.database.TuningRecord(
                schedule.trace, store.commit_workload(mod), record.run_secs, target, args))
            done[task.task_name] = Transfer(task.task_name, distance)
            break
    return done
