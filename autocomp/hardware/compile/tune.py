"""MetaSchedule tuning with a persistent per-target database, used by every tuned compile.

Untuned TVM gives CPU convolutions naive single-threaded loops (4-70x slower than
PyTorch), so every compile goes through here. A model's fused kernels ("tasks",
one per distinct workload: op, shapes, dtypes, layout) are looked up in the target's
database (``tuning_dir(profile)``); only the ones missing are tuned, with
``profile.latency.trials_per_task`` trials each, and their best schedule is added.
A workload is never tuned twice, by later trials of a search or by later runs, so
tuning cost grows with the number of distinct workloads, not with trials (raising
``trials_per_task`` later does not retune workloads already in the database).

Pipeline stages. ``lower_for_build`` returns the frontend's Relax module after
library dispatch, ``LegalizeOps``, ``AnnotateTIROpPattern``, ``FoldConstant``,
``FuseOps``, ``FuseTIR`` (the stage tasks are extracted from, so database keys match)
and ``MetaScheduleApplyDatabase``: each fused PrimFunc found in the database is
replaced by its tuned schedule and carries the attribute ``tirx.is_scheduled``.
``tvm.compile`` on that module only lowers it (legalization is then a no-op).

MetaSchedule's build and timing worker processes are started on first use and kept for
the life of the process (``_workers``): each takes 7-9 s to start, more than tuning a
few workloads. Several processes (search workers) may share a database: reads take a shared
``fcntl`` lock, merging new records takes an exclusive one, and one process tunes
at a time (a second waits, then reuses what the first tuned), which also keeps
two tuners from disturbing each other's timings on one machine.
"""

import atexit
import fcntl
import functools
import importlib
import importlib.util
import logging
import math
import os
import re
import sys
import tempfile
import time
import types
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from autocomp.core.errors import AutocompError, DamagedStore
from autocomp.core.paths import cache_dir
from autocomp.core.progress import Progress
from autocomp.hardware.profiles import HardwareProfile

WORKLOADS = "database_workload.json"
RECORDS = "database_tuning_record.json"
_DB_LOCK = "database.lock"
_TUNER_LOCK = "tuner.lock"
_MODULE_EQUALITY = "structural"
TRANSFERRED = "transferred"  # subfolder: the database of transferred schedules
NEW_WORKLOADS = ("tune", "transfer")
# Below this many trials per workload, candidates are sampled at random from the design
# space (replay-trace): with one batch per workload the evolutionary search's cost model
# has nothing to learn from yet, and its XGBoost updates and mutations cost 5-10 s a task.
EVOLUTION_FROM = 16
_SEED = 0

logger = logging.getLogger(__name__)
_last_report: "TuningReport | None" = None


@dataclass(frozen=True)
class TuningReport:
    """What one tuning call did: tasks found, tuned now, reused, and the time it took."""

    target_key: str
    tasks_in_model: int
    tasks_tuned: int
    tasks_reused: int
    seconds: float
    trials_per_task: int
    unscheduled: tuple[str, ...] = ()  # tasks whose every trial failed: they run untuned
    transferred: tuple[str, ...] = ()  # tasks running a neighbour's schedule (``compile.transfer``)

    def summary(self) -> str:
        text = (f"{self.tasks_in_model} tuning tasks: {self.tasks_tuned} tuned now "
                f"({self.trials_per_task} trials each, {self.seconds:.1f} s), "
                f"{self.tasks_reused - len(self.transferred)} reused from the {self.target_key} database")
        if self.transferred:
            text += f", {len(self.transferred)} with transferred schedules"
        if self.unscheduled:
            text += f"; {len(self.unscheduled)} without a working schedule: {', '.join(self.unscheduled)}"
        return text


def last_report() -> "TuningReport | None":
    """The report of the last tuning call in this process (``None`` before the first)."""
    return _last_report


