"""Writing outputs all at once, so a failure or a kill never leaves one half-written: a folder
(``staged_folder``), or a single file (``replacing``, and ``write_json`` on top of it)."""

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from autocomp.core.errors import AutocompError


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
    except BaseException as err:
        shutil.rmtree(staging, ignore_errors=True)
        _name_the_file(err, out)
        raise


@contextmanager
def replacing(path: Path) -> Iterator[Path]:
    """Yield a temporary sibling of ``path`` to write; it replaces ``path`` in one rename when
    the block succeeds, so readers see the old file or the new one, never a partial one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        yield temporary
        temporary.replace(path)
    except BaseException as err:
        temporary.unlink(missing_ok=True)
        _name_the_file(err, path)
        raise


def _name_the_file(err: BaseException, path: Path) -> None:
    """Give a failed write without a file name (a full disk fails ``write``, which names
    none) the output it was writing, so the user's one-line error says which."""
    if isinstance(err, OSError) and err.filename is None:
        err.filename = str(path)


def write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically (see ``replacing``)."""
    with replacing(path) as temporary:
        temporary.write_text(text)


def write_json(path: Path, data: Any) -> None:
    """Write ``data`` to ``path`` as indented JSON, atomically (see ``replacing``)."""
    with replacing(path) as temporary:
        temporary.write_text(json.dumps(data, indent=2) + "\n")
