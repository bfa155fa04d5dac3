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