def tuning_dir(profile: HardwareProfile) -> Path:
    """The folder holding the target's MetaSchedule JSON database (workloads + records)."""
    path = cache_dir() / "tuning" / profile.target_key
    path.mkdir(parents=True, exist_ok=True)
    return path


def is_untuned(profile: HardwareProfile, untuned: bool = False) -> bool:
    """True when compiles for ``profile`` skip tuning (the user's flag or the profile says so)."""
    return untuned or profile.latency.tuning == "untuned"


def tuning_label(profile: HardwareProfile, untuned: bool = False) -> str:
    """How kernels were compiled, for provenance strings."""
    if is_untuned(profile, untuned):
        return "untuned (plain tvm.compile)"
    if profile.latency.method == "estimate":
        return "MetaSchedule database schedules only (no device to tune the rest on)"
    return f"MetaSchedule-tuned ({profile.latency.trials_per_task} trials per workload)"


def schedules_label(profile: HardwareProfile, untuned: bool = False) -> str:
    """Which schedules the last compile for ``profile`` used, for provenance strings: tuned,
    transferred from a tuned neighbour, or untuned, with kernel counts."""
    report = _last_report
    if is_untuned(profile, untuned) or report is None or report.target_key != profile.target_key:
        return tuning_label(profile, untuned)
    kernels = report.tasks_in_model
    tuned = kernels - len(report.transferred) - len(report.unscheduled)
    parts = [f"tuned schedules ({profile.latency.trials_per_task} trials per workload) for {tuned}"]
    if report.transferred:
        parts.append(f"transferred schedules for {len(report.transferred)}")
    if report.unscheduled:
        parts.append(f"untuned for {len(report.unscheduled)}")
    text = ", ".join(parts) + f" of {kernels} kernels"
    if profile.latency.method == "estimate":
        text += " (no device to tune the rest on)"
    return text


def fusion_passes(target) -> list:
    """Library dispatch, legalization and operator fusion for a ``tvm.target.Target``: the
    passes that produce the fused kernels tuning works on (and the CUDA pipeline schedules)."""
    from tvm import relax
    from tvm.relax import pipeline

    return [
        *pipeline.library_dispatch_passes(target),
        relax.transform.LegalizeOps(),
        relax.transform.AnnotateTIROpPattern(),
        relax.transform.FoldConstant(),
        relax.transform.FuseOps(),
        relax.transform.FuseTIR(),
    ]


def gpu_default_schedules():
    """DLight's default GPU schedules for every fused kernel (matmul, GEMV, reductions, and a
    fallback binding the rest): without one TVM rejects GPU kernels for unbound thread axes."""
    from tvm.s_tir import dlight

    return dlight.ApplyDefaultSchedule(dlight.gpu.Matmul(), dlight.gpu.GEMV(), dlight.gpu.Reduction(),
                                       dlight.gpu.GeneralReduction(), dlight.gpu.Fallback())


def fuse(mod, profile: HardwareProfile):
    """Legalize and fuse the frontend's module: the stage tuning tasks are extracted from."""
    import tvm

    target = tvm.target.Target(profile.tvm_target)
    with target, tvm.transform.PassContext(opt_level=3):
        return tvm.transform.Sequential(fusion_passes(target))(mod)


def extract_tasks(fused, profile: HardwareProfile) -> list:
    """The distinct workloads (``ExtractedTask``) of a fused module, unscheduled ones only."""
    import tvm
    from tvm.s_tir import meta_schedule as ms

    tasks = ms.relax_integration.extract_tasks(fused, tvm.target.Target(profile.tvm_target),
                                               module_equality=_MODULE_EQUALITY)
    return [task for task in tasks if not task.mod.attrs.get("tirx.is_scheduled", False)]


def tune(mod, profile: HardwareProfile) -> TuningReport:
    """Tune the workloads of ``mod`` (frontend Relax module) missing from the target's database."""
    _check_tunable(profile)
    return _tune_fused(fuse(mod, profile), profile)[0]


