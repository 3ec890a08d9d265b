"""Hardware-software co-design: a search's Pareto front re-evaluated over device variants.

A variant is the target's profile with some of its hardware changed: the clock, the
number of cores, or the SRAM and flash limits. Each front trial's model is rebuilt and
its latency estimated on every variant by the profile's cost model (clock and cores
change the compute term; memory bandwidth and per-kernel overhead are held at the
profile's values, since a faster clock does not make DRAM or flash faster); on bare-metal
targets its SRAM and flash are computed once (they do not depend on clock or cores) and
checked against each variant's limits. The answer is which configurations meet the latency
budget at which accuracy, and the cheapest one that reaches the best accuracy.
"""

import itertools
import json
import logging
import math
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from torch import nn

from autocomp.core.errors import AutocompError
from autocomp.core.inventory import build_inventory
from autocomp.core.staging import write_json, write_text
from autocomp.core.units import format_seconds, parse_budget, parse_bytes
from autocomp.hardware.costmodel.estimate import (
    UNCALIBRATED_LOG_SD,
    Z90,
    CostModel,
    default_threads,
    list_ops,
    provenance,
)
from autocomp.hardware.mcu.memory import McuMemory, device_memory
from autocomp.hardware.measure.base import Latency
from autocomp.hardware.profiles import HardwareProfile, load_target
from autocomp.intake.data import DataSplits
from autocomp.search.results.trials import load_trial_model
from autocomp.search.settings import load_settings, with_memory_limits

logger = logging.getLogger(__name__)

SWEEP_KEYS = ("clock", "cores", "sram", "flash", "ram")
MEMORY_KEYS = ("sram", "flash")
_CLOCK_RE = re.compile(r"^([0-9]*\.?[0-9]+)\s*(GHz|MHz|kHz|Hz)$", re.IGNORECASE)
_CLOCK_UNITS = {"ghz": 1e9, "mhz": 1e6, "khz": 1e3, "hz": 1.0}


def _value(key: str, token: str) -> float | int:
    """One swept value, in Hz, cores or bytes."""
    if key == "clock":
        match = _CLOCK_RE.match(token)
        if not match or float(match.group(1)) <= 0:
            raise AutocompError(f"--sweep clock value {token!r}: use a positive frequency with GHz, MHz, "
                                "kHz or Hz (1.2GHz, 216MHz)")
        return float(match.group(1)) * _CLOCK_UNITS[match.group(2).lower()]
    if key == "cores":
        if not token.isdigit() or int(token) < 1:
            raise AutocompError(f"--sweep cores value {token!r}: use a whole number of cores (1, 2, 4)")
        return int(token)
    try:
        return parse_bytes(token)
    except AutocompError as err:
        raise AutocompError(f"--sweep {key} value {token!r}: {err}") from None


def parse_sweep(items: list[str]) -> dict[str, list]:
    """Read ``clock=1.2GHz,1.8GHz,cores=1,2,4,sram=256KB,512KB`` (one or more ``--sweep``
    texts): a token with ``=`` starts a key, the tokens after it without one add values.
    Clock in Hz, cores as integers, memory (sram, flash, ram) in bytes; duplicates dropped."""
    sweep: dict[str, list] = {}
    key = None
    for item in items:
        for raw in item.split(","):
            token = raw.strip()
            if "=" in token:
                key, _, token = (part.strip() for part in token.partition("="))
                key = key.lower()
                if key not in SWEEP_KEYS:
                    raise AutocompError(f"--sweep key {key!r} is unknown (known: {', '.join(SWEEP_KEYS)})")
                if key in sweep:
                    raise AutocompError(f"--sweep key {key!r} is given twice: list all its values after one "
                                        f"{key}=")
                sweep[key] = []
                if not token:
                    continue
            if not token:
                raise AutocompError(f"--sweep {item!r} has an empty value (stray comma)")
            if key is None:
                raise AutocompError(f"--sweep value {token!r} has no key: start with one of "
                                    f"{', '.join(k + '=' for k in SWEEP_KEYS)}")
            value = _value(key, token)
            if value not in sweep[key]:
                sweep[key].append(value)
    for key, values in sweep.items():
        if not values:
            raise AutocompError(f"--sweep {key}= lists no values")
    return sweep


def _format(key: str, value: float) -> str:
    """A swept value as a label shows it: ``1.2GHz``, ``4``, ``256KB``."""
    if key == "clock":
        for unit, scale in (("GHz", 1e9), ("MHz", 1e6), ("kHz", 1e3)):
            if value >= scale:
                return f"{value / scale:g}{unit}"
        return f"{value:g}Hz"
    if key == "cores":
        return str(value)
    for unit, scale in (("GB", 1024**3), ("MB", 1024**2), ("KB", 1024)):
        if value >= scale and value % scale == 0:
            return f"{value // scale}{unit}"
    return f"{value}B"


