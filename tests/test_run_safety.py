"""Nothing lost, nothing silently wrong (issue 29): the engine-level guarantees, each with a crafted bad input.

- ``--out`` safety: a folder with other content, ``/``, the home directory, a folder inside the data, an
  unwritable or too long path are refused with one line, before anything is written; sweeps have a marker.
- Strict inputs: non-finite, runner-supplied and output-changing hyperparameters, seeds, config types,
  sweep specifications.
- Every check before the first write: what a method checks after its first model call, IProp settings.
- Content checksums: a flipped byte, content rewritten under the old checksum, old run folders, a
  quarantine across file systems, an image replaced during the run.
- OS errors as one line at the CLI; derived ``--out`` names that fit the file system.

Every run uses the tiny classifier (32x32 inputs, 10 classes) on 2-4 images.
"""

from __future__ import annotations

import collections
import contextlib
import csv
import errno
import json
import os
import pathlib
import subprocess
import sys
import zipfile

import numpy as np
import pytest
import tiny_model as tiny
from tiny_model import TINY

from la_iprop.runs.store import ConfigError

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module", autouse=True)
def tiny_model():
    from la_iprop.models import zoo
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(zoo._MODELS, TINY, tiny.spec())
        yield TINY


def _config(out, **overrides):
    from la_iprop.runs.config import RunConfig
    kwargs = dict(methods=("sm",), model=TINY, num_images=4, batch_size=2, seed=1, out=str(out))
    return RunConfig(**{**kwargs, **overrides})


def _listing(path: pathlib.Path) -> dict | None:
    """Every entry under ``path`` with its size and mtime (None: ``path`` does not exist)."""
    if not path.exists():
        return None
    return {str(p.relative_to(path)): (p.stat().st_size if p.is_file() else -1, p.stat().st_mtime_ns)
            for p in sorted(path.rglob("*"))}


def _csv(out) -> list[dict]:
    with open(pathlib.Path(out) / "results.csv") as f:
        return [{k: v for k, v in row.items() if k != "seconds"} for row in csv.DictReader(f)]


def _png(path: pathlib.Path, seed: int, size: int = 40) -> None:
    from PIL import Image
    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)


def _refused(config, pattern: str) -> str:
    from la_iprop.runs.engine import run
    with pytest.raises(ConfigError, match=pattern) as err:
        run(config, progress=False)
    assert "\n" not in str(err.value)
    return str(err.value)


# ----------------------------------------------------------------------------- --out safety
def test_a_folder_with_other_content_is_refused_and_left_as_it_was(tmp_path):
    section = tmp_path / "results" / "reproduction" / "cpu_quick_64"  # like the repository's committed results
    section.mkdir(parents=True)
    (section / "results.md").write_text("committed tables\n")
    (section / "summary.json").write_text("{}\n")
    before = _listing(tmp_path)
    _refused(_config(section), rf"^--out: {section} is not empty and holds no run.json \(it holds results.md, "
                               r"summary.json\): a run writes only into an empty folder or its own run folder")
    _refused(_config(tmp_path / "results"), r"^--out: .*results is not empty and holds no run.json")
    assert _listing(tmp_path) == before


def test_root_home_and_folders_inside_the_data_are_refused(tmp_path, monkeypatch):
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    _refused(_config("/"), r"^--out: / is the root of the file system")
    _refused(_config(home), r"^--out: .*home is the home directory")
    _refused(_config("~"), r"^--out: ~ is the home directory")
    images = tmp_path / "images"
    for i in range(2):
        _png(images / f"{i}.png", i)
    for out in (images, images / "runs" / "x"):
        _refused(_config(out, data=f"folder:{images}", num_images=None),
                 rf"^--out: {out} is inside the --data folder {images}: its files would be read as images")
    link = tmp_path / "link"  # the same folder through a symbolic link
    link.symlink_to(images)
    _refused(_config(link / "out", data=f"folder:{images}", num_images=None), r"is inside the --data folder")
    assert sorted(p.name for p in images.iterdir()) == ["0.png", "1.png"] and not any(home.iterdir())


