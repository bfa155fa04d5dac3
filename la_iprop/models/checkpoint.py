"""A torch-free reader for PyTorch checkpoints (state dicts) that survives hostile files.

Reads both on-disk formats of ``torch.save``:

* the zip format (torch >= 1.6): ``<archive>/data.pkl`` plus one member per storage
  under ``<archive>/data/<key>``;
* the legacy format: a magic number, a protocol number and a system-info pickle,
  then the object pickle, then the list of storage keys, then each storage as an
  int64 element count followed by its raw bytes;

and the msgpack Flax checkpoints written by ``scripts/convert_weights.py``
(:func:`read_msgpack_tree`).

Every malformed, truncated, oversized or malicious input raises one
:class:`CheckpointError` whose one-line message names the file and the problem;
decoder errors (zlib, zipfile, unicode, struct, recursion, overflow, memory) are
wrapped, never leaked.

How the reader defends itself
-----------------------------
*Pickles.* Before a pickle is unpickled, its opcodes are scanned (``pickletools``,
which reads every argument without allocating what it declares): only data opcodes
plus ``GLOBAL``/``STACK_GLOBAL``/``REDUCE``/``BUILD``/``BINPERSID`` are accepted
(``INST``, ``OBJ``, ``NEWOBJ``, extension codes and out-of-band buffers are refused),
every length field must fit in the bytes that remain, memo indices and the simulated
stack are bounded. The unpickler then resolves only the globals a state dict needs
(``OrderedDict``, the tensor/parameter rebuild functions, the ``torch.<X>Storage``
types); anything else is refused before it is called, like
``torch.load(weights_only=True)``. Those globals are fresh objects made for each load
and refuse ``BUILD`` (``__setstate__``), so a pickle cannot change them, let alone
anything that outlives the load. Rebuilding a tensor only records and validates its
geometry; no memory is touched while unpickling. The unpickled object graph is walked
iteratively: its nesting depth and size are bounded and self-references refused.

*Tensors.* Before a tensor is copied out of its storage: sizes, strides and the
storage offset are Python ints in ``[0, 2**63)``; the view's extent
(``offset + sum((size-1)*stride) + 1`` when no size is 0) lies inside the storage;
the storage's recorded element count matches the bytes actually present. Broadcast
(stride-0) and overlapping views are legitimate in ``torch.save`` output (``expand``,
tied weights, slices of a shared buffer), so they are not refused but *materialised
under a cap*: the bytes of all returned tensors may not exceed
:data:`MAX_VIEW_AMPLIFICATION` times the bytes of the storages they use plus
:data:`VIEW_SLACK_BYTES`. Only then are bytes copied (``as_strided`` over the
validated view; strides of size-1 dimensions are zeroed).

*Zip archives.* A member is read only if it is neither encrypted nor compressed with
anything but stored/deflate, if its declared size fits the remaining budget, and it is
read in :data:`READ_CHUNK_BYTES` chunks that may not exceed the declared size (zipfile
then checks the CRC). The total of all members read is at most
:data:`MAX_INFLATION` times the file size plus :data:`INFLATION_SLACK_BYTES`, and at
most :data:`MAX_TOTAL_BYTES`.

*Legacy files.* Each storage's element count is checked against the bytes left in the
file before anything is read; storages are zero-copy views of the file's bytes.

*Msgpack (Flax) files.* msgpack's own limits (every declared length at most the input's
length, nesting at most 1024) apply; maps need string keys; an array record must be
(shape, dtype, bytes) with a plain numeric dtype and exactly ``prod(shape) * itemsize``
bytes; chunked arrays must add up to their shape; the tree nests at most
:data:`MAX_NESTING` deep (checked iteratively).

*Non-finite weights.* The readers return values as stored; :func:`check_finite` is
what ``load_model`` applies to the converted variables (NaN/Inf refused, naming the
variables; ``load_model(..., allow_nonfinite=True)`` / ``convert_weights.py
--allow_nonfinite`` opt out).

Limits and why
--------------
=============================  ==========  ===============================================
``MAX_TOTAL_BYTES``            8 GiB       file size, decompressed bytes, returned tensor
                                           bytes: ~3x the largest torchvision classifier
                                           checkpoint (ViT-H/RegNet-128GF, 2.5 GiB), and
                                           still something a workstation can hold.
``MAX_INFLATION``              10          ``torch.save`` never compresses (ratio 1);
                                           re-zipped float weights deflate < 1.2x; 10x
                                           leaves room for sparse / zero-heavy weights
                                           while a deflate bomb (~1000x) is cut at 10x.
``INFLATION_SLACK_BYTES``      1 MiB       tiny legit archives of zeros deflate far more
                                           than 10x; a fixed MiB is harmless.
``MAX_VIEW_AMPLIFICATION``     4           tied weights reference one storage 2-4 times.
``VIEW_SLACK_BYTES``           64 MiB      small ``expand``-ed buffers (a 1-element
                                           storage seen as 10^6 elements).
``MAX_PICKLE_BYTES``           64 MiB      a state dict pickle is ~100 bytes per tensor.
``MAX_PICKLE_OPS``             2,000,000   ~36 opcodes per tensor: ~50k tensors; bounds
                                           the objects (and memo entries) a pickle makes;
                                           the scan costs ~2 us per opcode.
``MAX_PICKLE_STACK``           100,000     the pickler batches 1000 items per ``MARK``.
``MAX_NESTING``                64          state dicts nest 1-6 deep (training
                                           checkpoints with optimizer state).
``MAX_NDIM``                   32          numpy's own limit is 64.
=============================  ==========  ===============================================

The limits are module constants: a caller with a legitimately larger file may raise
them (``checkpoint.MAX_TOTAL_BYTES = ...``) knowingly.
"""