def lower_for_build(mod, profile: HardwareProfile, *, untuned: bool = False, new_workloads: str = "tune"):
    """The frontend's Relax module -> the module ``tvm.compile(result, target)`` builds.

    Tuned (default): fused, with every workload's schedule applied from the database
    (missing ones are tuned first); see the module docstring for the stage. A profile
    with no device to tune on (latency method ``estimate``) uses the schedules the
    database has and leaves the rest untuned (listed in the report's ``unscheduled``).
    ``new_workloads="transfer"`` gives workloads the database lacks a schedule transferred
    from a tuned neighbour instead (``autocomp.hardware.compile.transfer``); of those no
    neighbour fits, one per op structure is tuned and lends its schedule to the others
    (the rest of them, if any fail the check, are tuned too). ``"tune"`` tunes them all now.
    Untuned: only dispatch and ``LegalizeOps``, the first passes of plain ``tvm.compile``.
    """
    import tvm
    from tvm import relax
    from tvm.relax import pipeline

    target = tvm.target.Target(profile.tvm_target)
    if is_untuned(profile, untuned):
        with target:
            return tvm.transform.Sequential([*pipeline.library_dispatch_passes(target),
                                             relax.transform.LegalizeOps()])(mod)
    fused = fuse(mod, profile)
    report, database = _tune_fused(fused, profile, new_workloads)
    if report.unscheduled:
        logger.warning("%s: %d of %d kernels have no tuned schedule and run untuned", profile.name,
                       len(report.unscheduled), report.tasks_in_model)
    with target, database, tvm.transform.PassContext(opt_level=3):
        scheduled = relax.transform.MetaScheduleApplyDatabase()(fused)
        if pipeline.BackendDispatcher.is_gpu_target(target):
            scheduled = gpu_default_schedules()(scheduled)
    return scheduled


def compile_tuned(mod, profile: HardwareProfile, *, untuned: bool = False, new_workloads: str = "tune"):
    """Compile the frontend's Relax module for the profile's target (a ``relax.Executable``);
    ``new_workloads`` as in ``lower_for_build``."""
    import tvm

    target = tvm.target.Target(profile.tvm_target)
    lowered = lower_for_build(mod, profile, untuned=untuned, new_workloads=new_workloads)
    if is_untuned(profile, untuned):
        return tvm.compile(lowered, target=target)
    with tvm.transform.PassContext(opt_level=3):
        return tvm.compile(lowered, target=target)


def _tune_fused(fused, profile: HardwareProfile, new_workloads: str = "tune"):
    """Schedule what the database lacks: tuned now (when the target can be measured), or
    transferred from tuned neighbours; returns (report, database to apply)."""
    global _last_report
    import tvm
    from tvm.s_tir import meta_schedule as ms

    if new_workloads not in NEW_WORKLOADS:
        raise ValueError(f"new_workloads must be one of {NEW_WORKLOADS}, not {new_workloads!r}")
    tasks = extract_tasks(fused, profile)
    folder = tuning_dir(profile)
    missing = _missing(tasks, folder)
    transferred: set[str] = set()
    tuned, seconds = 0, 0.0
    tunable = profile.latency.method != "estimate"
    if missing and new_workloads == "transfer":
        transferred = _transferred(missing, profile, folder)
        missing = [task for task in missing if task.task_name not in transferred]
        representatives = _one_per_structure(missing)
        if tunable and len(representatives) < len(missing):
            # Tune one workload of each new structure, then give the rest its schedule.
            tuned, seconds = _tune_now(representatives, tasks, profile, folder)
            rest = [task for task in missing if task not in representatives]
            transferred |= _transferred(rest, profile, folder)
            missing = [task for task in rest if task.task_name not in transferred]
    if missing and tunable:
        count, spent = _tune_now(missing, tasks, profile, folder)
        tuned, seconds = tuned + count, seconds + spent
    with _locked(folder / _DB_LOCK, exclusive=False):
        database = _open_database(folder)
        if transferred:
            database = ms.database.OrderedUnionDatabase(database, _open_database(folder / TRANSFERRED))
    target = tvm.target.Target(profile.tvm_target)
    unscheduled = tuple(task.task_name for task in tasks
                        if database.query_tuning_record(task.dispatched[0], target, "main") is None)
    _last_report = TuningReport(profile.target_key, len(tasks), tuned, len(tasks) - tuned, seconds,
                                profile.latency.trials_per_task, unscheduled, tuple(sorted(transferred)))
    return _last_report, database


