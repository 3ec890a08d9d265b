"""Fitting the cost model's constants (``autocomp calibrate``).

Two kinds of data: models measured on a reachable device (the host, an RPC board) with the
profile's measurer, or the figures of an anchors file (``hw_profiles/anchors/NAME.yaml``,
each figure with its model, input, threads, dtype, clock, latency and source; the file's
``origin`` says whether they are published by others or were measured by autocomp on a lent
device, and every fitted constant's source says which). The fit is a maximum-a-posteriori
least squares in log space (``scipy.optimize.least_squares``): residuals ``log(estimate /
measured) / 0.1`` for each figure, plus ``(theta - prior) / sd`` for each fitted constant
(efficiencies and the kernel overhead in log space with a factor-3 prior sd, the parallel
fraction in logit space), so that constants the data cannot pin down stay near their priors
instead of running off. Figures known only by their total MACs (the MCUNet figures of the
Cortex-M7) fit one common scale of all efficiencies, and the output says so.

The error reported is out of sample: each fitted figure is predicted by a fit without
it (leave-one-out), and device calibrations also predict compressed models that were
measured but never fitted (held out). The RMS of those log errors becomes
``spread_log_sd``, the p10/p90 band of every later estimate.
"""

import datetime
import logging
import math
import shutil
import statistics
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from autocomp.core.errors import AutocompError
from autocomp.core.units import format_seconds, parse_budget
from autocomp.core.yaml_checks import Checker, read_yaml, yaml_float
from autocomp.hardware.costmodel.estimate import (
    HARDWARE_CONSTANTS,
    KINDS,
    PRIORS,
    Op,
    OpArrays,
    aggregate_op,
    list_ops,
)
from autocomp.hardware.measure.device import device_measurer
from autocomp.hardware.profiles import DTYPES, HardwareProfile, calibrated_dir, load_profile, profiles_dir

logger = logging.getLogger(__name__)

DATA_LOG_SD = 0.1  # expected relative error of one measured or published figure
PRIOR_LOG_SD = math.log(3.0)
PRIOR_LOGIT_SD = 1.0
MIN_SPREAD = 0.05
ROLES = ("fit", "check", "held-out")


@dataclass(frozen=True)
class Anchor:
    """One latency figure from an anchors file: published by others, or measured by us on a
    device this machine cannot reach (``origin``)."""

    label: str
    model: str | None  # a model spec (reference:mobilenet_v1, torchvision:resnet18), or None
    macs: float | None  # total MACs when only those are published
    input_shape: tuple[int, ...]
    threads: int
    dtype: str
    latency_s: float
    clock_hz: float | None
    role: str
    source: str
    origin: str = "published"  # or "measured" (by autocomp, on a lent device)


ORIGINS = {"published": "published figures", "measured": "figures measured by autocomp"}


@dataclass(frozen=True)
class CalibrationModel:
    """A model to measure on the device: ``build()`` gives the model and its input shape."""

    label: str
    role: str  # fit or held-out
    build: Callable[[], tuple[nn.Module, tuple[int, ...]]]


@dataclass
class CalibrationRow:
    """One figure: what was measured (or published) and what the fitted model estimates."""

    label: str
    role: str
    threads: int
    measured_s: float
    estimated_s: float
    out_of_sample_s: float | None  # leave-one-out estimate (fit rows only)
    source: str

    @property
    def error(self) -> float:
        return self.estimated_s / self.measured_s - 1.0

    @property
    def out_of_sample_error(self) -> float:
        seconds = self.out_of_sample_s if self.out_of_sample_s is not None else self.estimated_s
        return seconds / self.measured_s - 1.0


