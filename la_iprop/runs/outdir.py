"""Where a run may write: the rules for ``--out``, checked before anything is written, and names that fit.

Why: a run writes run.json, batches/, scores/, results.csv, summary.json, results.md and two figures
into its folder, and resuming means overwriting the reports. Given a folder that holds something else
(a committed ``results/`` section, a home directory, ``/``) it would silently replace files, and given
a folder inside its own image folder its figures would become images of the next run. So a run (and a
sweep, and every study built on runs) writes only into

- an absent or empty folder (a killed run's unfinished write of the marker itself does not count), or
- a folder that holds its own marker: ``run.json`` for a run, ``sweep.json`` for a sweep (whose folder
  holds its cells' run folders and its tables beside the marker);

never into ``/``, the home directory, or a folder inside the ``--data`` folder (or ``--tfds_data_dir``).
The path must be creatable: the nearest existing folder on it must be a folder, writable and not on a
read-only file system, and every name on it, and every name the run will create inside it, must fit the
file system's limits (255 bytes per name): otherwise the refusal is one line now, not an ``OSError``
after ``run.json`` was written. :func:`short_name` shortens derived names (with a hash of the whole
name, so distinct long names stay distinct).
"""

from __future__ import annotations

import hashlib
import os
import pathlib
import re
from typing import Iterable

from la_iprop.runs.store import ConfigError

__all__ = ["RUN_MARKER", "SWEEP_MARKER", "NAME_BUDGET", "check_out", "short_name", "file_name", "name_part",
           "data_slug", "run_inner_paths"]

RUN_MARKER = "run.json"
SWEEP_MARKER = "sweep.json"
# Derived folder names are kept to this many bytes: 55 below the usual 255-byte limit, so the suffixes
# the studies append to a run's folder name (``_la_seed<n>``) still fit.
NAME_BUDGET = 200
_HASH_CHARS = 12


def short_name(name: str, limit: int = NAME_BUDGET) -> str:
    """``name`` if it fits ``limit`` bytes (UTF-8), else its longest prefix that does with ``-`` and 12
    hex digits of its sha256 appended (distinct names stay distinct; the same name gives the same folder,
    so a rerun of the same command resumes)."""
    data = name.encode()
    if len(data) <= limit:
        return name
    keep = data[: limit - _HASH_CHARS - 1].decode("utf-8", "ignore")
    return f"{keep}-{hashlib.sha256(data).hexdigest()[:_HASH_CHARS]}"


def file_name(text: str, limit: int = NAME_BUDGET) -> str:
    """``text`` as one safe folder name: runs of other characters than letters, digits, ``._=+@-``
    become ``-`` (no ``/``, no leading dot), shortened by :func:`short_name`."""
    safe = re.sub(r"[^A-Za-z0-9._=+@-]+", "-", text).lstrip(".") or "-"
    return short_name(safe, limit)


def name_part(text: str) -> str:
    """``text`` as one part of a derived folder name: runs of other characters than letters, digits and
    ``._-`` become ``-`` (the CLIs join such parts into their default ``--out``)."""
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text)


def data_slug(data: str) -> str:
    """A data source (``--data``) as a name part: the last component of its path."""
    return name_part(data.split(":", 1)[-1].rstrip("/").split("/")[-1] or data)


def run_inner_paths(variants: Iterable[str], protocols: Iterable[str]) -> list[str]:
    """The longest paths a run creates inside its folder (a quarantined unfinished batch write), one per
    variant and protocol: each name on them must fit the file system too."""
    unfinished = ".batch_0000000.npz.xxxxxxxx.tmp.99"
    return [f"quarantine/scores/{p}/{v}/{unfinished}" for v in variants for p in protocols] + \
           [f"quarantine/batches/{v}/{unfinished}" for v in variants]


def _data_roots(data: str | None, tfds_data_dir: str | None) -> list[tuple[str, pathlib.Path]]:
    roots = []
    kind, _, arg = (data or "").partition(":")
    if kind in ("folder", "la1000") and arg:
        roots.append(("--data", pathlib.Path(os.path.realpath(os.path.expanduser(arg)))))
    if tfds_data_dir:
        roots.append(("--tfds_data_dir", pathlib.Path(os.path.realpath(os.path.expanduser(tfds_data_dir)))))
    return roots


