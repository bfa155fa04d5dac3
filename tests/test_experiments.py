"""The experiment CLI: end to end, resumability after SIGKILL, sharding, flag validation, sweeps."""

from __future__ import annotations

import csv
import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image

from la_iprop.iprop import IPropConfig
from la_iprop.runs.config import RunConfig, parse_hparams
from la_iprop.runs.engine import check_identity, run
from la_iprop.runs.report import CSV_COLUMNS, TIMING_COLUMNS
from la_iprop.runs.store import ConfigError
from la_iprop.runs.validation import validate

ROOT = pathlib.Path(__file__).resolve().parents[1]
# Cheap but real: SM on 4 bundled sample photos with the embedded Lite0, protocol 'la'.
BASE = ["--method=sm", "--num_images=4", "--seed=3", "--progress=false"]


def _cli(args, env_extra=None, **kwargs):
    env = dict(os.environ, PYTHONUNBUFFERED="1", **(env_extra or {}))
    return subprocess.run([sys.executable, "-m", "experiments.imagenet", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, **kwargs)


def _rows(out) -> list[dict]:
    with open(pathlib.Path(out) / "results.csv") as f:
        return list(csv.DictReader(f))


def _without_timing(rows):
    return [{k: v for k, v in row.items() if k not in TIMING_COLUMNS} for row in rows]


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory):
    """An uninterrupted single-device run, in process (batch size 2)."""
    out = tmp_path_factory.mktemp("reference")
    summary = run(RunConfig(methods=("sm",), num_images=4, seed=3, batch_size=2, out=str(out)), progress=False)
    return out, summary


@pytest.mark.slow
def test_end_to_end_outputs_are_complete(reference_run):
    out, summary = reference_run
    rows = _rows(out)
    assert list(rows[0]) == CSV_COLUMNS
    assert [r["image_id"] for r in rows] == ["chelsea", "coffee", "astronaut", "rocket"]
    for r in rows:
        ins, dele = float(r["insertion"]), float(r["deletion"])
        assert 0 <= ins <= 1 and 0 <= dele <= 1
        assert float(r["ins_minus_del"]) == pytest.approx(ins - dele, abs=2e-6)
        assert r["predicted_name"]  # predictions print as class names
    assert {r["protocol"] for r in rows} == {"la"}
    saved = json.loads((out / "summary.json").read_text())
    assert saved["flags"]["methods"] == ["sm"] and saved["protocol"]["la"]["name"] == "la"
    assert saved["versions"]["jax"] and saved["device"]["backend"]
    result = saved["results"]["la"]["sm"]
    assert result["num_images"] == 4
    assert result["insertion"] == pytest.approx(np.mean([float(r["insertion"]) for r in rows]), abs=1e-5)
    assert (out / "results.md").read_text().count("| sm |") == 1
    for figure in ("heatmaps.png", "curves.png"):
        data = (out / figure).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
    with Image.open(out / "heatmaps.png") as heatmaps:  # a palette PNG, 126 px per cell (photo + sm), 4 rows
        assert heatmaps.mode == "P" and heatmaps.size == (2 * 126, 4 * 126)
    npz = np.load(out / "batches" / "sm" / "batch_00000.npz")  # the maps, computed once
    assert npz["attribution"].shape == (2, 224, 224, 3)
    scores = np.load(out / "scores" / "la" / "sm" / "batch_00000.npz")  # their scores under protocol la
    assert scores["insertion_curve"].shape == (2, 225)
    assert scores["id"].tolist() == ["chelsea", "coffee"]
    assert summary["results"]["la"]["sm"] == result


