"""The run store: the files of one experiment run, written atomically and checked on resume.

Layout of a run folder ``OUT``::

    OUT/run.json                                     identity: every setting that determines the maps
    OUT/batches/<variant>/batch_<b>.npz              maps of batch b (computed once): index, id, label,
                                                     predicted, seconds, run [, attribution]
    OUT/scores/<protocol>/protocol.json              the protocol's settings (preset and resolved record)
    OUT/scores/<protocol>/<variant>/batch_<b>.npz    its scores of batch b: index, id, insertion, deletion,
                                                     insertion_curve, deletion_curve, run, protocol
    OUT/results.csv, summary.json, results.md, heatmaps.png, curves.png

Maps and scores are separate, so a finished run is scored under another protocol from its
stored maps, without computing a map. The protocols are therefore not part of the run's
identity; each protocol's own settings are recorded (and checked) in its ``protocol.json``.
``run`` in every batch file is the digest of the run's identity.

This module sits below both the runner and the report layer (it imports neither).
"""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
import tempfile
from typing import Any, Callable

import numpy as np

__all__ = ["ConfigError", "FORMAT", "atomic_write", "digest", "batch_path", "maps_path", "scores_path",
           "protocol_path", "read_run", "check_run", "check_protocol", "record_protocol", "load_records",
           "MAP_KEYS", "SCORE_KEYS"]

FORMAT = 2  # run folders before this one stored one protocol's scores inside the map files

MAP_KEYS = ("index", "id", "label", "predicted", "seconds", "run")
SCORE_KEYS = ("index", "id", "insertion", "deletion", "insertion_curve", "deletion_curve", "run", "protocol")


class ConfigError(ValueError):
    """A bad flag, reported before any heavy work as one line naming the flag."""


# ----------------------------------------------------------------------------- files
def atomic_write(path: str | os.PathLike, write: Callable[[Any], None], mode: str = "w") -> None:
    """Writes via a temporary file in the same directory, then renames: never a partial file."""
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, mode) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_npz(path: str | os.PathLike, record: dict[str, np.ndarray]) -> None:
    atomic_write(path, lambda f: np.savez(f, **record), mode="wb")


def write_json(path: str | os.PathLike, content: Any) -> None:
    atomic_write(path, lambda f: json.dump(content, f, indent=2, default=str))


