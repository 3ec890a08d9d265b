"""Target profiles: ``hw_profiles/NAME.yaml`` loaded into a validated ``HardwareProfile``."""

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from autocomp.errors import AutocompError
from autocomp.paths import bundled_dir
from autocomp.yaml_files import Checker, read_yaml

LATENCY_METHODS = ("local",)
TUNING_MODES = ("untuned",)


@dataclass(frozen=True)
class LatencySettings:
    """How latency is obtained for a profile."""

    method: str
    threads: int
    tuning: str
    repeat: int
    min_repeat_ms: int


@dataclass(frozen=True)
class HardwareProfile:
    """A compilation and measurement target."""

    name: str
    description: str
    source: Path
    tvm_target: dict[str, Any]
    latency: LatencySettings
    channel_multiple: int

    @property
    def measured(self) -> bool:
        """True when this profile's latency is measured on a device (not estimated)."""
        return self.latency.method == "local"

    def how(self) -> str:
        """How latency is obtained, as shown to users."""
        return (f"measured on this machine (TVM {self.tvm_target['kind']} "
                f"{self.tvm_target.get('mcpu', '')}, {self.latency.tuning}, "
                f"{self.latency.threads} threads)")


def profiles_dir() -> Path:
    return bundled_dir("hw_profiles")


def available_profiles() -> list[str]:
    return sorted(path.stem for path in profiles_dir().glob("*.yaml"))


def load_profile(name_or_path: str) -> HardwareProfile:
    """Load a profile by name (``host``) or by the path of a YAML file."""
    path = Path(name_or_path)
    if path.suffix not in (".yaml", ".yml"):
        path = profiles_dir() / f"{name_or_path}.yaml"
        if not path.is_file():
            known = ", ".join(available_profiles())
            raise AutocompError(f"unknown target {name_or_path!r} (known: {known})")
    elif not path.is_file():
        raise AutocompError(f"target profile {path} does not exist")
    return _parse(read_yaml(path), Checker(path))


def _parse(data: Any, check: Checker) -> HardwareProfile:
    keys = {"name", "description", "tvm_target", "latency", "channel_multiple"}
    top = check.mapping(data, "", keys, keys)
    if top["name"] != check.path.stem:
        raise check.fail("name", f"{top['name']!r} does not match the file name")
    target = dict(check.mapping(top["tvm_target"], "tvm_target",
                                {"kind", "mcpu", "mtriple", "mattr", "num-cores"}, {"kind"}))
    if target.get("mcpu") == "auto":
        from tvm.target import codegen

        target["mcpu"] = codegen.llvm_get_system_cpu()
    lat = check.mapping(top["latency"], "latency",
                        {"method", "threads", "tuning", "repeat", "min_repeat_ms"},
                        {"method", "threads", "tuning"})
    method = lat["method"]
    if method not in LATENCY_METHODS:
        raise check.fail("latency.method", f"{method!r} is not one of {list(LATENCY_METHODS)} "
                         "(RPC devices and estimates come with the hardware issue)")
    tuning = check.choice(lat["tuning"], "latency.tuning", TUNING_MODES)
    threads = lat["threads"]
    if threads == "auto":
        threads = os.cpu_count() or 1
    threads = int(check.number(threads, "latency.threads", 1, 4096, integer=True))
    target.setdefault("num-cores", threads)
    settings = LatencySettings(
        method, threads, tuning,
        int(check.number(lat.get("repeat", 15), "latency.repeat", 3, 10_000, integer=True)),
        int(check.number(lat.get("min_repeat_ms", 40), "latency.min_repeat_ms", 0, 60_000,
                         integer=True)),
    )
    multiple = int(check.number(top["channel_multiple"], "channel_multiple", 1, 1024, integer=True))
    return HardwareProfile(top["name"], str(top["description"]), check.path, target, settings,
                           multiple)
