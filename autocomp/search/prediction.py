"""Latency predicted before a trial pays for it: a plan predicted far over the latency budget
is not compiled, timed or fine-tuned.

Where latency is measured (compiled and timed on a device), a trial that turns out over budget
has already spent its compile, its schedule transfers and its timing rounds (15-50 s on a
2-core host) to learn only that. The prediction costs one ``torch.export`` of the compressed
model (about a second): the profile's per-op cost model splits the model's time into its float
and its int8 kernels (``Features``), and the run corrects each part with a scale fitted on the
trials it has measured so far (``fit``): measured = a x float part + b x int8 part. The cost
model alone is far off on a measured target (fitted once, to other kernels, possibly untuned);
the in-run scales absorb that, and the fit's leave-one-out error says how far to trust it.

A plan is skipped only when it is predicted over the budget by more than the fit's 90th
percentile leave-one-out error (so a fit that is often wrong skips little), and only once
the fit rests on ``MIN_POINTS`` measurements. Until two plans with int8 kernels have been
measured, the int8 scale is unknown and plans with int8 kernels are not predicted (they are
measured).
"""

import math
import statistics
from dataclasses import dataclass

import numpy as np
from torch import nn

from autocomp.hardware.costmodel.estimate import estimate
from autocomp.hardware.profiles import HardwareProfile

# Measured models (the uncompressed baseline included) before a prediction is trusted.
MIN_POINTS = 4
# A model whose int8 kernels take less than this share of its estimated time counts as float
# only when deciding whether the int8 scale can be fitted or is needed.
INT8_SHARE = 0.05


@dataclass(frozen=True)
class Features:
    """What the prediction reads from a model: the profile cost model's time of its float
    kernels and of its int8 kernels (seconds, uncorrected)."""

    float_s: float
    int8_s: float

    @property
    def int8_share(self) -> float:
        total = self.float_s + self.int8_s
        return self.int8_s / total if total > 0 else 0.0

    def to_json(self) -> dict:
        return {"float_s": self.float_s, "int8_s": self.int8_s}

    @classmethod
    def from_json(cls, data: dict) -> "Features":
        return cls(float(data["float_s"]), float(data["int8_s"]))


def features(model: nn.Module, input_shape: tuple[int, ...], profile: HardwareProfile) -> Features:
    """``model``'s cost-model time, split by the dtype its kernels compute in."""
    costs = estimate(model, input_shape, profile).ops
    return Features(sum(c.seconds for c in costs if c.op.dtype != "int8"),
                    sum(c.seconds for c in costs if c.op.dtype == "int8"))


@dataclass(frozen=True)
class Point:
    """A measured model: its features and its measured latency (median, seconds)."""

    features: Features
    measured_s: float


@dataclass(frozen=True)
class Fit:
    """Scales fitted on measured models: latency = ``float_scale`` x float part +
    ``int8_scale`` x int8 part (``int8_scale`` None until two int8 models were measured), with
    the leave-one-out relative errors of the points it rests on."""

    float_scale: float
    int8_scale: float | None
    points: int
    errors: tuple[float, ...]  # leave-one-out: predicted / measured - 1

    @property
    def p90_error(self) -> float:
        """90th percentile of the leave-one-out absolute errors."""
        absolute = sorted(abs(error) for error in self.errors)
        if len(absolute) == 1:
            return absolute[0]
        return statistics.quantiles(absolute, n=10, method="inclusive")[-1]

    def predict(self, features: Features) -> float | None:
        """The predicted latency (seconds), or None when the model has int8 kernels the fit has
        no scale for."""
        if self.int8_scale is None:
            if features.int8_share >= INT8_SHARE:
                return None
            return self.float_scale * (features.float_s + features.int8_s)
        return self.float_scale * features.float_s + self.int8_scale * features.int8_s

    def describe(self) -> str:
        int8 = f"{self.int8_scale:.3g} x int8 part" if self.int8_scale is not None else "no int8 scale yet"
        return (f"cost model corrected in the run ({self.float_scale:.3g} x float part, {int8}), fitted on "
                f"{self.points} measured models, leave-one-out p90 error {self.p90_error:.0%}")