def _tune_now(wanted: list, tasks: list, profile: HardwareProfile, folder: Path) -> tuple[int, float]:
    """Tune the ``wanted`` tasks the database still lacks (another process may have tuned
    some meanwhile), one tuner at a time; returns (tasks tuned, seconds)."""
    _check_tunable(profile)
    names = {task.task_name for task in wanted}
    with _locked(folder / _TUNER_LOCK, exclusive=True, waiting=f"another process is tuning into {folder}"):
        missing = [task for task in _missing(tasks, folder) if task.task_name in names]
        if not missing:
            return 0, 0.0
        start = time.perf_counter()
        found = _search(missing, profile, folder)
        with _locked(folder / _DB_LOCK, exclusive=True):
            _merge(found, missing, folder)  # those with no working candidate, marked as done
        return len(missing), time.perf_counter() - start


def _one_per_structure(tasks: list) -> list:
    """One task per op structure (fused op names without their shape numbering, argument
    dtypes and ranks): the largest, whose tuned schedule the others can borrow."""
    from tvm.s_tir import meta_schedule as ms

    from autocomp.hardware.compile.transfer import structure

    chosen: dict[tuple, tuple[float, object]] = {}
    for task in tasks:
        args = ms.arg_info.ArgInfo.from_prim_func(task.dispatched[0]["main"])
        key = (re.sub(r"\d+", "", task.task_name), structure(args))
        size = sum(math.log(max(int(x), 1)) for arg in args for x in arg.shape)
        if key not in chosen or size > chosen[key][0]:
            chosen[key] = (size, task)
    return [task for _, task in chosen.values()]


def _transferred(missing: list, profile: HardwareProfile, folder: Path) -> set[str]:
    """Schedules for ``missing`` tasks from the transferred database, transferring those it
    lacks now; returns the task names that have one (those left need tuning)."""
    import tvm

    from autocomp.hardware.compile.transfer import transfer

    store_folder = folder / TRANSFERRED
    store_folder.mkdir(exist_ok=True)
    with _locked(folder / _DB_LOCK, exclusive=True):
        store = _open_database(store_folder)
        have = {task.task_name for task in missing if _has_schedule(store, task.dispatched[0])}
        lacking = [task for task in missing if task.task_name not in have]
        if lacking:
            target = tvm.target.Target(profile.tvm_target)
            register_intrinsics(target)
            start = time.perf_counter()
            done = transfer(lacking, _open_database(folder), store, target)
            logger.debug("transferred schedules to %d of %d new workloads in %.1f s", len(done), len(lacking),
                         time.perf_counter() - start)
            have |= set(done)
    return have


# Opened databases by folder, with the files' (mtime, size) they were read at: parsing the
# JSON takes 0.2-0.3 s, and a compile opens the database several times. Any write (here or
# by another process) changes the files, so the next open reads them again.
_opened: dict[Path, tuple[tuple, object]] = {}


def _stamp(folder: Path) -> tuple:
    return tuple((path.stat().st_mtime_ns, path.stat().st_size) if path.is_file() else None
                 for path in (folder / WORKLOADS, folder / RECORDS))


def _open_database(folder: Path):
    stamp = _stamp(folder)
    cached = _opened.get(folder)
    if cached is not None and cached[0] == stamp:
        return cached[1]
    database = _read_database(folder)
    _opened[folder] = (stamp, database)
    return database