from __future__ import annotations

import collections
import io
import math
import os
import pickle
import pickletools
import struct
import zipfile
import zlib
from typing import Any, Iterable, Mapping

import numpy as np

__all__ = ["CheckpointError", "load_state_dict", "read_msgpack_tree", "check_finite",
           "MAX_TOTAL_BYTES", "MAX_INFLATION", "MAX_VIEW_AMPLIFICATION", "MAX_PICKLE_OPS", "MAX_NESTING"]

LEGACY_MAGIC = 0x1950A86A20F9469CFC6C

GiB, MiB = 2**30, 2**20
MAX_TOTAL_BYTES = 8 * GiB
MAX_INFLATION = 10
INFLATION_SLACK_BYTES = 1 * MiB
MAX_VIEW_AMPLIFICATION = 4
VIEW_SLACK_BYTES = 64 * MiB
MAX_PICKLE_BYTES = 64 * MiB
MAX_PICKLE_OPS = 2_000_000
MAX_PICKLE_STACK = 100_000
MAX_NESTING = 64
MAX_NDIM = 32
MAX_ZIP_MEMBERS = 1_000_000
READ_CHUNK_BYTES = 1 * MiB
_INT_LIMIT = 2**63

_STORAGE_DTYPES = {
    "DoubleStorage": "<f8",
    "FloatStorage": "<f4",
    "HalfStorage": "<f2",
    "LongStorage": "<i8",
    "IntStorage": "<i4",
    "ShortStorage": "<i2",
    "CharStorage": "i1",
    "ByteStorage": "u1",
    "BoolStorage": "?",
    # bfloat16 has no numpy dtype: its raw bits are read as uint16 and widened to float32.
    "BFloat16Storage": "<u2",
}

# Exceptions that decoding a malformed file can raise; all become CheckpointError.
# (RecursionError and NotImplementedError are RuntimeErrors; UnicodeError is a ValueError.)
_DECODE_ERRORS = (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError,
                  KeyError, struct.error, zlib.error, zipfile.BadZipFile, zipfile.LargeZipFile, OSError,
                  RuntimeError, OverflowError, ArithmeticError, MemoryError)


class CheckpointError(ValueError):
    """A checkpoint file that cannot (or must not) be read."""


class _Malformed(Exception):
    """Raised inside the reader; :func:`load_state_dict` adds the file name."""


def _describe(value: Any) -> str:
    """A short, safe description of an untrusted value (no repr of big or deep objects)."""
    if isinstance(value, bool) or value is None:
        return repr(value)
    if isinstance(value, int):
        return str(value) if abs(value) < 2**64 else f"an integer of {value.bit_length()} bits"
    if isinstance(value, str):
        return repr(value[:60]) + ("..." if len(value) > 60 else "")
    if isinstance(value, tuple) and len(value) <= 8 and all(
            isinstance(v, int) and not isinstance(v, bool) for v in value):
        return "(" + ", ".join(_describe(v) for v in value) + ")"
    return f"a {type(value).__name__}"


def _one_line(text: str, limit: int = 500) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[:limit] + "..."


# ----------------------------------------------------------------------------- pickle scan
_ALLOWED_OPCODES = frozenset((
    "PROTO", "FRAME", "STOP", "MARK", "POP", "POP_MARK", "DUP", "NONE", "NEWTRUE", "NEWFALSE",
    "INT", "BININT", "BININT1", "BININT2", "LONG", "LONG1", "LONG4", "FLOAT", "BINFLOAT",
    "STRING", "BINSTRING", "SHORT_BINSTRING", "BINBYTES", "SHORT_BINBYTES", "BINBYTES8", "BYTEARRAY8",
    "UNICODE", "BINUNICODE", "SHORT_BINUNICODE", "BINUNICODE8",
    "EMPTY_LIST", "APPEND", "APPENDS", "LIST", "EMPTY_TUPLE", "TUPLE", "TUPLE1", "TUPLE2", "TUPLE3",
    "EMPTY_DICT", "DICT", "SETITEM", "SETITEMS", "EMPTY_SET", "ADDITEMS", "FROZENSET",
    "GET", "BINGET", "LONG_BINGET", "PUT", "BINPUT", "LONG_BINPUT", "MEMOIZE",
    "GLOBAL", "STACK_GLOBAL", "REDUCE", "BUILD", "PERSID", "BINPERSID",
))
_PUT_OPCODES = frozenset(("PUT", "BINPUT", "LONG_BINPUT"))
_OPCODE_EFFECTS = {}
for _op in pickletools.opcodes:
    _before = _op.stack_before
    if pickletools.markobject in _before:
        _OPCODE_EFFECTS[_op.name] = (True, _before.index(pickletools.markobject), len(_op.stack_after))
    else:
        _OPCODE_EFFECTS[_op.name] = (False, len(_before), len(_op.stack_after))
del _op, _before