def _variant(profile: HardwareProfile, values: dict[str, Any], label: str) -> HardwareProfile:
    """``profile`` with the swept hardware replaced, each changed constant's source saying so."""
    constants, sources = dict(profile.cost_model.constants), dict(profile.cost_model.sources)
    latency, target, memory = profile.latency, dict(profile.tvm_target), profile.memory
    note = f"codesign variant {label} of the {profile.name} profile"
    if "clock" in values:
        constants["clock_hz"], sources["clock_hz"] = float(values["clock"]), note
    if "cores" in values:
        constants["cores"], sources["cores"] = float(values["cores"]), note
        latency = replace(latency, threads=values["cores"])
        if "num-cores" in target:
            target["num-cores"] = values["cores"]
    if "sram" in values:
        memory = replace(memory, sram_bytes=values["sram"])
    if "flash" in values:
        memory = replace(memory, flash_bytes=values["flash"])
    return replace(profile, description=f"{profile.description} [{label}]", tvm_target=target,
                   latency=latency, memory=memory,
                   cost_model=replace(profile.cost_model, constants=constants, sources=sources))


def variants(profile: HardwareProfile, sweep: dict[str, list]) -> list[tuple[str, HardwareProfile]]:
    """Every combination of the swept values (keys in ``SWEEP_KEYS`` order), labelled like
    ``clock=1.2GHz cores=2 sram=256KB``; no sweep is the profile itself, labelled ``as profiled``."""
    if "ram" in sweep:
        raise AutocompError("--sweep ram: no memory model checks RAM; on bare-metal targets sweep sram and "
                            "flash, which the MCU memory plan computes")
    swept = [key for key in MEMORY_KEYS if key in sweep]
    if swept and profile.export.format != "c-sources":
        raise AutocompError(f"--sweep {swept[0]}: target {profile.name} has no device-memory model (SRAM and "
                            "flash are computed for bare-metal c-sources targets such as cortex-m7)")
    keys = [key for key in SWEEP_KEYS if key in sweep]
    if not keys:
        return [("as profiled", profile)]
    result = []
    for combination in itertools.product(*(sweep[key] for key in keys)):
        values = dict(zip(keys, combination, strict=True))
        label = " ".join(f"{key}={_format(key, value)}" for key, value in values.items())
        result.append((label, _variant(profile, values, label)))
    return result


def estimate_variant(ops: list, profile: HardwareProfile, label: str) -> Latency:
    """The estimated latency of a model's kernels (``list_ops``) on one variant: the same
    formula and spread as ``autocomp.hardware.costmodel.estimate.estimate``, at the variant's cores,
    labelled with the variant."""
    threads = default_threads(profile)
    median = CostModel.for_profile(profile).seconds(ops, threads)
    spread = profile.cost_model.constants.get("spread_log_sd", UNCALIBRATED_LOG_SD)
    points = int(profile.cost_model.constants.get("calibration_points", 0))
    text = provenance(profile, threads)[:-1] + f"; device variant {label})"
    return Latency(median, median * math.exp(-Z90 * spread), median * math.exp(Z90 * spread), points,
                   "estimated", text)


@dataclass
class VariantResult:
    """One device variant: the uncompressed model's latency, the budget it implies, and
    how every front trial fares on it."""

    label: str
    settings: dict[str, Any]
    uncompressed: Latency
    budget_s: float | None
    # number, val_acc, latency, meets_latency, memory, over_memory (SRAM, flash or the run's
    # size limit exceeded: why), feasible
    trials: list[dict[str, Any]]
    best: dict[str, Any] | None = None  # the most accurate feasible trial
    fastest: dict[str, Any] | None = None  # when none is feasible: the fastest that fits memory

    def to_json(self) -> dict[str, Any]:
        return {"label": self.label, "settings": self.settings, "uncompressed": self.uncompressed.to_json(),
                "budget_s": self.budget_s, "trials": self.trials, "best": self.best, "fastest": self.fastest}


