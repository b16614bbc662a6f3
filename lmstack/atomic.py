"""Atomic writes: a file or a whole directory appears complete or not at all.

Everything lmstack writes for a user (checkpoints, shards, reports) goes through here, so a crash,
a kill -9 or a full disk never leaves a half-written output where a complete one is expected.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from lmstack.errors import OutputError


def ensure_parent_writable(path: Path) -> None:
    """Create `path`'s parent directory if needed; a clear OSError naming it when that or writing there fails."""
    parent = path.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputError(f"{parent}: cannot create output directory ({e.strerror})") from None
    if not os.access(parent, os.W_OK):
        raise OutputError(f"{parent}: output directory is not writable")


@contextlib.contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling directory; on success it replaces `path` in one rename.

    On any exception the temporary directory is removed and an existing `path` is left untouched.
    """
    path = Path(path)
    ensure_parent_writable(path)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        yield tmp
        replace_directory(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def replace_directory(finished: Path, path: Path) -> None:
    """Move the complete directory `finished` onto `path` (a sibling), fsyncing its files first.

    An existing `path` is renamed aside and deleted only after the new one is in place, so at every
    moment `path` is either the old directory or the new one.
    """
    for child in finished.rglob("*"):
        if child.is_file():
            _fsync(child)
    if path.exists():
        old = path.with_name(f".{path.name}.old-{os.getpid()}")
        os.replace(path, old)
        os.replace(finished, path)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(finished, path)


@contextlib.contextmanager
def atomic_file(path: str | Path, mode: str = "w", encoding: str | None = "utf-8") -> Iterator:
    """Open a temporary sibling file for writing; on success it is fsynced and renamed onto `path`."""
    path = Path(path)
    ensure_parent_writable(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    try:
        with os.fdopen(fd, mode, encoding=None if "b" in mode else encoding) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_text(path: str | Path, text: str) -> None:
    with atomic_file(path) as f:
        f.write(text)


def _fsync(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())