def _scan_pickle(buffer: bytes, start: int, what: str) -> int:
    """Validates the pickle at ``buffer[start:]`` opcode by opcode; returns the offset after its STOP.

    Nothing is built: ``pickletools.genops`` reads each argument and fails if a declared
    length runs past the data, so a length of 2**63 allocates nothing.
    """
    stream = io.BytesIO(buffer)
    stream.seek(start)
    depth, marks, count = 0, [], 0
    end = None
    try:
        for opcode, arg, pos in pickletools.genops(stream):
            count += 1
            name = opcode.name
            if count > MAX_PICKLE_OPS:
                raise _Malformed(f"{what} has more than {MAX_PICKLE_OPS} opcodes (MAX_PICKLE_OPS)")
            if pos - start > MAX_PICKLE_BYTES:
                raise _Malformed(f"{what} is larger than {MAX_PICKLE_BYTES} bytes (MAX_PICKLE_BYTES)")
            if name not in _ALLOWED_OPCODES:
                raise _Malformed(f"{what} uses the opcode {name} at byte {pos}, which a state dict never needs")
            if name in _PUT_OPCODES and not (isinstance(arg, int) and 0 <= arg <= count):
                raise _Malformed(f"{what} memoizes at index {_describe(arg)} after {count} opcodes")
            if name == "FRAME" and arg > len(buffer) - stream.tell():
                raise _Malformed(f"{what} declares a frame of {arg} bytes past the end of the data")
            if name == "MARK":
                marks.append(depth)
            elif name == "POP" and marks and depth == marks[-1]:
                marks.pop()  # POP on an empty frame discards the mark
            else:
                to_mark, popped, pushed = _OPCODE_EFFECTS[name]
                if to_mark:
                    if not marks:
                        raise _Malformed(f"{what}: {name} at byte {pos} without a MARK")
                    depth = marks.pop()
                depth -= popped
                if depth < 0:
                    raise _Malformed(f"{what}: {name} at byte {pos} pops an empty stack")
                depth += pushed
            if depth + len(marks) > MAX_PICKLE_STACK:
                raise _Malformed(f"{what} stacks more than {MAX_PICKLE_STACK} items (MAX_PICKLE_STACK)")
            if name == "STOP":
                end = stream.tell()
    except _Malformed:
        raise
    except _DECODE_ERRORS as err:
        raise _Malformed(f"{what} is not a valid pickle ({type(err).__name__}: {err})") from None
    if end is None:
        raise _Malformed(f"{what} is truncated (no STOP opcode)")
    return end


# ----------------------------------------------------------------------------- objects a pickle may build
class _Sealed:
    """Base of every object the unpickler hands to a pickle: ``BUILD`` on it is refused."""

    __slots__ = ()

    def __setstate__(self, state):
        raise _Malformed(f"refusing BUILD (__setstate__) on {self!r}: a checkpoint may not modify "
                         "the reader's objects")

    def __reduce__(self):
        raise TypeError("reader objects cannot be pickled")


class _StorageType(_Sealed):
    """Stands in for ``torch.<X>Storage``: only its dtype matters."""

    __slots__ = ("name", "dtype")

    def __init__(self, name: str):
        self.name = name
        self.dtype = np.dtype(_STORAGE_DTYPES[name])

    def __repr__(self):
        return f"torch.{self.name}"


class _Storage:
    """One storage key of the file: its declared byte size and, once read, its bytes."""

    __slots__ = ("key", "nbytes", "first_type", "first_numel", "raw")

    def __init__(self, key: str, first_type: _StorageType, first_numel: int):
        self.key = key
        self.first_type = first_type
        self.first_numel = first_numel
        self.nbytes: int | None = None  # known from the zip directory or the legacy header
        self.raw: Any = None            # bytes-like, once read


class _StorageRef(_Sealed):
    """What ``persistent_load`` returns: a storage seen with one dtype."""

    __slots__ = ("storage", "storage_type", "numel")

    def __init__(self, storage: _Storage, storage_type: _StorageType, numel: int):
        self.storage, self.storage_type, self.numel = storage, storage_type, numel

    def __repr__(self):
        return f"storage {self.storage.key!r}"


class _Tensor(_Sealed):
    """A tensor whose geometry has been validated; its bytes are copied only when returned."""

    __slots__ = ("ref", "offset", "size", "stride")

    def __init__(self, ref: _StorageRef, offset: int, size: tuple, stride: tuple):
        self.ref, self.offset, self.size, self.stride = ref, offset, size, stride

    @property
    def numel(self) -> int:
        return math.prod(self.size)

    def __repr__(self):
        return f"tensor of size {self.size} on {self.ref!r}"


def _check_int(value: Any, what: str) -> int:
    if type(value) is not int or not 0 <= value < _INT_LIMIT:  # noqa: E721 - bool is refused on purpose
        raise _Malformed(f"{what} must be an integer in [0, 2**63), got {_describe(value)}")
    return value


def _check_int_tuple(value: Any, what: str) -> tuple:
    if not isinstance(value, (tuple, list)):
        raise _Malformed(f"{what} must be a tuple of integers, got {_describe(value)}")
    if len(value) > MAX_NDIM:
        raise _Malformed(f"{what} has {len(value)} dimensions, more than {MAX_NDIM} (MAX_NDIM)")
    return tuple(_check_int(v, what) for v in value)