@dataclass
class CodesignResult:
    """The front re-evaluated over device variants (see the module docstring)."""

    run: str
    target: str
    budget: str | None
    sweep: dict[str, list]
    front_source: str
    front: list[dict[str, Any]]  # number, label, val_acc, test_acc, plan_summary
    variants: list[VariantResult]
    best_val_acc: float | None = None
    cheapest: str | None = None  # the variant reaching best_val_acc with the fewest resources
    minimal: list[str] = field(default_factory=list)  # qualifying variants no other undercuts everywhere
    paths: list[Path] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {"run": self.run, "target": self.target, "budget": self.budget, "sweep": self.sweep,
                "front_source": self.front_source, "front": self.front,
                "variants": [v.to_json() for v in self.variants], "best_val_acc": self.best_val_acc,
                "cheapest": self.cheapest, "minimal": self.minimal}

    def table(self) -> str:
        """Markdown: one row per variant, then the answer and every latency's provenance."""
        count = f"{len(self.front)} trial{'s' if len(self.front) != 1 else ''}"
        lines = [f"# Co-design: run {self.run} on {self.target} variants", "",
                 f"Front: {count} from {self.front_source}. "
                 f"Budget: {self.budget or 'none'}"
                 + (" of the uncompressed model's estimate on the device as profiled, one deadline for "
                    "every variant" if self.budget and "%" in self.budget else "")
                 + ". All latencies are estimated by the cost model (provenance below).", "",
                 "| variant | uncompressed (est.) | budget | feasible trials | best val acc | test acc | "
                 "trial | latency (est.) | speedup |",
                 "|---|---:|---:|---|---:|---:|---:|---:|---:|"]
        for v in self.variants:
            feasible = ", ".join(f"#{t['number']}" for t in v.trials if t["feasible"]) or "none"
            budget = format_seconds(v.budget_s) if v.budget_s is not None else "-"
            if v.best is not None:
                test = v.best["test_acc"]
                cells = [f"{v.best['val_acc']:.2%}", f"{test:.2%}" if test is not None else "-",
                         f"#{v.best['number']}", format_seconds(v.best["latency"]["median_s"]),
                         f"{v.uncompressed.median_s / v.best['latency']['median_s']:.2f}x"]
            elif v.fastest is not None:
                cells = ["-", "-", f"(fastest #{v.fastest['number']})",
                         format_seconds(v.fastest["latency"]["median_s"]), "-"]
            else:
                cells = ["-"] * 5
            lines.append(f"| {v.label} | {format_seconds(v.uncompressed.median_s)} | {budget} | {feasible} | "
                         + " | ".join(cells) + " |")
        lines.append("")
        if self.cheapest is None:
            lines.append("No variant runs any front trial within the budget and memory limits.")
        else:
            lines.append(f"Cheapest configuration at the best accuracy ({self.best_val_acc:.2%} val): "
                         f"**{self.cheapest}**" + (f"; resource-minimal: {', '.join(self.minimal)}"
                                                   if len(self.minimal) > 1 else "") + ".")
        memory = [t["over_memory"] for v in self.variants for t in v.trials if t["over_memory"]]
        if memory:
            lines.append(f"{len(memory)} trial-variant pairs exceed the variant's SRAM or flash or the run's "
                         "size limit.")
        lines += ["", "Latency provenance:"]
        lines += [f"- {v.label}: {v.uncompressed.provenance}" for v in self.variants]
        return "\n".join(lines) + "\n"


def _front(run_dir: Path, settings) -> tuple[str, list[dict[str, Any]]]:
    """The trials to re-evaluate: the study's Pareto-optimal finished trials, whether or not
    they met the run's budget (another device moves the deadline), with the test accuracy
    front.json holds for those the search ended with."""
    from autocomp.search.results.pareto import collect, pareto_front
    from autocomp.search.study import open_study

    path = run_dir / "front.json"
    tested = ({t["number"]: t.get("test_acc") for t in json.loads(path.read_text())["trials"]}
              if path.is_file() else {})
    study = open_study(run_dir, settings)
    labels = {t.number: t.user_attrs.get("label") for t in study.get_trials(deepcopy=False)}
    front = pareto_front(collect(study))
    return "the study (Pareto-optimal finished trials)", [
        {"number": r.number, "label": labels.get(r.number), "val_acc": r.val_acc,
         "test_acc": tested.get(r.number), "size_bytes": r.size_bytes, "plan_summary": r.plan_summary}
        for r in front]


def _resources(variant: HardwareProfile, sweep: dict[str, list]) -> dict[str, float]:
    """A variant's swept resources, each as a fraction of the largest swept value of its key."""
    held = {"clock": variant.cost_model.constants["clock_hz"], "cores": variant.latency.threads,
            "sram": variant.memory.sram_bytes, "flash": variant.memory.flash_bytes}
    return {key: held[key] / max(values) for key, values in sweep.items()}


def _undercuts(a: dict[str, float], b: dict[str, float]) -> bool:
    return all(a[k] <= b[k] for k in a) and any(a[k] < b[k] for k in a)


