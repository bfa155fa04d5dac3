"""``python -m experiments.evaluate``: maps made elsewhere (here by PyTorch, saved NCHW like Captum's) scored
and propagated by the runner, with a tiny classifier (32x32 inputs, 10 classes) on three la1000 images.

The scores must be those of ``la_iprop.metrics.evaluate`` called directly on the same maps (float64 runs:
equal to the last bit), the same for every layout of the same maps, and every bad file must stop with one
line before anything is written.
"""

from __future__ import annotations

import csv
import json
import os
import pathlib
import subprocess
import sys
import zipfile

import numpy as np
import pytest
import tiny_model as tiny
from conftest import LA1000
from tiny_model import SIZE, TINY

from la_iprop.runs.external_maps import detect_layout, parse_layouts, run_maps
from la_iprop.runs.store import ConfigError, load_records

ROOT = pathlib.Path(__file__).resolve().parents[1]
IDS = ["7", "2", "5"]  # la1000 ids, not in the data set's order: maps are matched by id

DATA = f"la1000:{LA1000}"
pytestmark = pytest.mark.skipif(not (LA1000 / "labels.json").exists(), reason="la1000 images not available")


@pytest.fixture(scope="module", autouse=True)
def tiny_model():
    from la_iprop.models import zoo
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(zoo._MODELS, TINY, tiny.spec())
        yield TINY


@pytest.fixture(scope="module")
def images():
    from la_iprop.data import open_source
    return open_source(DATA, size=SIZE).load([int(i) for i in IDS]).images  # [3, 32, 32, 3], the file's order


@pytest.fixture(scope="module")
def torch_maps(images):
    """Saliency of a small PyTorch CNN, as Captum's ``Saliency(abs=True)`` returns it: NCHW float32."""
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(4),
                              torch.nn.Flatten(), torch.nn.Linear(128, 10))
    x = torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2))).requires_grad_(True)
    logits = net(x)
    (grad,) = torch.autograd.grad(logits.max(dim=1).values.sum(), x)
    return grad.abs().numpy()  # [3, 3, 32, 32]


def _save(path, **arrays) -> pathlib.Path:
    np.savez(path, **arrays)
    return pathlib.Path(path)


def _kwargs(out, **overrides) -> dict:
    return {"data": DATA, "model": TINY, "batch_size": 2, "out": str(out), "progress": False, **overrides}


def _rows(out) -> list[dict]:
    with open(pathlib.Path(out) / "results.csv") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def layouts_run(tmp_path_factory, torch_maps):
    """One run of the same maps in every layout, float64, both protocols, with IProp."""
    work = tmp_path_factory.mktemp("layouts")
    pixel = torch_maps.sum(axis=1)  # [3, 32, 32]: one value per pixel
    path = _save(work / "maps.npz", ids=np.asarray(IDS), sal_nchw=torch_maps,
                 sal_nhwc=np.ascontiguousarray(torch_maps.transpose(0, 2, 3, 1)), px_hw=pixel,
                 px_n1hw=pixel[:, None], px_nhw1=pixel[..., None], px_nchw=np.repeat(pixel[:, None], 3, axis=1))
    out = work / "out"
    summary = run_maps(path, **_kwargs(out, protocols=("la", "rise"), iprop=True, precision="float64"))
    return path, out, summary