def test_paths_that_cannot_be_written_are_refused_before_anything_is_written(tmp_path, monkeypatch):
    (tmp_path / "a_file").write_text("x")
    _refused(_config(tmp_path / "a_file" / "out"), r"^--out: .*a_file/out: .*a_file is not a folder")
    long = "n" * 300
    _refused(_config(tmp_path / long / "out"), r"^--out: the name 'n+'\.\.\. on .* is 300 bytes, longer than the "
                                               r"file system's limit of 255")
    _refused(_config(tmp_path / "out", methods=("sm@" + "v" * 260,)), r"^--out: the name 'sm@v+'\.\.\.")
    monkeypatch.setattr(os, "access", lambda *args, **kwargs: False)  # (root may write anywhere)
    _refused(_config(tmp_path / "out"), rf"^--out: no permission to write in {tmp_path}")
    monkeypatch.undo()

    class ReadOnly:
        f_flag = os.ST_RDONLY

    monkeypatch.setattr(os, "statvfs", lambda path: ReadOnly())
    _refused(_config(tmp_path / "out"), rf"^--out: {tmp_path} is on a read-only file system")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file"]


def test_an_empty_folder_or_an_unfinished_marker_write_is_a_new_run(tmp_path):
    from la_iprop.runs.outdir import check_out

    (tmp_path / "empty").mkdir()
    check_out(tmp_path / "empty")
    killed = tmp_path / "killed"  # a run killed while writing run.json leaves only its temporary file
    killed.mkdir()
    (killed / ".run.json.k1ll3d.tmp").write_text("{")
    check_out(killed)
    (killed / ".hidden").write_text("")
    with pytest.raises(ConfigError, match=r"holds no run.json \(it holds .hidden\)"):
        check_out(killed)


def test_a_sweep_writes_only_into_its_own_folder(tmp_path):
    from la_iprop.runs.engine import run
    from la_iprop.runs.sweep import _check_sweep_out, run_sweep

    spec = {"methods": ["sm"], "models": [TINY], "num_images": 2, "batch_size": 2, "seed": 3}
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match=r"^--out: .*foreign is not empty and holds no sweep.json \(it holds "
                                          r"notes.txt\): a sweep writes only into an empty folder"):
        run_sweep(spec, foreign, progress=False)
    sweep = tmp_path / "sweep"
    rows = run_sweep(spec, sweep, progress=False)
    assert [r["cell"] for r in rows] == [f"{TINY}_sm"]
    assert json.loads((sweep / "sweep.json").read_text())["kind"] == "la_iprop sweep"
    stored = {k: v for k, v in _listing(sweep).items() if "/batches/" in k or "/scores/" in k}
    assert run_sweep(spec, sweep, progress=False) == rows  # its own folder: resumed, nothing recomputed
    assert {k: v for k, v in _listing(sweep).items() if "/batches/" in k or "/scores/" in k} == stored
    with pytest.raises(ConfigError, match=r"^--out: .*sweep is not empty and holds no run.json"):
        run(_config(sweep), progress=False)  # a run into a sweep's folder
    with pytest.raises(ConfigError, match=r"^--out: .*holds no sweep.json"):
        run_sweep(spec, sweep / f"{TINY}_sm", progress=False)  # a sweep into a run's folder
    legacy = tmp_path / "legacy"  # a sweep from before the marker: its tables and run folders only
    (legacy / "cell").mkdir(parents=True)
    (legacy / "cell" / "run.json").write_text("{}")
    (legacy / "sweep.md").write_text("| cell |\n")
    _check_sweep_out(legacy, spec)
    (legacy / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match=r"holds no sweep.json"):
        _check_sweep_out(legacy, spec)
    (foreign / "notes.txt").unlink()
    (foreign / "sweep.json").write_text('{"kind": "something else"}')
    with pytest.raises(ConfigError, match=r"sweep.json is not the marker of a sweep"):
        run_sweep(spec, foreign, progress=False)


