"""A persistent latency table of kernels, and model latency predicted from it.

Each entry is one kernel (``kernels.Kernel``) measured alone on the target: keyed
by target, thread count, tuning (how it was scheduled, and the TVM version) and
its workload signature (op, buffer shapes and dtypes, and a digest of the
scheduled kernel that pins layout, strides and schedule), it holds the median,
p10/p90 spread, sample count and provenance of its time. A model's latency is
predicted from the sum over its kernel calls, corrected for what running inside the
model adds (the VM's cost per kernel call, and weights no longer hot in cache as
they are when a kernel runs alone): ``scale * kernel sum + per_call * calls``,
fitted once on models measured end to end (``fit_overhead``). A kernel missing from the table is compiled and
measured once, in a worker process running with the profile's threads.

Whenever a model has both a prediction and an end-to-end measurement, both go
into the table's ``predictions`` store (``record``), so the prediction error is
always known (``error_summary``). Storage is one SQLite file under
``cache_dir()/latency``; several processes may read and fill it at once.
"""

import hashlib
import logging
import sqlite3
import statistics
import tempfile
import time
from collections.abc import Iterable
from dataclasses import dataclass, replace
from pathlib import Path

from torch import nn

from autocomp.core.errors import AutocompError
from autocomp.core.paths import cache_dir
from autocomp.hardware.costmodel.kernels import Kernel, ModelKernels, model_kernels, pass_context
from autocomp.hardware.measure.base import Latency
from autocomp.hardware.measure.kernel_worker import shared_worker
from autocomp.hardware.profiles import HardwareProfile

logger = logging.getLogger(__name__)

SCHEMA = """
CREATE TABLE IF NOT EXISTS kernels (
    target_key TEXT NOT NULL, threads INTEGER NOT NULL, tuning TEXT NOT NULL,
    op TEXT NOT NULL, signature TEXT NOT NULL, digest TEXT NOT NULL,
    median_s REAL NOT NULL, p10_s REAL NOT NULL, p90_s REAL NOT NULL, samples INTEGER NOT NULL,
    provenance TEXT NOT NULL, measured_at TEXT NOT NULL,
    PRIMARY KEY (target_key, threads, tuning, op, signature, digest));
CREATE TABLE IF NOT EXISTS in_model_fit (
    target_key TEXT NOT NULL, threads INTEGER NOT NULL, scale REAL NOT NULL, per_call_s REAL NOT NULL,
    models INTEGER NOT NULL, provenance TEXT NOT NULL, fitted_at TEXT NOT NULL,
    PRIMARY KEY (target_key, threads));
CREATE TABLE IF NOT EXISTS predictions (
    id INTEGER PRIMARY KEY AUTOINCREMENT, target_key TEXT NOT NULL, threads INTEGER NOT NULL,
    label TEXT NOT NULL, model_digest TEXT NOT NULL, kernels INTEGER NOT NULL,
    calls INTEGER NOT NULL, hits INTEGER NOT NULL, kernel_sum_s REAL NOT NULL,
    overhead_s REAL NOT NULL, predicted_s REAL NOT NULL, prediction_provenance TEXT NOT NULL,
    measured_s REAL NOT NULL, measured_p10_s REAL NOT NULL, measured_p90_s REAL NOT NULL,
    measured_provenance TEXT NOT NULL, recorded_at TEXT NOT NULL);
"""


@dataclass(frozen=True)
class KernelTime:
    """A table entry: one kernel's time measured alone, with its spread and provenance."""

    median_s: float
    p10_s: float
    p90_s: float
    samples: int
    provenance: str


@dataclass(frozen=True)
class Overhead:
    """What running inside the model adds to the kernels' times alone, and how it was fitted:
    in-model time = ``scale`` x kernel sum + ``per_call_s`` x kernel calls."""

    scale: float
    per_call_s: float
    models: int
    provenance: str


@dataclass(frozen=True)
class Prediction:
    """A model's latency predicted from the table, with what went into it.

    ``hits`` counts the distinct kernels the table already held before this prediction;
    the others were measured for it.
    """

    latency: Latency
    model_digest: str
    kernels: int
    calls: int
    hits: int
    kernel_sum_s: float
    overhead_s: float


