"""Hardened inputs: NaN/Inf at every image size, label ranges for plain callables, wrong model outputs,
per-pixel IProp maps and extreme IProp settings. Tiny models only (these run in seconds)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from la_iprop.attribution import get_method
from la_iprop.attribution.base import _LOGITS_CACHE
from la_iprop.attribution.gradients import sm
from la_iprop.attribution.integrated import eg
from la_iprop.checks import check_images
from la_iprop.iprop import iprop, knn_graph, propagate, with_iprop
from la_iprop.metrics import evaluate

KEY = jax.random.PRNGKey(0)
SMALL = {"k": 4, "radius": 1}   # one small IProp graph for every test here: fast compiles, shared jit cache
NUM_CLASSES = 5
W_OUT = np.random.RandomState(0).normal(size=(3, NUM_CLASSES)).astype(np.float32)


def pooled(images):
    """A plain callable for any image size: mean colour -> 5 logits."""
    return (images.mean(axis=(1, 2)) - 0.5) @ W_OUT * 4.0


def _images(n, size, seed=0):
    return np.random.default_rng(seed).uniform(0, 1, (n, size, size, 3)).astype(np.float32)


def _spoil(array, value, index=(1, 2, 3, 1)):
    out = np.array(array, copy=True)
    out[index] = value
    return out


BAD = [pytest.param(np.nan, "NaN", id="nan"), pytest.param(np.inf, "infinite", id="inf"),
       pytest.param(-np.inf, "infinite", id="-inf")]
SIZES = [8, 64, 224]   # XLA:CPU min/max drop NaN from 64x64 up: the checks must not rely on them


# ------------------------------------------------------------------------------------- NaN / Inf
@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("value, word", BAD)
def test_non_finite_images_are_refused_at_every_size(size, value, word):
    images = _spoil(_images(2, size), value)
    maps = _images(2, size, seed=1)
    match = f"images contains {word} values .*batch item\\(s\\) \\[1\\].*expected finite pixel values in \\[0, 1\\]"
    with pytest.raises(ValueError, match=match):
        check_images(images)
    with pytest.raises(ValueError, match=match):
        sm(pooled, images, None)
    with pytest.raises(ValueError, match=match):
        evaluate(pooled, images, maps)
    with pytest.raises(ValueError, match=match):
        iprop(images, maps)
    with pytest.raises(ValueError, match=match):   # a chaotic method: refused before any walk
        get_method("la").fn(pooled, images, None, key=KEY, max_iter=2, sampling_times=2)
    with pytest.raises(ValueError, match=match):
        with_iprop("sm")(pooled, images, None)


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("value, word", BAD)
def test_non_finite_maps_are_refused_at_every_size(size, value, word):
    images = _images(2, size)
    maps = _spoil(_images(2, size, seed=1), value, (0, size - 1, 0, 2))
    match = f"attributions contains {word} values .*batch item\\(s\\) \\[0\\]"
    with pytest.raises(ValueError, match=match):
        evaluate(pooled, images, maps)
    with pytest.raises(ValueError, match=match):
        iprop(images, maps)
    with pytest.raises(ValueError, match=match):   # a per-pixel map
        iprop(images, maps.sum(-1))


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("value, word", BAD)
def test_non_finite_reference_images_are_refused(size, value, word):
    images = _images(1, size)
    references = _spoil(_images(3, size, seed=2), value)
    with pytest.raises(ValueError, match=f"reference_images contains {word} values"):
        eg(pooled, images, None, key=KEY, reference_images=references)


def test_maps_that_overflow_the_working_float_are_refused():
    images = _images(1, 8)
    maps = np.full(images.shape, 1e300)   # finite float64, infinite in float32
    with pytest.raises(ValueError, match="attributions contains infinite values .*fit in float32"):
        evaluate(pooled, images, maps)
    with pytest.raises(ValueError, match="attributions contains infinite values .*fit in float32"):
        iprop(images, maps)


def test_low_level_iprop_entry_points_refuse_non_finite_values():
    image = _images(1, 8)[0]
    with pytest.raises(ValueError, match="image contains NaN"):
        knn_graph(_spoil(image, np.nan, (1, 1, 1)), k=4, radius=1)
    graph = knn_graph(image, k=4, radius=1)
    with pytest.raises(ValueError, match="reward contains infinite"):
        propagate(graph, _spoil(np.zeros((8, 8), np.float32), np.inf, (3, 3)), gamma=0.5)


def test_non_finite_logits_are_refused():
    images = _images(2, 8)

    def nan_for_dark(x):   # NaN logits for the second image only
        m = x.mean(axis=(1, 2, 3))
        return pooled(x) * jnp.where(m > 0.45, 1.0, jnp.nan)[:, None]

    images[1] *= 0.5
    with pytest.raises(ValueError, match="logit_fn 'nan_for_dark' returned NaN or infinite logits for images \\[1\\]"):
        sm(nan_for_dark, images, None)
    with pytest.raises(ValueError, match="logit_fn 'nan_for_dark' returned NaN or infinite logits in the insertion"):
        evaluate(nan_for_dark, images, _images(2, 8, seed=1), labels=[0, 0])


# ------------------------------------------------------------------------------------- labels
@pytest.mark.parametrize("bad", [5000, -1, NUM_CLASSES])
def test_labels_out_of_range_for_a_plain_callable(bad):
    images = _images(2, 8)
    labels = np.array([0, bad], np.int32)
    match = f"labels must be class indices in \\[0, {NUM_CLASSES}\\)"
    with pytest.raises(ValueError, match=match):
        sm(pooled, images, labels)
    with pytest.raises(ValueError, match=match):
        get_method("ig").fn(pooled, images, labels, steps=2)
    with pytest.raises(ValueError, match=match):
        evaluate(pooled, images, images, labels=labels)
    sm(pooled, images, np.array([0, NUM_CLASSES - 1]))   # the edges are fine


def test_a_model_fn_must_agree_with_its_logits():
    from la_iprop.models import ModelFn

    class Pooled:   # a stand-in module: apply(variables, x)
        def apply(self, variables, x):
            return (x.mean(axis=(1, 2)) - 0.5) @ variables["w"]

    model = ModelFn(variables={"w": jnp.asarray(W_OUT)}, module=Pooled(), preprocess=lambda x: x, name="pooled",
                    input_size=8, num_classes=1000)
    with pytest.raises(ValueError, match="logit_fn 'pooled' declares num_classes=1000 but returns 5 logits"):
        sm(model, _images(1, 8), None)


# ------------------------------------------------------------------------------------- model outputs
WRONG_OUTPUTS = [
    pytest.param(lambda x: pooled(x)[0], ValueError, "got shape \\(5,\\) \\(rank < 2", id="1-D"),
    pytest.param(lambda x: pooled(x)[:1], ValueError, "got shape \\(1, 5\\) \\(a different batch size", id="batch"),
    pytest.param(lambda x: pooled(x)[:, :, None], ValueError, "got shape \\(2, 5, 1\\)", id="rank-3"),
    pytest.param(lambda x: pooled(x)[:, :0], ValueError, "got shape \\(2, 0\\)", id="no-classes"),
    pytest.param(lambda x: jnp.argsort(pooled(x)), TypeError, "got dtype int32", id="int"),
    pytest.param(lambda x: (pooled(x), pooled(x)), TypeError, "got a tuple", id="tuple"),
]


@pytest.mark.parametrize("model, error, match", WRONG_OUTPUTS)
def test_wrong_model_outputs_are_one_clear_error(model, error, match):
    images = _images(2, 8)
    full = f"logit_fn '<lambda>' must return .*\\[batch, num_classes\\] = \\[2, num_classes\\] for images .*{match}"
    with pytest.raises(error, match=full):
        sm(model, images, None)
    with pytest.raises(error, match=full):
        sm(model, images, np.array([0, 1]))
    with pytest.raises(error, match=full):
        evaluate(model, images, images)
    with pytest.raises(error, match=full):
        get_method("la").fn(model, images, None, key=KEY, max_iter=2, sampling_times=2)


def test_the_output_check_traces_the_model_once():
    traces = []

    def counted(x):
        traces.append(x.shape)
        return pooled(x)

    images = _images(2, 8)
    _LOGITS_CACHE.clear()
    first = sm(counted, images, None)
    after_first = len(traces)
    second = sm(counted, images, None)
    assert len(traces) == after_first   # cached: no new trace, no extra forward
    np.testing.assert_array_equal(np.asarray(first), np.asarray(second))


def test_traced_inputs_still_work():
    images = _images(2, 8)
    labels = np.array([1, 2])
    eager = sm(pooled, images, labels)
    traced = jax.jit(lambda x: sm(pooled, x, labels))(images)
    np.testing.assert_allclose(np.asarray(traced), np.asarray(eager), rtol=1e-6)
    maps = _images(2, 8, seed=1)
    np.testing.assert_allclose(np.asarray(jax.jit(lambda x, a: iprop(x, a, **SMALL))(images, maps)),
                               np.asarray(iprop(images, maps, **SMALL)), rtol=1e-6)


# ------------------------------------------------------------------------------------- IProp maps
@pytest.mark.parametrize("reward, gamma", [("positive_sum", 0.99), ("sum", 0.0), ("abs_sum", 0.0)])
def test_iprop_per_pixel_maps_equal_the_channel_aggregate(reward, gamma):
    """A per-pixel map is a one-channel attribution: the channel sum of a map (|a| summed for abs_sum) gives
    the result of the map (gamma = 0: the reward itself, cheap to compile; the propagation is the same)."""
    images = _images(2, 10)
    maps = np.random.default_rng(4).normal(size=images.shape).astype(np.float32)
    per_pixel = np.abs(maps).sum(-1) if reward == "abs_sum" else maps.sum(-1)
    full = np.asarray(iprop(images, maps, reward=reward, gamma=gamma, **SMALL))
    for given in (per_pixel, per_pixel[..., None]):
        out = np.asarray(iprop(images, given, reward=reward, gamma=gamma, **SMALL))
        assert out.shape == (2, 10, 10)
        np.testing.assert_allclose(out, full, rtol=1e-5, atol=1e-5 * np.abs(full).max())
    with pytest.raises(ValueError, match="attributions must have the shape of images .* for per-pixel maps"):
        iprop(images, maps[..., :2], reward=reward)


# ------------------------------------------------------------------------------------- extreme values
def test_iprop_extreme_bandwidths_are_refused_with_the_cause():
    images, maps = _images(1, 8), _images(1, 8, seed=1)
    with pytest.raises(ValueError, match="sigma_c=1e-30 is too small for float32: .* use sigma_c >= "):
        iprop(images, maps, sigma_c=1e-30)
    with pytest.raises(ValueError, match="sigma_s=1e-25 is too small for float32"):
        iprop(images, maps, sigma_s=1e-25, **SMALL)
    with pytest.raises(ValueError, match="sigma_c=1e-300 is too small for float64"):
        iprop(images, maps, sigma_c=1e-300, precision="float64")
    # representable in float64: finite
    assert np.isfinite(np.asarray(iprop(images, maps, sigma_c=1e-30, precision="float64", **SMALL))).all()


def test_iprop_is_scale_equivariant_and_robust_at_the_float_range():
    images = _images(2, 10)
    maps = np.random.default_rng(4).normal(size=images.shape).astype(np.float32)
    base = np.asarray(iprop(images, maps, **SMALL))
    for exponent in (-100, -20, 20, 100):   # powers of two: bit-identical
        scaled = np.asarray(iprop(images, maps * np.float32(2.0 ** exponent), **SMALL))
        np.testing.assert_array_equal(scaled, base * np.float32(2.0 ** exponent))
    big = np.asarray(iprop(images, maps * np.float32(1e35), **SMALL))   # channel sums near 1e36, V < 1e38
    assert np.isfinite(big).all()
    # Other rounding of the rewards may stop the iteration one step apart: within the tolerance bound
    # gamma / (1 - gamma) * tol * max|r| of the fixed point.
    np.testing.assert_allclose(big / 1e35, base, atol=2 * 99 * 1e-4 * 3 * np.abs(maps).max())
    with pytest.raises(ValueError, match="IProp values are NaN or infinite .*magnitudes up to 1e\\+38 .* rescale"):
        iprop(images, np.full(images.shape, 1e38, np.float32), **SMALL)
    out = np.asarray(iprop(images, np.full(images.shape, 1e38), precision="float64", **SMALL))
    assert np.isfinite(out).all()


def test_settings_level_names_the_cheap_overrides_and_refuses_unknown_levels():
    spec = get_method("la")
    assert spec.settings_hparams("quick") == dict(spec.quick) and spec.settings_hparams("quick") is not spec.quick
    assert spec.settings_hparams("paper") == {}
    with pytest.raises(ValueError, match="settings must be 'quick' or 'paper'"):
        spec.settings_hparams("fast")