class _RebuildTensor(_Sealed):
    """``torch._utils._rebuild_tensor(_v2)(storage, offset, size, stride, ...)``: validates, copies nothing."""

    __slots__ = ()

    def __call__(self, storage=None, storage_offset=None, size=None, stride=None, *rest):
        if not isinstance(storage, _StorageRef):
            raise _Malformed(f"a tensor must be built on a storage, got {_describe(storage)}")
        if len(rest) > 4:
            raise _Malformed(f"a tensor rebuild takes at most 8 arguments, got {4 + len(rest)}")
        offset = _check_int(storage_offset, "a tensor's storage offset")
        size = _check_int_tuple(size, "a tensor's size")
        stride = _check_int_tuple(stride, "a tensor's stride")
        if len(size) != len(stride):
            raise _Malformed(f"a tensor has size {size} but stride {stride}")
        if all(size):
            last = offset + sum((n - 1) * s for n, s in zip(size, stride, strict=True)) + 1
            if last > storage.numel:
                raise _Malformed(f"a tensor of size {size}, stride {stride} at offset {offset} needs "
                                 f"{last} elements of {storage!r}, which holds {storage.numel}")
        elif math.prod(max(n, 1) for n in size) > MAX_TOTAL_BYTES:
            raise _Malformed(f"an empty tensor of size {size} is absurdly large")
        return _Tensor(storage, offset, size, stride)

    def __repr__(self):
        return "torch._utils._rebuild_tensor_v2"


class _RebuildParameter(_Sealed):
    """``torch._utils._rebuild_parameter(_with_state)(data, requires_grad, hooks[, state])``."""

    __slots__ = ()

    def __call__(self, data=None, *rest):
        if not isinstance(data, _Tensor):
            raise _Malformed(f"a parameter must wrap a tensor, got {_describe(data)}")
        if len(rest) > 3:
            raise _Malformed(f"a parameter rebuild takes at most 4 arguments, got {1 + len(rest)}")
        return data

    def __repr__(self):
        return "torch._utils._rebuild_parameter"


class _StateDict(collections.OrderedDict):
    """The ``OrderedDict`` a pickle builds; ``BUILD`` may only set plain string-keyed attributes
    (``state_dict()._metadata``), which are dropped."""

    def __setstate__(self, state):
        if not (isinstance(state, dict) and all(isinstance(k, str) for k in state)):
            raise _Malformed(f"refusing BUILD on an OrderedDict with state {_describe(state)}")

    def __reduce__(self):
        raise TypeError("reader objects cannot be pickled")


class _OrderedDictFactory(_Sealed):
    """``collections.OrderedDict(...)``: no argument, or a list of (key, value) pairs."""

    __slots__ = ()

    def __call__(self, *args):
        result = _StateDict()
        if len(args) > 1:
            raise _Malformed(f"OrderedDict takes at most 1 argument in a checkpoint, got {len(args)}")
        if args:
            if not isinstance(args[0], (list, tuple)):
                raise _Malformed(f"OrderedDict expects a list of pairs, got {_describe(args[0])}")
            for pair in args[0]:
                if not (isinstance(pair, (list, tuple)) and len(pair) == 2):
                    raise _Malformed(f"OrderedDict expects (key, value) pairs, got {_describe(pair)}")
                result[pair[0]] = pair[1]
        return result

    def __repr__(self):
        return "collections.OrderedDict"


_ALLOWED_GLOBALS = {
    ("collections", "OrderedDict"): _OrderedDictFactory,
    ("torch._utils", "_rebuild_tensor_v2"): _RebuildTensor,
    ("torch._utils", "_rebuild_tensor"): _RebuildTensor,
    ("torch._utils", "_rebuild_parameter"): _RebuildParameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _RebuildParameter,
}


class _DataUnpickler(pickle.Unpickler):
    """Plain data only (the legacy headers and key list): every global is refused."""

    def find_class(self, module: str, name: str) -> Any:
        raise _Malformed(f"refusing to load global '{_one_line(module, 80)}.{_one_line(name, 80)}': "
                         "a checkpoint may only contain tensors, parameters and OrderedDicts "
                         "(like torch.load(weights_only=True))")

    def persistent_load(self, pid: Any) -> Any:
        raise _Malformed("unexpected persistent id outside the object pickle")


class _StateDictUnpickler(_DataUnpickler):
    """Resolves only what a state dict needs; every object it returns is fresh for this load."""

    def __init__(self, data: bytes, storages: dict[str, _Storage], on_new_storage):
        super().__init__(io.BytesIO(data))
        self._storages = storages
        self._on_new_storage = on_new_storage

    def find_class(self, module: str, name: str) -> Any:
        factory = _ALLOWED_GLOBALS.get((module, name))
        if factory is not None:
            return factory()
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageType(name)
        return super().find_class(module, name)

    def persistent_load(self, pid: Any) -> _StorageRef:
        if not (isinstance(pid, tuple) and len(pid) in (5, 6) and pid[0] == "storage"):
            raise _Malformed(f"unsupported persistent id ({_describe(pid)}; expected ('storage', ...))")
        storage_type, key, location, numel = pid[1:5]
        if not isinstance(storage_type, _StorageType):
            raise _Malformed(f"unsupported storage type {_describe(storage_type)}")
        if not (isinstance(key, str) and 0 < len(key) <= 256) or not isinstance(location, str):
            raise _Malformed(f"malformed storage key {_describe(key)} / location {_describe(location)}")
        numel = _check_int(numel, f"the element count of storage {key!r}")
        if len(pid) == 6 and pid[5] is not None:
            raise _Malformed(f"storage {key!r} is a view of another storage (pre-1.0 format, unsupported)")
        storage = self._storages.get(key)
        if storage is None:
            storage = self._storages[key] = _Storage(key, storage_type, numel)
            self._on_new_storage(storage)
        if storage.nbytes is not None and numel * storage_type.dtype.itemsize != storage.nbytes:
            raise _Malformed(f"storage {key!r} holds {storage.nbytes} bytes, but is declared as {numel} "
                             f"elements of {storage_type!r}")
        if storage.nbytes is None and numel * storage_type.dtype.itemsize != (
                storage.first_numel * storage.first_type.dtype.itemsize):
            raise _Malformed(f"storage {key!r} is declared with two different sizes")
        return _StorageRef(storage, storage_type, numel)