@dataclass(frozen=True)
class ErrorSummary:
    """Prediction errors (predicted / measured - 1) over recorded models."""

    count: int
    median_abs: float
    p95_abs: float
    within_10pct: float  # share of models predicted within +-10%
    median_signed: float  # > 0: the table over-predicts

    def describe(self) -> str:
        return (f"{self.count} models: median |error| {self.median_abs:.1%}, 95th percentile "
                f"{self.p95_abs:.1%}, {self.within_10pct:.0%} within +-10%, median signed "
                f"error {self.median_signed:+.1%}")


def default_path() -> Path:
    """Where the latency table lives (``cache_dir()/latency/table.sqlite``)."""
    folder = cache_dir() / "latency"
    folder.mkdir(parents=True, exist_ok=True)
    return folder / "table.sqlite"


def _open(path: Path) -> sqlite3.Connection:
    """The table's database, checked (``quick_check``) and with its schema."""
    db = sqlite3.connect(path, timeout=120, isolation_level=None)
    try:
        db.execute("PRAGMA journal_mode=WAL")
        found = db.execute("PRAGMA quick_check").fetchone()[0]
        if found != "ok":
            raise sqlite3.DatabaseError(found)
        db.executescript(SCHEMA)
    except sqlite3.DatabaseError:
        db.close()
        raise
    return db


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


