"""Writing an output folder all at once, so a failure never leaves it half-written."""

import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from autocomp.errors import AutocompError


def refuse_existing(out: Path, force: bool) -> None:
    """Fail early when ``out`` holds files and the user did not ask to replace them."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not force:
        raise AutocompError(f"{out} exists and is not empty (use --force to replace it)")


@contextmanager
def staged_folder(out: Path, *, force: bool = False) -> Iterator[Path]:
    """Yield a hidden sibling folder to write into; it becomes ``out`` only on success."""
    refuse_existing(out, force)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        yield staging
        if out.exists():
            shutil.rmtree(out)
        staging.replace(out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