def digest(content: Any) -> str:
    """A short stable hash of JSON-able content (keys sorted)."""
    text = json.dumps(content, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.blake2b(text.encode(), digest_size=12).hexdigest()


def maps_path(out: str | os.PathLike, variant: str, batch: int) -> pathlib.Path:
    return pathlib.Path(out) / "batches" / variant / f"batch_{batch:05d}.npz"


batch_path = maps_path  # the name before the scores moved out of the map files


def scores_path(out: str | os.PathLike, protocol: str, variant: str, batch: int) -> pathlib.Path:
    return pathlib.Path(out) / "scores" / protocol / variant / f"batch_{batch:05d}.npz"


def protocol_path(out: str | os.PathLike, protocol: str) -> pathlib.Path:
    return pathlib.Path(out) / "scores" / protocol / "protocol.json"


# ----------------------------------------------------------------------------- identity
def read_run(out: str | os.PathLike) -> dict | None:
    """``run.json`` of a run folder (None if there is none); a clear error for an older format."""
    path = pathlib.Path(out) / "run.json"
    if not path.exists():
        return None
    try:
        stored = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ConfigError(f"--out: cannot read {path} ({err}); use another --out") from None
    if not isinstance(stored, dict) or stored.get("format") != FORMAT:
        raise ConfigError(f"--out: {out} holds a run in an older storage format (format "
                          f"{stored.get('format', 1) if isinstance(stored, dict) else '?'}, this version writes "
                          f"{FORMAT}: maps and per-protocol scores in separate files); use another --out")
    return stored


def check_run(out: str | os.PathLike, identity: dict) -> str:
    """Compares ``identity`` with the run stored in ``out`` (writing ``run.json`` for a new run);
    returns the run's digest. Raises ConfigError naming the settings that differ."""
    out = pathlib.Path(out)
    identity = json.loads(json.dumps({**identity, "format": FORMAT}, default=str))
    previous = read_run(out)
    if previous is None:
        write_json(out / "run.json", identity)
    else:
        changed = sorted(k for k in set(previous) | set(identity) if previous.get(k) != identity.get(k))
        if changed:
            raise ConfigError(f"--out: {out} holds a run with different settings ({', '.join(changed)}); "
                              "use another --out or delete it")
    return digest(identity)


def check_protocol(out: str | os.PathLike, protocol: str, definition: dict) -> str:
    """The scores of ``protocol`` stored in ``out`` must have been computed with its settings in
    ``definition``; records them for a protocol not scored yet. Returns the protocol's digest."""
    path = protocol_path(out, protocol)
    definition = json.loads(json.dumps(definition, default=str))
    if path.exists():
        try:
            stored = json.loads(path.read_text())["definition"]
        except (OSError, json.JSONDecodeError, KeyError, TypeError) as err:
            raise ConfigError(f"--protocol: cannot read {path} ({err!r}); move scores/{protocol} aside") from None
        changed = sorted(k for k in set(stored) | set(definition) if stored.get(k) != definition.get(k))
        if changed:
            raise ConfigError(f"--protocol: the {protocol} scores in {out} were computed with other {protocol} "
                              f"settings ({', '.join(changed)}); use another --out or move scores/{protocol} aside")
    else:
        write_json(path, {"name": protocol, "definition": definition})
    return digest(definition)


def record_protocol(out: str | os.PathLike, protocol: str, record: dict) -> None:
    """Adds the resolved record of an evaluation (mean colour and its source, tie break) once."""
    path = protocol_path(out, protocol)
    stored = json.loads(path.read_text())
    if "record" not in stored:
        write_json(path, {**stored, "record": dict(record)})


def protocol_record(out: str | os.PathLike, protocol: str) -> dict | None:
    path = protocol_path(out, protocol)
    if not path.exists():
        return None
    stored = json.loads(path.read_text())
    return stored.get("record", stored.get("definition"))


# ----------------------------------------------------------------------------- reading
def _batch_numbers(run: dict) -> range:
    count, size = int(run["images"]["count"]), int(run["batch_size"])
    return range(-(-count // size))


def load_records(out: str | os.PathLike, variant: str, protocol: str | None = None, *,
                 attributions: bool = False) -> dict[str, np.ndarray] | None:
    """The finished batches of a variant, concatenated in image order (None if none).

    Only the run's own batch numbers are read. With ``protocol`` (None: the only protocol
    scored, or ``la``), the protocol's scores are joined to the maps' records (batches
    without scores are left out); ``attributions`` also loads the maps themselves.
    """
    out = pathlib.Path(out)
    run = read_run(out)
    if run is None:
        return None
    if protocol is None:
        scored = sorted(p.parent.name for p in (out / "scores").glob("*/protocol.json"))
        protocol = "la" if "la" in scored or not scored else scored[0]
    parts = []
    for b in _batch_numbers(run):
        path = maps_path(out, variant, b)
        if not path.exists():
            continue
        with np.load(path, allow_pickle=False) as stored:
            record = {k: stored[k] for k in stored.files if k != "run" and (attributions or k != "attribution")}
        if protocol:
            score_file = scores_path(out, protocol, variant, b)
            if not score_file.exists():
                continue
            with np.load(score_file, allow_pickle=False) as scores:
                if not np.array_equal(scores["index"], record["index"]):
                    raise RuntimeError(f"{score_file} holds images {scores['index'].tolist()}, its maps "
                                       f"{path} images {record['index'].tolist()}: rerun the same command")
                record.update({k: scores[k] for k in SCORE_KEYS if k not in ("index", "id", "run", "protocol")})
        parts.append(record)
    if not parts:
        return None
    return {key: np.concatenate([p[key] for p in parts]) for key in parts[0]}