@dataclass
class CalibrationResult:
    """The fitted constants, the figures behind them, and where they were written."""

    profile: str
    against: str
    fitted_to: str
    constants: dict[str, float]
    sources: dict[str, str]
    fitted: list[str]
    rows: list[CalibrationRow]
    spread_log_sd: float
    out: Path | None = None
    notes: list[str] = field(default_factory=list)

    def errors(self, role: str, *, out_of_sample: bool = True) -> list[float]:
        """Absolute relative errors of the rows with ``role``."""
        return [abs(row.out_of_sample_error if out_of_sample else row.error)
                for row in self.rows if row.role == role]

    def summary(self) -> dict[str, dict[str, float]]:
        """Median and max absolute error per kind of row (leave-one-out for fitted rows)."""
        result = {}
        groups = {"fit (in sample)": self.errors("fit", out_of_sample=False),
                  "fit (leave-one-out)": self.errors("fit"), "held-out": self.errors("held-out"),
                  "check": self.errors("check")}
        for name, errors in groups.items():
            if errors:
                result[name] = {"count": len(errors), "median_abs_error": statistics.median(errors),
                                "max_abs_error": max(errors)}
        return result

    def report(self) -> str:
        lines = [f"calibration of {self.profile} against {self.against}", "",
                 f"{'figure':<58} {'role':<8} {'thr':>3} {'measured':>10} {'estimated':>10} {'error':>7} "
                 f"{'LOO err':>7}"]
        for row in self.rows:
            loo = f"{row.out_of_sample_error:+7.1%}" if row.out_of_sample_s is not None else ""
            lines.append(f"{row.label[:58]:<58} {row.role:<8} {row.threads:>3} "
                         f"{format_seconds(row.measured_s):>10} {format_seconds(row.estimated_s):>10} "
                         f"{row.error:+7.1%} {loo:>7}")
        lines.append("")
        for name, stats in self.summary().items():
            lines.append(f"{name}: {stats['count']} figures, median |error| {stats['median_abs_error']:.1%}, "
                         f"max {stats['max_abs_error']:.1%}")
        lines.append(f"spread of later estimates: p10/p90 = x{math.exp(-1.2816 * self.spread_log_sd):.2f} / "
                     f"x{math.exp(1.2816 * self.spread_log_sd):.2f} (log sd {self.spread_log_sd:.3f})")
        lines.append("fitted constants:")
        for name in self.fitted:
            lines.append(f"  {name} = {self.constants[name]:.4g}")
        lines.extend(f"note: {note}" for note in self.notes)
        if self.out is not None:
            lines.append(f"written to {self.out}")
        return "\n".join(lines)

    def to_json(self) -> dict[str, Any]:
        return {"profile": self.profile, "against": self.against, "fitted_to": self.fitted_to,
                "constants": self.constants, "fitted": self.fitted, "spread_log_sd": self.spread_log_sd,
                "summary": self.summary(), "notes": self.notes, "out": str(self.out) if self.out else None,
                "rows": [{"label": r.label, "role": r.role, "threads": r.threads, "measured_s": r.measured_s,
                          "estimated_s": r.estimated_s, "out_of_sample_s": r.out_of_sample_s,
                          "error": r.error, "source": r.source} for r in self.rows]}


# ---------------------------------------------------------------- anchors files

def anchors_dir() -> Path:
    return profiles_dir() / "anchors"


def load_anchors(path: Path, profile_name: str | None = None) -> list[Anchor]:
    """Read an anchors file; any problem is a one-line error naming the file and the key."""
    path = Path(path)
    if not path.is_file():
        raise AutocompError(f"anchors file {path} does not exist")
    check = Checker(path)
    top = check.mapping(read_yaml(path), "", {"target", "description", "origin", "anchors"},
                        {"target", "anchors"})
    origin = check.choice(top.get("origin", "published"), "origin", tuple(ORIGINS))
    if profile_name is not None and top["target"] != profile_name:
        raise check.fail("target", f"{top['target']!r}: these figures are not for target {profile_name!r}")
    rows = top["anchors"]
    if not isinstance(rows, list) or not rows:
        raise check.fail("anchors", "must be a non-empty list")
    anchors = [replace(_anchor(row, f"anchors[{i}]", check), origin=origin) for i, row in enumerate(rows)]
    if not any(anchor.role == "fit" for anchor in anchors):
        raise check.fail("anchors", "no figure has role fit")
    return anchors