def _read_database(folder: Path):
    from tvm.s_tir import meta_schedule as ms

    try:
        return ms.database.JSONDatabase(path_workload=str(folder / WORKLOADS),
                                        path_tuning_record=str(folder / RECORDS),
                                        allow_missing=True, module_equality=_MODULE_EQUALITY)
    except Exception as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise DamagedStore(f"tuning database {folder} is unreadable ({first}); "
                            "delete the folder to tune again") from None


def _has_schedule(database, mod) -> bool:
    return database.has_workload(mod) and bool(database.get_top_k(database.commit_workload(mod), 1))


def _missing(tasks: list, folder: Path) -> list:
    with _locked(folder / _DB_LOCK, exclusive=False):
        database = _open_database(folder)
    return [task for task in tasks if not database.has_workload(task.dispatched[0])]


def _merge(found, tasks: list, folder: Path) -> None:
    """Add each task's workload and its best record to the shared database (lock held).

    Only the best record is kept: the database then loads fast however many
    trials were run, and a workload with no valid record is still marked as done.
    """
    from tvm.s_tir import meta_schedule as ms

    database = _open_database(folder)  # reopened under the lock: sees other processes' additions
    for task in tasks:
        mod = task.dispatched[0]
        if _has_schedule(database, mod):
            continue  # merged already, as soon as its tuning ended (``_persisting``)
        workload = database.commit_workload(mod)
        for record in found.get_top_k(found.commit_workload(mod), 1):
            database.commit_tuning_record(ms.database.TuningRecord(
                record.trace, workload, record.run_secs, record.target, record.args_info))
    # The lock is held, so the files now hold exactly what this object does: no need to read
    # them again on the next open.
    _opened[folder] = (_stamp(folder), database)


def _check_tunable(profile: HardwareProfile) -> None:
    lat = profile.latency
    if lat.method == "estimate":
        raise AutocompError(f"target {profile.name} has no device to tune on (latency method "
                            "'estimate'): set latency.tuning to 'untuned' in its profile or pass --untuned")
    if lat.method == "rpc" and lat.rpc is None:
        raise AutocompError(f"target {profile.name}: latency.rpc is missing, cannot tune over RPC")
    if lat.method == "local" and lat.device == "cuda":
        import tvm

        if not tvm.cuda(0).exist:
            raise AutocompError(f"target {profile.name}: no CUDA GPU here to tune on")


def _search(tasks: list, profile: HardwareProfile, folder: Path):
    """Run MetaSchedule on ``tasks``; returns the in-memory database of every trial. Each task's
    best record goes into the database in ``folder`` as soon as the task has had all its
    trials, so that a process killed while tuning loses one task's work, not all of them."""
    import tvm
    from tvm.s_tir import meta_schedule as ms

    target = tvm.target.Target(profile.tvm_target)
    register_intrinsics(target)
    trials = profile.latency.trials_per_task
    cores = max(1, os.cpu_count() or 1)
    evolve = trials >= EVOLUTION_FROM
    strategy = (ms.search_strategy.EvolutionarySearch(population_size=min(512, max(64, 16 * trials)))
                if evolve else ms.search_strategy.ReplayTrace())
    callbacks = [ms.measure_callback.AddToDatabase(), ms.measure_callback.RemoveBuildArtifact()]
    # MetaSchedule logs every candidate to the task's logger: warnings only.
    task_log = logging.getLogger(f"{__name__}.metaschedule")
    task_log.setLevel(logging.WARNING)
    if evolve:
        callbacks.append(ms.measure_callback.UpdateCostModel())
    contexts = [
        ms.TuneContext(mod=task.dispatched[0], target=target, space_generator="post-order-apply",
                       search_strategy=strategy, task_name=task.task_name,
                       logger=task_log, rand_state=_SEED + index,
                       num_threads=cores).clone()
        for index, task in enumerate(tasks)
    ]
    memory = ms.database.MemoryDatabase(module_equality=_MODULE_EQUALITY)
    builder, runner = _workers(profile, cores)
    with (_environment(**_worker_environment(profile)),  # for restarted workers too
          _progress(tasks, trials) as progress,
          tempfile.TemporaryDirectory(prefix="autocomp-tune-") as work_dir):
        ms.tune.tune_tasks(
            tasks=contexts, task_weights=[float(task.weight) for task in tasks], work_dir=work_dir,
            max_trials_global=trials * len(tasks), max_trials_per_task=trials,
            num_trials_per_iter=min(trials, 64), builder=builder, runner=runner,
            database=memory, cost_model="xgb" if evolve else "random",
            measure_callbacks=[*callbacks, _persisting(tasks, trials, memory, folder), progress],
            task_scheduler="round-robin", module_equality=_MODULE_EQUALITY,
        )
    return memory