@pytest.mark.slow
def test_killed_run_resumes_to_the_same_csv(reference_run, tmp_path):
    out = tmp_path / "killed"
    args = [*BASE, "--batch_size=2", f"--out={out}"]
    proc = subprocess.Popen([sys.executable, "-m", "experiments.imagenet", *args], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    first = out / "batches" / "sm" / "batch_00000.npz"
    deadline = time.time() + 300
    while not first.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    finished = sorted(p.name for p in (out / "batches" / "sm").glob("batch_*.npz"))
    assert finished == ["batch_00000.npz"], finished  # killed mid-way
    assert not (out / "results.csv").exists()
    # What else a crash or a user leaves behind: a stray copy under a batch number the run does not
    # have, and a short, unreadable file for a batch not computed yet. Both are moved aside, not read.
    (out / "batches" / "sm" / "batch_00005.npz").write_bytes(first.read_bytes())
    (out / "scores" / "la" / "sm").mkdir(parents=True, exist_ok=True)
    (out / "scores" / "la" / "sm" / "batch_00001.npz").write_bytes(first.read_bytes()[:100])
    resumed = _cli(args)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "maps of 2 image(s) to compute (2 already stored)" in resumed.stderr
    assert _without_timing(_rows(out)) == _without_timing(_rows(reference_run[0]))
    quarantined = sorted(str(p.relative_to(out / "quarantine")) for p in (out / "quarantine").rglob("*.npz"))
    assert quarantined == ["batches/sm/batch_00005.npz", "scores/la/sm/batch_00001.npz"]
    again = _cli(args)  # a finished run: nothing recomputed, nothing duplicated
    assert again.returncode == 0 and "already done" in again.stderr
    assert len(_rows(out)) == 4


@pytest.mark.slow
def test_sharded_run_equals_single_device(reference_run_float64, tmp_path):
    """4 devices (one image each) vs one device (batches of 2): other program shapes, so float32 rounding
    differs and sm's near-tied ranks can flip (|Δ AUC| up to 3e-3, results/stability.md). In float64 the
    runs agree to the last digits the CSV keeps."""
    out = tmp_path / "sharded"
    result = _cli(["--method=sm", "--num_images=2", "--seed=3", "--progress=false", "--precision=float64",
                   "--batch_size=4", "--devices=4", f"--out={out}"],
                  env_extra={"XLA_FLAGS": "--xla_force_host_platform_device_count=4"})
    assert result.returncode == 0, result.stderr[-2000:]
    assert "4 device(s)" in result.stderr
    sharded, single = _rows(out), _rows(reference_run_float64)
    assert [r["image_id"] for r in sharded] == [r["image_id"] for r in single]
    for a, b in zip(sharded, single, strict=True):
        assert a["predicted"] == b["predicted"]
        for column in ("insertion", "deletion"):
            assert float(a[column]) == pytest.approx(float(b[column]), abs=2e-6)  # the CSV keeps 6 decimals


@pytest.mark.parametrize("args,message", [
    (["--method=nope"], "--method: unknown method 'nope'"),
    (["--model=resnet5"], "--model: unknown model 'resnet5'"),
    (["--weights=/no/such/file.pth"], "--weights: file not found"),
    (["--data=folder:/no/such/dir"], "--data: image folder not found"),
    (["--num_images=0"], "--num_images: must be > 0"),
    (["--protocol=lа"], "--protocol: unknown protocol"),
    (["--hparams=la.no_such=3"], "--hparams: la has no hyperparameter 'no_such'"),
    (["--hparams=la.max_iter=3o"], "--hparams: la (max_iter='3o', sampling_times=6): max_iter must be an integer >= 1"),
    (["--method=sm,sm"], "--method: sm given more than once"),
    (["--protocol=la,la"], "--protocol: la given more than once"),
    (["--stride=0"], "--stride: must be >= 1"),
    (["--num_images=abc"], "flag --num_images=abc: invalid literal"),
    (["--metod=sm"], "Unknown command line flag 'metod'"),
])
@pytest.mark.slow
def test_bad_flags_stop_with_one_clear_line(tmp_path, args, message):
    result = _cli(["--method=la", *args, f"--out={tmp_path / 'x'}"] if not args[0].startswith("--method")
                  else [*args, f"--out={tmp_path / 'x'}"], timeout=120)
    assert result.returncode != 0
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and message in last, result.stderr[-1500:]
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "x").exists()  # stopped before writing anything (a run.json would block the fix)


def test_empty_folder_is_a_clear_error(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="--data: no image files"):
        validate(RunConfig(methods=("sm",), data=f"folder:{tmp_path / 'empty'}", out=str(tmp_path / "o")))


@pytest.fixture(scope="module")
def reference_run_float64(tmp_path_factory):
    """sm on 2 sample photos in float64, in process (batch size 2)."""
    out = tmp_path_factory.mktemp("reference_f64")
    run(RunConfig(methods=("sm",), num_images=2, seed=3, batch_size=2, out=str(out), precision="float64"),
        progress=False)
    return out


@pytest.mark.slow  # builds the module's reference runs (~45 s each)
def test_changed_settings_in_same_out_are_refused(reference_run):
    out, _ = reference_run
    with pytest.raises(ConfigError, match="different settings .*seed"):
        run(RunConfig(methods=("sm",), num_images=4, seed=4, batch_size=2, out=str(out)), progress=False)


def test_changed_library_default_is_not_resumed(tmp_path):
    """The identity holds the hyperparameters in effect, not just the overrides: a run stored under
    an older library default (here IProp's gamma) is refused instead of being mixed with new results."""
    config = RunConfig(methods=("la",), iprop=True, out=str(tmp_path))
    resolved = config.identity()["resolved"]
    assert resolved["methods"]["la"]["max_iter"] == 10  # the quick setting over the default 30
    assert resolved["iprop"]["gamma"] == IPropConfig().gamma
    check_identity(tmp_path, config)  # writes run.json
    check_identity(tmp_path, config)  # same settings: accepted
    stored = json.loads((tmp_path / "run.json").read_text())
    stored["resolved"]["iprop"]["gamma"] = 0.5
    (tmp_path / "run.json").write_text(json.dumps(stored))
    with pytest.raises(ConfigError, match="different settings \\(resolved\\.iprop\\.gamma\\)"):
        check_identity(tmp_path, config)