def _anchor(data: Any, key: str, check: Checker) -> Anchor:
    allowed = {"label", "model", "macs", "input", "threads", "dtype", "latency", "clock_hz", "device",
               "stack", "role", "source"}
    raw = check.mapping(data, key, allowed, {"threads", "dtype", "latency", "source"})
    if ("model" in raw) == ("macs" in raw):
        raise check.fail(f"{key}.model", "give either model (a model spec) or macs (a total), not both or "
                                         "neither")
    macs = None
    if "macs" in raw:
        macs = float(check.number(yaml_float(raw["macs"]), f"{key}.macs", 1, 1e15))
    shape = raw.get("input")
    if shape is None and "model" in raw:
        raise check.fail(f"{key}.input", "missing (the input shape, e.g. [1, 3, 224, 224])")
    if shape is not None and (not isinstance(shape, list) or len(shape) < 2
                              or not all(isinstance(d, int) and d > 0 for d in shape)):
        raise check.fail(f"{key}.input", f"must be a list of positive integers, not {shape!r}")
    try:
        budget = parse_budget(str(raw["latency"]))
    except AutocompError as err:
        raise check.fail(f"{key}.latency", str(err)) from None
    if budget.seconds is None:
        raise check.fail(f"{key}.latency", "must be a time (122.2ms), not a percentage")
    clock = raw.get("clock_hz")
    if clock is not None:
        clock = float(check.number(yaml_float(clock), f"{key}.clock_hz", 1e3, 1e11))
    model = raw.get("model")
    if model is not None and not isinstance(model, str):
        raise check.fail(f"{key}.model", "must be a model spec such as torchvision:resnet18")
    label = str(raw.get("label") or _default_label(model, macs, shape, raw))
    return Anchor(label, model, macs, tuple(shape or ()),
                  int(check.number(raw["threads"], f"{key}.threads", 1, 4096, integer=True)),
                  check.choice(raw["dtype"], f"{key}.dtype", DTYPES), budget.seconds, clock,
                  check.choice(raw.get("role", "fit"), f"{key}.role", ("fit", "check")), str(raw["source"]))


def _default_label(model: str | None, macs: float | None, shape: Any, raw: dict) -> str:
    what = f"{model.split(':')[-1]} {shape[-1]}" if model else f"{macs / 1e6:g}M MACs"
    stack = f", {raw['stack']}" if raw.get("stack") else ""
    return f"{what}, {raw['threads']} thr {raw['dtype']}{stack}"


def build_spec(spec: str, input_shape: tuple[int, ...], num_classes: int = 1000) -> nn.Module:
    """An untrained model from a ``build_model`` spec (latency does not depend on weight values)."""
    from autocomp.intake.models import build_model

    torch.manual_seed(0)
    return build_model(spec, num_classes=num_classes, in_channels=input_shape[1]).eval()


# ---------------------------------------------------------------- the fit

@dataclass
class _Point:
    label: str
    role: str
    arrays: OpArrays
    threads: int
    clock_hz: float
    measured_s: float
    source: str
    aggregate: bool


class _Fit:
    """Which constants are free, how they map to the unconstrained vector, and their priors."""

    def __init__(self, base: dict[str, float], sources: dict[str, str], points: list[_Point]) -> None:
        # A constant the profile sets from its own knowledge (not an earlier fit) is the prior;
        # every fit starts again from the priors, never from an earlier fit.
        self.prior = {name: base[name] if name in base and not _is_fitted(sources.get(name)) else value
                      for name, value in PRIORS.items()}
        self.base = {**base, **self.prior}
        self.aggregate = all(point.aggregate for point in points)
        if self.aggregate:
            self.names = ["efficiency_scale"]
            return
        kinds = {KINDS[k] for point in points for k in np.unique(point.arrays.kind)}
        names = [f"efficiency_{kind}" for kind in KINDS if kind in kinds]
        if any(point.arrays.int8.any() for point in points):
            names.append("int8_efficiency")
        if base["cores"] > 1 and any(point.threads > 1 for point in points):
            names.append("parallel_fraction")
        names.append("kernel_overhead_s")
        self.names = names

    def prior_vector(self) -> np.ndarray:
        if self.aggregate:
            return np.zeros(1)
        return np.array([_logit(self.prior[n]) if n == "parallel_fraction" else math.log(self.prior[n])
                         for n in self.names])

    def prior_sd(self) -> np.ndarray:
        return np.array([PRIOR_LOGIT_SD if n == "parallel_fraction" else PRIOR_LOG_SD for n in self.names])

    def constants(self, theta: np.ndarray) -> dict[str, float]:
        c = dict(self.base)
        if self.aggregate:
            scale = math.exp(theta[0])
            for kind in KINDS:
                c[f"efficiency_{kind}"] = self.prior[f"efficiency_{kind}"] * scale
            return c
        for name, value in zip(self.names, theta, strict=True):
            c[name] = 1.0 / (1.0 + math.exp(-value)) if name == "parallel_fraction" else math.exp(value)
        return c

    def solve(self, points: list[_Point]) -> tuple[dict[str, float], list[str]]:
        """The MAP constants, and the names the data pins down: a factor e on the constant
        moves some figure's estimate by more than 1% (a memory-bound kind does not)."""
        from scipy.optimize import least_squares

        prior, sd = self.prior_vector(), self.prior_sd()
        measured = np.log([point.measured_s for point in points])

        def residuals(theta: np.ndarray) -> np.ndarray:
            c = self.constants(theta)
            estimated = np.log([p.arrays.seconds(c, p.threads, p.clock_hz) for p in points])
            return np.concatenate([(estimated - measured) / DATA_LOG_SD, (theta - prior) / sd])

        solution = least_squares(residuals, prior, method="trf", max_nfev=2000)
        sensitivity = np.abs(solution.jac[: len(points)]).max(axis=0) * DATA_LOG_SD
        identified = [name for name, moves in zip(self.names, sensitivity, strict=True) if moves > 0.01]
        return self.constants(solution.x), identified


