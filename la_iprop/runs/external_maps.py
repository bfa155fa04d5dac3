"""Attribution maps made by any tool (Captum, PyTorch, numpy), scored and propagated by the runner.

File format: one ``.npz`` (``np.savez(FILE, ids=ids, captum_ig=maps, ...)``) holding

- ``ids``: ``[N]`` strings, the image ids as the data source names them
  (``la_iprop.data.open_source(DATA).ids``: ``"0"`` .. ``"999"`` for ``la1000:``, the file's path
  relative to the folder for ``folder:``, ``"chelsea"``... for ``samples``);
- one or more map arrays, each key a method/variant name (``[A-Za-z0-9][A-Za-z0-9_.-]*``, e.g.
  ``captum_ig``), each ``N`` maps **in the order of** ``ids``, real floats (float16/32/64), in one of
  the layouts ``[N, 3, H, W]`` (``nchw``, PyTorch), ``[N, H, W, 3]`` (``nhwc``) or one value per
  pixel: ``[N, H, W]``, ``[N, 1, H, W]``, ``[N, H, W, 1]`` (``hw``). The layout is read off the
  shape; a shape two layouts fit (H or W equal to 1 or 3) is refused unless ``--layout`` names it;
- optionally ``labels``: ``[N]`` ints, the class each map explains (what was passed to the tool
  as its target). The insertion/deletion curves then score that class; without ``labels`` they
  score the model's top-1 class on the clean image (the protocol of both papers, as
  ``experiments.imagenet`` does). Either way the class is the ``predicted`` column of the results.

Maps are matched to images by id, not by position; the run takes the images in the file's
order. The maps must be made on the images as the data source yields them at the model's input
size (``open_source(DATA, size=model.input_size)``: shorter side resized, centre crop), in [0, 1]
pixel space; a map of another size is refused (nothing is resized). Per-pixel maps are broadcast
over the 3 channels, as IProp's output is in the runner (protocol ``la`` then ranks the three
channels of a pixel as ties, in index order).

Everything is checked before anything is written, with one line naming the key (and the id):
the layout, the size, the dtype (floats only; no object arrays: the file is read with
``allow_pickle=False``), finite values (after the cast to the run's precision), known and unique
ids, labels in range. An untrusted file cannot make the reader allocate more than its declared
content: every member's ``.npy`` header (shape, dtype) is read first and must match the member's
size, ``ids`` cannot hold more ids than the data source has images, and maps are read a batch at a
time (and once in chunks for the finiteness check), never whole.

How the runner uses this (:class:`ExternalMaps` is ``RunConfig.external``): each key is a variant
whose maps are read from the file instead of computed, written to ``batches/<key>/`` like a
method's, and scored under every protocol; ``--iprop`` adds ``KEY+iprop`` and ``KEY+ctrl``
computed from the stored maps. The run's identity holds the file's sha256, so another file never
resumes into an old run, and the same command skips the work already done.
"""

from __future__ import annotations

import hashlib
import logging
import os
import pathlib
import re
import zipfile
from typing import Any, Sequence

import numpy as np

from la_iprop.precision import precision_dtype
from la_iprop.runs.map_layouts import LAYOUTS, MapArray, detect_layout, few, parse_layouts, shape_text
from la_iprop.runs.store import ConfigError, read_run

__all__ = ["ExternalMaps", "MapArray", "LAYOUTS", "RESERVED_KEYS", "open_maps", "parse_layouts", "detect_layout",
           "run_maps"]

log = logging.getLogger("la_iprop")

RESERVED_KEYS = ("ids", "labels")
KEY_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,99}")
CHUNK_BYTES = 64 << 20  # the finiteness check reads a map array this much at a time


