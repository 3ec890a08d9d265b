"""Reading the project's YAML files with errors that name the file and the key."""

from pathlib import Path
from typing import Any

import yaml

from autocomp.core.errors import AutocompError


def read_yaml(path: Path) -> Any:
    """Parse a YAML file; a syntax error is a one-line ``AutocompError`` naming the file."""
    try:
        return yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise AutocompError(f"{path}: not valid YAML: {str(err).splitlines()[0]}") from None


def yaml_float(value: Any) -> Any:
    """PyYAML reads ``1.2e9`` (no sign in the exponent) as a string: take it as the number."""
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


class Checker:
    """Validates nested mappings of one file; every error names ``file: dotted.key``."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def fail(self, key: str, problem: str) -> AutocompError:
        return AutocompError(f"{self.path}: {key}: {problem}")

    def mapping(self, value: Any, key: str, allowed: set[str], required: set[str]) -> dict:
        """``value`` as a dict with only ``allowed`` keys and all ``required`` ones."""
        where = (lambda name: f"{key}.{name}") if key else (lambda name: name)
        if not isinstance(value, dict):
            raise self.fail(key or "(top level)", "must be a mapping")
        unknown = sorted(set(value) - allowed)
        if unknown:
            raise self.fail(where(unknown[0]), f"unknown key (allowed: {', '.join(sorted(allowed))})")
        missing = sorted(required - set(value))
        if missing:
            raise self.fail(where(missing[0]), "missing")
        return value

    def number(self, value: Any, key: str, low: float, high: float, *, integer: bool = False) -> float:
        """``value`` as a number in ``[low, high]`` (an int when ``integer``)."""
        kinds = (int,) if integer else (int, float)
        if isinstance(value, bool) or not isinstance(value, kinds) or not low <= value <= high:
            kind = "an integer" if integer else "a number"
            raise self.fail(key, f"must be {kind} in [{low}, {high}], not {value!r}")
        return value

    def choice(self, value: Any, key: str, options: tuple[str, ...]) -> str:
        if value not in options:
            raise self.fail(key, f"{value!r} is not one of {list(options)}")
        return value
