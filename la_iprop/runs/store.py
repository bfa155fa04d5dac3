"""The run store: the files of one experiment run, written atomically and checked on resume.

Layout of a run folder ``OUT``::

    OUT/run.json                                     identity: every setting that determines the maps, and
                                                     the images (dataset indices, ids, content hashes)
    OUT/batches/<variant>/batch_<b>.npz              maps of batch b (computed once): index, id, hash, label,
                                                     predicted, seconds, run [, attribution]
    OUT/scores/<protocol>/protocol.json              the protocol's settings (preset and resolved record)
    OUT/scores/<protocol>/<variant>/batch_<b>.npz    its scores of batch b: index, id, hash, insertion,
                                                     deletion, insertion_curve, deletion_curve, run, protocol
    OUT/quarantine/...                               batch files that failed their check, moved aside (never
                                                     deleted) under their own relative path; ``log.txt`` says why
    OUT/results.csv, summary.json, results.md, heatmaps.png, curves.png

Maps and scores are separate, so a finished run is scored under another protocol from its
stored maps, without computing a map. The protocols are therefore not part of the run's
identity; each protocol's own settings are recorded (and checked) in its ``protocol.json``.

What a resumed run checks: ``run.json`` against the settings and the images it would use
now (an image added to, removed from or changed in a folder is a different run, refused
with a line naming the images); then every batch file of the run is checked against
what it must hold — readable, the expected keys, ``run`` (the digest of the identity),
``protocol`` (the digest of the protocol's settings), the dataset indices, ids and content
hashes of exactly its batch, one row per image, map shape and dtype, curve length, and its
content checksum (:mod:`la_iprop.runs.checksums`: every array is read in full and its sha256
recomputed, so a byte damaged anywhere is found). A file that fails (corrupt, short, another
run's, another image set's, another content than it was written with) or that is not a batch of
the run (a stray name or batch number) is moved to ``OUT/quarantine/`` (a copy and an unlink when
that is on another file system) and recomputed, so rerunning the same command always ends. While
the run goes on, each batch's images are hashed again when the batch is loaded
(:func:`check_unchanged`): an image replaced during the run is refused by name instead of being
scored on pixels its run.json does not describe.

Run folders written before the checksums (their run.json has no ``"checksums"`` entry) still
resume: their batch files are read in full (the zip's CRC-32 of every array) and checked as before,
and the batches they compute from then on carry a checksum. A run.json with ``"checksums"``
requires one in every batch file (a file without it is quarantined and recomputed). To bring an
old run wholly under checksums, move its ``batches/`` and ``scores/`` aside and rerun the command.

This module sits below both the runner and the report layer (it imports neither).
"""

from __future__ import annotations

import datetime
import hashlib
import json
import logging
import os
import pathlib
import re
import zipfile
from typing import Any, Callable, Sequence

import numpy as np

from la_iprop.runs.checksums import ALGORITHM, CHECKSUM, read_verified, with_checksum
from la_iprop.runs.files import atomic_write, copy_file, move_file, write_json
from la_iprop.runs.fingerprint import (
    _few,
    changed_images,
    describe_image_change,
    describe_setting_changes,
    image_hashes,
)

__all__ = ["ConfigError", "FORMAT", "atomic_write", "copy_file", "write_json", "write_npz", "digest", "batch_path",
           "maps_path", "scores_path", "protocol_path", "read_run", "check_run", "run_checksums", "check_protocol",
           "record_protocol", "load_records", "image_hashes", "changed_images", "describe_image_change", "BatchSpec",
           "check_maps_file", "check_scores_file", "quarantine", "scan", "MAP_KEYS", "SCORE_KEYS"]

log = logging.getLogger("la_iprop")

FORMAT = 2  # run folders before this one stored one protocol's scores inside the map files

MAP_KEYS = ("index", "id", "hash", "label", "predicted", "seconds", "run")
SCORE_KEYS = ("index", "id", "hash", "insertion", "deletion", "insertion_curve", "deletion_curve", "run", "protocol")
BATCH_NAME = re.compile(r"batch_(\d{5,})\.npz")
# Files of a variant's folder that are not batches and stay where they are: a named IProp variant's
# settings (``batches/METHOD+iprop@LABEL/iprop.json``, checked by the engine).
KEPT_NAMES = ("iprop.json",)
UNFINISHED_NAME = re.compile(r"\.batch_(\d{5,})\.npz\..*\.tmp")  # atomic_write's temporary files


