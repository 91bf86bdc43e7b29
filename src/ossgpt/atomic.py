"""Atomic output: a file or folder appears complete or not at all.

Everything ossgpt writes that a later step reads (prepared data, checkpoints, text splits) is written under a
temporary sibling name and renamed into place at the end. A crash, Ctrl-C or SIGKILL midway leaves the previous
version (or nothing), never a half-written one; rename within one folder is atomic on POSIX file systems.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def atomic_output(path: str | Path) -> Iterator[Path]:
    """Write a file or folder under a temporary name; it becomes `path` only if the block completes.

    Yields the temporary path (a sibling of `path`, not yet created). On success its data is flushed to disk and
    it replaces `path`, an old `path` being removed only once the new one is in place; on any failure (or Ctrl-C)
    it is deleted.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp-{os.getpid()}"
    _remove(tmp)  # left behind by a killed run that had the same process id
    try:
        yield tmp
        _fsync_tree(tmp)  # the data must be on disk before the rename makes it visible
        if path.is_dir():  # rename() cannot replace a non-empty folder, so move the old one aside first
            old = path.parent / f".{path.name}.old-{os.getpid()}"
            os.replace(path, old)
            os.replace(tmp, path)
            _remove(old)
        else:
            os.replace(tmp, path)
    except BaseException:
        _remove(tmp)
        raise


@contextmanager
def atomic_directory(path: str | Path) -> Iterator[Path]:
    """`atomic_output` for a folder: yields the (created) temporary folder to fill."""
    with atomic_output(path) as tmp:
        tmp.mkdir()
        yield tmp


def _fsync_tree(path: Path) -> None:
    for f in [path] if path.is_file() else (p for p in path.rglob("*") if p.is_file()):
        with open(f, "rb") as handle:
            os.fsync(handle.fileno())


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()