# ----------------------------------------------------------------------------- strict inputs
@pytest.mark.parametrize("hparams,message", [
    ({"sg": {"std": float("inf")}}, r"^--hparams: sg.std=inf: must be a finite number$"),
    ({"sg": {"std": "inf"}}, r"^--hparams: sg.std='inf': must be a finite number$"),
    ({"sg": {"std": float("nan")}}, r"^--hparams: sg.std=nan: must be a finite number$"),
    ({"big": {"epsilons": [0.1, float("-inf")]}}, r"^--hparams: big.epsilons\[1\]=-inf: must be a finite number$"),
    ({"la": {"spatial_range": "1e999"}}, r"^--hparams: la.spatial_range='1e999': must be a finite number$"),
    ({"eg": {"reference_images": [[0.0]]}}, r"^--hparams: eg.reference_images: supplied by the runner \(the "
                                            r"runner passes the first 8 images of --data\), it cannot be set$"),
    ({"la": {"return_iterates": True}}, r"^--hparams: la.return_iterates=True: a run stores the maps only"),
    ({"big": {"return_baselines": 1}}, r"^--hparams: big.return_baselines=1: a run stores the maps only"),
])
def test_hyperparameters_a_run_cannot_honour_are_refused(tmp_path, hparams, message):
    from la_iprop.runs.validation import validate
    with pytest.raises(ConfigError, match=message):
        validate(_config(tmp_path / "x", methods=tuple(hparams), hparams=hparams))


def test_parsed_hparams_and_iprop_hparams_are_checked_too(tmp_path):
    from la_iprop.runs.config import parse_hparams
    from la_iprop.runs.validation import validate

    with pytest.raises(ConfigError, match=r"^--hparams: la.spatial_range=inf: must be a finite number$"):
        validate(_config(tmp_path, methods=("la",), hparams=parse_hparams("la.spatial_range=1e999", ("la",))))
    with pytest.raises(ConfigError, match=r"^--iprop_hparams: gamma=nan: must be a finite number$"):
        validate(_config(tmp_path, iprop=True, iprop_hparams={"gamma": float("nan")}))
    with pytest.raises(ConfigError, match=r"^--hparams: la.max_iter given more than once$"):
        parse_hparams("la.max_iter=3,la.max_iter=4", ("la",))
    deep = "[" * 100000 + "]" * 100000  # not a literal Python reads: kept as text, refused by LA's own check
    assert parse_hparams(f"la.target_classes={deep}", ("la",)) == {"la": {"target_classes": deep}}


@pytest.mark.parametrize("overrides,message", [
    (dict(seed=2 ** 64), r"^--seed: must be in \[0, 2\*\*32\), got 18446744073709551616: jax.random.PRNGKey keeps"),
    (dict(seed=2 ** 32), r"^--seed: must be in \[0, 2\*\*32\), got 4294967296"),
    (dict(seed=-1), r"^--seed: must be in \[0, 2\*\*32\), got -1"),
    (dict(seed=1.5), r"^--seed: must be an integer, got 1.5$"),
    (dict(seed=True), r"^--seed: must be an integer, got True$"),
    (dict(batch_size="8"), r"^--batch_size: must be an integer, got '8'$"),
    (dict(num_images=None, start=None), r"^--start: must be an integer, got None$"),
    (dict(iprop="yes"), r"^--iprop: must be true or false, got 'yes'$"),
    (dict(methods="sm"), r"^--method: must be a list of names, got 'sm'$"),
    (dict(methods=("sm", 3)), r"^--method: must be a list of names"),
    (dict(hparams={"sm": 3}), r"^--hparams: 'sm': expected a mapping of hyperparameter names to values"),
    (dict(hparams=[("sm", {})]), r"^--hparams: must be a mapping of names to values, got list$"),
    (dict(data=None), r"^--data: must be a string, got None$"),
])
def test_settings_of_the_wrong_type_or_range_are_one_line(tmp_path, overrides, message):
    from la_iprop.runs.validation import validate
    with pytest.raises(ConfigError, match=message):
        validate(_config(tmp_path / "x", **overrides))


def test_the_largest_seed_is_accepted(tmp_path):
    from la_iprop.runs.validation import validate
    validate(_config(tmp_path / "x", seed=2 ** 32 - 1))