def _is_fitted(source: str | None) -> bool:
    return bool(source) and source.startswith(("fitted by autocomp calibrate", "prior (autocomp"))


def _logit(p: float) -> float:
    return math.log(p / (1.0 - p))


def _fit_points(profile: HardwareProfile, points: list[_Point]) -> tuple[dict[str, float], list[str],
                                                                          list[float | None]]:
    """Fitted constants, the names fitted, and each fit point's leave-one-out estimate."""
    base, sources = profile.cost_model.constants, profile.cost_model.sources
    fit_points = [p for p in points if p.role == "fit"]
    fit = _Fit(base, sources, fit_points)
    constants, identified = fit.solve(fit_points)
    for name in fit.names:  # what the data cannot pin down keeps its prior exactly
        if name not in identified and name in fit.prior:
            constants[name] = fit.prior[name]
    out_of_sample: list[float | None] = []
    for point in points:
        if point.role != "fit" or len(fit_points) < 2:
            out_of_sample.append(None)
            continue
        others = [p for p in fit_points if p is not point]
        c, _ = _Fit(base, sources, others).solve(others)
        out_of_sample.append(point.arrays.seconds(c, point.threads, point.clock_hz))
    return constants, identified, out_of_sample


def _result(profile: HardwareProfile, points: list[_Point], against: str, fitted_to: str,
            data_note: str, notes: list[str]) -> CalibrationResult:
    constants, fitted, loo = _fit_points(profile, points)
    rows = [CalibrationRow(p.label, p.role, p.threads, p.measured_s,
                           p.arrays.seconds(constants, p.threads, p.clock_hz), oos, p.source)
            for p, oos in zip(points, loo, strict=True)]
    out_of_sample = [math.log(1.0 + row.out_of_sample_error) for row in rows
                     if (row.role == "fit" and row.out_of_sample_s is not None) or row.role == "held-out"]
    if not out_of_sample:  # a single figure: no out-of-sample error, keep the in-sample one
        out_of_sample = [math.log(1.0 + row.error) for row in rows if row.role == "fit"]
        notes.append("one fitted figure only: the spread is its in-sample error, which understates it")
    spread = max(MIN_SPREAD, math.sqrt(sum(e * e for e in out_of_sample) / len(out_of_sample)))
    constants["spread_log_sd"] = spread
    constants["calibration_points"] = float(len(out_of_sample))
    today = datetime.date.today().isoformat()
    sources = dict(profile.cost_model.sources)
    names = [f"efficiency_{kind}" for kind in KINDS] if fitted == ["efficiency_scale"] else fitted
    scale_note = " (one common scale for all op kinds)" if fitted == ["efficiency_scale"] else ""
    for name in PRIORS:
        if name in names:
            sources[name] = f"fitted by autocomp calibrate on {today} against {data_note}{scale_note}"
        elif _is_fitted(sources.get(name)) or name not in sources:
            sources[name] = (f"prior (autocomp.hardware.costmodel.estimate.PRIORS), not identifiable "
                             f"from {data_note}")
    held_out = " and held-out models" if any(r.role == "held-out" for r in rows) else ""
    sources["spread_log_sd"] = (f"RMS of {len(out_of_sample)} out-of-sample log errors "
                                f"(leave-one-out{held_out}), autocomp calibrate on {today}")
    sources["calibration_points"] = "figures behind spread_log_sd"
    return CalibrationResult(profile.name, against, fitted_to, constants, sources, names, rows,
                             spread, notes=notes)


# ---------------------------------------------------------------- entry point

