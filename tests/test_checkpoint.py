"""The torch-free checkpoint reader: both formats, refusal of malicious pickles, corrupt files."""

from __future__ import annotations

import pathlib
import pickle
import sys
import zipfile

import numpy as np
import pytest
import torch

from la_iprop.models import CheckpointError, load_state_dict
from la_iprop.models.zoo import EMBEDDED_LITE0_CHECKPOINT

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))  # tests/hostile_checkpoints.py


def test_reads_embedded_legacy_checkpoint_like_torch():
    path = EMBEDDED_LITE0_CHECKPOINT()
    assert not zipfile.is_zipfile(path)  # the embedded file is the legacy format
    ours = load_state_dict(path)
    theirs = torch.load(path, weights_only=True)
    assert set(ours) == set(theirs)
    for name, tensor in theirs.items():
        np.testing.assert_array_equal(ours[name], tensor.numpy(), err_msg=name)


def test_reads_zip_checkpoint_with_views_and_dtypes(tmp_path):
    base = torch.randn(6, 5)
    state = {
        "transposed": base.t(),             # non-contiguous strides
        "slice": base[2:4],                 # storage offset into a shared storage
        "shared": base,
        "int64": torch.arange(7),
        "half": torch.randn(3).half(),
        "bf16": torch.randn(4).bfloat16(),
        "bool": torch.tensor([True, False]),
        "scalar": torch.tensor(3.5),
        "param": torch.nn.Parameter(torch.randn(2, 2)),
    }
    path = tmp_path / "model.pth"
    torch.save(state, path)
    assert zipfile.is_zipfile(path)
    ours = load_state_dict(path)
    for name, tensor in state.items():
        np.testing.assert_array_equal(ours[name], tensor.detach().float().numpy() if name == "bf16"
                                      else tensor.detach().numpy(), err_msg=name)
        assert ours[name].shape == tuple(tensor.shape)


def test_reads_legacy_checkpoint_written_by_torch(tmp_path):
    module = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
    path = tmp_path / "legacy.pth"
    torch.save(module.state_dict(), path, _use_new_zipfile_serialization=False)
    ours = load_state_dict(path)
    for name, tensor in module.state_dict().items():
        np.testing.assert_array_equal(ours[name], tensor.numpy())


def test_unwraps_training_checkpoint(tmp_path):
    path = tmp_path / "ckpt.pth"
    torch.save({"epoch": 3, "state_dict": {"w": torch.ones(2)}}, path)
    assert list(load_state_dict(path)) == ["w"]


class _Exploit:
    def __init__(self, command):
        self.command = command

    def __reduce__(self):
        import os
        return (os.system, (self.command,))


class _ExecExploit:
    def __init__(self, code):
        self.code = code

    def __reduce__(self):
        import builtins
        return (builtins.exec, (self.code,))


@pytest.mark.parametrize("payload_kind", ["os.system", "builtins.exec"])
def test_refuses_malicious_zip_pickle_without_running_it(tmp_path, payload_kind):
    marker = tmp_path / "pwned"
    if payload_kind == "os.system":
        payload = {"w": torch.ones(1), "evil": _Exploit(f"touch {marker}")}
    else:
        payload = {"w": torch.ones(1), "evil": _ExecExploit(f"open({str(marker)!r}, 'w').write('x')")}
    path = tmp_path / "evil.pth"
    torch.save(payload, path)  # a zip archive with a forbidden global inside data.pkl
    with pytest.raises(CheckpointError, match=r"refusing to load global '(posix|os|nt|builtins|__builtin__)\.(system|exec)'"):
        load_state_dict(path)
    assert not marker.exists()