class ConfigError(ValueError):
    """A bad flag, reported before any heavy work as one line naming the flag."""


# ----------------------------------------------------------------------------- files
def write_npz(path: str | os.PathLike, record: dict[str, np.ndarray]) -> None:
    """A batch file, atomically, with the checksum of its content (:mod:`la_iprop.runs.checksums`)."""
    record = with_checksum(record)
    atomic_write(path, lambda f: np.savez(f, **record), mode="wb")


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
    returns the run's digest. Raises ConfigError naming the settings that differ, or, when only
    the images differ, the images that were added, dropped or changed."""
    out = pathlib.Path(out)
    identity = json.loads(json.dumps({**identity, "format": FORMAT}, default=str))
    previous = read_run(out)
    if previous is None:
        write_json(out / "run.json", {**identity, "checksums": ALGORITHM})
    else:
        previous = _identity_of(previous)
        changed = sorted(k for k in set(previous) | set(identity) if previous.get(k) != identity.get(k))
        data_keys = {"images", "reference"}
        if changed and set(changed) <= data_keys:
            what = "; ".join(describe_image_change(previous.get(k) or {}, identity.get(k) or {},
                                                   "reference set" if k == "reference" else "images")
                             for k in changed)
            raise ConfigError(f"--data: {identity.get('data')} changed since the run in {out} started: {what}; its "
                              "results would mix two image sets: use another --out (or restore the images)")
        if changed:
            what = describe_setting_changes(previous, identity)
            raise ConfigError(f"--out: {out} holds a run with different settings ({what}); use another --out or "
                              "delete it")
    return digest(identity)



# Entries of run.json about how the store keeps the run, not what the run is: neither compared nor digested
# (a run folder written before checksums resumes under the same identity and digest).
_STORE_KEYS = ("checksums",)


def _identity_of(run: dict) -> dict:
    return {k: v for k, v in run.items() if k not in _STORE_KEYS}


def run_checksums(out: str | os.PathLike) -> bool:
    """Whether the run in ``out`` records content checksums (then every batch file must hold one)."""
    run = read_run(out)
    return bool(run and run.get("checksums"))


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
def run_batches(run: dict, digest_: str | None = None) -> list[BatchSpec]:
    """The batches of a stored run (from its ``run.json``)."""
    images, size = run["images"], int(run["batch_size"])
    count = int(images["count"])
    hashes = images.get("hashes")
    return [BatchSpec(b, images["indices"][b * size:(b + 1) * size], images["ids"][b * size:(b + 1) * size],
                      None if hashes is None else hashes[b * size:(b + 1) * size],
                      digest_ or digest(_identity_of(run)), checksums=bool(run.get("checksums")))
            for b in range(-(-count // size))]


def _check_indices(path: pathlib.Path, stored, spec: BatchSpec) -> None:
    if not np.array_equal(stored["index"], spec.indices):
        raise RuntimeError(f"{path} does not hold the images of batch {spec.number}: rerun the same command (the "
                           "file is moved aside and recomputed)")


def load_records(out: str | os.PathLike, variant: str, protocol: str | None = None, *,
                 attributions: bool = False) -> dict[str, np.ndarray] | None:
    """The finished batches of a variant, concatenated in image order (None if none).

    Only the run's own batch files are read, and each must hold its batch's images (else a
    RuntimeError names it: rerunning the run's command moves it aside and recomputes it). With
    ``protocol`` (None: ``la`` if it was scored, else the only protocol scored), the protocol's
    scores are joined to the maps' records (batches without scores are left out);
    ``attributions`` also loads the maps themselves.
    """
    out = pathlib.Path(out)
    run = read_run(out)
    if run is None:
        return None
    if protocol is None:
        scored = sorted(p.parent.name for p in (out / "scores").glob("*/protocol.json"))
        protocol = "la" if "la" in scored or not scored else scored[0]
    parts = []
    for spec in run_batches(run):
        path = maps_path(out, variant, spec.number)
        if not path.exists():
            continue
        with np.load(path, allow_pickle=False) as stored:
            _check_indices(path, stored, spec)
            record = {k: stored[k] for k in stored.files
                      if k not in ("run", CHECKSUM) and (attributions or k != "attribution")}
        if protocol:
            path = scores_path(out, protocol, variant, spec.number)
            if not path.exists():
                continue
            with np.load(path, allow_pickle=False) as scores:
                _check_indices(path, scores, spec)
                record.update({k: scores[k] for k in SCORE_KEYS if k not in ("index", "id", "hash", "run", "protocol")})
        parts.append(record)
    if not parts:
        return None
    return {key: np.concatenate([p[key] for p in parts]) for key in parts[0]}


# ----------------------------------------------------------------------------- checking batch files
class BatchSpec:
    """What one batch file must hold: its images (dataset indices, ids, content hashes) and run;
    ``checksums``: whether it must hold a content checksum (False only for runs begun before them)."""

    def __init__(self, number: int, indices: Sequence[int], ids: Sequence[str], hashes: Sequence[str] | None,
                 run: str, *, checksums: bool = True):
        self.number, self.run, self.checksums = number, run, checksums
        self.indices = np.asarray(indices, np.int64)
        self.ids = [str(i) for i in ids]
        self.hashes = None if hashes is None else [str(h) for h in hashes]

    def __len__(self) -> int:
        return len(self.indices)


def _check_common(path: pathlib.Path, spec: BatchSpec, keys: Sequence[str], big: Sequence[str]
                  ) -> tuple[str | None, dict, dict]:
    """Reads every array in full and checks the file's checksum; returns (problem, arrays except ``big``,
    shapes and dtypes of ``big``)."""
    try:
        with zipfile.ZipFile(path) as archive:
            names = {n[:-4] for n in archive.namelist() if n.endswith(".npy")}
        missing = [k for k in keys if k not in names]
        if missing:
            return f"lacks {', '.join(missing)}", {}, {}
        problem, arrays, headers, checksummed = read_verified(path, names, big)
    except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile, zipfile.LargeZipFile) as err:
        return f"unreadable ({type(err).__name__}: {err})", {}, {}
    if problem:
        return problem, {}, {}
    if spec.checksums and not checksummed:
        return "has no content checksum (the run records one in every batch file)", {}, {}
    if not np.array_equal(arrays["index"].reshape(-1), spec.indices) or arrays["id"].reshape(-1).tolist() != spec.ids:
        return (f"holds images {_few([str(i) for i in arrays['id'].reshape(-1).tolist()])}, batch {spec.number} "
                f"is {_few(spec.ids)}"), arrays, headers
    if spec.hashes is not None and arrays["hash"].reshape(-1).tolist() != spec.hashes:
        return "holds other image content (hashes differ)", arrays, headers
    if str(arrays["run"]) != spec.run:
        return "written by a run with other settings", arrays, headers
    n = len(spec)
    short = sorted(k for k, v in arrays.items() if k not in ("run", "protocol") and (v.ndim == 0 or len(v) != n))
    if short:
        return f"{', '.join(short)} not {n} rows", arrays, headers
    return None, arrays, headers


def check_maps_file(path: pathlib.Path, spec: BatchSpec, *, image_shape: tuple[int, ...] | None,
                    dtype: str | None) -> str | None:
    """None if the maps file of a batch is sound, else what is wrong. ``image_shape``: the maps'
    shape per image when they must be stored (``save_attributions``), else None."""
    keys = MAP_KEYS + (("attribution",) if image_shape is not None else ())
    problem, _, headers = _check_common(path, spec, keys, ("attribution",))
    if problem or image_shape is None:
        return problem
    shape, stored_dtype = headers["attribution"]
    if shape != (len(spec), *image_shape):
        return f"attribution has shape {shape}, expected {(len(spec), *image_shape)}"
    if dtype is not None and stored_dtype != np.dtype(dtype):
        return f"attribution is {stored_dtype}, the run is {dtype}"
    return None


def check_scores_file(path: pathlib.Path, spec: BatchSpec, *, protocol: str, curve_length: int) -> str | None:
    """None if the scores file of a batch is sound for the protocol with digest ``protocol``."""
    problem, arrays, _ = _check_common(path, spec, SCORE_KEYS, ())
    if problem:
        return problem
    if str(arrays["protocol"]) != protocol:
        return "scored under other protocol settings"
    for key in ("insertion_curve", "deletion_curve"):
        if arrays[key].shape != (len(spec), curve_length):
            return f"{key} has shape {arrays[key].shape}, expected {(len(spec), curve_length)}"
    if not all(np.isfinite(arrays[k]).all() for k in ("insertion", "deletion", "insertion_curve", "deletion_curve")):
        return "holds non-finite scores"
    return None


def quarantine(out: str | os.PathLike, path: str | os.PathLike, reason: str) -> pathlib.Path:
    """Moves ``path`` (inside ``out``) to ``out/quarantine/<same relative path>`` (``.1``, ``.2``...
    when that name is taken), logs why to ``out/quarantine/log.txt``; never deletes anything (across file
    systems the file is copied, flushed to disk, then unlinked: :func:`la_iprop.runs.files.move_file`)."""
    out, path = pathlib.Path(out), pathlib.Path(path)
    relative = path.relative_to(out)
    target = out / "quarantine" / relative
    k = 0
    while target.exists():
        k += 1
        target = out / "quarantine" / relative.with_name(f"{relative.name}.{k}")
    target.parent.mkdir(parents=True, exist_ok=True)
    move_file(path, target)
    stamp = datetime.datetime.now().isoformat(timespec="seconds")
    with open(out / "quarantine" / "log.txt", "a") as f:
        f.write(f"{stamp} {relative} -> {target.relative_to(out)}: {reason}\n")
    log.warning("%s: %s; moved to %s", relative, reason, target.relative_to(out))
    return target


def scan(out: str | os.PathLike, directory: str | os.PathLike, check: Callable[[int, pathlib.Path], str | None],
         *, batches: int, mine: Callable[[int], bool], strays: bool, unfinished: bool = False
         ) -> list[tuple[str, str]]:
    """Checks the batch files of one directory (``batches/<variant>`` or ``scores/<protocol>/<variant>``):
    files of this process's batches (``mine``) with ``check``, and with ``strays`` every other entry
    that is not a batch of the run (another name, or a batch number >= ``batches``). Moves each file that
    fails to the quarantine; returns ``(relative path, reason)`` of those. Folders and hidden files are
    left alone, except the temporary files of writes that a killed run left unfinished (``.batch_*.tmp``):
    those of this process's batches (only this process writes them), and with ``unfinished`` (only one
    process writes to the run) every one."""
    out, directory = pathlib.Path(out), pathlib.Path(directory)
    moved = []
    if not directory.is_dir():
        return moved
    for path in sorted(directory.iterdir()):
        if path.is_dir():
            continue
        if path.name.startswith("."):
            temporary = UNFINISHED_NAME.fullmatch(path.name)
            own = temporary is not None and int(temporary.group(1)) < batches and mine(int(temporary.group(1)))
            if (unfinished and path.name.startswith(".batch_") and path.name.endswith(".tmp")) or own:
                reason = "an unfinished write (the run was stopped while writing it)"
                quarantine(out, path, reason)
                moved.append((str(path.relative_to(out)), reason))
            continue
        if path.name in KEPT_NAMES:
            continue
        match = BATCH_NAME.fullmatch(path.name)
        number = int(match.group(1)) if match else None
        if number is None or number >= batches or path.name != f"batch_{number:05d}.npz":
            if strays:
                reason = (f"batch {number} does not exist in this run ({batches} batches)" if number is not None
                          else "not a batch file of this run")
                quarantine(out, path, reason)
                moved.append((str(path.relative_to(out)), reason))
            continue
        if not mine(number):
            continue
        problem = check(number, path)
        if problem:
            quarantine(out, path, problem)
            moved.append((str(path.relative_to(out)), problem))
    return moved