def calibrate(profile: HardwareProfile, against: str | Path, *, measurer: Any = None,
              models: list[CalibrationModel] | None = None, out: Path | None = None,
              write: bool = True) -> CalibrationResult:
    """Fit ``profile``'s cost-model constants and (with ``write``) save them in a profile YAML.

    ``against`` is ``"device"`` (measure ``models``, by default ``default_models()``,
    with ``measurer`` or the profile's own) or the path of an anchors file. The profile
    is written to ``out``, by default ``cache_dir()/profiles/NAME.yaml``; only its
    ``cost_model`` section changes. Each figure is logged as it is measured or read.
    """
    notes: list[str] = []
    if str(against) == "device":
        points = _device_points(profile, models or default_models(), measurer)
        fitted = [p.label for p in points if p.role == "fit"]
        what = f"{len(fitted)} models ({', '.join(fitted)}), {points[0].source}"
        result = _result(profile, points, "device measurements", what, f"measurements on {profile.name}",
                         notes)
    else:
        path = Path(against)
        anchors = load_anchors(path, profile.name)
        points = _anchor_points(profile, anchors)
        fit = [a for a in anchors if a.role == "fit"]
        if all(a.macs is not None for a in fit):
            notes.append("only aggregate figures (total MACs and latency) were available: one common "
                         "efficiency scale was fitted, per-op-kind efficiencies keep their prior ratios")
        figures = sorted({a.model.split(":")[-1] if a.model else a.label.split(" (")[0] for a in fit})
        kind = ORIGINS[anchors[0].origin]
        what = (f"{len(fit)} {kind} ({', '.join(figures)}) in anchors/{path.name}"
                + ("; aggregate MACs only" if all(a.macs is not None for a in fit) else ""))
        result = _result(profile, points, str(path), what, f"{kind} in anchors/{path.name}", notes)
    if write:
        result.out = write_profile(profile, result, out or calibrated_dir() / f"{profile.name}.yaml")
    return result


def default_models() -> list[CalibrationModel]:
    """The device calibration set: demo nets and small torchvision models are fitted;
    compressed variants (pruned, int8, factorised) are held out to measure the error."""
    def spec(label: str, role: str, name: str, shape: tuple[int, ...]) -> CalibrationModel:
        return CalibrationModel(label, role, lambda: (build_spec(name, shape, 10), shape))

    def compressed(label: str, name: str, shape: tuple[int, ...], choice: dict) -> CalibrationModel:
        return CalibrationModel(label, "held-out", lambda: (compressed_model(name, shape, choice), shape))

    small, image = (1, 1, 28, 28), (1, 3, 64, 64)
    prune, int8 = {"method": "prune", "ratio": 0.5}, {"method": "quant", "w_bits": 8, "a_bits": 8}
    lowrank = {"method": "lowrank", "rank": 0.5}
    return [
        spec("demo-resnet 28", "fit", "demo-resnet", small),
        spec("demo-mobilenetv2 28", "fit", "demo-mobilenetv2", small),
        spec("resnet18 64", "fit", "torchvision:resnet18", image),
        spec("mobilenet_v2 64", "fit", "torchvision:mobilenet_v2", image),
        spec("reference mobilenet_v1 64", "fit", "reference:mobilenet_v1", image),
        compressed("demo-resnet 28 pruned 50%", "demo-resnet", small, prune),
        compressed("demo-mobilenetv2 28 pruned 50%", "demo-mobilenetv2", small, prune),
        compressed("resnet18 64 pruned 50%", "torchvision:resnet18", image, prune),
        compressed("demo-resnet 28 int8", "demo-resnet", small, int8),
        compressed("demo-mobilenetv2 28 low-rank 0.5", "demo-mobilenetv2", small, lowrank),
    ]


def compressed_model(spec: str, shape: tuple[int, ...], choice: dict) -> nn.Module:
    """``spec`` with ``choice`` on every eligible layer (calibrated on random images:
    latency does not depend on the values)."""
    from autocomp.core.inventory import build_inventory
    from autocomp.methods.apply import apply_plan
    from autocomp.methods.plan import CompressionPlan
    from autocomp.methods.registry import config_from_json

    model = build_spec(spec, shape, 10)
    inventory = build_inventory(model, shape, coupling=choice["method"] == "prune")
    config = config_from_json(choice)
    names = [layer.name for layer in inventory.layers if config.ineligible(layer) is None]
    plan = CompressionPlan.from_json({"version": 1, "layers": {name: choice for name in names}})
    generator = torch.Generator().manual_seed(0)
    calib = [(torch.rand(8, *shape[1:], generator=generator), torch.zeros(8, dtype=torch.long))]
    return apply_plan(model, plan, inventory, channel_multiple=4, calib=calib)