def test_refuses_malicious_legacy_pickle_without_running_it(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil_legacy.pth"
    with open(path, "wb") as f:
        for header in (0x1950A86A20F9469CFC6C, 1001, {"protocol_version": 1001, "little_endian": True}):
            pickle.dump(header, f, protocol=2)
        pickle.dump({"evil": _Exploit(f"touch {marker}")}, f, protocol=2)
        pickle.dump([], f, protocol=2)
    with pytest.raises(CheckpointError, match="refusing to load global"):
        load_state_dict(path)
    assert not marker.exists()


def test_truncated_and_corrupt_files_raise_reader_error(tmp_path):
    embedded = EMBEDDED_LITE0_CHECKPOINT()
    blob = open(embedded, "rb").read()
    for cut in (10, 5000, len(blob) // 2, len(blob) - 100):
        path = tmp_path / f"cut{cut}.pth"
        path.write_bytes(blob[:cut])
        with pytest.raises(CheckpointError):
            load_state_dict(path)
    zipped = tmp_path / "zip.pth"
    torch.save({"w": torch.randn(100, 100)}, zipped)
    raw = zipped.read_bytes()
    truncated = tmp_path / "zip_cut.pth"
    truncated.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(CheckpointError):
        load_state_dict(truncated)
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint at all" * 10)
    with pytest.raises(CheckpointError):
        load_state_dict(garbage)
    with pytest.raises(CheckpointError, match="not found"):
        load_state_dict(tmp_path / "missing.pth")


def test_zip_with_missing_storage_is_reported(tmp_path):
    path = tmp_path / "m.pth"
    torch.save({"w": torch.randn(3)}, path)
    broken = tmp_path / "broken.pth"
    with zipfile.ZipFile(path) as src, zipfile.ZipFile(broken, "w") as dst:
        for item in src.infolist():
            if "/data/" not in item.filename:
                dst.writestr(item, src.read(item.filename))
    with pytest.raises(CheckpointError, match="missing"):
        load_state_dict(broken)


def test_broadcast_tied_and_reinterpreted_views_load_like_torch(tmp_path):
    """Legitimate views the hardened reader must keep accepting: expand (stride 0), tied weights,
    strided slices, zero-size tensors; results are C-contiguous writable copies."""
    base = torch.randn(4, 3)
    state = {
        "expanded": torch.arange(3.0).expand(5, 3),            # stride (0, 1)
        "position_ids": torch.arange(8).expand((1, -1)),      # HF-style buffer
        "tied_a": base, "tied_b": base.detach(),               # one storage, two tensors
        "column": base[:, 1],                                  # stride 3, offset 1
        "empty": torch.zeros(0, 7),
        "bf16_expanded": torch.randn(1).bfloat16().expand(4),
    }
    path = tmp_path / "views.pth"
    torch.save(state, path)
    ours = load_state_dict(path)
    assert list(ours) == list(state)
    for name, tensor in state.items():
        expected = tensor.float().numpy() if tensor.dtype == torch.bfloat16 else tensor.numpy()
        np.testing.assert_array_equal(ours[name], expected, err_msg=name)
        assert ours[name].shape == tuple(tensor.shape) and ours[name].flags.c_contiguous and ours[name].flags.writeable
    assert not np.shares_memory(ours["tied_a"], ours["tied_b"])


def test_build_cannot_change_the_reader(tmp_path):
    """A crafted BUILD on an allowed rebuild function is refused, and the next load is unaffected."""
    import hostile_checkpoints as hc

    build = hc.pickle_bytes(hc.p_global("torch._utils", "_rebuild_tensor_v2") + b"N"
                            + hc.p_dict([(hc.p_str("__defaults__"), hc.p_tuple(hc.p_int(1)))]) + b"\x86b")
    with pytest.raises(CheckpointError, match="refusing BUILD"):
        load_state_dict(hc.write_zip(tmp_path / "build.pth", build, {}))
    path = tmp_path / "ok.pth"
    torch.save({"w": torch.arange(6.0).reshape(2, 3)}, path)
    np.testing.assert_array_equal(load_state_dict(path)["w"], np.arange(6.0).reshape(2, 3))


def test_limits_are_documented_module_constants():
    from la_iprop.models import checkpoint

    for name in ("MAX_TOTAL_BYTES", "MAX_INFLATION", "MAX_VIEW_AMPLIFICATION", "VIEW_SLACK_BYTES",
                 "MAX_PICKLE_BYTES", "MAX_PICKLE_OPS", "MAX_PICKLE_STACK", "MAX_NESTING", "MAX_NDIM"):
        assert isinstance(getattr(checkpoint, name), int) and name in checkpoint.__doc__