def _persisting(tasks: list, trials: int, memory, folder: Path):
    """A measure callback merging each task's best record into the database in ``folder`` once
    the task has had its ``trials`` (its candidates are in ``memory`` by then: the
    ``AddToDatabase`` callback runs first)."""
    from tvm.ir.utils import derived_object
    from tvm.s_tir import meta_schedule as ms

    measured = [0] * len(tasks)

    @derived_object
    class Persist(ms.measure_callback.PyMeasureCallback):
        def apply(self, task_scheduler, task_id, measure_candidates, builder_results, runner_results) -> None:
            measured[task_id] += len(measure_candidates)
            if measured[task_id] >= trials:
                with _locked(folder / _DB_LOCK, exclusive=True):
                    _merge(memory, [tasks[task_id]], folder)

    return Persist()


# Builders and runners by measuring setting, kept for the life of the process: their worker
# processes take 7-9 s each to start (importing TVM), more than tuning a few workloads.
_started: dict[tuple, tuple] = {}


def _workers(profile: HardwareProfile, cores: int) -> tuple:
    """The (builder, runner) for ``profile``, started on first use (the runner's worker with
    the profile's ``TVM_NUM_THREADS``) and shut down when the process exits."""
    lat = profile.latency
    key = (lat.method, lat.threads, repr(lat.rpc), profile.export.cross_compiler, cores)
    if key not in _started:
        if not _started:
            atexit.register(_stop_workers)
        with _environment(**_worker_environment(profile)):
            _started[key] = (_builder(profile, cores), _runner(profile))
    return _started[key]


# A folder whose ``torch`` package refuses to import, put first on the workers' path.
_WITHOUT_TORCH = Path(__file__).parent / "without_torch"


def _worker_environment(profile: HardwareProfile) -> dict[str, str]:
    """Environment for MetaSchedule's worker processes: the profile's thread count, and
    PyTorch kept out (TVM's FFI imports it when it can: 8 s of each worker's start instead of
    3 s here; the workers never use it)."""
    path = os.pathsep.join(filter(None, [str(_WITHOUT_TORCH), os.environ.get("PYTHONPATH")]))
    return {"TVM_NUM_THREADS": str(profile.latency.threads), "PYTHONPATH": path}


def _stop_workers() -> None:
    for builder, _ in _started.values():
        builder.close()
    _started.clear()


def _builder(profile: HardwareProfile, cores: int):
    from autocomp.hardware.compile import tune_builder

    if profile.latency.method == "rpc":
        export = functools.partial(tune_builder.export_shared, compiler=profile.export.cross_compiler)
        return tune_builder.PooledBuilder(cores, 120.0, export)
    return tune_builder.PooledBuilder(cores, 120.0)


def _runner(profile: HardwareProfile):
    from tvm.s_tir import meta_schedule as ms

    evaluator = ms.runner.EvaluatorConfig(number=3, repeat=1, min_repeat_ms=40,
                                          enable_cpu_cache_flush=False)
    lat = profile.latency
    if lat.method == "rpc":
        assert lat.rpc is not None
        config = ms.runner.RPCConfig(tracker_host=lat.rpc.tracker_host, tracker_port=lat.rpc.tracker_port,
                                     tracker_key=lat.rpc.key, session_timeout_sec=int(lat.rpc.timeout_s))
        return ms.runner.RPCRunner(rpc_config=config, evaluator_config=evaluator, max_workers=1)
    return ms.runner.LocalRunner(timeout_sec=60.0, evaluator_config=evaluator)


