"""Statistics for reports: bootstrap confidence intervals over images, paired comparisons, map agreement.

Every mean in a report carries its image count and a 95% bootstrap CI over images (seeded,
percentile method); a comparison of A and B on the same images uses the paired
differences ``a_i - b_i``, and a claim holds only when that CI excludes 0.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import numpy as np

__all__ = ["MeanCI", "bootstrap_ci", "bootstrap_mean_ci", "paired_difference_ci", "ratio_of_means",
           "paired_ratio_difference_ci", "pearson", "relative_l1", "verdict", "VERDICTS"]

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


def bootstrap_ci(statistic: Callable[..., np.ndarray], *samples: Any, resamples: int = DEFAULT_RESAMPLES,
                 seed: int = 0, level: float = 0.95) -> MeanCI:
    """A statistic of per-image samples and its percentile bootstrap interval over images.

    ``samples`` hold one value per image each, for the same images in the same order; every
    resample draws image indices once and applies them to all samples (a paired bootstrap).
    ``statistic`` maps arrays of shape ``[resamples, n]`` to ``[resamples]`` (e.g. a mean over
    axis -1), so the resamples are evaluated at once.
    """
    arrays = [np.asarray(sample, np.float64).ravel() for sample in samples]
    if not arrays or arrays[0].size == 0:
        raise ValueError("samples must hold at least one number (one per image)")
    if any(a.shape != arrays[0].shape for a in arrays):
        raise ValueError(f"samples must hold one value per image for the same images, got sizes "
                         f"{[a.size for a in arrays]}")
    if not all(np.all(np.isfinite(a)) for a in arrays):
        raise ValueError("samples must be finite")
    if resamples < 1000:
        raise ValueError(f"resamples must be >= 1000 for a 95% interval, got {resamples}")
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    n = arrays[0].size
    rng = np.random.default_rng(seed)
    indices = rng.integers(0, n, (resamples, n))
    values = np.asarray(statistic(*(a[indices] for a in arrays)), np.float64)
    point = float(np.asarray(statistic(*(a[None, :] for a in arrays)), np.float64).ravel()[0])
    tail = (1.0 - level) / 2 * 100
    low, high = np.percentile(values, [tail, 100 - tail])
    return MeanCI(point, float(low), float(high), int(n))


def bootstrap_mean_ci(values: Any, *, resamples: int = DEFAULT_RESAMPLES, seed: int = 0,
                      level: float = 0.95) -> MeanCI:
    """Mean of ``values`` (one per image) and its percentile bootstrap interval (seeded, reproducible)."""
    return bootstrap_ci(lambda v: v.mean(axis=-1), values, resamples=resamples, seed=seed, level=level)


def paired_difference_ci(a: Any, b: Any, **kwargs) -> MeanCI:
    """Mean of the per-image differences ``a_i - b_i`` (same images, same order) with its bootstrap CI."""
    a, b = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
    if a.shape != b.shape:
        raise ValueError(f"a and b must hold one value per image for the same images, got {a.size} and {b.size}")
    return bootstrap_mean_ci(a - b, **kwargs)


def ratio_of_means(numerator: np.ndarray, denominator: np.ndarray) -> np.ndarray:
    """``mean(numerator) / mean(denominator)`` over the last axis (e.g. dir = deletion / insertion,
    the ratio of the mean curves' AUCs; per-image ratios explode where an insertion AUC is near 0)."""
    return numerator.mean(axis=-1) / denominator.mean(axis=-1)


def paired_ratio_difference_ci(num_a: Any, den_a: Any, num_b: Any, den_b: Any, **kwargs) -> MeanCI:
    """``ratio_of_means(num_a, den_a) - ratio_of_means(num_b, den_b)`` on the same images, paired bootstrap."""
    return bootstrap_ci(lambda na, da, nb, db: ratio_of_means(na, da) - ratio_of_means(nb, db),
                        num_a, den_a, num_b, den_b, **kwargs)


VERDICTS = ("holds", "does not hold", "inconclusive")


def verdict(ci: MeanCI, claimed_sign: int = 1) -> str:
    """"holds" when the CI excludes 0 on the claimed side, "does not hold" when it excludes 0 on the
    other side, else "inconclusive" (the CI contains 0: the images cannot separate the effect from noise)."""
    if claimed_sign not in (1, -1):
        raise ValueError(f"claimed_sign must be +1 or -1, got {claimed_sign}")
    if ci.low > 0:
        return "holds" if claimed_sign > 0 else "does not hold"
    if ci.high < 0:
        return "holds" if claimed_sign < 0 else "does not hold"
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