@pytest.mark.parametrize("spec,message", [
    (["sm"], r"^--config: a sweep specification is a JSON object, got list$"),
    ({"methods": []}, r"^--config: 'methods' must be a non-empty list of names, got \[\]$"),
    ({"methods": "sm"}, r"^--config: 'methods' must be a non-empty list of names"),
    ({"methods": ["sm", 1]}, r"^--config: 'methods' must be a non-empty list of names"),
    ({"methods": ["sm", "sm"]}, r"^--config: 'methods' lists \['sm'\] more than once$"),
    ({"methods": ["sm"], "models": []}, r"^--config: 'models' must be a non-empty list of names"),
    ({"methods": ["sm"], "grid": {"la": {"max_iter": [1]}}}, r"^--config: grid.la: la is not among 'methods' \(sm\)"),
    ({"methods": ["la"], "grid": {"la": {"max_iter": []}}}, r"^--config: grid.la.max_iter is empty: the sweep "
                                                             r"would run no cell of la$"),
    ({"methods": ["la"], "grid": {"la": {"max_iter": 3}}}, r"^--config: grid.la.max_iter must be a list of values, "
                                                           r"e.g. \[3\]$"),
    ({"methods": ["la"], "grid": {"la": {"max_iter": [3, 3]}}}, r"^--config: grid.la.max_iter lists a value more "
                                                                r"than once$"),
    ({"methods": ["la"], "grid": ["max_iter"]}, r"^--config: 'grid' must be an object"),
    ({"methods": ["la"], "grid": {"la": [3]}}, r"^--config: grid.la must be an object"),
    ({"methods": ["la"], "grid": {"la": {"update": ["a/b", "a b"]}}}, r"^--config: the cells .* would share the "
                                                                      r"folder efficientnet_lite0_la_updatea-b$"),
    ({"methods": ["sm"], "protocols": {"la": 1}}, r"^--config: 'protocols' must be a name or a list of names"),
    ({"methods": ["sm"], "bogus": 1}, r"^--config: unknown keys \['bogus'\]$"),
])
def test_a_sweep_specification_of_the_wrong_shape_is_one_line(spec, message):
    from la_iprop.runs.sweep import cells
    with pytest.raises(ConfigError, match=message):
        cells(spec)


def test_sweep_cells_of_the_wrong_type_are_refused_before_any_cell_runs(tmp_path):
    from la_iprop.runs.sweep import cells, run_sweep

    names = [name for name, _ in cells({"methods": ["la"], "grid": {"la": {"update": ["../../x", "y" * 300]}}})]
    assert all("/" not in n and len(n.encode()) <= 200 for n in names) and len(set(names)) == 2
    spec = {"methods": ["sm"], "models": [TINY], "grid": {"sm": {}}, "batch_size": "2"}
    with pytest.raises(ConfigError, match=rf"^cell {TINY}_sm: --batch_size: must be an integer, got '2'$"):
        run_sweep(spec, tmp_path / "sweep", progress=False)
    assert not (tmp_path / "sweep").exists()


# ----------------------------------------------------------------------------- every check before the first write
@pytest.mark.parametrize("overrides,message", [
    # checked by LA only after it has looked at the classifier (its class count: 10 for the tiny model)
    (dict(hparams={"la": {"sampling_times": 12}}), r"^--hparams: la \(.*sampling_times=12\): sampling_times - 1 = "
                                                   r"11 targets cannot be drawn without replacement from 10 classes$"),
    (dict(hparams={"la": {"target_classes": [1, 2]}}), r"^--hparams: la \(.*\): target_classes must have 5 classes "
                                                       r"per image"),
    (dict(hparams={"la": {"target_classes": [1, 2, 3, 4, 12]}}), r"^--hparams: la \(.*\): target_classes must be "
                                                                 r"class indices in \[0, 10\)"),
    (dict(hparams={"la": {"return_iterates": True}}), r"^--hparams: la.return_iterates=True: a run stores the maps"),
    # IProp settings against the image size (32 x 32): a window of radius 16 needs 33 x 33
    (dict(iprop=True, iprop_hparams={"radius": 16}), r"^--iprop_hparams: .*\(images of 32x32\)$"),
])
def test_late_checks_come_before_run_json_and_the_corrected_command_runs(tmp_path, overrides, message):
    out = tmp_path / "run"
    out.mkdir()
    config = _config(out, methods=("la",), num_images=1, batch_size=1, **overrides)
    _refused(config, message)
    assert _listing(out) == {}  # the folder exactly as it was
    _refused(_config(tmp_path / "absent", methods=("la",), num_images=1, batch_size=1, **overrides), message)
    assert not (tmp_path / "absent").exists()


@pytest.mark.slow
def test_after_a_late_refusal_the_corrected_command_runs_in_the_same_folder(tmp_path):
    from la_iprop.runs.engine import run

    out = tmp_path / "run"
    _refused(_config(out, methods=("la",), num_images=1, batch_size=1, hparams={"la": {"sampling_times": 12}}),
             r"sampling_times - 1 = 11 targets cannot be drawn")
    run(_config(out, methods=("la",), num_images=1, batch_size=1, hparams={"la": {"sampling_times": 3}}),
        progress=False)
    assert (out / "results.csv").exists()


