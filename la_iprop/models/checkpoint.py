"""A torch-free reader for PyTorch checkpoints (state dicts).

Reads both on-disk formats of ``torch.save``:

* the zip format (torch >= 1.6): ``<archive>/data.pkl`` plus one file per storage
  under ``<archive>/data/<key>``;
* the legacy format: a magic number, a protocol number and a system-info pickle,
  then the object pickle, then the list of storage keys, then each storage as an
  int64 element count followed by its raw bytes.

The object pickle is read by a restricted unpickler that resolves only the globals a
state dict needs (``OrderedDict``, the tensor and parameter rebuild functions and the
storage types). Anything else is refused with :class:`CheckpointError` naming the
global, before it is called — the same guarantee as ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import collections
import io
import os
import pickle
import struct
import zipfile
from typing import Any, BinaryIO

import numpy as np

__all__ = ["CheckpointError", "load_state_dict"]

LEGACY_MAGIC = 0x1950A86A20F9469CFC6C

_STORAGE_DTYPES = {
    "DoubleStorage": np.float64,
    "FloatStorage": np.float32,
    "HalfStorage": np.float16,
    "LongStorage": np.int64,
    "IntStorage": np.int32,
    "ShortStorage": np.int16,
    "CharStorage": np.int8,
    "ByteStorage": np.uint8,
    "BoolStorage": np.bool_,
    # bfloat16 has no numpy dtype; its raw bits are widened to float32 below.
    "BFloat16Storage": "bfloat16",
}


class CheckpointError(ValueError):
    """A checkpoint file that cannot (or must not) be read."""


class _StorageType:
    """Stands in for ``torch.<X>Storage``: only its dtype matters."""

    def __init__(self, name: str):
        self.name = name
        self.dtype = _STORAGE_DTYPES[name]

    @property
    def itemsize(self) -> int:
        return 2 if self.dtype == "bfloat16" else np.dtype(self.dtype).itemsize


class _Storage:
    """A lazily materialised flat storage."""

    def __init__(self, storage_type: _StorageType, key: str, numel: int | None):
        self.storage_type = storage_type
        self.key = key
        self.numel = numel
        self.array: np.ndarray | None = None


def _bytes_to_array(raw: bytes, storage_type: _StorageType) -> np.ndarray:
    if storage_type.dtype == "bfloat16":
        bits = np.frombuffer(raw, dtype="<u2").astype(np.uint32) << 16
        return bits.view(np.float32)
    return np.frombuffer(raw, dtype=np.dtype(storage_type.dtype).newbyteorder("<"))


def _rebuild_tensor(storage: _Storage, storage_offset, size, stride, *unused) -> np.ndarray:
    if storage.array is None:
        raise CheckpointError(f"storage {storage.key!r} is referenced but missing from the file")
    size, stride = tuple(int(s) for s in size), tuple(int(s) for s in stride)
    flat = storage.array
    needed = storage_offset + sum((n - 1) * s for n, s in zip(size, stride, strict=True)) + 1 if all(size) else 0
    if needed > flat.size:
        raise CheckpointError(
            f"tensor of size {size} at offset {storage_offset} overruns its storage "
            f"{storage.key!r} ({flat.size} elements): the file is corrupt")
    if not all(size):
        return np.zeros(size, dtype=flat.dtype)
    view = np.lib.stride_tricks.as_strided(
        flat[storage_offset:], shape=size, strides=tuple(s * flat.itemsize for s in stride))
    return np.array(view, dtype=flat.dtype.newbyteorder("="))


def _rebuild_parameter(data, requires_grad=None, backward_hooks=None, *unused):
    return data


# The complete list of globals a state dict may reference.
_ALLOWED_GLOBALS = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
}


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, file: BinaryIO, storages: dict[str, _Storage], load_storage):
        super().__init__(file)
        self._storages = storages
        self._load_storage = load_storage

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _ALLOWED_GLOBALS:
            return _ALLOWED_GLOBALS[(module, name)]
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageType(name)
        raise CheckpointError(
            f"refusing to load global '{module}.{name}': a checkpoint may only contain "
            "tensors, parameters and OrderedDicts (like torch.load(weights_only=True))")

    def persistent_load(self, pid: Any) -> _Storage:
        if not (isinstance(pid, tuple) and len(pid) >= 5 and pid[0] == "storage"):
            raise CheckpointError(f"unsupported persistent id {pid!r} in checkpoint")
        storage_type, key, _location, numel = pid[1:5]
        if not isinstance(storage_type, _StorageType):
            raise CheckpointError(f"unsupported storage type {storage_type!r} in checkpoint")
        key = str(key)
        if key not in self._storages:
            storage = _Storage(storage_type, key, int(numel))
            self._load_storage(storage)
            self._storages[key] = storage
        return self._storages[key]


class _ScanUnpickler(_RestrictedUnpickler):
    """Walks a legacy object pickle to register storages without rebuilding tensors."""

    def find_class(self, module: str, name: str) -> Any:
        target = super().find_class(module, name)
        if target in (_rebuild_tensor, _rebuild_parameter):
            return lambda *args, **kwargs: None
        return target


def _unpickle(data: bytes, storages: dict[str, _Storage], load_storage, path: str) -> Any:
    try:
        return _RestrictedUnpickler(io.BytesIO(data), storages, load_storage).load()
    except CheckpointError:
        raise
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError,
            IndexError, KeyError, struct.error) as err:
        raise CheckpointError(f"{path}: corrupt or truncated checkpoint ({err})") from None


def _load_zip(path: str) -> Any:
    try:
        archive = zipfile.ZipFile(path)
        names = archive.namelist()
    except (zipfile.BadZipFile, OSError) as err:
        raise CheckpointError(f"{path}: not a readable zip checkpoint ({err})") from None
    with archive:
        pickles = [n for n in names if n.endswith("/data.pkl") or n == "data.pkl"]
        if len(pickles) != 1:
            raise CheckpointError(f"{path}: expected one data.pkl in the archive, found {pickles}")
        prefix = pickles[0][: -len("data.pkl")]
        byteorder = "little"
        if prefix + "byteorder" in names:
            byteorder = archive.read(prefix + "byteorder").decode().strip()
        if byteorder != "little":
            raise CheckpointError(f"{path}: big-endian checkpoints are not supported")

        def load_storage(storage: _Storage) -> None:
            member = f"{prefix}data/{storage.key}"
            try:
                raw = archive.read(member)
            except KeyError:
                raise CheckpointError(f"{path}: storage {member!r} is missing from the archive") from None
            except (zipfile.BadZipFile, OSError, EOFError) as err:
                raise CheckpointError(f"{path}: storage {member!r} is corrupt ({err})") from None
            storage.array = _bytes_to_array(raw[: len(raw) - len(raw) % storage.storage_type.itemsize],
                                            storage.storage_type)

        try:
            data = archive.read(pickles[0])
        except (zipfile.BadZipFile, OSError, EOFError) as err:
            raise CheckpointError(f"{path}: {pickles[0]} is corrupt ({err})") from None
        return _unpickle(data, {}, load_storage, path)


def _load_legacy(path: str) -> Any:
    with open(path, "rb") as f:
        blob = f.read()
    stream = io.BytesIO(blob)

    def header_pickle():
        # The header holds only ints and a dict of ints: the restricted unpickler
        # (with no storages) is more than enough.
        return _RestrictedUnpickler(stream, {}, None).load()

    try:
        magic = header_pickle()
        if magic != LEGACY_MAGIC:
            raise CheckpointError(f"{path}: not a PyTorch checkpoint (bad magic number)")
        header_pickle()  # protocol version
        sys_info = header_pickle()
    except CheckpointError:
        raise
    except Exception as err:  # noqa: BLE001 - any failure here means "not a checkpoint"
        raise CheckpointError(f"{path}: not a PyTorch checkpoint or truncated ({err})") from None
    if isinstance(sys_info, dict) and not sys_info.get("little_endian", True):
        raise CheckpointError(f"{path}: big-endian checkpoints are not supported")

    storages: dict[str, _Storage] = {}
    obj_start = stream.tell()
    # Tensors are rebuilt while unpickling, but the legacy format stores the raw
    # storages after the object pickle: a first pass only registers the storages.
    scanner = _ScanUnpickler(stream, storages, lambda storage: None)
    try:
        scanner.load()
        keys = _RestrictedUnpickler(stream, {}, None).load()
    except CheckpointError:
        raise
    except Exception as err:  # noqa: BLE001
        raise CheckpointError(f"{path}: corrupt or truncated checkpoint ({err})") from None
    if not isinstance(keys, list):
        raise CheckpointError(f"{path}: corrupt checkpoint (storage key list missing)")
    for key in keys:
        key = str(key)
        if key not in storages:
            raise CheckpointError(f"{path}: storage {key!r} listed but never referenced")
        storage = storages[key]
        head = stream.read(8)
        if len(head) != 8:
            raise CheckpointError(f"{path}: truncated checkpoint (storage {key!r} missing)")
        (numel,) = struct.unpack("<q", head)
        nbytes = numel * storage.storage_type.itemsize
        raw = stream.read(nbytes)
        if len(raw) != nbytes:
            raise CheckpointError(
                f"{path}: truncated checkpoint (storage {key!r} has {len(raw)} of {nbytes} bytes)")
        storage.array = _bytes_to_array(raw, storage.storage_type)

    # Second pass: rebuild the object with every storage in hand.
    stream.seek(obj_start)
    try:
        return _RestrictedUnpickler(stream, storages, lambda s: None).load()
    except CheckpointError:
        raise
    except Exception as err:  # noqa: BLE001
        raise CheckpointError(f"{path}: corrupt or truncated checkpoint ({err})") from None


def load_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Reads a PyTorch checkpoint into ``{name: numpy array}`` without torch.

    Accepts a bare state dict, or a dict holding one under ``state_dict`` / ``model``
    (as training scripts often save). Raises :class:`CheckpointError` for a missing,
    corrupt, truncated or malicious file.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint file not found: {path}")
    obj = _load_zip(path) if zipfile.is_zipfile(path) else _load_legacy(path)
    if isinstance(obj, dict) and not any(isinstance(v, np.ndarray) for v in obj.values()):
        for wrapper_key in ("state_dict", "model", "model_state_dict"):
            if isinstance(obj.get(wrapper_key), dict):
                obj = obj[wrapper_key]
                break
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: expected a state dict, found {type(obj).__name__}")
    tensors = {str(k): v for k, v in obj.items() if isinstance(v, np.ndarray)}
    if not tensors:
        raise CheckpointError(f"{path}: the checkpoint holds no tensors")
    return tensors