def _unpickle(data: bytes, storages: dict[str, _Storage], on_new_storage, what: str) -> Any:
    _scan_pickle(data, 0, what)
    obj = _StateDictUnpickler(data, storages, on_new_storage).load()
    _check_structure(obj, what)
    return obj


def _check_structure(obj: Any, what: str) -> None:
    """Bounds the nesting depth and size of an unpickled graph and refuses self-references (iteratively)."""
    containers = (dict, list, tuple, set, frozenset)
    if not isinstance(obj, containers):
        return
    stack: list[tuple[Any, int, bool]] = [(obj, 1, False)]
    on_path: set[int] = set()
    visits = 0
    while stack:
        node, depth, leaving = stack.pop()
        if leaving:
            on_path.discard(id(node))
            continue
        if id(node) in on_path:
            raise _Malformed(f"{what} contains a structure that contains itself")
        if depth > MAX_NESTING:
            raise _Malformed(f"{what} nests containers deeper than {MAX_NESTING} levels (MAX_NESTING)")
        visits += 1
        if visits > MAX_PICKLE_OPS:
            raise _Malformed(f"{what} reaches more than {MAX_PICKLE_OPS} containers (shared too often)")
        on_path.add(id(node))
        stack.append((node, depth, True))
        children: Iterable = (*node.keys(), *node.values()) if isinstance(node, dict) else node
        for child in children:
            if isinstance(child, containers):
                stack.append((child, depth + 1, False))


# ----------------------------------------------------------------------------- materialisation
def _materialise(tensor: _Tensor, what: str) -> np.ndarray:
    """Copies a validated tensor out of its (already read) storage."""
    ref = tensor.ref
    dtype = ref.storage_type.dtype
    native = dtype.newbyteorder("=")
    if tensor.numel == 0:
        out = np.zeros(tensor.size, native)
    else:
        raw = ref.storage.raw
        if raw is None or len(raw) < ref.numel * dtype.itemsize:
            raise _Malformed(f"{what}: {ref!r} is referenced but missing or short")
        flat = np.frombuffer(raw, dtype=dtype, count=ref.numel)
        # _RebuildTensor validated the view; checked again here, next to the only as_strided.
        last = tensor.offset + sum((n - 1) * s for n, s in zip(tensor.size, tensor.stride, strict=True))
        if min((tensor.offset, *tensor.size, *tensor.stride)) < 0 or last >= ref.numel:
            raise _Malformed(f"{what}: {tensor!r} does not fit its storage")
        strides = tuple(0 if n == 1 else s * dtype.itemsize for n, s in zip(tensor.size, tensor.stride, strict=True))
        view = np.lib.stride_tricks.as_strided(flat[tensor.offset:], shape=tensor.size, strides=strides,
                                               writeable=False)
        out = np.array(view, dtype=native, order="C")
    if ref.storage_type.name == "BFloat16Storage":
        out = (out.astype(np.uint32) << 16).view(np.float32)
    return out


def _tensors_of(obj: Any, what: str) -> dict[str, _Tensor]:
    """The ``{name: tensor}`` of a state dict, or of one held under ``state_dict`` / ``model``."""
    if isinstance(obj, dict) and not any(isinstance(v, _Tensor) for v in obj.values()):
        for wrapper_key in ("state_dict", "model", "model_state_dict"):
            if isinstance(obj.get(wrapper_key), dict):
                obj = obj[wrapper_key]
                break
    if not isinstance(obj, dict):
        raise _Malformed(f"expected a state dict, found {_describe(obj)}")
    tensors = {}
    for key, value in obj.items():
        if isinstance(value, _Tensor):
            if not isinstance(key, str):
                raise _Malformed(f"a tensor is stored under the non-string key {_describe(key)}")
            tensors[key] = value
    if not tensors:
        raise _Malformed("the checkpoint holds no tensors")
    return tensors


def _check_budget(tensors: Mapping[str, _Tensor]) -> None:
    """Refuses amplification before any storage is read (sizes are Python ints: no overflow)."""
    storages = {id(t.ref.storage): t.ref.storage for t in tensors.values()}
    storage_bytes = sum(s.nbytes for s in storages.values())
    if storage_bytes > MAX_TOTAL_BYTES:
        raise _Malformed(f"the tensors' storages hold {storage_bytes} bytes, more than MAX_TOTAL_BYTES "
                         f"({MAX_TOTAL_BYTES})")
    unique = {id(t): t for t in tensors.values()}.values()
    tensor_bytes = sum(t.numel * t.ref.storage_type.dtype.itemsize for t in unique)
    limit = min(MAX_TOTAL_BYTES, MAX_VIEW_AMPLIFICATION * storage_bytes + VIEW_SLACK_BYTES)
    if tensor_bytes > limit:
        raise _Malformed(f"the tensors would occupy {tensor_bytes} bytes from {storage_bytes} bytes of "
                         f"storage (limit {limit}: MAX_VIEW_AMPLIFICATION x storage + VIEW_SLACK_BYTES); "
                         "broadcast or overlapping views amplify memory")