def test_a_run_from_before_a_new_hyperparameter_says_which_version_resumes_it(tmp_path):
    """A hyperparameter the library added since a run was made (at a default that may or may not
    reproduce the old maps) refuses the resume with one line naming it and how to resume the run."""
    config = RunConfig(methods=("la",), out=str(tmp_path))
    check_identity(tmp_path, config)
    stored = json.loads((tmp_path / "run.json").read_text())
    del stored["resolved"]["methods"]["la"]["strategy"]
    (tmp_path / "run.json").write_text(json.dumps(stored))
    with pytest.raises(ConfigError, match="resolved\\.methods\\.la\\.strategy: settings this la_iprop added .*"
                                          "version that made it") as info:
        check_identity(tmp_path, config)
    assert "\n" not in str(info.value)


def test_parse_hparams():
    assert parse_hparams("la.max_iter=30,la.update='pgd',ig.steps=5", ("la", "ig")) == {
        "la": {"max_iter": 30, "update": "pgd"}, "ig": {"steps": 5}}
    assert parse_hparams("max_iter=3", ("la",)) == {"la": {"max_iter": 3}}
    with pytest.raises(ConfigError, match="must name its method"):
        parse_hparams("max_iter=3", ("la", "ig"))


@pytest.mark.slow
def test_sweep_runs_cells_and_combines(tmp_path):
    from la_iprop.runs.sweep import run_sweep
    spec = {"methods": ["sm"], "num_images": 2, "batch_size": 2, "seed": 3}
    rows = run_sweep(spec, tmp_path, progress=False)
    assert [(r["protocol"], r["method"]) for r in rows] == [("la", "sm")]
    table = (tmp_path / "sweep.md").read_text()
    assert "efficientnet_lite0_sm" in table
    with open(tmp_path / "sweep.csv") as f:
        assert len(list(csv.DictReader(f))) == 1
    with pytest.raises(ConfigError, match="unknown keys"):
        run_sweep({"methods": ["sm"], "bogus": 1}, tmp_path / "b", progress=False)


@pytest.mark.slow
def test_iprop_variant_equals_wrapped_method(tmp_path):
    """METHOD+iprop and METHOD+ctrl reuse METHOD's stored maps; they must equal running
    with_iprop(METHOD) at the defaults and at gamma = 0."""
    import jax

    from la_iprop.data import open_source
    from la_iprop.iprop import with_iprop
    from la_iprop.models import load_model
    from la_iprop.runs.config import image_keys

    run(RunConfig(methods=("sm",), iprop=True, num_images=2, batch_size=2, seed=3, out=str(tmp_path)),
        progress=False)
    stored = np.load(tmp_path / "batches" / "sm+iprop" / "batch_00000.npz")
    model = load_model("efficientnet_lite0")
    images = open_source("samples").load([0, 1]).images
    labels = np.argmax(np.asarray(jax.jit(lambda m, x: m(x))(model, images)), -1)
    direct = with_iprop("sm")(model, images, labels, key=image_keys(3, np.arange(2)))
    np.testing.assert_allclose(stored["attribution"], np.asarray(direct), rtol=1e-5, atol=1e-7)
    control = np.load(tmp_path / "batches" / "sm+ctrl" / "batch_00000.npz")["attribution"]
    direct = with_iprop("sm", gamma=0.0)(model, images, labels, key=image_keys(3, np.arange(2)))
    np.testing.assert_allclose(control, np.asarray(direct), rtol=1e-6, atol=1e-8)
    assert not np.allclose(control, stored["attribution"])
    assert [r["method"] for r in _rows(tmp_path)] == ["sm", "sm", "sm+ctrl", "sm+ctrl", "sm+iprop", "sm+iprop"]


@pytest.mark.slow  # builds the module's reference runs (~45 s each)
def test_float64_run_keeps_float64_maps_and_is_never_resumed_as_float32(reference_run, reference_run_float64):
    """--precision=float64: the maps are stored in float64, the summary says so, and the same folder
    refuses a float32 run (and the float32 folder a float64 one)."""
    from la_iprop.runs.store import load_records

    out = reference_run_float64
    summary = json.loads((out / "summary.json").read_text())
    assert summary["precision"] == "float64" and summary["flags"]["precision"] == "float64"
    records = load_records(out, "sm", attributions=True)
    assert records["attribution"].dtype == np.float64
    # sm is smooth in the gradient, so its float32 run's AUCs differ by rounding only: near-tied ranks
    # (measured |Δ insertion| <= 3e-4 between float32 and float64 maps, results/stability.md)
    f32 = load_records(reference_run[0], "sm")
    np.testing.assert_allclose(records["insertion"], f32["insertion"][:2], rtol=0, atol=5e-3)
    with pytest.raises(ConfigError, match="different settings .*precision"):
        run(RunConfig(methods=("sm",), num_images=2, seed=3, batch_size=2, out=str(out)), progress=False)
    with pytest.raises(ConfigError, match="different settings .*precision"):
        run(RunConfig(methods=("sm",), num_images=4, seed=3, batch_size=2, out=str(reference_run[0]),
                      precision="float64"), progress=False)
