"""Writing and moving the files of a run folder: whole files or none, across file systems, with OS errors
that name the file the run meant to write.

Why a module of its own: every writer of the run engine (the store, the reports, the studies) goes
through :func:`atomic_write`, so a disk that fills up, a read-only mount or a name too long for the file
system ends the same way everywhere: an ``OSError`` whose ``filename`` is the target (not the temporary
file beside it), which the CLIs turn into one line (:func:`os_error_line`). :func:`move_file` is the
quarantine's move: a rename, or, when the target is on another file system (``EXDEV``), a copy that is on
disk (fsync) before the original is unlinked, so a damaged batch file is never lost on the way.
"""

from __future__ import annotations

import errno
import json
import os
import pathlib
import shutil
import tempfile
from typing import Any, Callable

__all__ = ["atomic_write", "copy_file", "write_json", "move_file", "naming", "os_error_line"]


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


_FILE_MODE = 0o666 & ~_umask()  # what open() would give; mkstemp's 0600 would hide results from the user's group


def naming(err: OSError, path: str | os.PathLike) -> OSError:
    """``err`` with ``path`` as its file name when it names none or only a temporary file (a failed
    ``write`` or ``fsync`` names nothing): the message must say which file the run could not write."""
    if err.errno is None or (err.filename is not None and not pathlib.Path(str(err.filename)).name.endswith(".tmp")):
        return err
    renamed = type(err)(err.errno, err.strerror or os.strerror(err.errno), str(path))
    renamed.__traceback__ = err.__traceback__
    return renamed


def atomic_write(path: str | os.PathLike, write: Callable[[Any], None], mode: str = "w") -> None:
    """Writes via a temporary file in the same directory, then renames: never a partial file. The
    file gets the permissions ``open()`` would give it (the process's umask). An OSError names ``path``."""
    path = pathlib.Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as err:
        raise naming(err, path) from None
    try:
        os.fchmod(fd, _FILE_MODE)
        with os.fdopen(fd, mode) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        if os.path.exists(tmp):
            os.unlink(tmp)
        if isinstance(err, OSError):
            raise naming(err, path) from None
        raise


def copy_file(source: str | os.PathLike, target: str | os.PathLike) -> None:
    """A whole copy or none (atomic): a report reads these files, and an interrupted copy must not look
    finished."""
    content = pathlib.Path(source).read_bytes()
    atomic_write(target, lambda f: f.write(content), mode="wb")


def write_json(path: str | os.PathLike, content: Any) -> None:
    atomic_write(path, lambda f: json.dump(content, f, indent=2, default=str))


def _fsync_directory(directory: pathlib.Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def move_file(source: str | os.PathLike, target: str | os.PathLike) -> None:
    """Moves ``source`` to ``target`` (which must not exist). A rename where it can be; across file
    systems (``EXDEV``, e.g. ``quarantine/`` on another mount than ``batches/``) a copy to ``target``,
    flushed to disk with its folder, and only then the unlink of ``source``: a crash in between leaves
    both files, never neither."""
    source, target = pathlib.Path(source), pathlib.Path(target)
    try:
        os.replace(source, target)
        return
    except OSError as err:
        if err.errno != errno.EXDEV:
            raise
    with open(source, "rb") as src, open(target, "xb") as dst:
        shutil.copyfileobj(src, dst)
        dst.flush()
        os.fsync(dst.fileno())
    shutil.copystat(source, target)
    _fsync_directory(target.parent)
    os.unlink(source)


_OS_HINTS = {
    errno.ENOSPC: "no space left on the device: free some space or use another --out, then rerun to resume",
    errno.EROFS: "the file system is read-only: use another --out",
    errno.ENAMETOOLONG: "a name on the path is longer than the file system allows: use a shorter --out",
    errno.EACCES: "permission denied: use a folder you may write to",
    errno.EPERM: "operation not permitted: use a folder you may write to",
    errno.ENOTDIR: "a file stands where a folder is needed on the path",
    errno.EXDEV: "a move across file systems failed",
    errno.EDQUOT: "disk quota exceeded: free some space or use another --out, then rerun to resume",
}


def os_error_line(err: OSError) -> str:
    """One line for an error of the operating system: the path (or paths) it concerns, the error's name
    and what to do about it."""
    paths = " -> ".join(str(p) for p in (err.filename, err.filename2) if p is not None)
    name = errno.errorcode.get(err.errno, "") if err.errno is not None else ""
    what = _OS_HINTS.get(err.errno, err.strerror or str(err))
    return f"{paths or 'a file of the run'}: {what}" + (f" ({name})" if name else "")