@pytest.mark.slow
def test_outputs_and_scores_equal_direct_evaluate(layouts_run, images, torch_maps, tiny_model):
    from la_iprop.iprop import iprop
    from la_iprop.metrics import evaluate
    from la_iprop.models import load_model

    path, out, summary = layouts_run
    for name in ("results.csv", "summary.json", "results.md", "heatmaps.png", "curves.png", "run.json"):
        assert (out / name).is_file(), name
    keys = ["sal_nchw", "sal_nhwc", "px_hw", "px_n1hw", "px_nhw1", "px_nchw"]
    variants = keys + [k + "+ctrl" for k in keys] + [k + "+iprop" for k in keys]
    for protocol in ("la", "rise"):
        assert list(summary["results"][protocol]) == variants
        for variant in variants:
            assert (out / "scores" / protocol / variant / "batch_00001.npz").is_file()
    rows = _rows(out)
    assert [r["image_id"] for r in rows if r["method"] == "sal_nchw" and r["protocol"] == "la"] == IDS
    assert {r["seconds"] for r in rows if r["method"] in keys} == {"0.0000"}  # made elsewhere
    saved = json.loads((out / "summary.json").read_text())
    assert saved["maps_file"]["sha256"] and "broadcast over the 3 channels" in saved["maps_file"]["per_pixel"]
    assert saved["maps_file"]["maps"]["sal_nchw"]["layout"] == "nchw"
    assert {saved["maps_file"]["maps"][k]["layout"] for k in keys[2:5]} == {"hw"}
    assert "broadcast over the 3 channels" in (out / "results.md").read_text()

    model = load_model(TINY)
    nhwc = torch_maps.transpose(0, 2, 3, 1)
    pixel = np.broadcast_to(torch_maps.sum(axis=1)[..., None], nhwc.shape)
    stored = load_records(out, "sal_nchw", "la", attributions=True)
    np.testing.assert_array_equal(stored["attribution"], nhwc)  # the maps, unchanged, in the image's layout
    predicted = stored["predicted"]
    direct = {}
    for protocol in ("la", "rise"):
        for name, maps in (("sal", nhwc), ("px", pixel)):
            result = evaluate(model, images, maps, protocol=protocol, labels=predicted, precision="float64")
            direct[name, protocol] = result
        for key in keys:
            records = load_records(out, key, protocol)
            expected = direct["sal" if key.startswith("sal") else "px", protocol]
            # float64 runs: a map's scores do not depend on the rest of its batch (docs/design.md: asserted exactly)
            np.testing.assert_array_equal(records["insertion"], expected.insertion_aucs)
            np.testing.assert_array_equal(records["deletion"], expected.deletion_aucs)
            np.testing.assert_array_equal(records["insertion_curve"], expected.insertion_curves)
    # IProp of the stored maps, as iprop() gives it on the file's maps
    propagated = load_records(out, "sal_nchw+iprop", "la", attributions=True)["attribution"]
    values = np.asarray(iprop(images, nhwc, precision="float64"))
    np.testing.assert_array_equal(propagated, np.broadcast_to(values[..., None], nhwc.shape))


def test_same_command_resumes_without_recomputing(layouts_run, monkeypatch):
    from la_iprop.runs import engine as runner

    path, out, summary = layouts_run
    calls = []
    monkeypatch.setattr(runner, "_compute_maps", lambda *a, **k: calls.append("maps"))
    monkeypatch.setattr(runner, "evaluate", lambda *a, **k: calls.append("score"))
    before = {p: p.stat().st_mtime_ns for p in out.rglob("batch_*.npz")}  # maps and scores
    assert len(before) == 18 * 3 * 2  # variants x (maps + 2 protocols) x batches
    again = run_maps(path, **_kwargs(out, protocols=("la", "rise"), iprop=True, precision="float64"))
    assert calls == [] and again["results"] == summary["results"]
    assert {p: p.stat().st_mtime_ns for p in out.rglob("batch_*.npz")} == before


def test_another_maps_file_is_refused_for_the_same_out(layouts_run, tmp_path):
    path, out, _ = layouts_run
    changed = dict(np.load(path))
    changed["sal_nchw"] = changed["sal_nchw"] * 2
    other = _save(tmp_path / "maps.npz", **changed)
    with pytest.raises(ConfigError, match="holds a run of another maps file"):
        run_maps(other, **_kwargs(out, protocols=("la", "rise"), iprop=True, precision="float64"))