def _build_arrays(tensors: Mapping[str, _Tensor], read_storage, what: str) -> dict[str, np.ndarray]:
    _check_budget(tensors)
    done: dict[int, np.ndarray] = {}
    result = {}
    for name, tensor in tensors.items():
        if id(tensor) not in done:
            storage = tensor.ref.storage
            if storage.raw is None and tensor.numel:
                read_storage(storage)
            done[id(tensor)] = _materialise(tensor, what)
        result[name] = done[id(tensor)]
    return result


# ----------------------------------------------------------------------------- zip format
class _ZipReader:
    def __init__(self, path: str, file_size: int):
        self.archive = zipfile.ZipFile(path)
        self.file_size = file_size
        self.budget = min(MAX_TOTAL_BYTES, MAX_INFLATION * file_size + INFLATION_SLACK_BYTES)
        infos = self.archive.infolist()
        if len(infos) > MAX_ZIP_MEMBERS:
            raise _Malformed(f"the archive has {len(infos)} members, more than {MAX_ZIP_MEMBERS}")
        self.members: dict[str, zipfile.ZipInfo] = {}
        for info in infos:
            if info.filename in self.members:
                raise _Malformed(f"the archive holds {info.filename!r} twice")
            self.members[info.filename] = info

    def info(self, name: str) -> zipfile.ZipInfo:
        info = self.members.get(name)
        if info is None:
            raise _Malformed(f"member {name!r} is missing from the archive")
        if info.flag_bits & 0x1:
            raise _Malformed(f"member {name!r} is encrypted")
        if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
            raise _Malformed(f"member {name!r} uses compression method {info.compress_type} "
                             "(only stored and deflate are read)")
        if info.compress_size > self.file_size or (
                info.compress_type == zipfile.ZIP_STORED and info.compress_size != info.file_size):
            raise _Malformed(f"member {name!r} declares inconsistent sizes ({info.compress_size} compressed, "
                             f"{info.file_size} uncompressed, in a {self.file_size}-byte file)")
        return info

    def read(self, name: str, limit: int | None = None) -> bytearray:
        """A member's bytes, read in chunks, never more than declared, within the inflation budget."""
        info = self.info(name)
        declared = info.file_size
        if limit is not None and declared > limit:
            raise _Malformed(f"member {name!r} declares {declared} bytes, more than the {limit} allowed")
        if declared > self.budget:
            raise _Malformed(f"member {name!r} declares {declared} bytes; only {self.budget} more may be "
                             f"decompressed from this {self.file_size}-byte file (MAX_INFLATION x file size, "
                             "at most MAX_TOTAL_BYTES)")
        self.budget -= declared
        data = bytearray(declared)
        view = memoryview(data)
        filled = 0
        with self.archive.open(info) as member:
            while True:
                chunk = member.read(min(READ_CHUNK_BYTES, declared - filled + 1))
                if not chunk:
                    break
                if filled + len(chunk) > declared:
                    raise _Malformed(f"member {name!r} inflates beyond its declared {declared} bytes")
                view[filled:filled + len(chunk)] = chunk
                filled += len(chunk)
        if filled != declared:
            raise _Malformed(f"member {name!r} is truncated ({filled} of {declared} bytes)")
        return data


def _load_zip(path: str, file_size: int) -> dict[str, np.ndarray]:
    reader = _ZipReader(path, file_size)
    with reader.archive:
        pickles = [n for n in reader.members if n.endswith("/data.pkl") or n == "data.pkl"]
        if len(pickles) != 1:
            raise _Malformed(f"expected one data.pkl in the archive, found {len(pickles)}")
        prefix = pickles[0][: -len("data.pkl")]
        if prefix + "byteorder" in reader.members:
            raw = bytes(reader.read(prefix + "byteorder", limit=16))
            try:
                byteorder = raw.decode("ascii").strip()
            except UnicodeDecodeError:
                raise _Malformed(f"the byteorder record is not text ({raw[:16]!r})") from None
            if byteorder == "big":
                raise _Malformed("big-endian checkpoints are not supported")
            if byteorder != "little":
                raise _Malformed(f"unknown byteorder record {byteorder!r}")

        def on_new_storage(storage: _Storage) -> None:
            info = reader.info(f"{prefix}data/{storage.key}")
            storage.nbytes = info.file_size

        data = bytes(reader.read(pickles[0], limit=MAX_PICKLE_BYTES))
        obj = _unpickle(data, {}, on_new_storage, pickles[0])
        tensors = _tensors_of(obj, pickles[0])

        def read_storage(storage: _Storage) -> None:
            storage.raw = reader.read(f"{prefix}data/{storage.key}")

        return _build_arrays(tensors, read_storage, path)


