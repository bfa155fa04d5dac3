"""The run store on real files with a tiny classifier (32x32 inputs, 10 classes), so every run takes seconds.

Attributions once, metrics many (a protocol added to a finished run computes no map), image
selection, and what a resumed run checks: the data's fingerprint (an added or changed image is
another run), every batch file (corrupt, short, stray or foreign files are moved to quarantine/
and recomputed), and every flag before anything is written.
"""

from __future__ import annotations

import contextlib
import csv
import json
import os
import pathlib
import stat

import numpy as np
import pytest
import tiny_model as tiny
from tiny_model import TINY

TINY_SPEC = tiny.spec()


@contextlib.contextmanager
def _registered(mp: pytest.MonkeyPatch):
    from la_iprop.models import zoo
    mp.setitem(zoo._MODELS, TINY, TINY_SPEC)
    yield


@pytest.fixture(scope="module", autouse=True)
def tiny_model():
    """The tiny model in the registry for this module's tests only."""
    with pytest.MonkeyPatch.context() as mp, _registered(mp):
        yield TINY


def _config(out, **overrides):
    from la_iprop.runs.config import RunConfig
    kwargs = dict(methods=("sm",), model=TINY, num_images=5, batch_size=2, seed=1, out=str(out))
    return RunConfig(**{**kwargs, **overrides})


def _csv(out) -> list[dict]:
    with open(pathlib.Path(out) / "results.csv") as f:
        return [{k: v for k, v in row.items() if k != "seconds"} for row in csv.DictReader(f)]


# ----------------------------------------------------------------------------- attributions once, metrics many
@pytest.mark.slow
def test_adding_a_protocol_scores_the_stored_maps_and_computes_no_map(tmp_path, counted):
    from la_iprop.runs.engine import run
    from la_iprop.runs.store import load_records

    first = run(_config(tmp_path / "run", methods=("counted_sm",)), progress=False)
    assert len(counted) == 3 and list(first["results"]) == ["la"]  # 3 batches (5 images, batches of 2)
    counted.clear()
    both = run(_config(tmp_path / "run", methods=("counted_sm",), protocols=("la", "rise")), progress=False)
    assert counted == []  # re-scoring: no attribution call at all
    assert both["results"]["la"] == first["results"]["la"]
    fresh = run(_config(tmp_path / "fresh", methods=("counted_sm",), protocols=("la", "rise")), progress=False)
    assert len(counted) == 3
    for protocol in ("la", "rise"):
        rescored = load_records(tmp_path / "run", "counted_sm", protocol)
        direct = load_records(tmp_path / "fresh", "counted_sm", protocol)
        np.testing.assert_array_equal(rescored["insertion"], direct["insertion"])
        np.testing.assert_array_equal(rescored["deletion"], direct["deletion"])
        np.testing.assert_array_equal(rescored["insertion_curve"], direct["insertion_curve"])
    assert fresh["results"]["rise"]["counted_sm"]["insertion"] == both["results"]["rise"]["counted_sm"]["insertion"]
    # the rise game differs from la's (pixels ranked, blur/mean substrates), so the numbers do too
    assert both["results"]["rise"]["counted_sm"]["insertion"] != both["results"]["la"]["counted_sm"]["insertion"]

    # Reports: a protocol column, summary keyed by protocol, a Markdown section per protocol.
    rows = _csv(tmp_path / "run")
    assert [r["protocol"] for r in rows] == ["la"] * 5 + ["rise"] * 5
    assert rows == _csv(tmp_path / "fresh")
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert list(summary["results"]) == ["la", "rise"] and summary["protocols"] == ["la", "rise"]
    assert summary["protocol"]["rise"]["ranking"] == "pixel" and summary["protocol"]["rise"]["mean_color"]
    text = (tmp_path / "run" / "results.md").read_text()
    assert text.index("protocol `la`") < text.index("protocol `rise`")
    # The protocols are not part of the identity; each protocol's settings are recorded on their own.
    assert "protocols" not in json.loads((tmp_path / "run" / "run.json").read_text())
    assert json.loads((tmp_path / "run" / "scores" / "rise" / "protocol.json").read_text())["definition"]["step"] == 224