def test_labels_in_the_file_are_the_explained_classes(tmp_path, torch_maps, images, tiny_model):
    from la_iprop.metrics import evaluate
    from la_iprop.models import load_model

    labels = np.asarray([3, 9, 0])
    path = _save(tmp_path / "maps.npz", ids=np.asarray(IDS), saliency=torch_maps, labels=labels)
    run_maps(path, **_kwargs(tmp_path / "out", batch_size=3))
    rows = _rows(tmp_path / "out")
    assert [int(r["predicted"]) for r in rows] == labels.tolist()
    direct = evaluate(load_model(TINY), images, torch_maps.transpose(0, 2, 3, 1), labels=labels)
    # float32, one batch of the same 3 images as the direct call: the same program, so the same numbers
    records = load_records(tmp_path / "out", "saliency", "la")
    np.testing.assert_array_equal(records["insertion"], direct.insertion_aucs)
    np.testing.assert_array_equal(records["deletion"], direct.deletion_aucs)
    bad = _save(tmp_path / "bad.npz", ids=np.asarray(IDS), saliency=torch_maps, labels=np.asarray([3, 10, 0]))
    with pytest.raises(ConfigError, match=r"labels holds class 10 \(id '2'\); the model has 10 classes"):
        run_maps(bad, **_kwargs(tmp_path / "bad_out"))
    assert not (tmp_path / "bad_out").exists()


# ----------------------------------------------------------------------------- refusals
def test_layout_detection():
    assert detect_layout("k", (2, 3, 32, 32)) == "nchw"
    assert detect_layout("k", (2, 32, 32, 3)) == "nhwc"
    assert detect_layout("k", (2, 32, 32)) == detect_layout("k", (2, 1, 32, 32)) == "hw"
    assert detect_layout("k", (2, 32, 32, 1)) == "hw"
    with pytest.raises(ConfigError, match=r"k has shape \[2,3,32,3\], which fits both nchw .* and nhwc .*"
                                          r"--layout=k=nchw"):
        detect_layout("k", (2, 3, 32, 3))
    with pytest.raises(ConfigError, match=r"k has shape \[2,1,32,3\], which fits both hw .* and nhwc"):
        detect_layout("k", (2, 1, 32, 3))
    assert detect_layout("k", (2, 3, 32, 3), "nhwc") == "nhwc"
    with pytest.raises(ConfigError, match=r"--layout: k has shape \[2,3,32,32\], which is not nhwc"):
        detect_layout("k", (2, 3, 32, 32), "nhwc")
    with pytest.raises(ConfigError, match=r"k has shape \[2,5,32,32\]; expected \[N,3,H,W\]"):
        detect_layout("k", (2, 5, 32, 32))
    assert parse_layouts(["nchw", "b=hw"]) == {"*": "nchw", "b": "hw"}
    with pytest.raises(ConfigError, match="--layout"):
        parse_layouts(["chw"])


def _forged(path: pathlib.Path, maps: np.ndarray) -> pathlib.Path:
    """An .npz whose ``m`` header claims 10^6 maps while the member holds a few (e.g. a hostile file)."""
    header = {"descr": "<f4", "fortran_order": False, "shape": (10**6, 3, SIZE, SIZE)}
    import io
    buffer = io.BytesIO()
    np.lib.format.write_array_header_1_0(buffer, header)
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("m.npy", buffer.getvalue() + maps.astype("<f4").tobytes())
        ids = io.BytesIO()
        np.save(ids, np.asarray(IDS))
        archive.writestr("ids.npy", ids.getvalue())
    return path


@pytest.mark.parametrize("case, message", [
    ("unknown id", r"1 id\(s\) are not images of the data source: 'nope'"),
    ("duplicate id", r"ids holds '7' more than once"),
    ("size", r"m holds 16x16 maps \(nchw, shape \[3,3,16,16\]\), tiny_cnn takes 32x32 images"),
    ("nan", r"m: the map of id '2' holds NaN or infinite values"),
    ("ambiguous", r"m has shape \[3,3,32,3\], which fits both nchw"),
    ("count", r"m holds 2 maps .* ids holds 3 ids"),
    ("int", r"m has dtype int32; expected float16, float32 or float64"),
    ("object", r"m has dtype object"),
    ("forged", r"its header says \[1000000,3,32,32\] float32 \(12288000000 bytes\) but the member holds 36864"),
    ("no ids", r"has no ids array"),
])
def test_bad_files_stop_with_one_line_before_writing(tmp_path, torch_maps, case, message):
    ids, maps = np.asarray(IDS), torch_maps
    arrays = {"unknown id": dict(ids=np.asarray(["7", "nope", "5"]), m=maps),
              "duplicate id": dict(ids=np.asarray(["7", "2", "7"]), m=maps),
              "size": dict(ids=ids, m=maps[:, :, :16, :16]),
              "nan": dict(ids=ids, m=np.where(np.arange(3)[:, None, None, None] == 1, np.nan, maps)),
              "ambiguous": dict(ids=ids, m=maps[:, :, :, :3]),
              "count": dict(ids=ids, m=maps[:2]),
              "int": dict(ids=ids, m=maps.astype(np.int32)),
              "object": dict(ids=ids, m=np.asarray([None, 1, "x"], dtype=object)),
              "no ids": dict(m=maps)}.get(case)
    path = _forged(tmp_path / "maps.npz", maps) if case == "forged" else _save(tmp_path / "maps.npz", **arrays)
    out = tmp_path / "out"
    with pytest.raises(ConfigError, match=message) as err:
        run_maps(path, **_kwargs(out))
    assert "\n" not in str(err.value)
    assert not out.exists()  # nothing written