def _limit(path: pathlib.Path, name: str, default: int) -> int:
    try:
        return int(os.pathconf(path, name))
    except (OSError, ValueError):
        return default


def _nearest_existing(path: pathlib.Path) -> pathlib.Path:
    while not os.path.lexists(path) and path.parent != path:
        path = path.parent
    return path


def _check_creatable(flag: str, out: pathlib.Path, resolved: pathlib.Path, inner: Iterable[str]) -> None:
    existing = _nearest_existing(resolved)
    if not existing.is_dir():
        raise ConfigError(f"{flag}: {out}: {existing} is not a folder (a file is on the path)")
    name_max = _limit(existing, "PC_NAME_MAX", 255)
    path_max = _limit(existing, "PC_PATH_MAX", 4096)
    for part in [*out.parts, *(p for rel in inner for p in rel.split("/"))]:
        if len(part.encode()) > name_max:
            raise ConfigError(f"{flag}: the name {part[:40]!r}... on {out} is {len(part.encode())} bytes, longer "
                              f"than the file system's limit of {name_max}; use a shorter name")
    longest = max((len(rel.encode()) + 1 for rel in inner), default=0)
    if len(str(resolved).encode()) + longest >= path_max:
        raise ConfigError(f"{flag}: {out} is too long: the paths of the run inside it would exceed the file "
                          f"system's limit of {path_max} bytes; use a shorter --out")
    try:
        read_only = bool(os.statvfs(existing).f_flag & os.ST_RDONLY)
    except OSError:
        read_only = False
    if read_only:
        raise ConfigError(f"{flag}: {existing} is on a read-only file system; use another {flag}")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"{flag}: no permission to write in {existing}; use another {flag}")


def _entries(flag: str, out: pathlib.Path, marker: str) -> list[str]:
    """The entries of ``out`` that are not a killed process's unfinished write of the marker."""
    try:
        names = sorted(os.listdir(out))
    except OSError as err:
        raise ConfigError(f"{flag}: cannot list {out}: {err.strerror}") from None
    unfinished = re.compile(rf"\.{re.escape(marker)}\..*\.tmp")
    return [n for n in names if not unfinished.fullmatch(n)]


def check_out(out: str | os.PathLike, *, marker: str = RUN_MARKER, what: str = "run", flag: str = "--out",
              data: str | None = None, tfds_data_dir: str | None = None, inner: Iterable[str] = ()) -> None:
    """Refuses (ConfigError, one line naming the folder) an output folder a ``what`` must not write into;
    see the module docstring. ``inner``: relative paths the ``what`` will create inside it."""
    if not isinstance(out, (str, os.PathLike)) or not str(out):
        raise ConfigError(f"{flag}: an output folder is required")
    inner = list(inner)
    given = pathlib.Path(os.path.expanduser(str(out)))
    resolved = pathlib.Path(os.path.realpath(given))
    if resolved.parent == resolved:
        raise ConfigError(f"{flag}: {out} is the root of the file system; give a folder of its own")
    home = os.path.realpath(os.path.expanduser("~"))
    if str(resolved) == home:
        raise ConfigError(f"{flag}: {out} is the home directory; give a folder of its own, e.g. {out}/runs/NAME")
    for source_flag, root in _data_roots(data, tfds_data_dir):
        if resolved == root or root in resolved.parents:
            raise ConfigError(f"{flag}: {out} is inside the {source_flag} folder {root}: its files would be read as "
                              f"images of the next run; use a folder outside it")
    _check_creatable(flag, given, resolved, inner)
    if not os.path.isdir(resolved):
        return
    entries = _entries(flag, resolved, marker)
    if not entries or marker in entries:
        return
    shown = ", ".join(entries[:3]) + (f" and {len(entries) - 3} more" if len(entries) > 3 else "")
    raise ConfigError(f"{flag}: {out} is not empty and holds no {marker} (it holds {shown}): a {what} writes only "
                      f"into an empty folder or its own {what} folder; use another {flag}")
