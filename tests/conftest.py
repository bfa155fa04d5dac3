"""Shared fixtures: the embedded Lite0, la1000 images, the official reference data, a counting method."""

from __future__ import annotations

import functools
import json
import os
import pathlib

import numpy as np
import pytest
from PIL import Image

ROOT = pathlib.Path(__file__).resolve().parents[1]
SHARED = pathlib.Path(os.environ.get("LA_IPROP_SHARED", ROOT.parent / "shared"))
LA1000 = SHARED / "data" / "la1000"
REFERENCE = SHARED / "reference"


def la1000_images(indices) -> tuple[np.ndarray, np.ndarray]:
    """la1000 images (NHWC float32 in [0,1]) and their true labels."""
    labels = json.loads((LA1000 / "labels.json").read_text())["labels"]
    images = np.stack([np.asarray(Image.open(LA1000 / "images" / f"{int(i)}.png").convert("RGB"),
                                  np.float32) / 255.0 for i in indices])
    return images, np.asarray([labels[int(i)] for i in indices], np.int32)


def in_float64(test):
    """Runs a test inside la_iprop's float64 scope: method calls inherit it, and jnp arrays are float64.

    Sign- and rank-driven walks (LA, AGI, MFABA, BIG, AttEXplore, Guided IG) are chaotic in float32:
    a rounding difference between a batched kernel and a plain loop, or between batch sizes, flips a
    near-zero gradient sign and the walks part. Exact comparisons of such walks run in float64 only."""
    from la_iprop.precision import precision_scope

    @functools.wraps(test)
    def wrapper(*args, **kwargs):
        with precision_scope("float64"):
            return test(*args, **kwargs)
    return wrapper


def fast_tier_subset(values, fast):
    """Parameters for a test over many values: those in `fast` stay in the fast tier
    (`-m "not slow"`), the others are marked slow; the full suite runs them all."""
    return [pytest.param(value, marks=() if value in fast else pytest.mark.slow) for value in values]


def chw_to_hwc(array: np.ndarray) -> np.ndarray:
    return np.transpose(array, (0, 2, 3, 1))


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_programs():
    """Drops every compiled XLA program after each test module. XLA:CPU keeps each executable mapped
    (measured: about 3 memory maps per small program), and the whole suite compiles thousands in one
    process: without this it reaches the kernel's limit of 65530 maps late in the suite and the
    process dies with a segmentation fault inside the compiler."""
    yield
    import gc

    import jax
    jax.clear_caches()
    gc.collect()


@pytest.fixture(scope="session")
def lite0():
    from la_iprop.models import load_model
    return load_model("efficientnet_lite0")


@pytest.fixture(scope="session")
def la_reference():
    return dict(np.load(REFERENCE / "la_official_lite0.npz"))


@pytest.fixture(scope="session")
def metric_reference():
    return dict(np.load(REFERENCE / "metric_official_lite0.npz"))


@pytest.fixture
def counted(monkeypatch):
    """A registered method ``counted_sm`` (sm) that records the (padded) batch size of every call."""
    from la_iprop.attribution import base, get_method

    calls: list[int] = []
    sm = get_method("sm").fn

    def counted_sm(logit_fn, images, labels=None, *, key=None, precision="float32"):
        maps = sm(logit_fn, images, labels, key=key, precision=precision)
        calls.append(int(images.shape[0]))  # after the call: the runner's hyperparameter probe stops inside it
        return maps

    monkeypatch.setitem(base._METHODS, "counted_sm", base.MethodSpec("counted_sm", counted_sm, "sm, counting calls"))
    return calls