def _scales(points: list[Point], int8_models: int = 2) -> tuple[float, float | None] | None:
    """The scales, both positive, fitted by least squares in relative error (each point
    weighted by 1 / measured); the int8 scale only from ``int8_models`` models with int8
    kernels or more (two for a fit, so that leave-one-out, which fits on one fewer, checks
    it too). None when the points cannot give them."""
    float_only = [p for p in points if p.features.int8_share < INT8_SHARE]
    with_int8 = [p for p in points if p.features.int8_share >= INT8_SHARE]
    if not float_only:
        return None
    if len(with_int8) < int8_models:
        return statistics.median(p.measured_s / (p.features.float_s + p.features.int8_s)
                                 for p in float_only), None
    terms = np.array([[p.features.float_s / p.measured_s, p.features.int8_s / p.measured_s] for p in points])
    scale_float, scale_int8 = np.linalg.lstsq(terms, np.ones(len(points)), rcond=None)[0]
    if scale_float <= 0 or scale_int8 <= 0 or not math.isfinite(scale_float * scale_int8):
        return None
    return float(scale_float), float(scale_int8)


def fit(points: list[Point]) -> Fit | None:
    """The scales fitted on ``points``, with their leave-one-out errors; None with fewer than
    ``MIN_POINTS`` points or when they cannot be fitted."""
    if len(points) < MIN_POINTS:
        return None
    scales = _scales(points)
    if scales is None:
        return None
    errors = []
    for index, point in enumerate(points):
        rest = _scales(points[:index] + points[index + 1:], int8_models=1)
        if rest is None:
            continue
        predicted = Fit(*rest, 0, ()).predict(point.features)
        if predicted is not None:
            errors.append(predicted / point.measured_s - 1)
    if len(errors) < MIN_POINTS - 1:
        return None
    return Fit(*scales, len(points), tuple(errors))


# Trial user attributes: the features of a trial's model, and the prediction made for it.
FEATURES_KEY = "latency_features"
PREDICTION_KEY = "prediction"


def measured_points(trials, baseline: Point | None = None) -> list[Point]:
    """The measured trials among ``trials`` (FrozenTrials), with ``baseline`` (the uncompressed
    model in the profile's own setting) first; models with the same features count once, at
    their median latency. Every deployment setting (thread count) counts: the features are
    computed for the trial's own threads, so one fit serves them all. Figures marked noisy are
    kept: the search decides on them too, and the leave-one-out error of a fit they disturb
    says so."""
    groups: dict[tuple[float, float], list[float]] = {}
    if baseline is not None:
        groups[(baseline.features.float_s, baseline.features.int8_s)] = [baseline.measured_s]
    for trial in trials:
        attrs = trial.user_attrs
        latency = attrs.get("latency")
        if FEATURES_KEY not in attrs or not latency or latency.get("kind") != "measured":
            continue
        found = Features.from_json(attrs[FEATURES_KEY])
        groups.setdefault((found.float_s, found.int8_s), []).append(float(latency["median_s"]))
    return [Point(Features(*key), statistics.median(values)) for key, values in groups.items()]


def predictions_summary(trials) -> str | None:
    """How the run's latency predictions did, in one sentence (None when none was made): plans
    skipped, how many of those predicted over the budget but measured all the same were, and
    the median error on measured plans."""
    made = [t.user_attrs[PREDICTION_KEY] for t in trials
            if (t.user_attrs.get(PREDICTION_KEY) or {}).get("predicted_s") is not None]
    if not made:
        return None
    skipped = sum(1 for p in made if p.get("skipped"))
    text = f"{skipped} plan{'s' if skipped != 1 else ''} predicted over the latency budget not compiled"
    checked = [p for p in made if p.get("over_budget") and "error" in p]
    if checked:
        confirmed = sum(1 for p in checked if p.get("measured_over_budget"))
        text += f"; of {len(checked)} such plans measured all the same, {confirmed} were over it"
    errors = sorted(abs(p["error"]) for p in made if "error" in p)
    if errors:
        text += (f"; on {len(errors)} measured plan{'s' if len(errors) != 1 else ''} the prediction was "
                 f"off by {statistics.median(errors):.0%} (median)")
    return text