class LatencyTable:
    """The latency table for one profile (its target and thread count)."""

    def __init__(self, profile: HardwareProfile, path: Path | None = None) -> None:
        if profile.latency.method != "local":
            raise AutocompError(f"target {profile.name}: the latency table measures kernels on "
                                f"this machine, but its latency method is {profile.latency.method!r}")
        self.profile = profile
        self.path = path or default_path()
        self.threads = profile.latency.threads
        try:
            self._db = _open(self.path)
        except sqlite3.DatabaseError as err:
            # A cache: a damaged file (a full disk, a copy cut short) is set aside and refilled.
            aside = self.path.with_name(self.path.name + ".damaged")
            logger.warning("latency table %s is damaged (%s): moved to %s, starting a new one",
                           self.path, err, aside)
            self.path.replace(aside)
            for suffix in ("-wal", "-shm"):
                self.path.with_name(self.path.name + suffix).unlink(missing_ok=True)
            self._db = _open(self.path)

    def __enter__(self) -> "LatencyTable":
        return self

    def __exit__(self, *_exc) -> None:
        self.close()

    def close(self) -> None:
        self._db.close()

    # -- kernels -------------------------------------------------------------------------

    def _key(self, kernel: Kernel) -> tuple:
        return (self.profile.target_key, self.threads, kernel.tuning, kernel.op, kernel.signature,
                kernel.digest)

    def lookup(self, kernel: Kernel) -> KernelTime | None:
        """The table's entry for ``kernel``, or None."""
        row = self._db.execute(
            "SELECT median_s, p10_s, p90_s, samples, provenance FROM kernels WHERE target_key=? "
            "AND threads=? AND tuning=? AND op=? AND signature=? AND digest=?", self._key(kernel)).fetchone()
        return KernelTime(*row) if row else None

    def fill(self, kernels: Iterable[Kernel]) -> list[Kernel]:
        """Measure the kernels the table lacks, store them, and return them.

        They are compiled into one library and timed one by one in the worker, each on
        random inputs of its real shapes and dtypes. A kernel that fails to run is an
        error: a table with holes would under-predict.
        """
        missing = {self._key(kernel): kernel for kernel in kernels if self.lookup(kernel) is None}
        if not missing:
            return []
        todo = list(missing.values())
        symbols = {f"autocomp_kernel_{i}": kernel for i, kernel in enumerate(todo)}
        reply = self._time(symbols)
        if reply["errors"]:
            symbol, reason = next(iter(reply["errors"].items()))
            raise AutocompError(f"kernel {symbols[symbol].name} ({symbols[symbol].signature}) "
                                f"failed to run alone: {reason}")
        for symbol, kernel in symbols.items():
            self._store(kernel, reply["seconds"][symbol])
        return todo

    def _time(self, symbols: dict[str, Kernel]) -> dict:
        import tvm

        module = tvm.IRModule({symbol: kernel.func.with_attr("global_symbol", symbol)
                               for symbol, kernel in symbols.items()})
        with pass_context(self.profile):
            library = tvm.compile(module, tvm.target.Target(self.profile.tvm_target))
        lat = self.profile.latency
        with tempfile.TemporaryDirectory(prefix="autocomp-lut-") as tmp:
            path = Path(tmp) / "kernels.so"
            library.export_library(str(path))
            return shared_worker(self.threads).ask({
                "op": "kernels", "library": str(path), "device": lat.device,
                "repeat": lat.repeat, "min_repeat_ms": lat.min_repeat_ms,
                "kernels": [{"symbol": symbol, "args": [[list(shape), dtype] for shape, dtype in kernel.args]}
                            for symbol, kernel in symbols.items()]})

    def _store(self, kernel: Kernel, seconds: list[float]) -> None:
        deciles = statistics.quantiles(seconds, n=10, method="inclusive") if len(seconds) > 1 else seconds * 9
        provenance = (f"measured alone ({self.profile.name}: TVM {self.profile.target_text()}, "
                      f"{kernel.tuning}, {self.threads} threads, time_evaluator median of {len(seconds)} "
                      "on random inputs)")
        self._db.execute("INSERT OR IGNORE INTO kernels VALUES (?,?,?,?,?,?,?,?,?,?,?,?)",
                         (*self._key(kernel), statistics.median(seconds), deciles[0], deciles[-1],
                          len(seconds), provenance, _now()))

    # -- models --------------------------------------------------------------------------

    def overhead(self) -> Overhead:
        """The fitted in-model correction (none, labelled so, until one is fitted)."""
        row = self._db.execute(
            "SELECT scale, per_call_s, models, provenance FROM in_model_fit WHERE target_key=? AND threads=?",
            (self.profile.target_key, self.threads)).fetchone()
        return Overhead(*row) if row else Overhead(1.0, 0.0, 0, "no in-model correction fitted yet")

    def predict(self, model: nn.Module, input_shape: tuple[int, ...]) -> Prediction:
        """The model's latency as the sum of its kernel calls plus the VM overhead; kernels
        missing from the table are measured first."""
        return self.predict_kernels(model_kernels(model, input_shape, self.profile))

    def predict_kernels(self, model: ModelKernels) -> Prediction:
        """``predict`` for kernels already extracted (``kernels.model_kernels``)."""
        measured = self.fill(model.kernels.values())
        counts = model.counts()
        entries = {name: self.lookup(kernel) for name, kernel in model.kernels.items()}
        overhead = self.overhead()
        total = {field: sum(getattr(entries[name], field) * n for name, n in counts.items())
                 for field in ("median_s", "p10_s", "p90_s")}
        extra = (overhead.scale - 1) * total["median_s"] + overhead.per_call_s * len(model.calls)
        hits = len(model.kernels) - len(measured)
        provenance = (f"latency table sum ({self.profile.name}: {len(model.calls)} calls of "
                      f"{len(model.kernels)} kernels, each measured alone with {self.threads} threads, "
                      f"{hits} from the table; {overhead.provenance})")
        latency = Latency(total["median_s"] + extra, total["p10_s"] + extra, total["p90_s"] + extra,
                          min(entry.samples for entry in entries.values()), "estimated", provenance)
        digest = hashlib.sha256(",".join(sorted(f"{model.kernels[name].digest}*{n}"
                                                for name, n in counts.items())).encode()).hexdigest()[:16]
        return Prediction(latency, digest, len(model.kernels), len(model.calls), hits,
                          total["median_s"], extra)

    def record(self, prediction: Prediction, measured: Latency, label: str = "") -> None:
        """Store a prediction next to the end-to-end measurement of the same model, in the frame
        of the kernels' own times (``timed_frame``)."""
        if measured.kind != "measured":
            raise AutocompError(f"only measured latencies can check a prediction, not {measured.kind}")
        measured = timed_frame(measured)
        self._db.execute(
            "INSERT INTO predictions (target_key, threads, label, model_digest, kernels, calls, hits, "
            "kernel_sum_s, overhead_s, predicted_s, prediction_provenance, measured_s, measured_p10_s, "
            "measured_p90_s, measured_provenance, recorded_at) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
            (self.profile.target_key, self.threads, label, prediction.model_digest, prediction.kernels,
             prediction.calls, prediction.hits, prediction.kernel_sum_s, prediction.overhead_s,
             prediction.latency.median_s, prediction.latency.provenance, measured.median_s,
             measured.p10_s, measured.p90_s, measured.provenance, _now()))

    def records(self, label_prefix: str = "") -> list[dict]:
        """Recorded (prediction, measurement) pairs of this target, oldest first."""
        cursor = self._db.execute("SELECT * FROM predictions WHERE target_key=? AND threads=? ORDER BY id",
                                  (self.profile.target_key, self.threads))
        names = [column[0] for column in cursor.description]
        rows = [dict(zip(names, row, strict=True)) for row in cursor.fetchall()]
        return [row for row in rows if row["label"].startswith(label_prefix)]

    def fit_overhead(self, label_prefix: str = "") -> Overhead:
        """Fit the in-model correction on the recorded models (those whose label starts with
        ``label_prefix``): least squares of measured = scale x kernel sum + per_call x calls.
        With one model, or when that fit is not positive, scale stays 1 and per_call is the
        median of (measured - kernel sum) / calls. Later predictions use the fit;
        predictions already recorded keep theirs."""
        import numpy as np

        rows = self.records(label_prefix)
        if not rows:
            raise AutocompError("no model has both a prediction and a measurement to fit the "
                                "in-model correction on")
        scale, per_call = 0.0, 0.0
        if len(rows) > 1:
            terms = np.array([[row["kernel_sum_s"], row["calls"]] for row in rows])
            measured = np.array([row["measured_s"] for row in rows])
            scale, per_call = (float(v) for v in np.linalg.lstsq(terms, measured, rcond=None)[0])
        if scale <= 0 or per_call < 0:
            scale = 1.0
            per_call = statistics.median((row["measured_s"] - row["kernel_sum_s"]) / row["calls"]
                                         for row in rows)
        provenance = (f"in-model correction {scale:.3f} x kernel sum + {per_call * 1e6:.2f} us per "
                      f"kernel call, fitted on {len(rows)} model{'s' if len(rows) != 1 else ''} "
                      "measured end to end")
        self._db.execute("INSERT OR REPLACE INTO in_model_fit VALUES (?,?,?,?,?,?,?)",
                         (self.profile.target_key, self.threads, scale, per_call, len(rows), provenance,
                          _now()))
        return Overhead(scale, per_call, len(rows), provenance)

    def error_summary(self, label_prefix: str = "") -> ErrorSummary:
        """How far the recorded predictions were from the measurements."""
        rows = self.records(label_prefix)
        if not rows:
            raise AutocompError("no model has both a prediction and a measurement yet")
        return summarise([row["predicted_s"] / row["measured_s"] - 1 for row in rows])