def _cli(args):
    env = dict(os.environ, PYTHONUNBUFFERED="1", JAX_PLATFORMS="cpu")
    return subprocess.run([sys.executable, tiny.__file__, "experiments.evaluate", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_cli_end_to_end_and_one_line_errors(tmp_path, torch_maps):
    path = _save(tmp_path / "captum_maps.npz", ids=np.asarray(IDS), saliency=torch_maps)
    out = tmp_path / "out"
    done = _cli([f"--maps={path}", f"--data={DATA}", f"--model={TINY}", "--iprop", "--batch_size=3",
                 "--progress=false", f"--out={out}"])
    assert done.returncode == 0, done.stderr[-2000:]
    assert "| saliency+iprop |" in done.stdout and f"results written to {out}" in done.stdout
    assert {r["method"] for r in _rows(out)} == {"saliency", "saliency+ctrl", "saliency+iprop"}
    bad = _save(tmp_path / "bad.npz", ids=np.asarray(["7", "nope", "5"]), saliency=torch_maps)
    refused = _cli([f"--maps={bad}", f"--data={DATA}", f"--model={TINY}", f"--out={tmp_path / 'bad_out'}"])
    assert refused.returncode == 1 and not (tmp_path / "bad_out").exists()
    last = refused.stderr.strip().splitlines()[-1]
    assert last.startswith("error: --maps: 1 id(s) are not images of the data source: 'nope'"), refused.stderr


def test_reader_compressed_float16_big_endian_any_order(tmp_path, torch_maps):
    """The batch reader against the arrays themselves: a compressed file (np.savez_compressed), float16 and
    big-endian maps, per-pixel maps, rows asked for out of order; without a model or a run."""
    from types import SimpleNamespace

    from la_iprop.runs.external_maps import open_maps

    ids = np.asarray(["5", "7", "2"])
    maps = {"half_nhwc": torch_maps.transpose(0, 2, 3, 1).astype(np.float16),
            "big_nchw": torch_maps.astype(">f8"), "px": torch_maps[:, 0]}
    np.savez_compressed(tmp_path / "maps.npz", ids=ids, **maps)
    file = open_maps(tmp_path / "maps.npz")
    assert {k: a.layout for k, a in file.arrays.items()} == {"half_nhwc": "nhwc", "big_nchw": "nchw", "px": "hw"}
    model = SimpleNamespace(input_size=SIZE, num_classes=10, name=TINY)
    source = SimpleNamespace(ids=[str(i) for i in range(10)])
    file.check(model, source)
    np.testing.assert_array_equal(file.indices(source), [5, 7, 2])
    order = ["2", "5"]
    rows = [list(ids).index(i) for i in order]
    try:
        np.testing.assert_array_equal(file.read("half_nhwc", order), maps["half_nhwc"][rows].astype(np.float32))
        np.testing.assert_array_equal(file.read("big_nchw", order, np.float64),
                                      torch_maps[rows].transpose(0, 2, 3, 1).astype(np.float64))
        np.testing.assert_array_equal(file.read("px", order), np.repeat(maps["px"][rows][..., None], 3, axis=-1))
        np.testing.assert_array_equal(file.read("px", ["7"]), np.repeat(maps["px"][[1]][..., None], 3, axis=-1))
    finally:
        file.close()
