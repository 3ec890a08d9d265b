"""Outputs written whole or not at all, and a failed write that names the output it was
writing (a full disk fails ``write``, which names no file)."""

import errno
from pathlib import Path

import pytest

from autocomp.core.staging import replacing, staged_folder


def _fill_disk(target: Path) -> None:
    """Write through /dev/full: the kernel's own ENOSPC, with no file name on the error."""
    with open("/dev/full", "w") as full:
        full.write(target.name)


def test_a_full_disk_names_the_file_and_leaves_the_old_one(tmp_path: Path) -> None:
    path = tmp_path / "metrics.json"
    path.write_text("old")
    with pytest.raises(OSError) as caught, replacing(path) as temporary:
        temporary.write_text("new, half")
        _fill_disk(path)
    assert caught.value.errno == errno.ENOSPC and caught.value.filename == str(path)
    assert path.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["metrics.json"]


def test_a_full_disk_names_the_folder_and_leaves_no_staging(tmp_path: Path) -> None:
    out = tmp_path / "export"
    with pytest.raises(OSError) as caught, staged_folder(out) as staging:
        (staging / "model.so").write_bytes(b"\0")
        _fill_disk(out)
    assert caught.value.errno == errno.ENOSPC and caught.value.filename == str(out)
    assert list(tmp_path.iterdir()) == []