# ----------------------------------------------------------------------------- legacy format
def _load_legacy(path: str) -> dict[str, np.ndarray]:
    with open(path, "rb") as f:
        blob = f.read()
    pos = 0

    def data_pickle(what: str) -> Any:
        nonlocal pos
        end = _scan_pickle(blob, pos, what)
        value = _DataUnpickler(io.BytesIO(blob[pos:end])).load()
        _check_structure(value, what)
        pos = end
        return value

    try:
        magic = data_pickle("the magic number")
    except _Malformed as err:
        raise _Malformed(f"not a PyTorch checkpoint (neither a zip archive nor a legacy pickle: {err})") from None
    if magic != LEGACY_MAGIC:
        raise _Malformed(f"not a PyTorch checkpoint (bad magic number {_describe(magic)})")
    data_pickle("the protocol version")
    sys_info = data_pickle("the system information")
    if isinstance(sys_info, dict) and sys_info.get("little_endian", True) is not True:
        raise _Malformed("big-endian checkpoints are not supported")

    storages: dict[str, _Storage] = {}
    end = _scan_pickle(blob, pos, "the object pickle")
    obj = _StateDictUnpickler(blob[pos:end], storages, lambda storage: None).load()
    _check_structure(obj, "the object pickle")
    pos = end
    keys = data_pickle("the storage key list")
    if not (isinstance(keys, list) and all(isinstance(k, str) for k in keys)):
        raise _Malformed("the storage key list is not a list of strings")
    if len(set(keys)) != len(keys) or set(keys) != set(storages):
        raise _Malformed(f"the storage key list ({len(keys)} keys) does not match the {len(storages)} "
                         "storages the object pickle references")
    view = memoryview(blob)
    for key in keys:
        storage = storages[key]
        if len(blob) - pos < 8:
            raise _Malformed(f"truncated checkpoint (storage {key!r} missing)")
        (numel,) = struct.unpack_from("<q", blob, pos)
        pos += 8
        nbytes = numel * storage.first_type.dtype.itemsize
        if numel != storage.first_numel:
            raise _Malformed(f"storage {key!r} records {numel} elements, its reference {storage.first_numel}")
        if nbytes > len(blob) - pos:
            raise _Malformed(f"truncated checkpoint (storage {key!r} needs {nbytes} bytes, "
                             f"{len(blob) - pos} remain)")
        storage.nbytes = nbytes
        storage.raw = view[pos:pos + nbytes]
        pos += nbytes
    tensors = _tensors_of(obj, "the object pickle")
    return _build_arrays(tensors, lambda storage: None, path)


# ----------------------------------------------------------------------------- public API
def _file_size(path: str) -> int:
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint file not found: {path}")
    size = os.path.getsize(path)
    if size > MAX_TOTAL_BYTES:
        raise CheckpointError(f"{path}: the file has {size} bytes, more than MAX_TOTAL_BYTES ({MAX_TOTAL_BYTES})")
    return size