def timed_frame(measured: Latency) -> Latency:
    """``measured`` as the timing worker saw it, the frame kernels timed alone are in.

    A reference-relative figure (``measure.reference``) is the candidate's ratio to the
    reference in the same rounds times the run's baseline, which was timed at another moment,
    under another load: compared with kernel times taken now, it carries the ratio of the
    two loads (2x when the baseline was timed on a busy machine). The candidate's own median
    in its rounds (``reference["raw_median_s"]``, the spread scaled alike) is what kernel
    sums predict. A figure without a reference is returned as it is.
    """
    raw = (measured.reference or {}).get("raw_median_s")
    if raw is None:
        return measured
    factor = raw / measured.median_s
    return replace(measured, median_s=raw, p10_s=measured.p10_s * factor, p90_s=measured.p90_s * factor,
                   provenance=f"{measured.provenance}; as timed (the candidate's own median in its rounds, "
                              "not scaled to the baseline)")


def summarise(errors: list[float]) -> ErrorSummary:
    """Median and 95th-percentile absolute error and the share within +-10%."""
    absolute = sorted(abs(error) for error in errors)
    p95 = (statistics.quantiles(absolute, n=20, method="inclusive")[-1] if len(absolute) > 1
           else absolute[0])
    return ErrorSummary(len(errors), statistics.median(absolute), p95,
                        sum(error <= 0.10 for error in absolute) / len(absolute),
                        statistics.median(errors))


class TableMeasurer:
    """A ``Measurer`` that answers from the latency table (kernels missing from it are
    measured once); its latencies are labelled estimates, with the table's provenance."""

    def __init__(self, profile: HardwareProfile, path: Path | None = None) -> None:
        self.table = LatencyTable(profile, path)
        self.last: Prediction | None = None

    def measure(self, model: nn.Module, input_shape: tuple[int, ...]) -> Latency:
        self.last = self.table.predict(model, input_shape)
        return self.last.latency

    def close(self) -> None:
        self.table.close()