def _header(archive: zipfile.ZipFile, info: zipfile.ZipInfo) -> tuple[tuple[int, ...], bool, np.dtype, int]:
    """``(shape, fortran_order, dtype, data offset)`` of one ``.npy`` member, from its header only."""
    with archive.open(info) as f:
        version = np.lib.format.read_magic(f)
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
        elif version == (2, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
        else:
            raise ValueError(f".npy format version {version[0]}.{version[1]} (expected 1.0 or 2.0)")
        return tuple(int(s) for s in shape), bool(fortran), np.dtype(dtype), f.tell()


def _file_state(path: pathlib.Path) -> tuple[int, int]:
    stat = path.stat()
    return stat.st_size, stat.st_mtime_ns


def _sha256(path: pathlib.Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


class ExternalMaps:
    """A checked maps file (see the module docstring); ``RunConfig.external`` of its run.

    :func:`open_maps` reads the headers; :meth:`check` (called by the runner's ``prepare`` with the
    model and the data source) reads ``ids``/``labels`` and checks every value; :meth:`read` gives
    a batch's maps in NHWC."""

    def __init__(self, path: pathlib.Path, sha256: str, arrays: dict[str, MapArray], count: int,
                 ids_header: tuple, labels_header: tuple | None, state: tuple[int, int]):
        self.path, self.sha256, self.arrays, self.count = path, sha256, arrays, count
        self._ids_header, self._labels_header, self._state = ids_header, labels_header, state
        self.ids: list[str] | None = None
        self.labels: np.ndarray | None = None   # [N] int64 when the file has labels (after check)
        self._rows: dict[str, int] = {}          # id -> row of the file
        self._source_index: dict[str, int] = {}  # id -> dataset index
        self._open: dict[str, tuple[zipfile.ZipFile, Any]] = {}

    # What a run records about the file.
    @property
    def keys(self) -> tuple[str, ...]:
        return tuple(self.arrays)

    @property
    def has_labels(self) -> bool:
        return self._labels_header is not None

    def identity(self) -> dict:
        """What determines the run's maps: the file's content and how it is read."""
        return {"sha256": self.sha256, "layouts": {k: a.layout for k, a in self.arrays.items()},
                "labels": "file" if self.has_labels else "predicted"}

    def describe(self) -> dict:
        per_pixel = [k for k, a in self.arrays.items() if a.per_pixel]
        return {
            "file": str(self.path), "sha256": self.sha256, "bytes": self._state[0], "images": self.count,
            "maps": {k: a.describe() for k, a in self.arrays.items()},
            "explained_class": ("the file's labels array (the predicted column holds it)" if self.has_labels else
                                "the model's top-1 prediction on the clean image"),
            "per_pixel": (f"{', '.join(per_pixel)}: one value per pixel, broadcast over the 3 channels (as IProp's "
                          "output is); protocol la ranks a pixel's 3 channels as ties, in index order"
                          if per_pixel else "none"),
            "seconds": "0 for the maps read from the file (made elsewhere); KEY+iprop and KEY+ctrl: IProp's time"}

    def __repr__(self) -> str:
        return f"ExternalMaps({str(self.path)!r}, sha256={self.sha256[:12]}, keys={list(self.keys)})"

    __str__ = __repr__

    def __deepcopy__(self, memo) -> ExternalMaps:  # immutable once checked (dataclasses.asdict copies fields)
        return self

    # Checks that need the model and the data source.
    def check(self, model, source, precision: str = "float32") -> None:
        """Every check that needs the model (input size, classes) and the data source (ids), and
        every map value (finite in ``precision``). Raises ConfigError; reads the maps in chunks."""
        size, name = int(model.input_size), getattr(model, "name", "the model")
        for key, array in self.arrays.items():
            if array.spatial != (size, size):
                h, w = array.spatial
                raise ConfigError(f"--maps: {key} holds {h}x{w} maps ({array.layout}, shape "
                                  f"{shape_text(array.shape)}), {name} takes {size}x{size} images; make the maps "
                                  f"on the images at the model's input size (maps are not resized)")
        self._read_ids(source)
        if self.has_labels:
            self._read_labels(int(getattr(model, "num_classes", 0)) or None)
        for key in self.keys:
            try:
                self._check_values(key, precision_dtype(precision))
            except (OSError, EOFError, zipfile.BadZipFile) as err:  # e.g. a CRC mismatch: a damaged member
                raise ConfigError(f"--maps: {key}: unreadable ({type(err).__name__}: {err})") from None

    def _member(self, archive: zipfile.ZipFile, name: str):
        return archive.open(f"{name}.npy")

    def _read_small(self, name: str, header: tuple) -> np.ndarray:
        shape, _, dtype, offset = header
        try:
            with zipfile.ZipFile(self.path) as archive, self._member(archive, name) as f:
                f.seek(offset)
                data = f.read(shape[0] * dtype.itemsize)
                if f.read(1):
                    raise ConfigError(f"--maps: {name} holds more bytes than its header says (a damaged file)")
        except (OSError, EOFError, zipfile.BadZipFile) as err:
            raise ConfigError(f"--maps: {name}: unreadable ({type(err).__name__}: {err})") from None
        if len(data) != shape[0] * dtype.itemsize:
            raise ConfigError(f"--maps: {self.path}: {name} is shorter than its header says (a damaged file)")
        return np.frombuffer(data, dtype=dtype, count=shape[0])

    def _read_ids(self, source) -> None:
        source_ids = [str(i) for i in source.ids]
        if self.count > len(source_ids):
            raise ConfigError(f"--maps: ids holds {self.count} ids, the data source has only {len(source_ids)} "
                              "images (one map per image)")
        longest = max((len(i) for i in source_ids), default=0)
        dtype = self._ids_header[2]
        chars = dtype.itemsize // (4 if dtype.kind == "U" else 1)
        if chars > max(2 * longest, 64):  # (bounds what reading them allocates)
            raise ConfigError(f"--maps: ids are strings of up to {chars} characters, far longer than any id of the "
                              f"data source (up to {longest} characters, e.g. {few(source_ids[:2], 2)})")
        raw = self._read_small("ids", self._ids_header)
        ids = [x.decode("utf-8", "replace") if isinstance(x, bytes) else str(x) for x in raw.tolist()]
        seen, duplicated = set(), []
        for i in ids:
            if i in seen and i not in duplicated:
                duplicated.append(i)
            seen.add(i)
        if duplicated:
            raise ConfigError(f"--maps: ids holds {few(duplicated)} more than once; one map per image")
        known = set(source_ids)
        unknown = [i for i in ids if i not in known]
        if unknown:
            raise ConfigError(f"--maps: {len(unknown)} id(s) are not images of the data source: {few(unknown)}; "
                              f"ids are its image ids (e.g. {few(source_ids[:3])})")
        self.ids = ids
        self._rows = {i: r for r, i in enumerate(ids)}
        self._source_index = {i: n for n, i in enumerate(source_ids)}

    def _read_labels(self, num_classes: int | None) -> None:
        labels = self._read_small("labels", self._labels_header).astype(np.int64)
        bad = np.flatnonzero((labels < 0) | (labels >= num_classes if num_classes else False))
        if len(bad):
            r = int(bad[0])
            raise ConfigError(f"--maps: labels holds class {int(labels[r])} (id {self.ids[r]!r}); the model has "
                              f"{num_classes} classes (0 to {num_classes - 1})")
        self.labels = labels

    def _check_values(self, key: str, dtype: np.dtype) -> None:
        """Every map of ``key`` finite, also once cast to ``dtype``; names the first bad id."""
        array = self.arrays[key]
        per_chunk = max(1, CHUNK_BYTES // max(array.row_bytes, 1))
        with zipfile.ZipFile(self.path) as archive, self._member(archive, key) as f:
            f.seek(array.offset)
            for start in range(0, self.count, per_chunk):
                n = min(per_chunk, self.count - start)
                data = f.read(n * array.row_bytes)
                if len(data) != n * array.row_bytes:
                    raise ConfigError(f"--maps: {key} is shorter than its header says (a damaged file)")
                rows = np.frombuffer(data, array.dtype).reshape(n, -1)
                finite = np.isfinite(rows).all(axis=1)
                if finite.all():
                    with np.errstate(over="ignore"):
                        finite = np.isfinite(rows.astype(dtype)).all(axis=1)
                    if not finite.all():
                        r = start + int(np.flatnonzero(~finite)[0])
                        raise ConfigError(f"--maps: {key}: the map of id {self.ids[r]!r} has values beyond the range "
                                          f"of {dtype.name} (the run's precision); rescale the maps or use "
                                          "--precision=float64")
                    continue
                r = start + int(np.flatnonzero(~finite)[0])
                raise ConfigError(f"--maps: {key}: the map of id {self.ids[r]!r} holds NaN or infinite values; "
                                  "expected finite scores (higher = more important)")
            if f.read(1):
                raise ConfigError(f"--maps: {key} holds more bytes than its header says (a damaged file)")

    # What the runner asks for.
    def indices(self, source) -> np.ndarray:
        """Dataset indices of the run's images: the file's ids, in the file's order."""
        if self.ids is None:
            self._read_ids(source)
        return np.asarray([self._source_index[i] for i in self.ids], np.int64)

    def labels_of(self, ids: Sequence[str]) -> np.ndarray:
        """The file's labels of ``ids`` (int32); only for a file with labels."""
        return self.labels[[self._rows[str(i)] for i in ids]].astype(np.int32)

    def read(self, key: str, ids: Sequence[str], dtype: Any = np.float32) -> np.ndarray:
        """The maps of ``ids`` (a batch) as ``[n, H, W, 3]`` of ``dtype``, read from the file."""
        if _file_state(self.path) != self._state:
            raise RuntimeError(f"{self.path} changed while the run was going (its sha256 is part of the run's "
                               "identity): rerun the command")
        array = self.arrays[key]
        rows = [self._rows[str(i)] for i in ids]
        out = np.empty((len(rows), *array.shape[1:]), array.dtype)
        f = self._stream(key)
        for n, row in sorted(enumerate(rows), key=lambda item: item[1]):  # forward reads of the member
            f.seek(array.offset + row * array.row_bytes)
            data = f.read(array.row_bytes)
            if len(data) != array.row_bytes:
                raise RuntimeError(f"{self.path}: {key} is shorter than its header says (a damaged file)")
            out[n] = np.frombuffer(data, array.dtype).reshape(array.shape[1:])
        return array.to_nhwc(out, dtype)

    def _stream(self, key: str):
        """The member of ``key``, kept open between batches (a compressed member seeks forward cheaply)."""
        if key not in self._open:
            archive = zipfile.ZipFile(self.path)
            self._open[key] = (archive, self._member(archive, key))
        return self._open[key][1]

    def close(self) -> None:
        for archive, f in self._open.values():
            f.close()
            archive.close()
        self._open.clear()


def open_maps(path: str | os.PathLike, layouts: dict[str, str] | None = None) -> ExternalMaps:
    """Reads and checks the structure of a maps file from its ``.npy`` headers (no map data);
    ``layouts``: :func:`parse_layouts` of ``--layout``. Raises ConfigError (one line)."""
    path = pathlib.Path(path)
    layouts = dict(layouts or {})
    if not path.is_file():
        raise ConfigError(f"--maps: file not found: {path}")
    state = _file_state(path)
    try:
        with zipfile.ZipFile(path) as archive:
            infos = archive.infolist()
            names = [i.filename for i in infos]
            strays = [n for n in names if not n.endswith(".npy")]
            if strays:
                raise ConfigError(f"--maps: {path} holds {few(strays)}, which are not arrays (an .npz holds .npy "
                                  "members only)")
            if len(set(names)) != len(names):
                raise ConfigError(f"--maps: {path} holds an array name twice")
            headers = {}
            for info in infos:
                key = info.filename[:-4]
                try:
                    shape, fortran, dtype, offset = _header(archive, info)
                except (ValueError, EOFError, OSError, SyntaxError) as err:
                    raise ConfigError(f"--maps: {key}: unreadable .npy header ({err})") from None
                if dtype.hasobject or dtype.fields is not None or dtype.subdtype is not None:
                    raise ConfigError(f"--maps: {key} has dtype {dtype} (objects or records); expected plain numbers "
                                      "(the file is read without pickle)")
                data_bytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
                if info.file_size != offset + data_bytes:
                    raise ConfigError(f"--maps: {key}: its header says {shape_text(shape)} {dtype.name} "
                                      f"({data_bytes} bytes) but the member holds {info.file_size - offset} bytes "
                                      "(a damaged or forged file)")
                if fortran and len(shape) > 1:
                    raise ConfigError(f"--maps: {key} is stored in Fortran order; save "
                                      f"np.ascontiguousarray({key}) instead")
                headers[key] = (shape, fortran, dtype, offset)
    except zipfile.BadZipFile:
        hint = " (a single .npy array; save an .npz: np.savez(FILE, ids=ids, KEY=maps))" if path.suffix == ".npy" else ""
        raise ConfigError(f"--maps: {path} is not an .npz (zip) file{hint}") from None
    except (OSError, zipfile.LargeZipFile, NotImplementedError, RuntimeError) as err:
        raise ConfigError(f"--maps: cannot read {path} ({type(err).__name__}: {err})") from None

    if "ids" not in headers:
        raise ConfigError(f"--maps: {path} has no ids array (the image id of each map); it holds "
                          f"{few(sorted(headers))}")
    ids_shape, _, ids_dtype, _ = headers["ids"]
    if len(ids_shape) != 1 or ids_dtype.kind not in "US":
        raise ConfigError(f"--maps: ids has shape {shape_text(ids_shape)} and dtype {ids_dtype}; expected [N] strings")
    count = ids_shape[0]
    if count == 0:
        raise ConfigError("--maps: ids is empty")
    labels = headers.get("labels")
    if labels is not None and (labels[0] != (count,) or labels[2].kind not in "iu" or labels[2].itemsize > 8):
        raise ConfigError(f"--maps: labels has shape {shape_text(labels[0])} and dtype {labels[2]}; expected "
                          f"[{count}] ints (the class each map explains), one per id")
    keys = [k for k in headers if k not in RESERVED_KEYS]
    if not keys:
        raise ConfigError(f"--maps: {path} holds no maps besides {', '.join(k for k in RESERVED_KEYS if k in headers)}")
    unknown = sorted(set(layouts) - set(keys) - {"*"})
    if unknown:
        raise ConfigError(f"--layout: {few(unknown)} not among the maps of {path} ({few(keys)})")
    arrays, folded = {}, {}
    for key in keys:
        if not KEY_PATTERN.fullmatch(key):
            raise ConfigError(f"--maps: {key!r} is not a usable method name (letters, digits, _ . -, starting with a "
                              "letter or digit; it names the results and a folder)")
        if key.lower() in folded:
            raise ConfigError(f"--maps: {key!r} and {folded[key.lower()]!r} differ only in case (they would share a "
                              "folder on some file systems)")
        folded[key.lower()] = key
        shape, _, dtype, offset = headers[key]
        if dtype.kind != "f" or dtype.itemsize not in (2, 4, 8):
            raise ConfigError(f"--maps: {key} has dtype {dtype}; expected float16, float32 or float64 maps")
        layout = detect_layout(key, shape, layouts.get(key, layouts.get("*")))
        if shape[0] != count:
            raise ConfigError(f"--maps: {key} holds {shape[0]} maps (shape {shape_text(shape)}), ids holds {count} "
                              "ids; one map per id, in the order of ids")
        arrays[key] = MapArray(key, shape, dtype, layout, offset)
    sha256 = _sha256(path)
    if _file_state(path) != state:
        raise ConfigError(f"--maps: {path} changed while it was read; rerun when it is written")
    return ExternalMaps(path.resolve(), sha256, arrays, count, headers["ids"], labels, state)


# ----------------------------------------------------------------------------- a run
def run_maps(maps_file: str | os.PathLike, *, layouts: Sequence[str] = (), progress: bool = True,
             loaded_model=None, **config) -> dict:
    """Evaluates (and with ``iprop=True`` propagates) the maps of ``maps_file`` through the runner;
    ``config``: :class:`la_iprop.runs.config.RunConfig` fields (``data``, ``model``, ``weights``,
    ``protocols``, ``iprop``, ``iprop_hparams``, ``out``, ``batch_size``, ``precision``, ...). Returns
    the run's summary. ``loaded_model``: the classifier ``config["model"]`` names, already loaded.
    Raises ConfigError (one line) before anything is written."""
    from la_iprop.runs.config import RunConfig
    from la_iprop.runs.engine import run

    maps = open_maps(maps_file, parse_layouts(layouts))
    out = config.get("out")
    if not out:
        raise ConfigError("--out: an output directory is required")
    stored = read_run(out) if os.path.isdir(out) else None
    if stored is not None:
        previous = ((stored.get("resolved") or {}).get("external") or {}).get("sha256")
        if previous != maps.sha256:
            what = (f"of another maps file (sha256 {previous[:12]}...)" if previous else
                    "that is not an evaluation of a maps file")
            raise ConfigError(f"--out: {out} holds a run {what}, not of {maps_file} (sha256 {maps.sha256[:12]}...); "
                              "use another --out")
    try:
        return run(RunConfig(methods=maps.keys, external=maps, **config), progress=progress, model=loaded_model)
    finally:
        maps.close()
