"""Target profiles: ``hw_profiles/NAME.yaml`` loaded into a validated ``HardwareProfile``.

A profile says what to compile for (a TVM target in JSON-dict form), how its latency is
obtained (measured here, measured on a device through a TVM RPC tracker, or estimated
by a cost model whose constants and their sources live in the profile), how to export
for it, and its memory limits.
"""

import hashlib
import json
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from autocomp.core.errors import AutocompError
from autocomp.core.paths import bundled_dir, cache_dir
from autocomp.core.units import parse_bytes
from autocomp.core.yaml_checks import Checker, read_yaml, yaml_float

LATENCY_METHODS = ("local", "rpc", "estimate")
DEVICES = ("cpu", "cuda")
TUNING_MODES = ("metaschedule", "untuned")
EXPORT_FORMATS = ("shared-library", "c-sources")
DTYPES = ("float32", "int8")
TARGET_KEYS = {"kind", "mcpu", "mtriple", "mattr", "num-cores", "arch", "host", "max_num_threads",
               "thread_warp_size", "max_threads_per_block"}


@dataclass(frozen=True)
class RpcSettings:
    """Where a device registered with a TVM RPC tracker is found."""

    tracker_host: str
    tracker_port: int
    key: str
    timeout_s: float
    retries: int

    def address(self) -> str:
        return f"{self.tracker_host}:{self.tracker_port} key {self.key}"


@dataclass(frozen=True)
class LatencySettings:
    """How latency is obtained for a profile."""

    method: str
    device: str
    threads: int
    tuning: str
    trials_per_task: int
    repeat: int
    min_repeat_ms: int
    rpc: RpcSettings | None = None


@dataclass(frozen=True)
class ExportSettings:
    """The deployable artefact: its format and the compiler that builds it."""

    format: str
    cross_compiler: str | None
    cflags: tuple[str, ...] = ()


@dataclass(frozen=True)
class MemoryLimits:
    """Hard memory limits of the device (None: not a constraint)."""

    ram_bytes: int | None = None
    sram_bytes: int | None = None
    flash_bytes: int | None = None


@dataclass(frozen=True)
class CostModelSettings:
    """Constants of the per-op latency estimate, each with where its value came from."""

    version: str
    fitted_to: str
    constants: dict[str, float] = field(default_factory=dict)
    sources: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class HardwareProfile:
    """A compilation, measurement and export target."""

    name: str
    description: str
    source: Path
    tvm_target: dict[str, Any]
    latency: LatencySettings
    export: ExportSettings
    memory: MemoryLimits
    dtypes: tuple[str, ...]
    channel_multiple: int
    cost_model: CostModelSettings

    @property
    def target_key(self) -> str:
        """A short stable name for this target's caches (tuning database, latency table)."""
        canonical = json.dumps(self.tvm_target, sort_keys=True, separators=(",", ":"))
        return f"{self.name}-{hashlib.sha256(canonical.encode()).hexdigest()[:12]}"

    @property
    def measured(self) -> bool:
        """True when this profile's latency is measured on a device (not estimated)."""
        return self.latency.method in ("local", "rpc")

    def target_text(self) -> str:
        """The TVM target in a few words: ``llvm rocketlake``, ``cuda sm_90``."""
        target = self.tvm_target
        detail = target.get("mcpu") or target.get("arch") or target.get("mtriple") or ""
        return f"{target['kind']} {detail}".strip()

    def how(self) -> str:
        """How the profile asks for latency to be obtained, as shown to users (whether its
        device can be reached from here is ``autocomp.hardware.oracle.latency_here``)."""
        lat = self.latency
        compiled = f"TVM {self.target_text()}, {lat.tuning}"
        if lat.method == "local":
            where = "this machine's GPU" if lat.device == "cuda" else "this machine"
            return f"measured on {where} ({compiled}, {lat.threads} threads)"
        if lat.method == "rpc":
            assert lat.rpc is not None
            return f"measured through the RPC tracker {lat.rpc.address()} ({compiled}, {lat.threads} threads)"
        return self.how_estimated()

    def how_estimated(self) -> str:
        """How the profile's cost model estimates latency, as shown to users."""
        return (f"estimated by the {self.name} cost model {self.cost_model.version} "
                f"(fitted to {self.cost_model.fitted_to})")


def profiles_dir() -> Path:
    return bundled_dir("hw_profiles")


def available_profiles() -> list[str]:
    return sorted(path.stem for path in profiles_dir().glob("*.yaml"))


def calibrated_dir() -> Path:
    """Where ``autocomp calibrate`` writes the user's calibrated copies of profiles."""
    return cache_dir() / "profiles"


def load_profile(name_or_path: str) -> HardwareProfile:
    """Load a profile by name (``host``) or by the path of a YAML file.

    A name finds the user's calibrated copy (``autocomp calibrate``) before the bundled profile.
    """
    path = Path(name_or_path)
    if path.suffix not in (".yaml", ".yml"):
        path = calibrated_dir() / f"{name_or_path}.yaml"
        if not path.is_file():
            path = profiles_dir() / f"{name_or_path}.yaml"
        if not path.is_file():
            known = ", ".join(available_profiles())
            raise AutocompError(f"unknown target {name_or_path!r} (known: {known})")
    elif not path.is_file():
        raise AutocompError(f"target profile {path} does not exist")
    return _parse(read_yaml(path), Checker(path))


def load_target(name_or_path: str, *, untuned: bool = False) -> HardwareProfile:
    """``load_profile``, with tuning switched off when the user asked for ``--untuned``."""
    profile = load_profile(name_or_path)
    if untuned:
        profile = replace(profile, latency=replace(profile.latency, tuning="untuned"))
    return profile


