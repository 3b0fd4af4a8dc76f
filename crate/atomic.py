"""Atomic writes: a file is written under a temporary name in the same folder, fsynced and renamed into
place, so a kill at any moment leaves either the old file or the new one under the final name.

Temporaries are named `.<name>.tmp<pid>` (files) and `.<name>.tmp-<random>` (directories); a process killed
with SIGKILL leaves them behind, and `remove_stale_temporaries` clears them when the next one starts.
Everything is created with the permissions a plain open() or mkdir() gives under the umask (tempfile's
are 0600 / 0700).
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from crate.errors import DiskFullError

_TEMPORARY = re.compile(r"^\..+\.tmp(\d+|-\w+)$")


def umask() -> int:
    """The process's umask (reading it means setting it: set it straight back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def temporary_dir(path: str | os.PathLike) -> Path:
    """A new empty directory beside `path`, to be renamed onto it, with mkdir()'s permissions (not 0700)."""
    path = Path(path)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    os.chmod(tmp, 0o777 & ~umask())
    return tmp


def honour_umask(folder: str | os.PathLike) -> None:
    """Give the files in `folder` the mode open() would (0666 & ~umask): some writers (safetensors) make 0600."""
    mode = 0o666 & ~umask()
    for p in Path(folder).iterdir():
        if p.is_file() and not p.is_symlink():
            os.chmod(p, mode)


def remove_stale_temporaries(folder: str | os.PathLike) -> list[Path]:
    """Delete the temporaries of atomic writes in `folder` that a killed process left; returns them.
    Call it only where no other process is writing (a run folder when its training starts)."""
    folder = Path(folder)
    stale = sorted(p for p in folder.iterdir() if _TEMPORARY.match(p.name)) if folder.is_dir() else []
    for p in stale:
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
    return stale


def fsync_dir(path: str | os.PathLike) -> None:
    """Make a rename inside `path` durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


LOW_SPACE = 1 << 20  # bytes: a write that fails with less free than this ran out of space


def disk_full(error: BaseException, folder: Path) -> bool:
    """Whether `error`, raised while writing into `folder`, means the disk is full: ENOSPC / EDQUOT, or a writer's own
    error (torch.save says "unexpected pos" or "file write failed") with under LOW_SPACE bytes left there."""
    if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    if not isinstance(error, (OSError, RuntimeError)):
        return False
    try:
        return shutil.disk_usage(folder).free < LOW_SPACE
    except OSError:
        return False


def _full(error: BaseException, path: Path) -> DiskFullError:
    try:
        free = f"{shutil.disk_usage(path.parent).free / 2**20:.1f} MiB free"
    except OSError:
        free = "free space unknown"
    old = f"{path} is as it was" if path.exists() else f"nothing was written at {path}"
    return DiskFullError(f"the disk holding {path.parent} is full ({free}) while writing {path.name}: {old} (the "
                         f"partial write is removed); free space there, then run the same command again "
                         f"({type(error).__name__}: {error})")


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[BinaryIO]:
    """Open a temporary file for writing; on a clean exit it replaces `path`, on an error it is removed (a full
    disk: DiskFullError, naming the file and that the old one is intact)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:
        full = disk_full(e, path.parent)  # before the partial write is removed, which frees what it took
        tmp.unlink(missing_ok=True)
        if full:
            raise _full(e, path) from e
        raise
    finally:
        tmp.unlink(missing_ok=True)
    fsync_dir(path.parent)


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_file(path) as f:
        f.write(data)


def replace_dir(src: Path, dst: Path) -> None:
    """Rename `src` onto `dst`; an existing `dst` is moved aside first and removed only afterwards."""
    old = None
    if dst.exists():
        old = dst.with_name(f".{dst.name}.old-{os.getpid()}")
        os.replace(dst, old)
    os.replace(src, dst)
    fsync_dir(dst.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """A new folder beside `path` to fill; on a clean exit its files get open()'s permissions (some writers, such as
    safetensors, make 0600) and it replaces `path` whole (see replace_dir), on an error it is removed: a kill leaves
    the old folder or the new one, never half of one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_dir(path)
    try:
        yield tmp
        honour_umask(tmp)
        fsync_dir(tmp)
        replace_dir(tmp, path)
    except BaseException as e:
        full = disk_full(e, path.parent)  # before the partial write is removed, which frees what it took
        shutil.rmtree(tmp, ignore_errors=True)
        if full:
            raise _full(e, path) from e
        raise
