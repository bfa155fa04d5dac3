"""Choosing IProp's settings: the ablation grid and the searches over it.

The searches only rank settings by a score the caller computes (for the ablation experiment:
the mean over methods of insertion − deletion on a tuning split), so they are independent of
models, data and caching. :mod:`la_iprop.studies.iprop_tuning` supplies that score.
"""

from __future__ import annotations

import itertools
from typing import Any, Callable

import numpy as np

from la_iprop.iprop.defaults import REWARD_RULES, IPropConfig

__all__ = ["GRID", "SEARCHES", "valid", "full_grid", "make_config", "setting_key", "search", "coarse_points"]

RAW = "raw"  # the method's own map, no IProp
# The ablation grid; sigma_s, tol and max_iter stay at the library defaults.
GRID: dict[str, tuple] = {
    "k": (4, 8, 16),
    "radius": (1, 2, 3),
    "gamma": (0.5, 0.8, 0.9, 0.95, 0.99),
    "sigma_c": (0.1, 0.3),
    "color_space": ("rgb", "lab"),
    "reward": REWARD_RULES,
}
SEARCHES = ("full", "coordinate")


def valid(setting: dict[str, Any]) -> bool:
    """A window graph (knn, random_window) needs k neighbours inside the (2 radius + 1)² window, the pixel
    itself excluded (random_image draws from the whole image: its bound depends on the image size)."""
    if setting.get("graph", "knn") == "random_image":
        return True
    return setting["k"] <= (2 * setting["radius"] + 1) ** 2 - 1


def full_grid(grid: dict[str, tuple]) -> list[dict[str, Any]]:
    """Every valid combination of the grid's values, in the grid's axis order."""
    keys = list(grid)
    settings = [dict(zip(keys, values, strict=True)) for values in itertools.product(*(grid[k] for k in keys))]
    return [s for s in settings if valid(s)]


def make_config(setting: dict[str, Any]) -> IPropConfig:
    return IPropConfig().replace(**setting)


def setting_key(config: IPropConfig | None) -> str:
    """Cache key of a variant; gamma = 0 (no propagation) depends only on the reward rule."""
    if config is None:
        return RAW
    return f"g0_{config.reward}" if config.gamma == 0.0 else config.tag()


def search(score_setting: Callable[[IPropConfig], dict[str, Any]], grid: dict[str, tuple], mode: str,
           max_passes: int = 3) -> dict[str, dict[str, Any]]:
    """Scores settings of ``grid``; returns ``{config.tag(): record}`` of every setting evaluated.

    ``score_setting(config)`` returns a record with a ``"score"`` (higher is better); each
    setting is scored once. ``mode="full"`` scores every valid grid point; ``"coordinate"``
    ascends from the library defaults (or the first grid value of an axis whose default is
    off the grid), trying every value of one axis at a time and keeping strict improvements,
    until a full pass changes nothing or after ``max_passes`` passes.
    """
    if mode not in SEARCHES:
        raise ValueError(f"mode must be one of {SEARCHES}, got {mode!r}")
    if max_passes < 1:
        raise ValueError(f"max_passes must be >= 1, got {max_passes}")
    results: dict[str, dict[str, Any]] = {}

    def score(setting: dict[str, Any]) -> float:
        config = make_config(setting)
        if config.tag() not in results:
            results[config.tag()] = score_setting(config)
        return results[config.tag()]["score"]

    if mode == "full":
        for setting in full_grid(grid):
            score(setting)
        return results

    defaults = IPropConfig().as_dict(full=True)
    current = {axis: defaults[axis] if defaults[axis] in values else values[0] for axis, values in grid.items()}
    if not valid(current):
        current["k"] = min(grid["k"])
    best = score(current)
    for _ in range(max_passes):
        changed = False
        for axis, values in grid.items():
            for value in values:
                candidate = {**current, axis: value}
                if not valid(candidate):
                    continue
                s = score(candidate)
                if s > best + 1e-12:
                    best, current, changed = s, candidate, True
        if not changed:
            break
    return results


def coarse_points(num_points: int, every: int) -> np.ndarray:
    """Indices of a curve of ``num_points`` that the protocol with ``every`` times the step
    evaluates: every ``every``-th point, and the last (all units changed)."""
    return np.unique(np.append(np.arange(0, num_points, every), num_points - 1))