def _parse(data: Any, check: Checker) -> HardwareProfile:
    keys = {"name", "description", "tvm_target", "latency", "export", "memory", "dtypes",
            "channel_multiple", "cost_model"}
    top = check.mapping(data, "", keys, keys - {"memory"})
    if top["name"] != check.path.stem:
        raise check.fail("name", f"{top['name']!r} does not match the file name")
    latency = _latency(top["latency"], check)
    target = _target(top["tvm_target"], check)
    if target["kind"] == "llvm":
        target.setdefault("num-cores", latency.threads)
    dtypes = top["dtypes"]
    if not isinstance(dtypes, list) or not dtypes:
        raise check.fail("dtypes", f"must be a non-empty list of {list(DTYPES)}")
    for i, dtype in enumerate(dtypes):
        check.choice(dtype, f"dtypes[{i}]", DTYPES)
    multiple = int(check.number(top["channel_multiple"], "channel_multiple", 1, 1024, integer=True))
    return HardwareProfile(top["name"], str(top["description"]), check.path, target, latency,
                           _export(top["export"], check), _memory(top.get("memory") or {}, check),
                           tuple(dtypes), multiple, _cost_model(top["cost_model"], check))


def _target(data: Any, check: Checker) -> dict[str, Any]:
    target = dict(check.mapping(data, "tvm_target", TARGET_KEYS, {"kind"}))
    if target.get("mcpu") == "auto":
        from tvm.target import codegen

        target["mcpu"] = codegen.llvm_get_system_cpu()
    try:
        import tvm

        tvm.target.Target(target)
    except Exception as err:
        message = str(err).strip().splitlines()[-1] if str(err).strip() else type(err).__name__
        raise check.fail("tvm_target", f"TVM rejects this target: {message}") from None
    return target


def _latency(data: Any, check: Checker) -> LatencySettings:
    lat = check.mapping(data, "latency",
                        {"method", "device", "threads", "tuning", "trials_per_task", "repeat",
                         "min_repeat_ms", "rpc"},
                        {"method", "threads", "tuning"})
    method = check.choice(lat["method"], "latency.method", LATENCY_METHODS)
    device = check.choice(lat.get("device", "cpu"), "latency.device", DEVICES)
    threads = lat["threads"]
    if threads == "auto":
        threads = os.cpu_count() or 1
    rpc = None
    if method == "rpc" and "rpc" not in lat:
        raise check.fail("latency.rpc", "missing (method rpc needs the tracker and device key)")
    if "rpc" in lat:
        raw = check.mapping(lat["rpc"], "latency.rpc",
                            {"tracker_host", "tracker_port", "key", "timeout_s", "retries"},
                            {"tracker_host", "tracker_port", "key"})
        rpc = RpcSettings(
            str(raw["tracker_host"]),
            int(check.number(raw["tracker_port"], "latency.rpc.tracker_port", 1, 65535, integer=True)),
            str(raw["key"]),
            float(check.number(raw.get("timeout_s", 120), "latency.rpc.timeout_s", 1, 86400)),
            int(check.number(raw.get("retries", 2), "latency.rpc.retries", 0, 100, integer=True)),
        )
    return LatencySettings(
        method, device,
        int(check.number(threads, "latency.threads", 1, 4096, integer=True)),
        check.choice(lat["tuning"], "latency.tuning", TUNING_MODES),
        int(check.number(lat.get("trials_per_task", 16), "latency.trials_per_task", 1, 100_000,
                         integer=True)),
        int(check.number(lat.get("repeat", 15), "latency.repeat", 3, 10_000, integer=True)),
        int(check.number(lat.get("min_repeat_ms", 40), "latency.min_repeat_ms", 0, 60_000, integer=True)),
        rpc,
    )


def _export(data: Any, check: Checker) -> ExportSettings:
    raw = check.mapping(data, "export", {"format", "cross_compiler", "cflags"}, {"format"})
    cflags = raw.get("cflags") or []
    if not isinstance(cflags, list) or not all(isinstance(flag, str) for flag in cflags):
        raise check.fail("export.cflags", "must be a list of strings")
    compiler = raw.get("cross_compiler")
    if compiler is not None and not isinstance(compiler, str):
        raise check.fail("export.cross_compiler", "must be a compiler command such as aarch64-linux-gnu-g++")
    return ExportSettings(check.choice(raw["format"], "export.format", EXPORT_FORMATS), compiler,
                          tuple(cflags))


def _memory(data: Any, check: Checker) -> MemoryLimits:
    raw = check.mapping(data, "memory", {"ram", "sram", "flash"}, set())
    sizes = {}
    for key in ("ram", "sram", "flash"):
        if raw.get(key) is None:
            sizes[key] = None
            continue
        try:
            sizes[key] = parse_bytes(raw[key])
        except AutocompError as err:
            raise check.fail(f"memory.{key}", str(err)) from None
    return MemoryLimits(sizes["ram"], sizes["sram"], sizes["flash"])


def _cost_model(data: Any, check: Checker) -> CostModelSettings:
    raw = check.mapping(data, "cost_model", {"version", "fitted_to", "constants"},
                        {"version", "fitted_to", "constants"})
    constants = check.mapping(raw["constants"], "cost_model.constants", set(raw["constants"] or {}), set())
    values, sources = {}, {}
    for name, entry in constants.items():
        key = f"cost_model.constants.{name}"
        item = check.mapping(entry, key, {"value", "source"}, {"value", "source"})
        values[name] = float(check.number(yaml_float(item["value"]), f"{key}.value", 0, float("inf")))
        sources[name] = str(item["source"])
    return CostModelSettings(str(raw["version"]), str(raw["fitted_to"]), values, sources)
