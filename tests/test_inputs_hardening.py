"""Hardened inputs: NaN/Inf at every image size, label ranges for plain callables, wrong model outputs,
per-pixel IProp maps and extreme IProp settings; non-finite maps, hyperparameters, keys and seeds.
Tiny models only (these run in seconds)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from la_iprop.attribution import available_methods, get_method, method_hparams
from la_iprop.attribution.base import (
    _LOGITS_CACHE,
    NonFiniteAttributionError,
    check_finite_hparams,
    check_key,
    key_from_seed,
)
from la_iprop.attribution.gradients import sm
from la_iprop.attribution.integrated import eg
from la_iprop.checks import check_images, check_nonnegative, check_positive, check_seed
from la_iprop.iprop import iprop, knn_graph, propagate, with_iprop
from la_iprop.metrics import evaluate
from la_iprop.precision import precision_scope

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


# ------------------------------------------------------------------------------------- non-finite outputs
def _marked_images(size=8):
    """Two images; image 1 carries a marker (pixel [0, 0, 0] = 1) that stays above 0.5 near it, image 0 a 0."""
    images = _images(2, size)
    images[0, 0, 0, 0], images[1, 0, 0, 0] = 0.0, 1.0
    return images


def _nan_on_clean(x):
    """NaN logits everywhere: on the clean image too."""
    return pooled(x) * jnp.nan


def _nan_near(clean):
    def _nan_on_perturbed(x):
        """Finite logits (and gradients) on the clean images; NaN on any other input near image 1."""
        distance = jnp.abs(x[:, None] - jnp.asarray(clean)[None]).max(axis=(2, 3, 4)).min(axis=1)
        spoiled = (distance > 0) & (x[:, 0, 0, 0] > 0.5)
        return pooled(x) * jnp.where(spoiled, jnp.nan, 1.0)[:, None]
    return _nan_on_perturbed


_nan_on_perturbed = _nan_near(_marked_images())


def _inf_gradient(x):
    """Finite logits, infinite gradient: sqrt at 0 (pixel [0, 0, 0] of image 0 is 0)."""
    return pooled(x) + jnp.sqrt(x[:, 0, 0, :1])


NAN_METHODS = [pytest.param("sm", {}, id="sm"), pytest.param("ig", {"steps": 4}, id="ig"),
               pytest.param("la", {"key": KEY, "max_iter": 2, "sampling_times": 2}, id="la")]


def _one_line(err) -> str:
    text = str(err.value)
    assert "\n" not in text
    return text


@pytest.mark.parametrize("name, hparams", NAN_METHODS)
def test_nan_logits_on_the_clean_image_are_an_error(name, hparams):
    images = _marked_images()
    with pytest.raises(ValueError, match="logit_fn '_nan_on_clean' returned NaN or infinite logits for images "
                                         "\\[0, 1\\]"):
        get_method(name).fn(_nan_on_clean, images, None, **hparams)   # labels=None: the prediction is NaN
    with pytest.raises(NonFiniteAttributionError) as err:                # given labels: the maps are NaN
        get_method(name).fn(_nan_on_clean, images, np.array([0, 1]), **hparams)
    text = _one_line(err)
    assert f"method {name!r} returned NaN or infinite attributions for image(s) [0, 1]" in text
    assert "likely cause: non-finite logits or gradients of logit_fn '_nan_on_clean'" in text
    assert err.value.method == name and err.value.rows == [0, 1]


@pytest.mark.parametrize("name, hparams", NAN_METHODS)
def test_nan_logits_on_perturbed_inputs_only_are_an_error(name, hparams):
    images = _marked_images()
    np.testing.assert_array_equal(np.isfinite(np.asarray(_nan_on_perturbed(images))), True)   # clean: finite
    if name == "sm":   # a saliency map evaluates the clean image only: its map is finite and correct
        assert np.isfinite(np.asarray(sm(_nan_on_perturbed, images, None))).all()
        return
    with pytest.raises(NonFiniteAttributionError) as err:
        get_method(name).fn(_nan_on_perturbed, images, None, **hparams)
    assert f"method {name!r} returned NaN or infinite attributions for image(s) [1] of the batch" in _one_line(err)
    assert err.value.rows == [1]


def test_infinite_gradients_are_an_error():
    images = _marked_images()
    with pytest.raises(NonFiniteAttributionError, match="method 'sm' .* for image\\(s\\) \\[0\\] .*gradients"):
        sm(_inf_gradient, images, None)


def test_traced_calls_are_not_checked():
    """Under an outer jit there are no values to check: the NaN map comes back (the caller's jit decides)."""
    out = jax.jit(lambda x: sm(_nan_on_clean, x, np.array([0, 1])))(_marked_images())
    assert np.isnan(np.asarray(out)).all()


def test_evaluate_refuses_nan_scores_from_perturbed_inputs():
    images = _marked_images(32)   # 32x32: the games have points between the clean image and the substrate
    maps = _images(2, 32, seed=1)
    maps[:, 0, 0, 0] = -1.0       # the marker is deleted last and inserted last
    with pytest.raises(ValueError, match="logit_fn '_nan_on_perturbed' returned NaN or infinite logits in the "
                                         "insertion/deletion games of images \\[1\\]") as err:
        evaluate(_nan_near(images), images, maps)
    _one_line(err)


# ------------------------------------------------------------------------------------- hyperparameters
def _float_hparams():
    for name in available_methods():
        for hparam, default in method_hparams(name).items():
            if isinstance(default, float):
                yield pytest.param(name, hparam, id=f"{name}-{hparam}")


@pytest.mark.parametrize("name, hparam", list(_float_hparams()))
@pytest.mark.parametrize("value", [np.inf, -np.inf, np.nan, np.float32(np.nan)], ids=["inf", "-inf", "nan", "nan32"])
def test_non_finite_hyperparameters_are_refused_by_every_method(name, hparam, value):
    """Checked before any model call (an infinite radius or noise level would give all-zero or NaN maps)."""
    def never(x):
        raise AssertionError("the model must not be called")

    with pytest.raises(ValueError, match=f"method {name!r}: hyperparameter {hparam}=.* must be a finite number") as err:
        get_method(name).fn(never, _images(1, 8), None, key=KEY, **{hparam: value})
    _one_line(err)


def test_non_finite_hyperparameters_in_lists_and_the_shared_checks():
    with pytest.raises(ValueError, match="method 'big': hyperparameter epsilons\\[1\\]=inf must be a finite number"):
        get_method("big").fn(pooled, _images(1, 8), None, epsilons=(0.1, float("inf")))
    with pytest.raises(ValueError, match="spatial_range must be a finite number, got inf"):
        check_positive("spatial_range", float("inf"))
    with pytest.raises(ValueError, match="std must be a finite number, got nan"):
        check_nonnegative("std", float("nan"))
    check_positive("big", 10**400)   # an integer is finite, however large
    check_finite_hparams("la", {"spatial_range": 10.0, "strategy": "mixed", "max_iter": 10**400})   # before a run
    with pytest.raises(ValueError, match="method 'sg': hyperparameter std=nan must be a finite number"):
        check_finite_hparams("sg", {"samples": 4, "std": float("nan")})


# ------------------------------------------------------------------------------------- keys and seeds
@pytest.mark.parametrize("key, error, match", [
    pytest.param("abc", TypeError, "got 'abc'", id="str"),
    pytest.param(1.5, TypeError, "got 1.5", id="float"),
    pytest.param(42, TypeError, "got 42", id="int-seed"),
    pytest.param(object(), TypeError, "got object", id="object"),
    pytest.param(np.zeros(2, np.float32), TypeError, "got ndarray", id="float-array"),
    pytest.param(jnp.zeros(3, jnp.uint32), ValueError, "got shape \\(3,\\) dtype uint32", id="shape"),
])
def test_a_key_of_the_wrong_type_is_one_line(key, error, match):
    images = _images(2, 8)
    for name in ("sg", "sm"):   # a method that needs the key, and one that ignores it
        with pytest.raises(error, match=f"key must be a jax.random key .*{match}") as err:
            get_method(name).fn(pooled, images, None, key=key)
        _one_line(err)
    assert check_key(np.asarray(KEY)).shape == (2,)   # a numpy copy of a key is fine


def test_seeds_are_64_bit_and_keys_from_them_do_not_depend_on_x64():
    assert np.array_equal(key_from_seed(5), jax.random.PRNGKey(5))   # small seeds: PRNGKey's key
    assert np.array_equal(key_from_seed(2**32 - 1), jax.random.PRNGKey(2**32 - 1))
    big = np.asarray(key_from_seed(2**32 + 5))
    assert not np.array_equal(big, key_from_seed(5))   # PRNGKey(2**32 + 5) == PRNGKey(5) with x64 off
    with precision_scope("float64"):
        np.testing.assert_array_equal(np.asarray(key_from_seed(2**32 + 5)), big)
    assert np.asarray(key_from_seed(2**64 - 1)).shape == (2,)
    for bad, error in [(2**64, ValueError), (-1, ValueError), (10**400, ValueError), (True, TypeError),
                       ("5", TypeError), (1.0, TypeError)]:
        with pytest.raises(error, match="seed must be an integer in \\[0, 2\\*\\*64\\)") as err:
            key_from_seed(bad)
        assert len(_one_line(err)) < 200
    assert check_seed("seed", np.uint64(2**64 - 1)) == 2**64 - 1