_INTRINSICS = {"x86": ("x86",), "aarch64": ("arm_cpu",), "arm": ("arm_cpu",), "riscv": ("riscv_cpu",)}


def register_intrinsics(target) -> None:
    """Register the tensor intrinsics ``target`` can use, without TVM's 30-40 s import of all.

    ``import tvm.s_tir.tensor_intrin`` registers every back-end's intrinsics (CUDA's
    alone take 20-30 s here) and MetaSchedule imports it for each tuning context.
    An empty package object takes its place, and only the submodules the target
    needs are imported into it; later imports of other submodules still work.
    """
    import tvm.s_tir

    name = "tvm.s_tir.tensor_intrin"
    if name not in sys.modules:
        spec = importlib.util.find_spec(name)
        assert spec is not None and spec.submodule_search_locations is not None
        package = types.ModuleType(name, "Tensor intrinsics, registered per target by autocomp.")
        package.__path__ = list(spec.submodule_search_locations)
        package.__spec__ = spec
        sys.modules[name] = package
        tvm.s_tir.tensor_intrin = package
    if target.kind.name == "cuda":
        needed: tuple[str, ...] = ("cuda",)
    else:
        triple = str(target.attrs.get("mtriple", "")) or "x86"
        needed = next((mods for prefix, mods in _INTRINSICS.items() if triple.startswith(prefix)), ())
    for sub in needed:
        importlib.import_module(f"{name}.{sub}")


@contextmanager
def _locked(path: Path, *, exclusive: bool, waiting: str = "") -> Iterator[None]:
    """Hold an ``fcntl`` lock on ``path`` (shared or exclusive) for the block."""
    with open(path, "a+") as handle:
        mode = fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH
        try:
            fcntl.flock(handle, mode | fcntl.LOCK_NB)
        except BlockingIOError:
            if waiting:
                logger.info("waiting: %s", waiting)
            fcntl.flock(handle, mode)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


@contextmanager
def _environment(**values: str) -> Iterator[None]:
    """Set environment variables for worker processes started in the block."""
    saved = {key: os.environ.get(key) for key in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


_PICKS = re.compile(r'picks Task #(\d+): "(.*)"')


@contextmanager
def _progress(tasks: list, trials: int) -> Iterator[object]:
    """A progress phase over the trials; its label names the task being tuned.

    The label follows the task scheduler's log line ``picks Task #i``; the count
    advances by MetaSchedule's measure callback after each batch of trials.
    """
    from tvm.ir.utils import derived_object
    from tvm.s_tir import meta_schedule as ms

    bar = Progress(f"tuning {len(tasks)} workloads", total=trials * len(tasks), unit="trial")
    seen: set[int] = set()

    class Label(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            match = _PICKS.search(record.getMessage())
            if match and int(match[1]) not in seen:  # later picks only confirm finished tasks
                seen.add(int(match[1]))
                bar.set_description(f"tuning {len(seen)}/{len(tasks)} {match[2][:40]}")

    @derived_object
    class Advance(ms.measure_callback.PyMeasureCallback):
        def apply(self, task_scheduler, task_id, measure_candidates, builder_results, runner_results) -> None:
            bar.update(len(measure_candidates))

    scheduler_log = logging.getLogger("tvm.s_tir.meta_schedule.task_scheduler")
    handler = Label(logging.INFO)
    saved = (scheduler_log.level, scheduler_log.propagate)
    scheduler_log.addHandler(handler)
    scheduler_log.setLevel(logging.INFO)
    scheduler_log.propagate = False
    try:
        yield Advance()
    finally:
        scheduler_log.removeHandler(handler)
        scheduler_log.setLevel(saved[0])
        scheduler_log.propagate = saved[1]
        bar.close()
