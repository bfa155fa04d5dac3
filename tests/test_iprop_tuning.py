"""IProp's setting searches on a synthetic score (no model, no data)."""

from __future__ import annotations

import pytest

from la_iprop.iprop import IPropConfig
from la_iprop.iprop.tuning import GRID, full_grid, make_config, search, setting_key, valid

SMALL = {"k": (4, 8), "radius": (1, 2), "gamma": (0.5, 0.9), "sigma_c": (0.1,), "color_space": ("rgb", "lab"),
         "reward": ("sum",)}


def _score(config: IPropConfig) -> dict:
    # A separable objective with a unique optimum at k=8, radius=2, gamma=0.9, lab.
    value = (config.k == 8) + (config.radius == 2) + 2 * (config.gamma == 0.9) + 0.5 * (config.color_space == "lab")
    return {"score": float(value), "config": config.as_dict()}


def test_full_grid_keeps_only_valid_graphs():
    settings = full_grid(SMALL)
    assert all(valid(s) for s in settings)
    assert valid({"k": 8, "radius": 1}) and not valid({"k": 16, "radius": 1})  # a 3x3 window has 8 neighbours
    assert len(settings) == 2 * 2 * 2 * 2 and len(full_grid(GRID)) < 3 * 3 * 5 * 2 * 2 * 3


def test_full_and_coordinate_search_find_the_optimum_and_score_each_setting_once():
    calls = []

    def counted(config):
        calls.append(config.tag())
        return _score(config)

    full = search(counted, SMALL, "full")
    assert len(calls) == len(set(calls)) == len(full) == len(full_grid(SMALL))
    best = max(full.values(), key=lambda r: r["score"])["config"]
    assert (best["k"], best["radius"], best["gamma"], best["color_space"]) == (8, 2, 0.9, "lab")
    calls.clear()
    coordinate = search(counted, SMALL, "coordinate")
    assert len(calls) == len(set(calls)) < len(full)
    assert max(coordinate.values(), key=lambda r: r["score"])["config"] == best


def test_search_arguments_and_keys():
    with pytest.raises(ValueError, match="mode"):
        search(_score, SMALL, "random")
    with pytest.raises(ValueError, match="max_passes"):
        search(_score, SMALL, "coordinate", max_passes=0)
    assert setting_key(None) == "raw"
    assert setting_key(IPropConfig(gamma=0.0, reward="sum")) == "g0_sum"
    assert setting_key(make_config({"k": 8})) == make_config({"k": 8}).tag()