# ----------------------------------------------------------------------------- content checksums
def _member_data_offset(path: pathlib.Path, member: str) -> tuple[int, int]:
    """(offset, size) of the array data of ``member`` (e.g. ``attribution.npy``) inside an ``.npz``."""
    with zipfile.ZipFile(path) as archive:
        info = archive.getinfo(member)
        with archive.open(info) as f:
            version = np.lib.format.read_magic(f)
            read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            read(f)
            header = f.tell()
    raw = path.read_bytes()
    name_length, extra_length = np.frombuffer(raw[info.header_offset + 26:info.header_offset + 30], "<u2")
    start = info.header_offset + zipfile.sizeFileHeader + int(name_length) + int(extra_length) + header
    return start, info.file_size - header


def _records(out: pathlib.Path) -> dict:
    from la_iprop.runs.store import load_records
    return load_records(out, "counted_sm", attributions=True)


def _quarantined(out: pathlib.Path) -> list[str]:
    log = out / "quarantine" / "log.txt"
    return log.read_text().splitlines() if log.exists() else []


@pytest.mark.slow
def test_a_flipped_byte_in_the_maps_is_quarantined_and_recomputed(tmp_path, counted):
    from la_iprop.runs.engine import run

    out = tmp_path / "run"
    config = _config(out, methods=("counted_sm",))
    run(config, progress=False)
    reference, rows = _records(out), _csv(out)
    path = out / "batches" / "counted_sm" / "batch_00001.npz"
    start, size = _member_data_offset(path, "attribution.npy")
    raw = bytearray(path.read_bytes())
    raw[start + size // 2] ^= 0x10  # one bit of one float of the second image's map
    path.write_bytes(bytes(raw))
    counted.clear()
    run(config, progress=False)
    assert counted == [2]  # batch 1 only, recomputed
    (line,) = _quarantined(out)
    assert "batches/counted_sm/batch_00001.npz -> quarantine/" in line and "unreadable" in line  # zip CRC-32
    after = _records(out)
    assert after.keys() == reference.keys() and "checksum" not in after
    for key in reference:
        if key != "seconds":
            np.testing.assert_array_equal(after[key], reference[key])
    assert _csv(out) == rows


def test_content_rewritten_under_its_old_checksum_is_found(tmp_path, counted):
    from la_iprop.runs.engine import run

    out = tmp_path / "run"
    config = _config(out, methods=("counted_sm",))
    run(config, progress=False)
    rows = _csv(out)
    for path in (out / "batches" / "counted_sm" / "batch_00000.npz", out / "scores" / "la" / "counted_sm" /
                 "batch_00001.npz"):
        content = dict(np.load(path))
        key = "attribution" if "attribution" in content else "insertion"
        content[key] = content[key] * 0.5  # a valid zip, plausible values, the old checksum
        np.savez(path, **content)
    counted.clear()
    run(config, progress=False)
    assert counted == [2]  # the maps of batch 0; batch 1 only rescored
    log = _quarantined(out)
    assert len(log) == 2 and all("checksum mismatch (its content changed after it was written)" in e for e in log)
    assert _csv(out) == rows


@pytest.mark.slow
def test_a_run_folder_from_before_the_checksums_resumes(tmp_path, counted):
    """Accepted after a full read (the zip's CRC-32), as the store's docstring says; a run.json that
    records checksums requires them."""
    from la_iprop.runs.engine import run

    out = tmp_path / "run"
    config = _config(out, methods=("counted_sm",))
    run(config, progress=False)
    rows = _csv(out)
    stored = json.loads((out / "run.json").read_text())
    assert stored.pop("checksums") == "sha256"
    (out / "run.json").write_text(json.dumps(stored))  # as written before the checksums
    for path in sorted(out.glob("*/**/batch_*.npz")):
        np.savez(path, **{k: v for k, v in np.load(path).items() if k != "checksum"})
    counted.clear()
    run(config, progress=False)
    assert counted == [] and _quarantined(out) == [] and _csv(out) == rows
    stored["checksums"] = "sha256"
    (out / "run.json").write_text(json.dumps(stored))
    run(config, progress=False)
    assert counted == [2, 2] and _csv(out) == rows
    assert len(_quarantined(out)) == 4  # 2 map files, 2 score files
    assert all("has no content checksum" in line for line in _quarantined(out))


def test_quarantine_works_across_file_systems(tmp_path, monkeypatch):
    from la_iprop.runs import files
    from la_iprop.runs.store import quarantine

    out = tmp_path / "run"
    path = out / "batches" / "sm" / "batch_00000.npz"
    path.parent.mkdir(parents=True)
    path.write_bytes(b"damaged content")
    real_replace = os.replace

    def cross_device(src, dst, *args, **kwargs):
        if "quarantine" in str(dst):
            raise OSError(errno.EXDEV, os.strerror(errno.EXDEV), str(src), None, str(dst))
        return real_replace(src, dst, *args, **kwargs)

    monkeypatch.setattr(files.os, "replace", cross_device)
    target = quarantine(out, path, "unreadable")
    assert not path.exists() and target.read_bytes() == b"damaged content"
    assert target == out / "quarantine" / "batches" / "sm" / "batch_00000.npz"
    assert "batches/sm/batch_00000.npz -> quarantine/batches/sm/batch_00000.npz: unreadable" in _quarantined(out)[0]


def test_an_image_replaced_during_the_run_is_refused_by_name(tmp_path, monkeypatch):
    from la_iprop.attribution import base, get_method

    folder = tmp_path / "images"
    for seed, name in enumerate(("a.png", "b.png", "c.png", "d.png")):
        _png(folder / name, seed)
    sm = get_method("sm").fn

    def tampering_sm(logit_fn, images, labels=None, *, key=None, precision="float32"):
        maps = sm(logit_fn, images, labels, key=key, precision=precision)
        _png(folder / "c.png", 99)  # after batch 0's maps (the probe stops inside sm): c.png is in batch 1
        return maps

    monkeypatch.setitem(base._METHODS, "tampering_sm", base.MethodSpec("tampering_sm", tampering_sm, "sm"))
    out = tmp_path / "run"
    _refused(_config(out, methods=("tampering_sm",), data=f"folder:{folder}", num_images=None),
             rf"^--data: c.png changed during the run \(not the content recorded in {out}/run.json when it "
             r"started\); restore the image\(s\) and rerun")
    assert sorted(p.name for p in (out / "batches" / "tampering_sm").iterdir()) == ["batch_00000.npz"]


# ----------------------------------------------------------------------------- OS errors, derived names
_DRIVER = r"""
import contextlib, errno, io, json, os, sys
sys.path[:0] = [sys.argv[1], os.path.join(sys.argv[1], "tests")]
import tiny_model as tiny
from la_iprop.models import zoo
zoo._MODELS[tiny.TINY] = tiny.spec()
from absl import flags
from experiments import imagenet
from la_iprop.runs import files
imagenet.define_flags()
results = []
for name, where, out in json.loads(sys.argv[2]):
    code = getattr(errno, name)
    def fail(*args, **kwargs):
        raise OSError(code, os.strerror(code))
    target = {"fsync": (os, "fsync"), "mkstemp": (files.tempfile, "mkstemp"), "replace": (os, "replace")}[where]
    real = getattr(*target)
    setattr(*target, fail)
    flags.FLAGS(["imagenet", "--method=sm", f"--model={tiny.TINY}", "--num_images=1", "--batch_size=1",
                 "--progress=false", f"--out={out}"])
    try:
        imagenet.main([])
        message = None
    except SystemExit as exit:
        message = exit.code
    finally:
        setattr(*target, real)
    results.append([name, message, os.path.exists(os.path.join(out, "run.json"))])
print(json.dumps(results))
"""


@pytest.mark.slow
def test_os_errors_end_as_one_line_naming_the_path(tmp_path):
    cases = [("ENOSPC", "fsync"), ("EROFS", "mkstemp"), ("ENAMETOOLONG", "mkstemp"), ("EACCES", "mkstemp"),
             ("ENOTDIR", "mkstemp"), ("EXDEV", "replace")]
    outs = {name: str(tmp_path / name.lower()) for name, _ in cases}
    done = subprocess.run([sys.executable, "-c", _DRIVER, str(ROOT),
                           json.dumps([[name, where, outs[name]] for name, where in cases])],
                          cwd=ROOT, env=dict(os.environ, JAX_PLATFORMS="cpu"), capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(done.stdout.strip().splitlines()[-1])
    assert [name for name, *_ in results] == [name for name, _ in cases]
    for name, message, wrote in results:
        # sys.exit(message) prints it as one line and exits with status 1
        assert isinstance(message, str) and message.startswith("error: ") and "\n" not in message, (name, message)
        assert f"{outs[name]}/run.json: " in message and message.endswith(f"({name})"), message
        assert not wrote and "Traceback" not in message
    assert "no space left on the device" in results[0][1] and "read-only" in results[1][1]


@pytest.mark.slow
def test_cli_refuses_an_unwritable_out_with_one_line_and_status_1(tmp_path):
    """A file on the --out path (ENOTDIR) through the real CLI: one line, exit status 1, nothing written."""
    (tmp_path / "a_file").write_text("")
    done = subprocess.run([sys.executable, tiny.__file__, "experiments.imagenet", "--method=sm", f"--model={TINY}",
                           "--num_images=1", "--progress=false", f"--out={tmp_path / 'a_file' / 'out'}"],
                          cwd=ROOT, env=dict(os.environ, JAX_PLATFORMS="cpu"), capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines()[-1].startswith(f"error: --out: {tmp_path / 'a_file' / 'out'}: ")
    assert (tmp_path / "a_file").read_text() == ""


def test_derived_out_names_fit_the_file_system():
    from experiments import evaluate, imagenet

    def flags(**values):  # the run flags default_out reads; any other one unset (None)
        return collections.defaultdict(lambda: None, values)

    fields = dict(methods=tuple(f"method{i}" for i in range(80)), model=TINY, data="folder:/d/" + "x" * 300,
                  settings="quick", seed=0, precision="float32", iprop=False, start=0, stride=1, num_images=None)
    out = imagenet.default_out(flags(**fields))
    again = imagenet.default_out(flags(**fields))
    other = imagenet.default_out(flags(**{**fields, "seed": 1}))
    assert out == again and out != other  # the same flags resume the same run; other flags another
    for name in (out, other, evaluate.default_out("/m/" + "y" * 300 + ".npz", TINY, "samples", False)):
        assert name.startswith("runs/") and len(name[5:].encode()) <= 200 and "/" not in name[5:]
    assert imagenet.default_out(flags(**{**fields, "methods": ("la",), "data": "samples"})) == \
           f"runs/la_{TINY}_samples_quick_seed0"  # short names are unchanged


def test_os_error_line_names_both_paths_of_a_move():
    from la_iprop.runs.files import os_error_line
    err = OSError(errno.EXDEV, os.strerror(errno.EXDEV), "/a/batch.npz", None, "/b/quarantine/batch.npz")
    assert os_error_line(err) == "/a/batch.npz -> /b/quarantine/batch.npz: a move across file systems failed (EXDEV)"
    with contextlib.suppress(AttributeError):  # errno.EDQUOT is not on every platform
        assert os_error_line(OSError(errno.EDQUOT, "Disk quota exceeded", "/x")).endswith("(EDQUOT)")


@pytest.mark.parametrize("where", ["clean", "perturbed"])
def test_non_finite_numbers_end_the_run_with_one_line_naming_the_images(tmp_path, where):
    """A classifier whose logits turn NaN (on every input, or only once pixels move: a gradient method's
    path) stops the run with one line naming the variant and its images, not a traceback."""
    import jax.numpy as jnp

    from la_iprop.runs.engine import run

    model = tiny.build(None)
    if where == "clean":
        broken = model.replace(preprocess=lambda x: x * jnp.nan)
    else:  # finite on the images themselves, NaN on ig's interpolated inputs (every pixel scaled below 1)
        broken = model.replace(preprocess=lambda x: jnp.where(jnp.max(x) < 0.999, jnp.nan, 1.0) * (x * 2.0 - 1.0))
    method = "sm" if where == "clean" else "ig"
    config = _config(tmp_path / "out", methods=(method,), num_images=2, data="samples")
    with pytest.raises(ConfigError) as info:
        run(config, progress=False, model=broken)
    text = str(info.value)
    assert "\n" not in text and text.startswith(f"{method}:") and "non-finite" in text, text
