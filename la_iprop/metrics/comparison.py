"""Paired comparisons of attribution methods on the same images, with bootstrap CIs and verdicts.

A method's evidence is its per-image insertion and deletion AUCs. Every figure is a mean over
images with a 95% bootstrap CI (:mod:`la_iprop.metrics.statistics`), and every comparison of
A and B resamples the images they share, so per-image difficulty cancels. ``dir`` (deletion /
insertion, lower is better) is the ratio of the mean AUCs, as in the reports' tables.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from la_iprop.metrics.statistics import (
    MeanCI,
    bootstrap_ci,
    bootstrap_mean_ci,
    paired_difference_ci,
    paired_ratio_difference_ci,
    ratio_of_means,
    verdict,
)

__all__ = ["Scores", "METRICS", "summarize", "compare", "Comparison", "exceeds_noise"]

# Each metric and the sign of "better": higher insertion, lower deletion, ...
METRICS: dict[str, int] = {"insertion": 1, "deletion": -1, "ins_minus_del": 1, "dir": -1}


@dataclasses.dataclass(frozen=True)
class Scores:
    """Per-image AUCs of one method: ``index`` (dataset indices), ``insertion``, ``deletion``."""
    index: np.ndarray
    insertion: np.ndarray
    deletion: np.ndarray

    def __post_init__(self):
        index = np.asarray(self.index, np.int64).ravel()
        insertion = np.asarray(self.insertion, np.float64).ravel()
        deletion = np.asarray(self.deletion, np.float64).ravel()
        if not index.size == insertion.size == deletion.size:
            raise ValueError(f"index, insertion and deletion must have one entry per image, got sizes "
                             f"{index.size}, {insertion.size}, {deletion.size}")
        if np.unique(index).size != index.size:
            raise ValueError("index holds an image twice: scores of one method must cover each image once")
        order = np.argsort(index, kind="stable")
        object.__setattr__(self, "index", index[order])
        object.__setattr__(self, "insertion", insertion[order])
        object.__setattr__(self, "deletion", deletion[order])

    def __len__(self) -> int:
        return int(self.index.size)

    def select(self, indices: np.ndarray) -> Scores:
        position = np.searchsorted(self.index, indices)
        return Scores(self.index[position], self.insertion[position], self.deletion[position])


def _shared(a: Scores, b: Scores) -> tuple[Scores, Scores]:
    common = np.intersect1d(a.index, b.index)
    if common.size == 0:
        raise ValueError("the two methods share no image: a paired comparison needs the same images")
    return a.select(common), b.select(common)


def summarize(scores: Scores, **bootstrap: Any) -> dict[str, MeanCI]:
    """Mean insertion, deletion, ins − del and dir over the images, each with its 95% CI."""
    return {
        "insertion": bootstrap_mean_ci(scores.insertion, **bootstrap),
        "deletion": bootstrap_mean_ci(scores.deletion, **bootstrap),
        "ins_minus_del": bootstrap_mean_ci(scores.insertion - scores.deletion, **bootstrap),
        "dir": bootstrap_ci(ratio_of_means, scores.deletion, scores.insertion, **bootstrap),
    }


@dataclasses.dataclass(frozen=True)
class Comparison:
    """``a − b`` on each metric over their shared images, and whether ``a`` is better (verdicts)."""
    differences: dict[str, MeanCI]
    verdicts: dict[str, str]

    @property
    def n(self) -> int:
        return next(iter(self.differences.values())).n


def compare(a: Scores, b: Scores, **bootstrap: Any) -> Comparison:
    """Paired comparison of two methods on the images both have; verdicts for "a is better than b"."""
    a, b = _shared(a, b)
    differences = {
        "insertion": paired_difference_ci(a.insertion, b.insertion, **bootstrap),
        "deletion": paired_difference_ci(a.deletion, b.deletion, **bootstrap),
        "ins_minus_del": paired_difference_ci(a.insertion - a.deletion, b.insertion - b.deletion, **bootstrap),
        "dir": paired_ratio_difference_ci(a.deletion, a.insertion, b.deletion, b.insertion, **bootstrap),
    }
    return Comparison(differences, {m: verdict(ci, METRICS[m]) for m, ci in differences.items()})


def exceeds_noise(difference: MeanCI, noise: float) -> bool:
    """Whether a paired difference is larger than a measured noise level: its CI excludes 0 and the
    CI's end nearer to 0 lies beyond ``noise`` (e.g. the summed float32-rounding and seed-to-seed
    spread of the two methods' scores, ``results/stability.md``)."""
    return difference.excludes_zero() and min(abs(difference.low), abs(difference.high)) > noise
