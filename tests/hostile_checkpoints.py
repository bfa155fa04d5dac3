"""Hostile checkpoints for tests/test_checkpoint_hostile.py: a tiny pickle assembler, file writers,
the case list, and the runner that loads every case in a subprocess under an address-space limit.

    python tests/hostile_checkpoints.py run CASES.json RESULTS.jsonl   # what the test runs

Every case is a dict: ``name``, ``path``, ``loader`` ("state_dict", "flax" or "model"),
``expect`` ("error" or "ok"), ``match`` (a regex the error must contain) and optional
``allow_nonfinite``. The runner writes one JSON line per case as it goes, so a crash
still leaves the cases before it.
"""

from __future__ import annotations

import io
import json
import os
import pathlib
import pickle
import re
import resource
import struct
import sys
import zipfile
import zlib

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
LITE0 = "efficientnet_lite0"


# ----------------------------------------------------------------------------- pickle assembler (protocol 2)
def p_int(value: int) -> bytes:
    if 0 <= value < 256:
        return b"K" + bytes([value])
    if -2**31 <= value < 2**31:
        return b"J" + struct.pack("<i", value)
    raw = value.to_bytes((value.bit_length() + 8) // 8, "little", signed=True)
    return b"\x8a" + bytes([len(raw)]) + raw  # LONG1


def p_str(text: str) -> bytes:
    raw = text.encode()
    return b"X" + struct.pack("<I", len(raw)) + raw


def p_global(module: str, name: str) -> bytes:
    return b"c" + module.encode() + b"\n" + name.encode() + b"\n"


def p_tuple(*items: bytes) -> bytes:
    return b"(" + b"".join(items) + b"t"


def p_call(func: bytes, *args: bytes) -> bytes:
    return func + p_tuple(*args) + b"R"


def p_dict(items: list[tuple[bytes, bytes]]) -> bytes:
    return b"}" + b"".join(k + v + b"s" for k, v in items)


def pickle_bytes(body: bytes) -> bytes:
    return b"\x80\x02" + body + b"."


def p_storage(key: str, numel: int, storage_type: str = "FloatStorage", legacy: bool = False) -> bytes:
    fields = [p_str("storage"), p_global("torch", storage_type), p_str(key), p_str("cpu"), p_int(numel)]
    if legacy:
        fields.append(b"N")
    return p_tuple(*fields) + b"Q"  # BINPERSID


def p_tensor(key: str, numel: int, offset: int, size, stride, storage_type="FloatStorage", legacy=False) -> bytes:
    return p_call(p_global("torch._utils", "_rebuild_tensor_v2"),
                  p_storage(key, numel, storage_type, legacy), p_int(offset),
                  p_tuple(*map(p_int, size)), p_tuple(*map(p_int, stride)), b"\x89",
                  p_call(p_global("collections", "OrderedDict")))


def state_dict_pickle(tensors: dict[str, bytes], extra: list[tuple[bytes, bytes]] = ()) -> bytes:
    return pickle_bytes(p_dict([(p_str(k), v) for k, v in tensors.items()] + list(extra)))


def deep_nesting(levels: int) -> bytes:
    """A list nested ``levels`` deep built through the memo with a constant stack."""
    out = bytearray(b"]r" + struct.pack("<I", 0))
    for i in range(levels):  # LONG_BINGET i, EMPTY_LIST, LONG_BINPUT i+1, APPEND, POP
        out += b"j" + struct.pack("<I", i) + b"]r" + struct.pack("<I", i + 1) + b"a0"
    return bytes(out)


# ----------------------------------------------------------------------------- file writers
def write_zip(path, pkl: bytes, storages: dict[str, bytes], *, byteorder: bytes | None = b"little",
              compress: int = zipfile.ZIP_STORED, prefix: str = "archive") -> pathlib.Path:
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr(f"{prefix}/data.pkl", pkl)
        if byteorder is not None:
            archive.writestr(f"{prefix}/byteorder", byteorder)
        for key, raw in storages.items():
            archive.writestr(zipfile.ZipInfo(f"{prefix}/data/{key}"), raw, compress_type=compress)
    return pathlib.Path(path)


def patch_zip_member(path, name: str, *, flags: int | None = None, method: int | None = None,
                     size: int | None = None) -> None:
    """Rewrites a member's flag bits, compression method or uncompressed size in both headers."""
    blob = bytearray(pathlib.Path(path).read_bytes())
    encoded = name.encode()
    # central directory entry: flags @8, method @10, usize @24, name @46
    for signature, flag_at, method_at, size_at, name_at in ((b"PK\x01\x02", 8, 10, 24, 46),
                                                            (b"PK\x03\x04", 6, 8, 22, 30)):
        start = 0
        while (start := blob.find(signature, start)) >= 0:
            if blob[start + name_at:start + name_at + len(encoded)] == encoded:
                if flags is not None:
                    struct.pack_into("<H", blob, start + flag_at, flags)
                if method is not None:
                    struct.pack_into("<H", blob, start + method_at, method)
                if size is not None:
                    struct.pack_into("<I", blob, start + size_at, size)
            start += 4
    pathlib.Path(path).write_bytes(bytes(blob))


def write_legacy(path, obj_pickle: bytes, storages: list[tuple[str, int, bytes]], *,
                 header: tuple | None = None, keys: list | None = None) -> pathlib.Path:
    header = header or (LEGACY_MAGIC, 1001, {"protocol_version": 1001, "little_endian": True,
                                               "type_sizes": {"short": 2, "int": 4, "long": 4}})
    with open(path, "wb") as f:
        for item in header:
            f.write(item if isinstance(item, bytes) else pickle.dumps(item, protocol=2))
        f.write(obj_pickle)
        f.write(pickle.dumps([k for k, _, _ in storages] if keys is None else keys, protocol=2))
        for _, numel, raw in storages:
            f.write(struct.pack("<q", numel) + raw)
    return pathlib.Path(path)


def write_msgpack(path, tree) -> pathlib.Path:
    import msgpack
    pathlib.Path(path).write_bytes(msgpack.packb(tree, use_bin_type=True))
    return pathlib.Path(path)


def msgpack_array(shape, dtype: str, raw: bytes):
    import msgpack
    return msgpack.ExtType(1, msgpack.packb((list(shape), dtype, raw), use_bin_type=True))


def flax_payload(variables, model=LITE0):
    return {"format": "la_iprop.flax_variables.v1", "model": model, "variables": variables}


# ----------------------------------------------------------------------------- the cases
F4 = np.arange(4, dtype="<f4").tobytes()  # a 4-element float storage


def build_cases(directory: pathlib.Path, marker: pathlib.Path, secret: bytes, lite0: dict) -> list[dict]:
    """Writes every hostile file into ``directory``; returns the case list.

    ``lite0`` holds the legitimate bases made by the test: ``state_dict`` (name -> numpy
    array) and ``msgpack`` (path of a Lite0 Flax checkpoint).
    """
    d = pathlib.Path(directory)
    cases: list[dict] = []

    def case(name, path, match, loader="state_dict", expect="error", **extra):
        cases.append({"name": name, "path": str(path), "loader": loader, "expect": expect, "match": match, **extra})

    def one_tensor_zip(name, offset, size, stride, numel=4, raw=F4, storage_type="FloatStorage"):
        pkl = state_dict_pickle({"w": p_tensor("0", numel, offset, size, stride, storage_type)})
        return write_zip(d / f"{name}.pth", pkl, {"0": raw})

    def one_tensor_legacy(name, offset, size, stride, numel=4, raw=F4):
        pkl = state_dict_pickle({"w": p_tensor("0", numel, offset, size, stride, legacy=True)})
        return write_legacy(d / f"{name}.pth", pkl, [("0", numel, raw)])

    # --- controls: legitimate files that must load (and prove the leak detector works)
    case("control_zip_views", one_tensor_zip("control_zip_views", 1, (3,), (1,)), None, expect="ok")
    case("control_legacy", one_tensor_legacy("control_legacy", 0, (2, 2), (2, 1)), None, expect="ok")
    case("control_broadcast_view", one_tensor_zip("control_broadcast_view", 0, (1000, 4), (0, 1)), None,
         expect="ok")
    pad = secret + b"\0" * (-len(secret) % 4)
    pkl = state_dict_pickle({"s": p_tensor("0", len(pad), 0, (len(pad),), (1,), "ByteStorage")})
    case("control_secret_in_file", write_zip(d / "control_secret.pth", pkl, {"0": pad}), None, expect="ok",
         secret_expected=True)

    # --- geometry: out-of-buffer reads and overflow
    case("zip_negative_offset", one_tensor_zip("zip_negative_offset", -(2**16), (2**16,), (1,)), "storage offset")
    case("zip_negative_stride", one_tensor_zip("zip_negative_stride", 3, (64, 1024), (-1024, 1)), "stride")
    case("zip_huge_negative_stride", one_tensor_zip("zip_huge_negative_stride", 0, (2, 2), (-(2**62), 1)),
         "stride")
    case("zip_view_past_end", one_tensor_zip("zip_view_past_end", 0, (10,), (1,)), r"needs 10 elements")
    case("zip_offset_past_end", one_tensor_zip("zip_offset_past_end", 10, (1,), (1,)), r"needs 11 elements")
    case("zip_huge_stride", one_tensor_zip("zip_huge_stride", 0, (2,), (2**62,)), r"needs \d+ elements")
    case("zip_size_2_63", one_tensor_zip("zip_size_2_63", 0, (2**63,), (1,)), r"\[0, 2\*\*63\)")
    case("zip_size_not_int", write_zip(d / "zip_size_not_int.pth", state_dict_pickle({"w": p_call(
        p_global("torch._utils", "_rebuild_tensor_v2"), p_storage("0", 4), p_int(0),
        p_tuple(b"G" + struct.pack(">d", 2.0)), p_tuple(p_int(1)))}), {"0": F4}), "must be an integer")
    case("zip_stride0_1gib", one_tensor_zip("zip_stride0_1gib", 0, (2**28,), (0,), numel=1, raw=F4[:4]),
         "would occupy")
    case("zip_ndim_100", one_tensor_zip("zip_ndim_100", 0, (1,) * 100, (1,) * 100), "MAX_NDIM")
    many = {f"t{i}": p_tensor("0", 2**16, 0, (2**16,), (1,)) for i in range(1200)}
    case("zip_repeated_full_views", write_zip(d / "zip_repeated_full_views.pth", state_dict_pickle(many),
                                              {"0": bytes(2**18)}), "would occupy")
    case("zip_storage_size_mismatch", one_tensor_zip("zip_storage_size_mismatch", 0, (4,), (1,), numel=100),
         "holds 16 bytes")

    # --- zip container
    pkl = state_dict_pickle({"w": p_tensor("0", 2**27, 0, (2**27,), (1,))})
    compressor = zlib.compressobj(9, zlib.DEFLATED, -15)  # a full flush makes a block that stands alone:
    block = compressor.compress(bytes(2**20)) + compressor.flush(zlib.Z_FULL_FLUSH)  # 1 MiB of zeros in ~1 KB
    deflated = block * 512 + b"\x03\x00"  # ... repeated, then an empty final block
    bomb = write_raw_zip(d / "zip_bomb.pth", [("archive/data.pkl", pkl, len(pkl), zlib.crc32(pkl), 0),
                                              ("archive/data/0", deflated, 2**29, _zeros_crc(2**29), 8)])
    case("zip_bomb_512mib", bomb, "may be decompressed")
    lie = d / "zip_declared_size_lie.pth"
    pkl = state_dict_pickle({"w": p_tensor("0", 256, 0, (256,), (1,))})
    write_zip(lie, pkl, {"0": bytes(2**22)}, compress=zipfile.ZIP_DEFLATED)
    patch_zip_member(lie, "archive/data/0", size=1024)
    case("zip_declared_size_lie", lie, r"(?i)crc|inflates beyond|truncated")
    enc = one_tensor_zip("zip_encrypted_flag", 0, (4,), (1,))
    patch_zip_member(enc, "archive/data/0", flags=0x1)
    case("zip_encrypted_flag", enc, "encrypted")
    unk = one_tensor_zip("zip_unknown_compression", 0, (4,), (1,))
    patch_zip_member(unk, "archive/data/0", method=99)
    case("zip_unknown_compression", unk, "compression method 99")
    pkl = state_dict_pickle({"w": p_tensor("0", 4, 0, (4,), (1,))})
    case("zip_bad_byteorder_bytes", write_zip(d / "zip_bad_byteorder.pth", pkl, {"0": F4}, byteorder=b"\xff\xfe\x00"),
         "byteorder record is not text")
    case("zip_big_endian", write_zip(d / "zip_big_endian.pth", pkl, {"0": F4}, byteorder=b"big"), "big-endian")
    case("zip_missing_storage", write_zip(d / "zip_missing_storage.pth", pkl, {}), "missing")
    no_pkl = d / "zip_no_data_pkl.pth"
    with zipfile.ZipFile(no_pkl, "w") as archive:
        archive.writestr("archive/data/0", F4)
    case("zip_no_data_pkl", no_pkl, "expected one data.pkl")
    legit = one_tensor_zip("zip_legit_for_cut", 0, (4,), (1,)).read_bytes()
    (d / "zip_truncated.pth").write_bytes(legit[: len(legit) // 2])
    case("zip_truncated", d / "zip_truncated.pth", "")
    (d / "zip_corrupt_deflate.pth").write_bytes(_corrupt_deflate(d))
    case("zip_corrupt_deflate", d / "zip_corrupt_deflate.pth", "")

    # --- pickle: code execution, forbidden opcodes, structure bombs
    for name, payload in (("zip_global_os_system", p_call(p_global("os", "system"), p_str(f"touch {marker}"))),
                          ("zip_global_posix_system", p_call(p_global("posix", "system"), p_str(f"touch {marker}"))),
                          ("zip_global_builtins_eval", p_call(p_global("builtins", "eval"),
                                                              p_str(f"open({str(marker)!r}, 'w')"))),
                          ("zip_global_builtins_exec", p_call(p_global("__builtin__", "exec"),
                                                              p_str(f"open({str(marker)!r}, 'w')"))),
                          ("zip_global_subprocess", p_call(p_global("subprocess", "check_call"),
                                                           p_tuple(p_str("touch"), p_str(str(marker))))),
                          ("zip_global_getattr", p_call(p_global("builtins", "getattr"), p_str("x"), p_str("y"))),
                          ("zip_global_torch_other", p_call(p_global("torch._utils", "_rebuild_qtensor"))),
                          ("zip_global_numpy", p_call(p_global("numpy.core.multiarray", "_reconstruct")))):
        pkl = state_dict_pickle({"w": p_tensor("0", 4, 0, (4,), (1,))}, [(p_str("evil"), payload)])
        case(name, write_zip(d / f"{name}.pth", pkl, {"0": F4}), "refusing to load global")
    stack_global = pickle_bytes(p_str("os") + p_str("system") + b"\x93" + p_tuple(p_str(f"touch {marker}")) + b"R")
    case("zip_stack_global_os_system", write_zip(d / "zip_stack_global.pth", stack_global, {}),
         "refusing to load global")
    # BUILD on an allowed rebuild function: would set its __defaults__ for the rest of the process
    build = pickle_bytes(p_global("torch._utils", "_rebuild_parameter") + b"N"
                         + p_dict([(p_str("__defaults__"), p_tuple(p_int(1)))]) + b"\x86" + b"b")
    case("zip_build_on_rebuild_function", write_zip(d / "zip_build_fn.pth", build, {}), "refusing BUILD")
    build_tensor = pickle_bytes(p_dict([(p_str("w"), p_tensor("0", 4, 0, (4,), (1,)) + p_dict([]) + b"b")]))
    case("zip_build_on_tensor", write_zip(d / "zip_build_tensor.pth", build_tensor, {"0": F4}), "refusing BUILD")
    build_od = pickle_bytes(p_call(p_global("collections", "OrderedDict")) + b"N"
                            + p_dict([(p_str("x"), p_int(1))]) + b"\x86b")
    case("zip_build_slotstate_on_ordereddict", write_zip(d / "zip_build_od.pth", build_od, {}), "refusing BUILD")
    reduce_storage = state_dict_pickle({"w": p_call(p_global("torch", "FloatStorage"), p_int(10))})
    case("zip_reduce_on_storage_type", write_zip(d / "zip_reduce_storage.pth", reduce_storage, {}),
         "not callable")
    bad_od = state_dict_pickle({"w": p_call(p_global("collections", "OrderedDict"), p_int(5))})
    case("zip_ordereddict_bad_args", write_zip(d / "zip_od_args.pth", bad_od, {}), "list of pairs")
    inst = pickle_bytes(b"(" + p_str("x") + b"iposix\nsystem\n")
    case("zip_opcode_inst", write_zip(d / "zip_inst.pth", inst, {}), "opcode INST")
    newobj = pickle_bytes(p_global("collections", "OrderedDict") + b")\x81")
    case("zip_opcode_newobj", write_zip(d / "zip_newobj.pth", newobj, {}), "opcode NEWOBJ")
    case("zip_memo_index_2_32", write_zip(d / "zip_memo.pth", pickle_bytes(b"Nr\xff\xff\xff\xff"), {}),
         "memoizes at index")
    case("zip_binbytes8_2_63", write_zip(d / "zip_binbytes8.pth",
                                         b"\x80\x04\x8e" + struct.pack("<Q", 2**63 - 1) + b"abc.", {}),
         "not a valid pickle")
    case("zip_binunicode_4gib", write_zip(d / "zip_binunicode.pth", b"\x80\x02X\xff\xff\xff\xffabc.", {}),
         "not a valid pickle")
    case("zip_frame_past_end", write_zip(d / "zip_frame.pth", b"\x80\x04\x95" + struct.pack("<Q", 2**40) + b"N.",
                                         {}), "frame")
    case("zip_deep_nesting", write_zip(d / "zip_deep.pth", pickle_bytes(deep_nesting(100_000)), {}),
         "deeper than 64")
    case("zip_self_reference", write_zip(d / "zip_selfref.pth", pickle_bytes(b"]r\x00\x00\x00\x00j\x00\x00\x00\x00a"),
                                         {}), "contains itself")
    case("zip_stack_bomb", write_zip(d / "zip_stack_bomb.pth", pickle_bytes(b"N" * 200_000 + b"(t"), {}),
         "MAX_PICKLE_STACK")
    case("zip_pop_empty_stack", write_zip(d / "zip_pop.pth", pickle_bytes(b"0"), {}), "empty stack")
    case("zip_bad_persistent_id", write_zip(d / "zip_bad_pid.pth", state_dict_pickle(
        {"w": p_str("storage") + b"Q"}), {}), "persistent id")
    case("zip_persistent_id_deep_key", write_zip(d / "zip_pid_key.pth", state_dict_pickle(
        {"w": p_tuple(p_str("storage"), p_global("torch", "FloatStorage"), deep_nesting(5000), p_str("cpu"),
                      p_int(4)) + b"Q"}), {}), "storage key")
    case("zip_not_a_state_dict", write_zip(d / "zip_list.pth", pickle_bytes(b"]"), {}), "expected a state dict")
    case("zip_no_tensors", write_zip(d / "zip_empty.pth", pickle_bytes(b"}"), {}), "no tensors")
    case("zip_long_text_int", write_zip(d / "zip_long_int.pth", b"L" + b"9" * 100_000 + b"L\n.", {}),
         "not a valid pickle")

    # --- legacy format
    case("legacy_negative_offset_secret", one_tensor_legacy("legacy_negative_offset", -(2**16), (2**16,), (1,)),
         "storage offset")
    case("legacy_negative_stride", one_tensor_legacy("legacy_negative_stride", 3, (64, 1024), (-1024, 1)), "stride")
    case("legacy_huge_negative_stride", one_tensor_legacy("legacy_huge_neg", 0, (2,), (-(2**62),)), "stride")
    case("legacy_view_past_end", one_tensor_legacy("legacy_past_end", 2, (3,), (1,)), r"needs 5 elements")
    pkl = state_dict_pickle({"w": p_tensor("0", 1, 0, (15, 2**30), (0, 0), legacy=True)})
    case("legacy_stride0_60gib", write_legacy(d / "legacy_60gib.pth", pkl, [("0", 1, F4[:4])]), "would occupy")
    pkl = state_dict_pickle({"w": p_tensor("0", 2**40, 0, (4,), (1,), legacy=True)})
    case("legacy_numel_past_file", write_legacy(d / "legacy_numel.pth", pkl, [("0", 2**40, F4)]),
         r"needs \d+ bytes")
    pkl = state_dict_pickle({"w": p_tensor("0", 4, 0, (4,), (1,), legacy=True)})
    case("legacy_numel_mismatch", write_legacy(d / "legacy_numel_neg.pth", pkl, [("0", -1, F4)]), "records -1")
    case("legacy_bad_magic", write_legacy(d / "legacy_magic.pth", pkl, [("0", 4, F4)],
                                          header=(12345, 1001, {})), "bad magic number")
    case("legacy_big_endian", write_legacy(d / "legacy_be.pth", pkl, [("0", 4, F4)],
                                           header=(LEGACY_MAGIC, 1001, {"little_endian": False})), "big-endian")
    case("legacy_keys_mismatch", write_legacy(d / "legacy_keys.pth", pkl, [("0", 4, F4)], keys=["0", "1"]),
         "does not match")
    evil_header = pickle_bytes(p_call(p_global("os", "system"), p_str(f"touch {marker}")))
    case("legacy_global_in_header", write_legacy(d / "legacy_evil_header.pth", pkl, [("0", 4, F4)],
                                                 header=(LEGACY_MAGIC, evil_header, {})), "refusing to load global")
    case("legacy_deep_header", write_legacy(d / "legacy_deep_header.pth", pkl, [("0", 4, F4)],
                                            header=(LEGACY_MAGIC, 1001, pickle_bytes(deep_nesting(100_000)))),
         "deeper than 64")
    legit = one_tensor_legacy("legacy_legit_for_cut", 0, (4,), (1,)).read_bytes()
    for cut in (5, 40, len(legit) - 30, len(legit) - 3):
        (d / f"legacy_truncated_{cut}.pth").write_bytes(legit[:cut])
        case(f"legacy_truncated_{cut}", d / f"legacy_truncated_{cut}.pth", "")
    (d / "garbage.pth").write_bytes(b"not a checkpoint at all\n" * 40)
    case("garbage_text", d / "garbage.pth", "not a PyTorch checkpoint")
    (d / "empty.pth").write_bytes(b"")
    case("empty_file", d / "empty.pth", "")
    (d / "pk_garbage.pth").write_bytes(b"PK\x03\x04" + b"\xff" * 100)
    case("zip_magic_garbage", d / "pk_garbage.pth", "")

    # --- non-finite weights (a real Lite0 state dict with one poisoned tensor)
    import torch
    poisoned = {k: torch.from_numpy(np.array(v)) for k, v in lite0["state_dict"].items()}
    name = next(k for k in poisoned if k.endswith("conv_stem.weight") or k.endswith("stem.0.weight")
                or k.endswith(".weight"))
    poisoned[name].view(-1)[::7] = float("nan")
    torch.save(poisoned, d / "lite0_nan.pth")
    case("lite0_nan_weights", d / "lite0_nan.pth", "non-finite", loader="model")
    lite_msgpack = pathlib.Path(lite0["msgpack"])
    case("lite0_msgpack_control", lite_msgpack, None, loader="flax", expect="ok")
    inf_path = d / "lite0_inf.msgpack"
    _poison_msgpack(lite_msgpack, inf_path)
    case("lite0_msgpack_inf_weights", inf_path, r"non-finite.*1 Inf", loader="model")

    # --- msgpack Flax checkpoints
    def mp(name, tree, match):
        case(name, write_msgpack(d / f"{name}.msgpack", tree), match, loader="flax")

    (d / "msgpack_garbage.msgpack").write_bytes(b"\xc1" + os.urandom(64))
    case("msgpack_garbage", d / "msgpack_garbage.msgpack", "not a valid msgpack", loader="flax")
    (d / "msgpack_truncated.msgpack").write_bytes(lite_msgpack.read_bytes()[:5000])
    case("msgpack_truncated", d / "msgpack_truncated.msgpack", "not a valid msgpack", loader="flax")
    mp("msgpack_not_a_dict", [1, 2, 3], "not a la_iprop Flax checkpoint")
    mp("msgpack_missing_variables", {"format": "la_iprop.flax_variables.v1", "model": LITE0}, "no 'variables'")
    mp("msgpack_variables_not_dict", flax_payload(5), "no 'variables'")
    mp("msgpack_wrong_model", flax_payload({}, model="resnet50"), "holds variables of 'resnet50'")
    mp("msgpack_leaf_not_array", flax_payload({"params": {"x": "text"}}), "not arrays")
    mp("msgpack_bad_keys", flax_payload({"params": {"nonsense": msgpack_array((2,), "float32", bytes(8))}}),
       "missing variable.*unexpected variable.*params/nonsense")
    mp("msgpack_array_bytes_mismatch", flax_payload({"x": msgpack_array((1000, 1000), "float32", bytes(16))}),
       "holds 16 bytes")
    mp("msgpack_negative_shape", flax_payload({"x": msgpack_array((-1, 4), "float32", bytes(16))}),
       r"\[0, 2\*\*63\)")
    mp("msgpack_shape_2_63", flax_payload({"x": msgpack_array((2**63 - 1, 2), "float32", bytes(16))}),
       "holds 16 bytes")
    mp("msgpack_object_dtype", flax_payload({"x": msgpack_array((1,), "object", bytes(8))}), "unsupported array dtype")
    import msgpack
    mp("msgpack_unknown_ext", flax_payload({"x": msgpack.ExtType(42, b"abc")}), "extension type 42")
    mp("msgpack_complex_ext", flax_payload({"x": msgpack.ExtType(2, msgpack.packb((1.0, 2.0)))}), "extension type 2")
    mp("msgpack_ext_not_triple", flax_payload({"x": msgpack.ExtType(1, msgpack.packb([1, 2]))}), "not \\(shape")
    mp("msgpack_int_keys", flax_payload({1: msgpack_array((1,), "float32", bytes(4))}), "not a valid msgpack")
    mp("msgpack_chunked_bad", flax_payload({"x": {"__msgpack_chunked_array__": True, "shape": {"0": 10},
                                                  "chunks": {"0": msgpack_array((3,), "float32", bytes(12))}}}),
       "holds 3 elements")
    mp("msgpack_chunked_keys", flax_payload({"x": {"__msgpack_chunked_array__": True, "shape": {"5": 1},
                                                   "chunks": {}}}), "malformed chunked array")
    deep = {"leaf": 1}
    for _ in range(200):
        deep = {"a": deep}
    mp("msgpack_deep_nesting_200", flax_payload(deep), "deeper than 64")
    (d / "msgpack_deep_2000.msgpack").write_bytes(b"\x81\xa1a" * 2000 + b"\x80")
    case("msgpack_deep_nesting_2000", d / "msgpack_deep_2000.msgpack", "not a valid msgpack", loader="flax")
    (d / "msgpack_bin_4gib.msgpack").write_bytes(b"\x81\xa1x\xc6\xff\xff\xff\xf0abc")
    case("msgpack_bin_declares_4gib", d / "msgpack_bin_4gib.msgpack", "not a valid msgpack", loader="flax")
    (d / "msgpack_array_2_32.msgpack").write_bytes(b"\xdd\xff\xff\xff\xff\xc0")
    case("msgpack_array_declares_2_32", d / "msgpack_array_2_32.msgpack", "not a valid msgpack", loader="flax")
    return cases


def _zeros_crc(n: int) -> int:
    crc, chunk = 0, bytes(2**20)
    for _ in range(n // len(chunk)):
        crc = zlib.crc32(chunk, crc)
    return crc


def write_raw_zip(path, members: list[tuple[str, bytes, int, int, int]]) -> pathlib.Path:
    """A zip whose members are given as (name, stored bytes, uncompressed size, CRC, method) as is."""
    out = io.BytesIO()
    entries = [_raw_member(out, *member) for member in members]
    central = out.tell()
    for filename, offset, csize, usize, crc, method in entries:
        encoded = filename.encode()
        out.write(struct.pack("<4sHHHHHHIIIHHHHHII", b"PK\x01\x02", 20, 20, 0, method, 0, 0x21, crc, csize, usize,
                              len(encoded), 0, 0, 0, 0, 0, offset) + encoded)
    end = out.tell()
    out.write(struct.pack("<4sHHHHIIH", b"PK\x05\x06", 0, 0, len(entries), len(entries), end - central, central, 0))
    pathlib.Path(path).write_bytes(out.getvalue())
    return pathlib.Path(path)


def _raw_member(out, filename, data, usize, crc, method):
    """Writes one local header and its data; returns the central directory fields."""
    encoded = filename.encode()
    offset = out.tell()
    out.write(struct.pack("<4sHHHHHIIIHH", b"PK\x03\x04", 20, 0, method, 0, 0x21, crc, len(data), usize,
                          len(encoded), 0) + encoded + data)
    return filename, offset, len(data), usize, crc, method


def _corrupt_deflate(d: pathlib.Path) -> bytes:
    pkl = state_dict_pickle({"w": p_tensor("0", 1024, 0, (1024,), (1,))})
    path = write_zip(d / "zip_deflate_base.pth", pkl, {"0": np.arange(1024, dtype="<f4").tobytes()},
                     compress=zipfile.ZIP_DEFLATED)
    blob = bytearray(path.read_bytes())
    at = blob.find(b"PK\x03\x04", blob.find(b"archive/data/0") - 40)
    start = at + 30 + len(b"archive/data/0")
    for i in range(start + 5, start + 60):
        blob[i] ^= 0x5A
    return bytes(blob)


def _poison_msgpack(src: pathlib.Path, dst: pathlib.Path) -> None:
    """A copy of a Flax checkpoint with one Inf in its first float array (msgpack re-encoded)."""
    import msgpack

    def hook(code, data):
        return msgpack.ExtType(code, data)

    tree = msgpack.unpackb(src.read_bytes(), ext_hook=hook, raw=False)
    node = tree["variables"]
    while isinstance(node, dict):
        key = sorted(node)[0]
        parent, node = node, node[key]
    shape, dtype, raw = msgpack.unpackb(node.data, raw=True)
    raw = bytearray(raw)
    raw[:4] = np.array([np.inf], "<f4").tobytes()
    parent[key] = msgpack.ExtType(1, msgpack.packb((shape, dtype, bytes(raw)), use_bin_type=True))
    dst.write_bytes(msgpack.packb(tree, use_bin_type=True))


# ----------------------------------------------------------------------------- the runner (in a subprocess)
def vm_size() -> int:
    for line in pathlib.Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmSize:"):
            return int(line.split()[1]) * 1024
    return 0


def limit_address_space(headroom: int) -> int:
    """Caps this process's address space at its current size plus ``headroom``; returns the cap."""
    cap = vm_size() + headroom
    resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
    return cap


def run(cases_path: str, results_path: str, headroom: int = 1536 * 2**20) -> None:
    sys.path.insert(0, str(ROOT))
    import jax
    import jax.numpy as jnp

    from la_iprop.models import CheckpointError, load_model, load_state_dict, zoo
    from la_iprop.models.efficientnet_lite import EfficientNetLite0

    spec = json.loads(pathlib.Path(cases_path).read_text())
    secret = spec["secret"].encode()
    # ~5 MB of the secret on the heap, in small (pymalloc) and large (malloc) objects, next to where
    # the reader's own small buffers are allocated: an out-of-buffer read would very likely return it.
    planted = ([secret * 3 + bytes([i % 256]) for i in range(20000)]
               + [secret * 64 + bytes([i % 256]) for i in range(1000)])
    template = jax.eval_shape(EfficientNetLite0().init, jax.random.PRNGKey(0), jnp.zeros((1, 224, 224, 3)))
    imported = vm_size()
    cap = limit_address_space(headroom)
    with open(results_path, "w") as out:
        out.write(json.dumps({"name": "__limits__", "vm_after_import": imported, "rlimit_as": cap}) + "\n")
        for case in spec["cases"]:
            record = {"name": case["name"]}
            try:
                if case["loader"] == "state_dict":
                    arrays = list(load_state_dict(case["path"]).values())
                elif case["loader"] == "flax":
                    arrays = jax.tree_util.tree_leaves(
                        zoo.read_flax_checkpoint(case["path"], template, architecture=LITE0))
                else:
                    model = load_model(LITE0, case["path"], allow_nonfinite=case.get("allow_nonfinite", False))
                    arrays = jax.tree_util.tree_leaves(model.variables)
                record["outcome"] = "ok"
                record["leaked"] = any(secret in np.asarray(a).tobytes() for a in arrays)
            except CheckpointError as err:
                record.update(outcome="CheckpointError", message=str(err), leaked=secret in str(err).encode())
            except BaseException as err:  # noqa: BLE001 - reported, the test fails on it
                record.update(outcome=type(err).__name__, message=re.sub(r"\s+", " ", str(err))[:500])
            out.write(json.dumps(record) + "\n")
            out.flush()
    del planted


def run_one(path: str, cap: int) -> None:
    """Loads one file with checkpoint.py imported on its own (no jax), under an absolute address-space cap."""
    import importlib.util
    spec = importlib.util.spec_from_file_location("standalone_checkpoint", ROOT / "la_iprop" / "models" / "checkpoint.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    imported = vm_size()
    resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
    try:
        module.load_state_dict(path)
        result = {"outcome": "ok"}
    except module.CheckpointError as err:
        result = {"outcome": "CheckpointError", "message": str(err)}
    except BaseException as err:  # noqa: BLE001
        result = {"outcome": type(err).__name__, "message": str(err)[:500]}
    print(json.dumps({**result, "vm_after_import": imported}))


if __name__ == "__main__":
    if sys.argv[1] == "run":
        run(sys.argv[2], sys.argv[3])
    elif sys.argv[1] == "one":
        run_one(sys.argv[2], int(sys.argv[3]))