def _device_points(profile: HardwareProfile, models: list[CalibrationModel], measurer: Any) -> list[_Point]:
    own = measurer is None
    measurer = measurer or device_measurer(profile)
    points = []
    try:
        for item in models:
            model, shape = item.build()
            latency = measurer.measure(model, shape)
            ops = list_ops(model, shape)
            logger.info("%s: %s (%s)", item.label, format_seconds(latency.median_s), latency.provenance)
            points.append(_Point(item.label, item.role, OpArrays(ops), profile.latency.threads,
                                 profile.cost_model.constants["clock_hz"], latency.median_s,
                                 latency.provenance, False))
    finally:
        if own:
            measurer.close()
    return points


def _anchor_points(profile: HardwareProfile, anchors: list[Anchor]) -> list[_Point]:
    cache: dict[tuple, list[Op]] = {}
    points = []
    for anchor in anchors:
        if anchor.model is None:
            assert anchor.macs is not None
            ops = [aggregate_op(anchor.macs, anchor.dtype)]
        else:
            key = (anchor.model, anchor.input_shape, anchor.dtype)
            if key not in cache:
                model = build_spec(anchor.model, anchor.input_shape)
                cache[key] = list_ops(model, anchor.input_shape, assume_dtype=anchor.dtype)
            ops = cache[key]
        points.append(_Point(anchor.label, anchor.role, OpArrays(ops), anchor.threads,
                             anchor.clock_hz or profile.cost_model.constants["clock_hz"], anchor.latency_s,
                             anchor.source, anchor.model is None))
        logger.info("%s: %s %s", anchor.label, anchor.origin, format_seconds(anchor.latency_s))
    return points


# ---------------------------------------------------------------- writing the profile

def write_profile(profile: HardwareProfile, result: CalibrationResult, out: Path) -> Path:
    """Copy the profile's YAML to ``out`` with its ``cost_model`` section replaced by the
    fitted constants; the result is loaded back to prove it valid before it is kept."""
    text = profile.source.read_text()
    block = _cost_model_block(profile, result)
    new_text = _replace_section(text, "cost_model", block, profile.source)
    out = Path(out)
    with tempfile.TemporaryDirectory(prefix="autocomp-profile-") as tmp:
        trial = Path(tmp) / f"{profile.name}.yaml"
        trial.write_text(new_text)
        load_profile(str(trial))
        out.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(trial, out)
    return out


def _cost_model_block(profile: HardwareProfile, result: CalibrationResult) -> str:
    import json

    lines = ["cost_model:", f"  version: {profile.cost_model.version}",
             f"  fitted_to: {json.dumps(result.fitted_to)}", "  constants:"]
    names = [n for n in HARDWARE_CONSTANTS if n in result.constants]
    names += [n for n in PRIORS if n not in names]
    names += [n for n in result.constants if n not in names]
    for name in names:
        source = result.sources.get(name) or profile.cost_model.sources.get(name, "")
        value = _yaml_number(result.constants[name])
        lines.append(f"    {name}: {{value: {value}, source: {json.dumps(source)}}}")
    return "\n".join(lines) + "\n"


def _yaml_number(value: float) -> str:
    """A float PyYAML reads back as a float (it needs a dot and a signed exponent)."""
    if float(value).is_integer() and abs(value) < 1e6:
        return str(int(value))
    text = f"{value:.5g}"
    if "e" in text:
        mantissa, exponent = text.split("e")
        mantissa += "" if "." in mantissa else ".0"
        return f"{mantissa}e{exponent}"
    return text if "." in text else f"{text}.0"


def _replace_section(text: str, key: str, block: str, path: Path) -> str:
    """Replace the top-level ``key:`` mapping (its header and indented lines) with ``block``."""
    lines = text.splitlines(keepends=True)
    start = next((i for i, line in enumerate(lines) if line.startswith(f"{key}:")), None)
    if start is None:
        raise AutocompError(f"{path}: {key}: missing")
    end = start + 1
    while end < len(lines) and (lines[end].startswith((" ", "\t")) or not lines[end].strip()):
        end += 1
    while end > start + 1 and not lines[end - 1].strip():
        end -= 1  # keep the blank lines before the next key
    return "".join(lines[:start]) + block + "".join(lines[end:])
