"""Content checksums of the run's batch files: a damaged byte anywhere in a file is found on resume.

Why: a resumed run used to check a batch file's header only (keys, shapes, images, run digest), so
one flipped byte inside the maps passed and surfaced later (an error at the figure step) or never.
Each batch file written by :func:`la_iprop.runs.store.write_npz` now holds ``checksum``: the sha256
of every other array's name, dtype, shape and bytes, in sorted key order; :func:`read_verified`
reads every array of a file in full and recomputes it. (Reading in full also makes ``zipfile`` check
each member's CRC-32, which catches most damage to the stored bytes before the sha256 does; the
sha256 also catches a file rewritten with other values under the old checksum.)
"""

from __future__ import annotations

import hashlib
import os
from typing import Any, Iterable, Mapping

import numpy as np

__all__ = ["CHECKSUM", "ALGORITHM", "content_checksum", "with_checksum", "read_verified"]

CHECKSUM = "checksum"  # the array (a 0-d string) that holds a batch file's checksum
ALGORITHM = "sha256"   # recorded in run.json ("checksums"): the run's batch files all carry one


def _update(h, key: str, array: np.ndarray) -> None:
    array = np.ascontiguousarray(array)
    h.update(f"{key}\0{array.dtype.str}\0{array.shape}\0".encode())
    h.update(array.tobytes())


def content_checksum(arrays: Mapping[str, Any]) -> str:
    """sha256 over the arrays other than ``checksum``: name, dtype, shape and bytes, keys sorted."""
    h = hashlib.new(ALGORITHM)
    for key in sorted(k for k in arrays if k != CHECKSUM):
        _update(h, key, np.asarray(arrays[key]))
    return h.hexdigest()


def with_checksum(record: Mapping[str, Any]) -> dict[str, Any]:
    """``record`` plus its ``checksum`` (what :func:`la_iprop.runs.store.write_npz` stores)."""
    record = {k: v for k, v in record.items() if k != CHECKSUM}
    return {**record, CHECKSUM: np.asarray(content_checksum(record))}


def read_verified(path: str | os.PathLike, names: Iterable[str], keep_headers: Iterable[str] = ()
                  ) -> tuple[str | None, dict[str, np.ndarray], dict[str, tuple[tuple[int, ...], np.dtype]], bool]:
    """Reads every array of the ``.npz`` at ``path`` in full (``names``: its members without ``.npy``),
    one at a time, and checks its checksum when it has one.

    Returns ``(problem, arrays, headers, checksummed)``: ``problem`` None or what is wrong (``checksum
    mismatch``); ``arrays`` every array except those in ``keep_headers`` (large: only their shape and
    dtype are kept, in ``headers``); ``checksummed`` whether the file holds a checksum. Errors of
    reading (a damaged zip member, a bad header) propagate to the caller, which names the file.
    """
    keep_headers = set(keep_headers)
    names = sorted(names)
    h = hashlib.new(ALGORITHM)
    arrays: dict[str, np.ndarray] = {}
    headers: dict[str, tuple[tuple[int, ...], np.dtype]] = {}
    with np.load(path, allow_pickle=False) as stored:
        for key in names:
            array = stored[key]
            if key != CHECKSUM:
                _update(h, key, array)
            if key in keep_headers:
                headers[key] = (tuple(array.shape), array.dtype)
            else:
                arrays[key] = array
            del array
    if CHECKSUM not in names:
        return None, arrays, headers, False
    recorded = arrays.pop(CHECKSUM)
    if recorded.shape != () or str(recorded) != h.hexdigest():
        return "checksum mismatch (its content changed after it was written)", arrays, headers, True
    return None, arrays, headers, True
