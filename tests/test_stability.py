"""The statistics helpers and the stability experiment (a tiny run end to end, resume, report)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from la_iprop.metrics.statistics import (
    bootstrap_mean_ci,
    paired_difference_ci,
    pearson,
    relative_l1,
    verdict,
)
from la_iprop.studies.stability import StabilityConfig, nudge_one_ulp, run_stability
from la_iprop.studies.stability_report import write_report


def test_bootstrap_ci_is_seeded_and_brackets_the_mean():
    values = np.random.default_rng(0).normal(1.0, 0.5, size=40)
    ci = bootstrap_mean_ci(values)
    assert ci.n == 40 and ci.low < ci.mean < ci.high and ci.mean == pytest.approx(values.mean())
    assert bootstrap_mean_ci(values) == ci                      # same seed, same interval
    assert 0.2 < (ci.high - ci.low) / (0.5 / np.sqrt(40)) < 6   # about 2 x 1.96 standard errors wide
    assert verdict(ci) == "holds" and verdict(ci, claimed_sign=-1) == "does not hold"
    assert verdict(bootstrap_mean_ci([-1.0, 1.0, -1.0, 1.0])) == "inconclusive"


def test_paired_difference_ci_uses_the_pairs():
    a = np.random.default_rng(1).normal(size=30)
    ci = paired_difference_ci(a + 0.01, a)  # a constant shift: zero spread once paired
    assert ci.low == pytest.approx(0.01) and ci.high == pytest.approx(0.01) and ci.excludes_zero()
    with pytest.raises(ValueError, match="one value per image"):
        paired_difference_ci([1.0, 2.0], [1.0])
    with pytest.raises(ValueError, match="at least one"):
        bootstrap_mean_ci([])
    with pytest.raises(ValueError, match="finite"):
        bootstrap_mean_ci([1.0, np.nan])
    with pytest.raises(ValueError, match="resamples"):
        bootstrap_mean_ci([1.0, 2.0], resamples=10)


def test_agreement_measures():
    a = np.arange(12.0)
    assert pearson(a, 2 * a + 1) == pytest.approx(1.0) and pearson(a, -a) == pytest.approx(-1.0)
    assert pearson(np.ones(4), np.ones(4)) == 1.0
    assert relative_l1(a * 1.1, a) == pytest.approx(0.1) and relative_l1(np.zeros(3), np.zeros(3)) == 0.0


def test_nudge_moves_every_element_by_one_ulp_inside_the_unit_interval():
    images = np.array([0.0, 1e-30, 0.25, 0.5, 0.75, 1.0], np.float32)
    nudged = nudge_one_ulp(images)
    assert nudged.dtype == np.float32 and np.all((nudged >= 0) & (nudged <= 1))
    assert np.all(nudged != images)
    assert np.all(np.abs(nudged - images) == np.spacing(np.minimum(images, nudged)))


@pytest.mark.slow
def test_tiny_stability_run_resumes_and_reports(tmp_path):
    """The study's engine runs: a rerun computes nothing (the engine's store is the cache), other settings
    into the same folder are refused, and the report is built from the stored maps and scores."""
    from la_iprop.runs import ConfigError
    from la_iprop.runs.store import load_records

    config = StabilityConfig(data="samples", num_images=2, batch_size=2, metric_every=224)
    work = tmp_path / "work"
    measured = run_stability(config, ("sm", "sg"), work)
    files = sorted(p for p in work.rglob("*.npz"))
    stamps = [p.stat().st_mtime_ns for p in files]
    assert sorted(p.name for p in work.iterdir()) == ["alone", "float32", "float64", "next_seed", "nudged"]
    again = run_stability(config, ("sm", "sg"), work)  # everything stored: nothing recomputed
    assert [p.stat().st_mtime_ns for p in files] == stamps and again[1].keys() == measured[1].keys()
    with pytest.raises(ConfigError, match="different settings"):
        run_stability(StabilityConfig(data="samples", num_images=3, batch_size=2, metric_every=224), ("sm",), work)
    # the float64 run stores float64 maps, scored by the float32 metric; the nudged run's input moved by one ulp
    f64 = load_records(work / "float64", "sm", "la_every224", attributions=True)
    assert f64["attribution"].dtype == np.float64
    from la_iprop.data import open_source
    from la_iprop.metrics import evaluate
    from la_iprop.models import load_model
    from la_iprop.runs.config import resolve_protocol
    images = open_source("samples", size=224).load([0, 1]).images
    game = evaluate(load_model("efficientnet_lite0"), images, f64["attribution"], labels=f64["predicted"],
                    protocol=resolve_protocol("la_every224"), precision="float32")
    np.testing.assert_array_equal(game.insertion_aucs, f64["insertion"])  # the float32 metric, as metric_precision says
    np.testing.assert_array_equal(game.deletion_aucs, f64["deletion"])
    sm = measured[1]["sm"]
    assert sm["images"] == [0, 1] and len(sm["seconds_per_image"]["float32"]) == 1
    assert not all(sm["ulp_nudge"]["identical"]) and sm["other_class"] == {"float32": 0, "float64": 0, "alone": 0,
                                                                          "nudged": 0}
    assert "float32_next_seed" in measured[1]["sg"]["metric"] and "float32_next_seed" not in sm["metric"]

    payload = write_report(tmp_path / "results", "python -m experiments.stability ...", measured=measured)
    summary = payload["summaries"]
    assert set(summary) == {"sm", "sg"} and summary["sm"]["n"] == 2
    # sm is not chaotic: float32 and float64 maps agree closely
    assert summary["sm"]["f32_vs_f64"]["pearson_min"] > 0.999
    assert "seed_abs_delta_insertion" in summary["sg"] and "seed_abs_delta_insertion" not in summary["sm"]
    text = (tmp_path / "results" / "stability.md").read_text()
    for heading in ("## How far float32 maps move", "## What it does to insertion / deletion",
                    "## Findings", "Not measured yet"):
        assert heading in text
    assert json.loads((tmp_path / "results" / "stability.json").read_text())["settings"]["num_images"] == 2


@pytest.mark.slow
def test_report_only_rebuilds_the_committed_report_from_its_json(tmp_path):
    """``--report_only`` from ``results/stability.json`` gives the committed report's tables line for line."""
    import pathlib
    import shutil
    import subprocess
    import sys

    root = pathlib.Path(__file__).resolve().parents[1]
    results = tmp_path / "results"
    results.mkdir()
    shutil.copy(root / "results" / "stability.json", results)
    shutil.copytree(root / "results" / "reproduction", results / "reproduction")
    done = subprocess.run([sys.executable, "-m", "experiments.stability", "--report_only", f"--results_dir={results}"],
                          cwd=root, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    rebuilt = (results / "stability.md").read_text().splitlines()
    committed = (root / "results" / "stability.md").read_text().splitlines()
    tables = [line for line in committed if line.startswith("|")]
    assert tables and tables == [line for line in rebuilt if line.startswith("|")]
