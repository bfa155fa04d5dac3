"""The IProp ablation script: split parsing, the coarsened tuning protocol, and a small end-to-end run."""

from __future__ import annotations

import argparse
import json
import pathlib
import shlex

import jax.numpy as jnp
import numpy as np
import pytest

from experiments import iprop_ablation
from la_iprop.iprop.tuning import coarse_points
from la_iprop.metrics import evaluate, get_protocol

ROOT = pathlib.Path(__file__).resolve().parents[1]
LA1000 = ROOT.parent / "shared" / "data" / "la1000"


def test_range_parsing():
    assert iprop_ablation._range("0:200") == (0, 200, 1)
    assert iprop_ablation._range("800:1000:4") == (800, 1000, 4)
    for bad in ("5", "0:10:0", "a:b", "1:2:3:4"):
        with pytest.raises(argparse.ArgumentTypeError, match="START:STOP"):
            iprop_ablation._range(bad)


@pytest.mark.parametrize("every", [2, 3])
def test_coarse_protocol_is_the_curve_sampled_at_coarse_points(every):
    """The tuning protocol (``every`` times the step) scores exactly the points coarse_points picks."""
    rng = np.random.default_rng(0)
    images = jnp.asarray(rng.uniform(size=(2, 8, 8, 3)), jnp.float32)
    maps = jnp.asarray(rng.normal(size=(2, 8, 8, 3)), jnp.float32)
    weights = jnp.asarray(rng.normal(size=(8 * 8 * 3, 5)), jnp.float32)

    def logits(x):
        return x.reshape(x.shape[0], -1) @ weights

    fine = evaluate(logits, images, maps, protocol=get_protocol("la", step=24))
    coarse = evaluate(logits, images, maps, protocol=get_protocol("la", step=24 * every))
    points = coarse_points(fine.insertion_curves.shape[1], every)
    np.testing.assert_allclose(coarse.insertion_curves, fine.insertion_curves[:, points], rtol=1e-6)
    np.testing.assert_allclose(coarse.deletion_curves, fine.deletion_curves[:, points], rtol=1e-6)


@pytest.mark.skipif(not LA1000.is_dir(), reason="needs ../shared/data/la1000")
@pytest.mark.parametrize("protocol,tune_step,unit", [("la", 2688, "elements"), ("rise", 896, "pixels")])
def test_small_ablation_writes_a_consistent_report(tmp_path, protocol, tune_step, unit):
    out = tmp_path / "ablation.md"
    record = iprop_ablation.main([
        "--methods=sm", "--settings=quick", f"--data=la1000:{LA1000}", "--tune=0:4:2", "--heldout=800:802",
        f"--protocol={protocol}", f"--tune_step={tune_step}", "--batch_size=2", f"--cache={tmp_path / 'cache'}",
        f"--out={out}",
        '--grid={"k": [8, 16], "radius": [2], "gamma": [0.9], "sigma_c": [0.1], "color_space": ["lab"], '
        '"reward": ["sum"]}'])
    settings = record["tuning"]["settings"]
    assert len(settings) == 2
    best = max(settings.values(), key=lambda r: r["score"])
    assert record["chosen"] == best["config"]
    held = record["heldout"]["sm"]
    assert held["raw"]["num_images"] == 2 and held["iprop"]["gain_vs_raw_ci"]["n"] == 2
    ci = held["iprop"]["gain_vs_raw_ci"]
    assert ci["mean"] == pytest.approx(held["iprop"]["ins_minus_del"] - held["raw"]["ins_minus_del"], abs=1e-6)
    # The held-out scores use the protocol itself; the tuning-protocol column is the same curves, sampled.
    assert held["iprop"]["ins_minus_del"] != pytest.approx(held["iprop"]["ins_minus_del_tuning_protocol"], abs=1e-9)
    text = out.read_text()
    assert f"coarsened to {tune_step} {unit} per step" in text and "| sm | sm+iprop |" in text
    assert f"Protocol `{protocol}` (" in text and f"\"name\": \"{protocol}\"" in text
    # rise's scores are cached apart from la's (whose paths are those of earlier caches)
    scored = [path.relative_to(tmp_path / "cache").parts for path in (tmp_path / "cache").rglob("scores/**/*.npz")]
    assert scored and all(("rise" in parts) == (protocol == "rise") for parts in scored)
    assert json.loads(out.with_suffix(".json").read_text())["chosen"] == record["chosen"]
    # A rerun is served from the cache: nothing is recomputed.
    again = iprop_ablation.main(shlex.split(record["command"])[3:])
    assert again["environment"]["evaluated"] == 0
    assert again["heldout"] == record["heldout"]