def test_changed_protocol_settings_are_refused(tmp_path):
    from la_iprop.runs.engine import run
    from la_iprop.runs.store import ConfigError

    run(_config(tmp_path), progress=False)
    path = tmp_path / "scores" / "la" / "protocol.json"
    stored = json.loads(path.read_text())
    stored["definition"]["step"] = 1
    path.write_text(json.dumps(stored))
    with pytest.raises(ConfigError, match=r"--protocol: the la scores .* other la settings \(step\)"):
        run(_config(tmp_path), progress=False)


def test_old_format_run_folder_is_a_clear_error(tmp_path):
    from la_iprop.runs.engine import run
    from la_iprop.runs.store import ConfigError

    (tmp_path / "run.json").write_text(json.dumps({"methods": ["sm"], "protocol": "la"}))
    with pytest.raises(ConfigError, match="older storage format"):
        run(_config(tmp_path), progress=False)


# ----------------------------------------------------------------------------- image selection
def test_stride_selects_every_kth_image_with_keys_from_the_dataset_index(tmp_path):
    from la_iprop.attribution import get_method
    from la_iprop.data import open_source
    from la_iprop.runs.config import image_keys, select_images
    from la_iprop.runs.engine import run
    from la_iprop.runs.store import load_records
    from la_iprop.runs.validation import validate

    config = _config(tmp_path / "strided", methods=("sg",), start=1, stride=2, num_images=None, batch_size=2)
    source = validate(config)
    assert select_images(config, source).tolist() == [1, 3, 5]
    assert select_images(_config(tmp_path, start=1, stride=2, num_images=2), source).tolist() == [1, 3]
    run(config, progress=False)
    records = load_records(tmp_path / "strided", "sg", attributions=True)
    assert records["index"].tolist() == [1, 3, 5]
    assert records["id"].tolist() == [source.ids[i] for i in (1, 3, 5)]
    # sg draws noise from each image's key: the key of dataset index 3, not of position 1
    model = tiny.build(None)
    image = open_source("samples", size=32).load([3]).images
    direct = get_method("sg").fn(model, image, records["predicted"][1:2], key=image_keys(1, np.asarray([3])),
                                 **get_method("sg").quick)
    np.testing.assert_allclose(records["attribution"][1], np.asarray(direct)[0], rtol=1e-5, atol=1e-7)


# ----------------------------------------------------------------------------- the data's fingerprint
def _png(path: pathlib.Path, seed: int, size: int = 40) -> None:
    from PIL import Image
    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)


def _bomb_png(path: pathlib.Path) -> None:
    """A PNG whose header claims 20000 x 20000 pixels (PIL refuses it as a decompression bomb on open)."""
    import io
    import struct
    import zlib

    from PIL import Image
    buffer = io.BytesIO()
    Image.new("RGB", (1, 1)).save(buffer, format="PNG")
    data = bytearray(buffer.getvalue())
    data[16:24] = struct.pack(">II", 20000, 20000)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    path.write_bytes(bytes(data))


def _files(out: pathlib.Path) -> dict[str, int]:
    return {str(p.relative_to(out)): p.stat().st_mtime_ns for p in sorted(out.rglob("*")) if p.is_file()}


