"""Statistics for reports: bootstrap confidence intervals over images, paired comparisons, map agreement.

Every mean in a report carries its image count and a 95% bootstrap CI over images (seeded,
percentile method); a comparison of A and B on the same images uses the paired
differences ``a_i - b_i``, and a claim holds only when that CI excludes 0.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

__all__ = ["MeanCI", "bootstrap_mean_ci", "paired_difference_ci", "pearson", "relative_l1", "verdict"]

DEFAULT_RESAMPLES = 2000


@dataclasses.dataclass(frozen=True)
class MeanCI:
    """A mean over ``n`` images with its 95% bootstrap interval ``[low, high]``."""
    mean: float
    low: float
    high: float
    n: int

    def excludes_zero(self) -> bool:
        return self.low > 0 or self.high < 0

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def format(self, digits: int = 4) -> str:
        return f"{self.mean:+.{digits}f} [{self.low:+.{digits}f}, {self.high:+.{digits}f}]"


def bootstrap_mean_ci(values: Any, *, resamples: int = DEFAULT_RESAMPLES, seed: int = 0,
                      level: float = 0.95) -> MeanCI:
    """Mean of ``values`` (one per image) and its percentile bootstrap interval (seeded, reproducible)."""
    values = np.asarray(values, np.float64).ravel()
    if values.size == 0:
        raise ValueError("values must hold at least one number (one per image)")
    if not np.all(np.isfinite(values)):
        raise ValueError("values must be finite")
    if resamples < 1000:
        raise ValueError(f"resamples must be >= 1000 for a 95% interval, got {resamples}")
    rng = np.random.default_rng(seed)
    means = values[rng.integers(0, values.size, (resamples, values.size))].mean(axis=1)
    tail = (1.0 - level) / 2 * 100
    low, high = np.percentile(means, [tail, 100 - tail])
    return MeanCI(float(values.mean()), float(low), float(high), int(values.size))


def paired_difference_ci(a: Any, b: Any, **kwargs) -> MeanCI:
    """Mean of the per-image differences ``a_i - b_i`` (same images, same order) with its bootstrap CI."""
    a, b = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
    if a.shape != b.shape:
        raise ValueError(f"a and b must hold one value per image for the same images, got {a.size} and {b.size}")
    return bootstrap_mean_ci(a - b, **kwargs)


def verdict(ci: MeanCI, claimed_sign: int = 1) -> str:
    """"holds" when the CI excludes 0 on the claimed side, "contradicted" on the other, else "inconclusive"."""
    if ci.low > 0:
        return "holds" if claimed_sign > 0 else "contradicted"
    if ci.high < 0:
        return "holds" if claimed_sign < 0 else "contradicted"
    return "inconclusive"


def pearson(a: Any, b: Any) -> float:
    """Pearson correlation of two maps (flattened); 1.0 for two identical constant maps."""
    a, b = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
    a, b = a - a.mean(), b - b.mean()
    denominator = np.sqrt((a * a).sum() * (b * b).sum())
    if denominator == 0:
        return 1.0 if np.array_equal(a, b) else 0.0
    return float((a * b).sum() / denominator)


def relative_l1(a: Any, reference: Any) -> float:
    """``sum |a - reference| / sum |reference|`` (0 when both are zero)."""
    a, reference = np.asarray(a, np.float64), np.asarray(reference, np.float64)
    scale = np.abs(reference).sum()
    difference = np.abs(a - reference).sum()
    if scale == 0:
        return 0.0 if difference == 0 else float("inf")
    return float(difference / scale)
