"""Where autocomp finds its bundled YAML files and keeps its caches."""

import os
from pathlib import Path

from autocomp.core.errors import AutocompError

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


def check_creatable(folder: Path, what: str) -> None:
    """Raise ``AutocompError`` (one line) unless ``folder`` exists as a writable directory or
    could be created: checked before any work, so that a bad path never ends a long run."""
    folder = Path(folder)
    existing = next((p for p in (folder, *folder.parents) if p.exists()), None)
    if existing is not None and not existing.is_dir():
        raise AutocompError(f"{what} {folder} cannot be created: {existing} is a file, not a folder")
    if existing is not None and not os.access(existing, os.W_OK | os.X_OK):
        raise AutocompError(f"{what} {folder} cannot be created: {existing} is not writable")
