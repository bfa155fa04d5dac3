"""The benchmark entry point's quick mode runs and writes valid JSON (timings are not asserted)."""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_quick_benchmark_writes_json(tmp_path):
    out = tmp_path / "bench.json"
    result = subprocess.run([sys.executable, "scripts/benchmark.py", "--json", str(out), "iprop", "--quick"],
                            cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-2000:]
    data = json.loads(out.read_text())
    assert data["environment"]["jax"] and data["environment"]["backend"] == "cpu"
    timings = data["iprop"]["single_image_ms"]
    assert all(v[0] > 0 for v in timings.values())
    assert max(data["iprop"]["scipy_reference"]["float32"]["rel_max_diff_vs_jax"].values()) < 1e-4


def test_quick_vs_torch_benchmark_runs_side_by_side(tmp_path):
    """``vs-torch --quick``: every part runs and the transcribed official loops give our results."""
    out = tmp_path / "vs_torch.json"
    result = subprocess.run([sys.executable, "scripts/benchmark.py", "--json", str(out), "vs-torch", "--quick",
                             "--lite0-batch", "1", "--size", "32"],
                            cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    data = json.loads(out.read_text())["vs-torch"]
    if "skipped" in data:
        return
    assert data["torch_threads"] == 2 and data["image_size"] == 32
    assert data["lite0"][0]["ours_vjp_ms"] > 0 and data["lite0"][0]["max_abs_logit_diff"] < 1e-3
    assert data["la"]["rows"][0]["map_correlation_ours_vs_official"] > 0.99
    assert data["metric"]["max_abs_curve_diff_vs_official"] < 1e-3
    assert data["metric"]["forwards_per_image"] == 2 * (32 + 1)


def test_random_weight_models_cover_lite1_and_lite2_at_their_input_size():
    """``models --random-weights`` times every Lite variant at its own input size (240, 260)."""
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        import jax
        import jax.numpy as jnp
        from bench_models import random_model_fn
    finally:
        sys.path.remove(str(ROOT / "scripts"))
    for name, size in (("efficientnet_lite1", 240), ("efficientnet_lite2", 260)):
        model = random_model_fn(name, jax.random.PRNGKey(0))
        assert model.input_size == size
        assert jax.eval_shape(model, jnp.zeros((2, size, size, 3), jnp.float32)).shape == (2, 1000)
