"""Atomic writes: a file or a whole directory appears complete or not at all.

Everything lmstack writes for a user (checkpoints, shards, reports) goes through here, so a crash,
a kill -9 or a full disk never leaves a half-written output where a complete one is expected.

What appears follows the umask like any other program's output (0644 / 0755 under the usual 022):
the temporary files and directories are created private (mkstemp 0600, mkdtemp 0700), and are given
the ordinary modes when they are published, so colleagues on a shared machine can read checkpoints.
A place that cannot be written is one OutputError naming the path the user gave, never the
temporary name.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from lmstack.errors import OutputError


def current_umask() -> int:
    """The process's umask, read without changing it where the OS allows (Linux: /proc/self/status)."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    mask = os.umask(0o022)  # elsewhere: the classic read-by-setting (not thread-safe, but rare)
    os.umask(mask)
    return mask


def publish_modes(path: Path) -> None:
    """Give `path` (and, for a directory, everything in it) the modes a plain open()/mkdir() would have:
    0666 / 0777 minus the umask."""
    mask = current_umask()
    if path.is_dir():
        for child in path.rglob("*"):
            if not child.is_symlink():
                os.chmod(child, (0o777 if child.is_dir() else 0o666) & ~mask)
        os.chmod(path, 0o777 & ~mask)
    else:
        os.chmod(path, 0o666 & ~mask)


def cannot_write(path: Path, error: OSError) -> OutputError:
    """An OSError met while creating an output -> one message about the path the user asked for."""
    blocker = next((p for p in [path, *path.parents] if p.exists() and not p.is_dir()), None)
    if blocker is not None and blocker != path and error.errno in (errno.EEXIST, errno.ENOTDIR):
        return OutputError(f"{path}: cannot write the output there ({blocker} is a file, not a directory)")
    reason = {
        "ENOENT": "the directory does not accept new files",  # /proc, a vanished directory
        "EACCES": "permission denied", "EPERM": "permission denied", "EROFS": "read-only file system",
        "ENOSPC": "no space left on the device", "EDQUOT": "disk quota exceeded",
        "ENOTDIR": "a path component is a file, not a directory", "EEXIST": "a file of that name is in the way",
        "EISDIR": "a directory of that name is in the way",
    }.get(errno.errorcode.get(error.errno or 0, ""), (error.strerror or str(error)).lower())
    return OutputError(f"{path}: cannot write the output there ({reason})")


def ensure_parent_writable(path: Path) -> None:
    """Create `path`'s parent directory if needed; one OutputError naming `path` when that or writing there fails."""
    parent = path.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise cannot_write(path, e) from None
    if not parent.is_dir():
        raise OutputError(f"{path}: cannot write the output there ({parent} is a file, not a directory)")
    if not os.access(parent, os.W_OK):
        raise OutputError(f"{path}: cannot write the output there (permission denied on {parent})")


def make_output_dir(path: str | Path) -> Path:
    """mkdir -p an output directory the user named; one OutputError naming it when that is impossible."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise cannot_write(path, e) from None
    return path


@contextlib.contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling directory; on success it replaces `path` in one rename.

    On any exception the temporary directory is removed and an existing `path` is left untouched.
    """
    path = Path(path)
    ensure_parent_writable(path)
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    except OSError as e:
        raise cannot_write(path, e) from None
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
        if child.is_file() and not child.is_symlink():
            _fsync(child)
    publish_modes(finished)
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
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    except OSError as e:
        raise cannot_write(path, e) from None
    try:
        with os.fdopen(fd, mode, encoding=None if "b" in mode else encoding) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        publish_modes(Path(tmp))
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