@pytest.mark.slow
def test_an_added_or_changed_image_is_another_run(tmp_path):
    from la_iprop.runs.engine import run
    from la_iprop.runs.store import ConfigError

    folder = tmp_path / "images"
    for seed, name in enumerate(("a.png", "b.png", "c.png")):
        _png(folder / name, seed)
    out, out3 = tmp_path / "all", tmp_path / "first3"
    config = _config(out, data=f"folder:{folder}", num_images=None)
    config3 = _config(out3, data=f"folder:{folder}", num_images=3, batch_size=3)
    run(config, progress=False)
    run(config3, progress=False)
    before = _files(tmp_path)
    _png(folder / "b2.png", 7)  # sorts between b and c: before the fix, c was scored twice and b2 never
    with pytest.raises(ConfigError, match=r"^--data: folder:.* changed since the run in .* started: 1 image\(s\) "
                                          r"now in the images that were not \(b2.png\);"):
        run(config, progress=False)
    with pytest.raises(ConfigError, match=r"1 image\(s\) now in the images that were not \(b2.png\), 1 image\(s\) "
                                          r"no longer in the images \(c.png\)"):
        run(config3, progress=False)
    (folder / "b2.png").unlink()
    _png(folder / "a.png", 99)  # same name, other pixels
    with pytest.raises(ConfigError, match=r"1 image\(s\) with other content \(a.png\)"):
        run(config, progress=False)
    assert _files(tmp_path) == {**before, **{k: v for k, v in _files(tmp_path).items() if k.startswith("images")}}
    # refused before writing anything


def test_an_unreadable_or_oversized_image_is_one_line_naming_it(tmp_path):
    from la_iprop.runs.engine import run
    from la_iprop.runs.store import ConfigError

    folder = tmp_path / "images"
    _png(folder / "a.png", 0)
    (folder / "b.png").write_bytes(b"not an image")
    with pytest.raises(ConfigError, match=r"^--data: cannot (read image file .*b\.png: cannot )?identify image "
                                          r"file .*b\.png"):
        run(_config(tmp_path / "o1", data=f"folder:{folder}", num_images=None), progress=False)
    (folder / "b.png").unlink()
    _bomb_png(folder / "c.png")
    with pytest.raises(ConfigError, match=r"^--data: cannot read image file .*c\.png: .*decompression bomb") as err:
        run(_config(tmp_path / "o2", data=f"folder:{folder}", num_images=None), progress=False)
    assert "\n" not in str(err.value)
    assert not (tmp_path / "o1").exists() and not (tmp_path / "o2").exists()


def test_the_reference_set_is_loaded_only_for_methods_that_need_it(tmp_path):
    from la_iprop.runs.config import REFERENCE_SET_SIZE
    from la_iprop.runs.engine import run
    from la_iprop.runs.store import ConfigError

    folder = tmp_path / "images"
    (folder / "0.png").parent.mkdir()
    (folder / "0.png").write_bytes(b"broken")  # inside the reference set, outside the run's images
    for i in range(1, 4):
        _png(folder / f"{i}.png", i)
    run(_config(tmp_path / "sm", data=f"folder:{folder}", start=1, num_images=None), progress=False)
    with pytest.raises(ConfigError, match=rf"^--data: the reference set of eg \(images 0-{min(REFERENCE_SET_SIZE, 4) - 1}"
                                          r" of folder:.*\): cannot (read image file .*0\.png: cannot )?identify "
                                          r"image file .*0\.png"):
        run(_config(tmp_path / "eg", methods=("eg",), data=f"folder:{folder}", start=1, num_images=None),
            progress=False)
    assert not (tmp_path / "eg").exists()


# ----------------------------------------------------------------------------- flags: checked before any file
def test_a_refused_flag_writes_nothing_and_the_corrected_command_runs(tmp_path):
    from la_iprop.runs.engine import run
    from la_iprop.runs.store import ConfigError
    from la_iprop.runs.validation import validate

    out = tmp_path / "run"
    with pytest.raises(ConfigError, match=r"^--hparams: sg \(.*samples='3o'.*\): samples must be an integer >= 1, "
                                          r"got '3o'$"):
        run(_config(out, methods=("sg",), hparams={"sg": {"samples": "3o"}}), progress=False)
    with pytest.raises(ConfigError, match=r"^--hparams: sg .*: std must be"):
        run(_config(out, methods=("sg",), hparams={"sg": {"std": -1.0}}), progress=False)
    with pytest.raises(ConfigError, match=r"^--method: sm given more than once$"):
        validate(_config(out, methods=("sm", "sm")))
    with pytest.raises(ConfigError, match=r"^--protocol: la given more than once$"):
        validate(_config(out, protocols=("la", "la")))
    with pytest.raises(ConfigError, match=r"^--stride: must be >= 1"):
        validate(_config(out, stride=0))
    assert not out.exists()
    run(_config(out, methods=("sg",), hparams={"sg": {"samples": 3}}), progress=False)
    assert (out / "results.csv").exists()


