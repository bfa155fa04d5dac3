"""scripts/precision_cost.py pairs gpu_benchmark.sh's rows of the two float32 modes (timings are not asserted)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from conftest import ROOT


def _write(out, mode, name, data):
    (out / mode).mkdir(parents=True, exist_ok=True)
    (out / mode / name).write_text(json.dumps({"environment": {"device": "H100"}, "precision": mode, **data}))


def _la(rate_1, rate_8):
    return {"la": {"rows": [{"batch": 1, "images_per_second": rate_1}, {"batch": 8, "images_per_second": rate_8}]}}


def test_slowdown_per_row(tmp_path):
    _write(tmp_path, "float32", "la_lite0.json", _la(2.0, 8.0))
    _write(tmp_path, "float32_fast", "la_lite0.json", _la(3.0, 8.0))
    metric = lambda rate: {"metrics": {"results": [{"protocol": "la", "chunk_size": 64,  # noqa: E731
                                                    "images_per_s": rate}]}}
    _write(tmp_path, "float32", "metric.json", metric(10.0))
    _write(tmp_path, "float32_fast", "metric.json", metric(25.0))
    _write(tmp_path, "float32", "only_one_mode.json", _la(1.0, 1.0))
    result = subprocess.run([sys.executable, "scripts/precision_cost.py", str(tmp_path)], cwd=ROOT,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    table = json.loads((tmp_path / "precision_cost.json").read_text())
    assert [(e["part"], e["row"], e["slowdown"]) for e in table] == [
        ("la_lite0", [1], 1.5), ("la_lite0", [8], 1.0), ("metric", ["la", 64], 2.5)]
    assert table[0]["device"] == "H100" and "1.50x" in result.stdout


@pytest.mark.parametrize("case", ["missing_mode", "mislabelled"])
def test_bad_output_is_one_clear_error(tmp_path, case):
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        from precision_cost import compare
    finally:
        sys.path.remove(str(ROOT / "scripts"))
    _write(tmp_path, "float32", "la.json", _la(1.0, 1.0))
    if case == "missing_mode":
        with pytest.raises(FileNotFoundError, match="out: expected .*float32_fast"):
            compare(tmp_path)
    else:
        (tmp_path / "float32_fast").mkdir()
        (tmp_path / "float32_fast" / "la.json").write_text(json.dumps({"precision": "float32", **_la(1.0, 1.0)}))
        with pytest.raises(ValueError, match="precision 'float32', expected 'float32_fast'"):
            compare(tmp_path)
