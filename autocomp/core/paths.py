"""Where autocomp finds its bundled YAML files and keeps its caches."""

import os
from pathlib import Path

_PACKAGE_DIR = Path(__file__).resolve().parent.parent  # the autocomp package


def bundled_dir(name: str) -> Path:
    """A top-level data folder (``hw_profiles``, ``search_spaces``) of a checkout or a wheel."""
    for candidate in (_PACKAGE_DIR.parent / name, _PACKAGE_DIR / "_data" / name):
        if candidate.is_dir():
            return candidate
    raise FileNotFoundError(f"autocomp installation lacks its {name}/ folder")


def cache_dir() -> Path:
    """Cache for trained baselines (``$AUTOCOMP_CACHE`` or ``~/.cache/autocomp``)."""
    root = os.environ.get("AUTOCOMP_CACHE") or Path.home() / ".cache" / "autocomp"
    path = Path(root)
    path.mkdir(parents=True, exist_ok=True)
    return path