# ----------------------------------------------------------------------------- checked batch files
@pytest.mark.slow
def test_bad_batch_files_are_moved_aside_and_recomputed(tmp_path, counted):
    from la_iprop.runs.checksums import with_checksum
    from la_iprop.runs.engine import run

    out = tmp_path / "run"
    config = _config(out, methods=("counted_sm",))
    run(config, progress=False)
    reference = _csv(out)
    run(_config(tmp_path / "others", methods=("counted_sm",), start=1), progress=False)  # other images
    run(_config(tmp_path / "seed", methods=("counted_sm",), seed=2), progress=False)     # other settings
    maps, scores = out / "batches" / "counted_sm", out / "scores" / "la" / "counted_sm"
    planted = {
        maps / "batch_00000.npz": "holds images",                           # another image set copied over
        scores / "batch_00000.npz": "written by a run with other settings",  # same images, another seed
        scores / "batch_00001.npz": "insertion not 2 rows",                  # short
        maps / "batch_00002.npz": "unreadable",                              # corrupt (truncated)
        maps / "batch_00007.npz": "batch 7 does not exist in this run",      # a batch number that should not exist
        scores / "batch_00001 (copy).npz": "not a batch file of this run",   # a stray name
        maps / ".batch_00001.npz.k1ll3d.tmp": "an unfinished write",          # a write cut short by a kill
    }
    (maps / "batch_00000.npz").write_bytes((tmp_path / "others/batches/counted_sm/batch_00000.npz").read_bytes())
    (scores / "batch_00000.npz").write_bytes((tmp_path / "seed/scores/la/counted_sm/batch_00000.npz").read_bytes())
    (scores / "batch_00001 (copy).npz").write_bytes((scores / "batch_00001.npz").read_bytes())
    short = dict(np.load(scores / "batch_00001.npz"))
    short["insertion"] = short["insertion"][:1]
    np.savez(scores / "batch_00001.npz", **with_checksum(short))  # a valid checksum: the row count is checked
    (maps / "batch_00007.npz").write_bytes((maps / "batch_00001.npz").read_bytes())
    data = (maps / "batch_00002.npz").read_bytes()
    (maps / "batch_00002.npz").write_bytes(data[: len(data) // 2])
    (maps / ".batch_00001.npz.k1ll3d.tmp").write_bytes(data[:1000])
    counted.clear()

    run(config, progress=False)
    assert len(counted) == 2  # the maps of batches 0 and 2, nothing else
    assert _csv(out) == reference
    log = (out / "quarantine" / "log.txt").read_text().splitlines()
    assert len(log) == len(planted)
    for path, reason in planted.items():
        relative = str(path.relative_to(out))
        line = next(entry for entry in log if f" {relative} -> " in entry)
        assert reason in line, line
        assert (out / "quarantine" / relative).exists()  # moved aside, never deleted
    counted.clear()
    run(config, progress=False)  # a finished run: nothing moved, nothing computed
    assert counted == [] and len((out / "quarantine" / "log.txt").read_text().splitlines()) == len(planted)


def test_atomic_write_leaves_the_old_file_or_the_new_one_with_the_umask_permissions(tmp_path):
    """A failed write keeps the previous content and leaves no temporary file; a finished one has the
    permissions open() would give (mkstemp's own 0600 would hide a lab's shared results from its group)."""
    from la_iprop.runs.store import atomic_write

    path = tmp_path / "results.csv"
    umask = os.umask(0o022)
    os.umask(umask)
    atomic_write(path, lambda f: f.write("a,b\n"))
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask

    def fail(f):
        f.write("half")
        raise RuntimeError("interrupted")

    with pytest.raises(RuntimeError, match="interrupted"):
        atomic_write(path, fail)
    assert path.read_text() == "a,b\n" and sorted(p.name for p in tmp_path.iterdir()) == ["results.csv"]