def codesign(run_dir: Path, target: str, sweep: dict[str, list], *, budget: str | None = None,
             data: DataSplits) -> CodesignResult:
    """Re-evaluate the run's front on every variant of ``target`` (see the module docstring);
    writes ``codesign-TARGET.json`` and ``.md`` into the run folder. ``budget`` (20ms, 60%)
    defaults to the run's; a percentage is of the uncompressed model on the unswept profile."""
    settings = load_settings(run_dir)
    profile = load_target(target)
    if profile.name == settings.target:  # the run's --sram / --flash hold unless swept
        profile = with_memory_limits(profile, settings.sram, settings.flash)
    chosen = variants(profile, sweep)
    limit = parse_budget(budget) if budget else parse_budget(settings.budget) if settings.budget else None
    size_limit = parse_bytes(settings.size_budget) if settings.size_budget else None
    source, front = _front(run_dir, settings)
    if not front:
        raise AutocompError(f"run {settings.name!r} has no finished trials to re-evaluate")
    shape = settings.input_shape

    def kernels(model: nn.Module) -> list:
        return list_ops(model.eval(), shape)

    logger.info("codesign: %d front trial%s of run %s x %d variants of %s (%s)", len(front),
                "s" if len(front) != 1 else "", settings.name, len(chosen), profile.name, source)
    teacher = settings.model.build()
    reference = kernels(teacher)
    base = (teacher, build_inventory(teacher, shape))  # built once for every front trial
    models = {t["number"]: load_trial_model(run_dir, settings, t["number"], data, base) for t in front}
    ops = {number: kernels(model) for number, model in models.items()}
    memory: dict[int, McuMemory | None] = {}

    def memory_of(number: int, variant: HardwareProfile) -> McuMemory | None:
        if number not in memory:  # SRAM and flash do not depend on clock or cores
            memory[number] = device_memory(models[number], shape, variant)
        return memory[number]

    by_number = {t["number"]: t for t in front}
    # A percentage is of the uncompressed model on the device as profiled: one deadline for
    # every variant, so that faster hardware can only meet it more easily.
    budget_s = limit.resolve(estimate_variant(reference, profile, "as profiled").median_s) if limit else None
    results = []
    for label, variant in chosen:
        uncompressed = estimate_variant(reference, variant, label)
        needs_memory = variant.export.format == "c-sources" and bool(
            variant.memory.sram_bytes or variant.memory.flash_bytes)
        rows = []
        for trial in front:
            latency = estimate_variant(ops[trial["number"]], variant, label)
            used = memory_of(trial["number"], variant) if needs_memory else None
            over = "; ".join(filter(None, (
                used.exceeds(variant.memory) if used is not None else None,
                f"size {trial['size_bytes']} B > {size_limit} B (the run's --size)"
                if size_limit is not None and trial["size_bytes"] > size_limit else None))) or None
            meets = budget_s is None or latency.median_s <= budget_s
            rows.append({"number": trial["number"], "val_acc": trial["val_acc"], "latency": latency.to_json(),
                         "meets_latency": meets,
                         "memory": ({"sram_bytes": used.sram_bytes, "flash_bytes": used.flash_bytes}
                                    if used is not None else None),
                         "over_memory": over, "feasible": meets and over is None})
        feasible = [r for r in rows if r["feasible"]]
        fitting = [r for r in rows if r["over_memory"] is None]
        result = VariantResult(
            label, {"clock_hz": variant.cost_model.constants["clock_hz"], "threads": default_threads(variant),
                    "sram_bytes": variant.memory.sram_bytes, "flash_bytes": variant.memory.flash_bytes},
            uncompressed, budget_s, rows)
        if feasible:
            best = max(feasible, key=lambda r: (r["val_acc"], -r["latency"]["median_s"]))
            result.best = {"number": best["number"], "val_acc": best["val_acc"], "latency": best["latency"],
                           "test_acc": by_number[best["number"]]["test_acc"]}
        elif fitting:
            fastest = min(fitting, key=lambda r: r["latency"]["median_s"])
            result.fastest = {"number": fastest["number"], "latency": fastest["latency"]}
        results.append(result)

    outcome = CodesignResult(settings.name, profile.name, limit.text if limit else None, sweep, source, front,
                             results)
    reaching = [v for v in results if v.best is not None]
    if reaching:
        outcome.best_val_acc = max(v.best["val_acc"] for v in reaching)
        top = [v for v in reaching if v.best["val_acc"] == outcome.best_val_acc]
        profiles = dict(chosen)
        cost = {v.label: _resources(profiles[v.label], sweep) for v in top}
        outcome.minimal = [v.label for v in top
                           if not any(_undercuts(cost[o.label], cost[v.label]) for o in top if o is not v)]
        outcome.cheapest = min(top, key=lambda v: (sum(cost[v.label].values()),
                                                    v.best["latency"]["median_s"])).label
    outcome.paths = [run_dir / f"codesign-{profile.name}.json", run_dir / f"codesign-{profile.name}.md"]
    write_json(outcome.paths[0], outcome.to_json())
    write_text(outcome.paths[1], outcome.table())
    return outcome