def load_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Reads a PyTorch checkpoint into ``{name: numpy array}`` without torch.

    Accepts a bare state dict, or a dict holding one under ``state_dict`` / ``model``
    (as training scripts often save). Raises :class:`CheckpointError` (one line, naming
    the file) for a missing, corrupt, truncated, oversized or malicious file. Values are
    returned as read, NaN and Inf included (see :func:`check_finite`).
    """
    path = os.fspath(path)
    file_size = _file_size(path)
    try:
        with open(path, "rb") as f:
            head = f.read(4)
        if head[:2] == b"PK":
            return _load_zip(path, file_size)
        return _load_legacy(path)
    except CheckpointError as err:
        raise CheckpointError(f"{path}: {_one_line(err)}") from None
    except _Malformed as err:
        raise CheckpointError(f"{path}: {_one_line(err)}") from None
    except MemoryError:
        raise CheckpointError(f"{path}: ran out of memory reading the checkpoint") from None
    except _DECODE_ERRORS as err:
        raise CheckpointError(f"{path}: corrupt or malformed checkpoint "
                              f"({type(err).__name__}: {_one_line(err, 200)})") from None


# ----------------------------------------------------------------------------- msgpack (Flax) checkpoints
_MSGPACK_DTYPES = frozenset(("float16", "float32", "float64", "bfloat16", "int8", "int16", "int32", "int64",
                             "uint8", "uint16", "uint32", "uint64", "bool"))
_CHUNKED = "__msgpack_chunked_array__"


def _msgpack_dtype(name: Any) -> np.dtype:
    if isinstance(name, bytes):
        name = name.decode("ascii", errors="replace")
    if name not in _MSGPACK_DTYPES:
        raise _Malformed(f"unsupported array dtype {_describe(name)}")
    if name == "bfloat16":
        import ml_dtypes
        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(name)


def _msgpack_array(data: bytes) -> np.ndarray:
    import msgpack
    fields = msgpack.unpackb(data, raw=True, use_list=True, strict_map_key=True)
    if not (isinstance(fields, list) and len(fields) == 3 and isinstance(fields[2], bytes)):
        raise _Malformed("an array record is not (shape, dtype, bytes)")
    shape = _check_int_tuple(fields[0], "an array's shape")
    dtype = _msgpack_dtype(fields[1])
    if math.prod(shape) * dtype.itemsize != len(fields[2]):
        raise _Malformed(f"an array of shape {shape} and dtype {dtype} holds {len(fields[2])} bytes")
    return np.frombuffer(fields[2], dtype=dtype).reshape(shape)


def _msgpack_ext(code: int, data: bytes) -> np.ndarray:
    if code == 1:  # flax.serialization: ndarray
        return _msgpack_array(data)
    if code == 3:  # numpy scalar, stored as a 0-d array
        array = _msgpack_array(data)
        if array.ndim:
            raise _Malformed("a numpy scalar record holds an array")
        return array
    raise _Malformed(f"unsupported msgpack extension type {code}")


def _unchunk(node: dict) -> np.ndarray:
    shape, chunks = node.get("shape"), node.get("chunks")
    if set(node) != {_CHUNKED, "shape", "chunks"} or not isinstance(shape, dict) or not isinstance(chunks, dict):
        raise _Malformed("malformed chunked array")
    if set(shape) != {str(i) for i in range(len(shape))} or set(chunks) != {str(i) for i in range(len(chunks))}:
        raise _Malformed("malformed chunked array (keys are not 0..n-1)")
    shape = _check_int_tuple([shape[str(i)] for i in range(len(shape))], "a chunked array's shape")
    parts = [chunks[str(i)] for i in range(len(chunks))]
    if not parts or not all(isinstance(p, np.ndarray) and p.ndim == 1 and p.dtype == parts[0].dtype
                            for p in parts):
        raise _Malformed("malformed chunked array (chunks are not 1-d arrays of one dtype)")
    if sum(p.size for p in parts) != math.prod(shape):
        raise _Malformed(f"chunked array of shape {shape} holds {sum(p.size for p in parts)} elements")
    return np.concatenate(parts).reshape(shape)


def _check_msgpack_tree(root: Any) -> Any:
    """Iteratively: string keys only, bounded depth, arrays / str / numbers as leaves; unchunks arrays."""
    if isinstance(root, dict) and _CHUNKED in root:
        return _unchunk(root)
    stack = [(root, 1)]
    while stack:
        node, depth = stack.pop()
        if depth > MAX_NESTING:
            raise _Malformed(f"the tree nests deeper than {MAX_NESTING} levels (MAX_NESTING)")
        items = node.items() if isinstance(node, dict) else enumerate(node)
        for key, value in list(items):
            if isinstance(node, dict) and not isinstance(key, str):
                raise _Malformed(f"a map has the non-string key {_describe(key)}")
            if isinstance(value, dict) and _CHUNKED in value:
                node[key] = _unchunk(value)
            elif isinstance(value, (dict, list)):
                stack.append((value, depth + 1))
            elif not isinstance(value, (np.ndarray, str, int, float, bool, type(None))):
                raise _Malformed(f"the tree holds an unsupported value ({_describe(value)})")
    return root


def read_msgpack_tree(path: str | os.PathLike) -> Any:
    """The tree stored in a msgpack Flax checkpoint (flax.serialization's format), read defensively.

    Maps must have string keys, nesting is bounded by :data:`MAX_NESTING`, leaves are
    arrays of plain numeric dtypes whose byte count matches their shape exactly (no
    amplification), strings and numbers. Raises :class:`CheckpointError` naming the file.
    """
    import msgpack
    path = os.fspath(path)
    _file_size(path)
    try:
        with open(path, "rb") as f:
            data = f.read()
        # msgpack's own limits default to the input's length; its nesting limit is 1024.
        tree = msgpack.unpackb(data, ext_hook=_msgpack_ext, raw=False, use_list=True, strict_map_key=True)
        if not isinstance(tree, (dict, list)):
            return tree
        return _check_msgpack_tree(tree)
    except _Malformed as err:
        raise CheckpointError(f"{path}: not a valid msgpack Flax checkpoint ({_one_line(err)})") from None
    except MemoryError:
        raise CheckpointError(f"{path}: ran out of memory reading the checkpoint") from None
    except msgpack.exceptions.StackError:
        raise CheckpointError(f"{path}: not a valid msgpack Flax checkpoint (nested deeper than msgpack "
                              "allows)") from None
    except (*_DECODE_ERRORS, msgpack.exceptions.UnpackException) as err:
        detail = f"{type(err).__name__}: {_one_line(err, 200)}" if str(err) else type(err).__name__
        raise CheckpointError(f"{path}: not a valid msgpack Flax checkpoint ({detail})") from None


# ----------------------------------------------------------------------------- finiteness
def check_finite(arrays: Mapping[str, Any], source: str) -> None:
    """Raises :class:`CheckpointError` naming every floating array of ``arrays`` with NaN or Inf.

    ``arrays`` maps names to numpy or jax arrays (these are copied to the host: one
    compiled reduction per shape would cost far more than the copy).
    """
    bad = []
    for name, array in arrays.items():
        dtype = np.dtype(array.dtype)
        if not (np.issubdtype(dtype, np.inexact) or "float" in dtype.name):  # ml_dtypes' bfloat16 too
            continue
        array = np.asarray(array)
        finite = np.isfinite(array)
        if not finite.all():
            nan = int(np.isnan(array).sum())
            bad.append(f"{name} ({nan} NaN, {int(array.size - finite.sum()) - nan} Inf)")
    if bad:
        raise CheckpointError(f"{source} holds non-finite weights in {len(bad)} tensor(s): "
                              + "; ".join(bad[:10]) + ("; ..." if len(bad) > 10 else "")
                              + " (pass allow_nonfinite=True / --allow_nonfinite to load them anyway)")
