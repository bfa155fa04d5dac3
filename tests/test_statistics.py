"""Report statistics: the bootstrap against known distributions, paired resampling, verdicts."""

from __future__ import annotations

import numpy as np
import pytest

from la_iprop.metrics.statistics import (
    MeanCI,
    bootstrap_ci,
    bootstrap_mean_ci,
    paired_difference_ci,
    paired_ratio_difference_ci,
    ratio_of_means,
    verdict,
)


def test_bootstrap_interval_of_a_normal_mean_has_the_textbook_width_and_coverage():
    # For n = 40 draws of N(mu, 1) the 95% interval of the mean is about mu_hat +- 1.96 / sqrt(40); over 400
    # independent data sets it must contain mu about 95% of the time (the percentile bootstrap undercovers
    # slightly at small n: 0.93-0.95 expected; the binomial sd of the rate over 400 sets is 0.011).
    rng = np.random.default_rng(123)
    mu, n, sets = 0.3, 40, 400
    hits, widths = 0, []
    for s in range(sets):
        values = rng.normal(mu, 1.0, n)
        ci = bootstrap_mean_ci(values, resamples=1000, seed=s)
        hits += ci.low <= mu <= ci.high
        widths.append((ci.high - ci.low) / (2 * 1.96 * values.std(ddof=1) / np.sqrt(n)))
    assert 0.90 <= hits / sets <= 0.98
    assert 0.9 < np.median(widths) < 1.05


def test_bootstrap_is_seeded_and_its_point_is_the_statistic():
    values = np.random.default_rng(0).exponential(size=30)
    a, b = bootstrap_mean_ci(values, seed=7), bootstrap_mean_ci(values, seed=7)
    assert a == b and a.mean == pytest.approx(values.mean()) and a.low < a.mean < a.high and a.n == 30
    assert bootstrap_mean_ci(values, seed=8) != a


def test_paired_resampling_removes_the_shared_image_effect():
    # Per-image difficulty (sd 0.2) dominates the two methods' scores; their difference is a constant 0.01
    # plus small noise. Paired: the CI excludes 0. Unpaired (independent resampling) it could not.
    rng = np.random.default_rng(1)
    difficulty = rng.normal(0.5, 0.2, 64)
    a = difficulty + 0.01 + rng.normal(0, 0.002, 64)
    b = difficulty
    ci = paired_difference_ci(a, b)
    assert ci.low > 0.009 and ci.high < 0.011 and verdict(ci) == "holds"
    unpaired = bootstrap_mean_ci(a).low - bootstrap_mean_ci(b).high
    assert unpaired < 0


def test_ratio_of_means_and_its_paired_difference():
    rng = np.random.default_rng(2)
    ins = rng.uniform(0.2, 0.6, 50)
    dele = rng.uniform(0.05, 0.15, 50)
    ci = bootstrap_ci(ratio_of_means, dele, ins)
    assert ci.mean == pytest.approx(dele.mean() / ins.mean()) and ci.low < ci.mean < ci.high
    same = paired_ratio_difference_ci(dele, ins, dele, ins)
    assert same.mean == same.low == same.high == 0.0 and verdict(same) == "inconclusive"
    better = paired_ratio_difference_ci(dele * 0.5, ins, dele, ins)  # half the deletion: lower dir
    assert verdict(better, claimed_sign=-1) == "holds" and verdict(better, claimed_sign=1) == "does not hold"


@pytest.mark.parametrize("low, high, sign, expected", [
    (0.1, 0.2, 1, "holds"), (0.1, 0.2, -1, "does not hold"),
    (-0.2, -0.1, -1, "holds"), (-0.2, -0.1, 1, "does not hold"),
    (-0.1, 0.1, 1, "inconclusive"), (0.0, 0.1, 1, "inconclusive"), (-0.1, 0.0, -1, "inconclusive"),
])
def test_verdict_logic(low, high, sign, expected):
    assert verdict(MeanCI((low + high) / 2, low, high, 10), claimed_sign=sign) == expected


def test_bad_samples_are_refused_with_a_clear_message():
    with pytest.raises(ValueError, match="one value per image"):
        bootstrap_ci(ratio_of_means, np.ones(3), np.ones(4))
    with pytest.raises(ValueError, match="finite"):
        bootstrap_mean_ci([1.0, np.nan])
    with pytest.raises(ValueError, match="resamples"):
        bootstrap_mean_ci([1.0, 2.0], resamples=10)
    with pytest.raises(ValueError, match="claimed_sign"):
        verdict(MeanCI(0, 0, 0, 1), claimed_sign=0)


def test_comparisons_pair_the_shared_images_only():
    from la_iprop.metrics.comparison import Scores, compare, summarize

    a = Scores(index=[5, 1, 3, 7], insertion=[0.5, 0.1, 0.3, 0.9], deletion=[0.1, 0.1, 0.1, 0.1])
    b = Scores(index=[1, 3, 5], insertion=[0.0, 0.2, 0.4], deletion=[0.2, 0.1, 0.0])
    result = compare(a, b, resamples=1000)
    assert result.n == 3
    assert result.differences["insertion"].mean == pytest.approx(0.1, abs=1e-15)  # image 7 has no partner
    assert result.differences["deletion"].mean == pytest.approx(0.0, abs=1e-15)
    assert summarize(a)["dir"].mean == pytest.approx(0.4 / np.sum([0.5, 0.1, 0.3, 0.9]), rel=1e-14)
    with pytest.raises(ValueError, match="twice"):
        Scores(index=[1, 1], insertion=[0, 0], deletion=[0, 0])
    with pytest.raises(ValueError, match="share no image"):
        compare(a, Scores(index=[2], insertion=[0], deletion=[0]))
