"""precision="float32" | "float64": the scope, exact float64 behaviour of every method, parity in float64.

Exactness claims are made in float64 only (see docs/design.md, "Numerical precision"): there the
sign- and rank-driven methods are no longer chaotic, so maps agree across batch sizes and
thread counts, and Guided IG equals PAIR-code/saliency's algorithm.
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys
import textwrap
from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import ROOT, fast_tier_subset

from la_iprop.attribution import available_methods, get_method, method_hparams
from la_iprop.attribution.base import split_per_image
from la_iprop.attribution.guided_ig import kth_smallest_nonnegative
from la_iprop.iprop import iprop, knn_graph, to_dense, with_iprop
from la_iprop.metrics import evaluate
from la_iprop.models import ModelFn
from la_iprop.precision import float_dtype, precision_scope
from la_iprop.runs.config import RunConfig
from la_iprop.runs.engine import check_identity
from la_iprop.runs.store import ConfigError
from la_iprop.runs.validation import validate

KEY = jax.random.PRNGKey(0)
NUM_CLASSES = 10


class _TinyCNN(nn.Module):
    activation: Callable = jax.nn.relu

    @nn.compact
    def __call__(self, x):
        x = self.activation(nn.Conv(4, (3, 3))(x))
        x = self.activation(nn.Conv(6, (3, 3), strides=(2, 2))(x))
        return nn.Dense(NUM_CLASSES)(jnp.mean(x, axis=(1, 2)))


@pytest.fixture(scope="module")
def tiny():
    module = _TinyCNN()
    variables = module.init(jax.random.PRNGKey(1), jnp.zeros((1, 8, 8, 3)))
    return ModelFn(variables=variables, module=module, preprocess=lambda x: x, name="tiny", input_size=8,
                   num_classes=NUM_CLASSES)


def _images(n: int, seed: int = 0, size: int = 8) -> np.ndarray:
    return np.random.default_rng(seed).uniform(0.05, 1.0, (n, size, size, 3)).astype(np.float32)


# Small settings per method, so that each compiled program stays cheap.
HPARAMS = {
    "agi": dict(num_targets=4, max_iter=4),
    "attexplore": dict(max_iter=3, num_samples=4, sample_chunk=2),
    "big": dict(epsilons=(0.01, 0.03, 0.1, 0.3), attack_steps=3, attack_step_size=None, steps=6),
    "mfaba": dict(max_iter=8, step_size=0.01),
    "la": dict(max_iter=4, sampling_times=4),
    "sg": dict(samples=4),
    "ig": dict(steps=6),
    "eg": dict(samples=3),
    "gig": dict(steps=5),
}


def _call(name, model, images, key, **extra):
    hparams = dict(HPARAMS.get(name, {}), **extra)
    if get_method(name).needs_reference_set:
        hparams["reference_images"] = _images(4, seed=11)
    return get_method(name).fn(model, images, None, key=key, **hparams)


# --- the scope --------------------------------------------------------------------------------------------------

def test_scope_switches_x64_for_the_call_only(tiny):
    assert not jax.config.jax_enable_x64
    with precision_scope("float64"):
        assert jax.config.jax_enable_x64 and float_dtype() == np.float64
    assert not jax.config.jax_enable_x64 and float_dtype() == np.float32
    with pytest.raises(RuntimeError, match="inside"), precision_scope("float64"):
        raise RuntimeError("inside")
    assert not jax.config.jax_enable_x64
    # an error raised inside a float64 method call leaves the configuration as it was
    with pytest.raises(ValueError, match="labels"):
        get_method("sm").fn(tiny, _images(2), np.array([0, 99]), precision="float64")
    assert not jax.config.jax_enable_x64
    out = get_method("sm").fn(tiny, _images(2), None, precision="float64")
    assert out.dtype == jnp.float64 and not jax.config.jax_enable_x64


def test_float32_does_not_depend_on_the_callers_x64_setting(tiny):
    images = _images(2)
    plain = np.asarray(get_method("ig").fn(tiny, images, None, steps=4))
    with jax.enable_x64(True):  # a user who runs with x64 on globally
        inside = get_method("ig").fn(tiny, images, None, steps=4)
        assert jax.config.jax_enable_x64  # still on after the call
    assert inside.dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(inside), plain)


def test_nested_calls_inherit_the_precision(tiny):
    """with_iprop calls the method without a precision: it runs in the wrapper's."""
    images = _images(2, size=12)
    model = tiny.replace(input_size=12)
    wrapped = with_iprop("sm", k=4, radius=1)
    out = wrapped(model, images, None, precision="float64")
    assert out.dtype == jnp.float64
    direct = iprop(images, get_method("sm").fn(model, images, None, precision="float64"), k=4, radius=1,
                   precision="float64")
    np.testing.assert_allclose(np.asarray(out)[..., 0], np.asarray(direct), rtol=1e-12, atol=0)


@pytest.mark.parametrize("bad", ["float16", "fp64", 64])
def test_bad_precision_is_a_clear_error(tiny, bad):
    images = _images(1)
    for name in ("sm", "la"):
        with pytest.raises(ValueError, match="precision must be one of"):
            get_method(name).fn(tiny, images, None, key=KEY, precision=bad)
    with pytest.raises(ValueError, match="precision must be one of"):
        evaluate(tiny, images, images, precision=bad)
    with pytest.raises(ValueError, match="precision must be one of"):
        iprop(_images(1, size=12), _images(1, size=12), precision=bad)
    assert not jax.config.jax_enable_x64


def test_a_float32_only_classifier_is_a_clear_error_in_float64():
    kernel = jnp.ones((3, 3, 3, 2), jnp.float32)

    def conv_model(images):  # float32 weights: lax.conv refuses float64 images
        h = jax.lax.conv_general_dilated(images, kernel, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
        return h.mean(axis=(1, 2))

    def casting_model(images):  # silently computes in float32
        return images.astype(jnp.float32).mean(axis=(1, 2))

    images = _images(1)
    for model in (conv_model, casting_model):
        with pytest.raises(TypeError, match="precision='float64'"):
            get_method("sm").fn(model, images, None, precision="float64")
        with pytest.raises(TypeError, match="precision='float64'"):
            evaluate(model, images, images, precision="float64")
    assert get_method("sm").fn(conv_model, images, None).dtype == jnp.float32  # float32 is fine
    assert not jax.config.jax_enable_x64


def test_precision_is_not_a_hyperparameter():
    for name in available_methods():
        assert "precision" not in method_hparams(name)


# --- float64: every method, exactly batch independent --------------------------------------------------------

@pytest.mark.parametrize("name", fast_tier_subset(sorted(available_methods()), fast={"la", "sm"}))
def test_float64_is_exactly_batch_independent(name, tiny):
    """A batch of 3 vs each image alone with its own key: equal to 1e-10 in float64 (in float32 the
    sign/rank-driven methods are chaotic, see results/stability.md)."""
    images = _images(3, seed=2)
    batched = np.asarray(_call(name, tiny, images, KEY, precision="float64"))
    assert batched.dtype == np.float64 and np.all(np.isfinite(batched)) and np.abs(batched).max() > 0
    keys = split_per_image(KEY, 3)
    for i in range(3):
        alone = np.asarray(_call(name, tiny, images[i:i + 1], keys[i:i + 1], precision="float64"))[0]
        np.testing.assert_allclose(alone, batched[i], rtol=1e-10, atol=1e-10 * np.abs(batched[i]).max())
    assert not jax.config.jax_enable_x64


@pytest.mark.parametrize("name", fast_tier_subset(sorted(available_methods()), fast={"la", "sg"}))
def test_float64_and_float32_share_random_draws(name, tiny):
    """Random draws are made in float32 and cast, so float64 differs from float32 by rounding, not by the
    noise realisation: on this smooth tiny model every method's two maps correlate (measured >= 0.99999999)."""
    images = _images(2, seed=5)
    f32 = np.asarray(_call(name, tiny, images, KEY))
    f64 = np.asarray(_call(name, tiny, images, KEY, precision="float64"))
    assert f32.dtype == np.float32 and f64.dtype == np.float64
    # 0.999: far below what a shared draw gives (measured 0.99999999+), far above different draws (sg 0.86, eg 0.55)
    assert np.corrcoef(f32.ravel(), f64.ravel())[0, 1] >= 0.999


# --- Guided IG's exact k-th smallest in float64 -------------------------------------------------------------

def test_kth_smallest_is_exact_in_float64():
    rng = np.random.default_rng(3)
    with jax.enable_x64(True):
        for size in (1, 7, 1000):
            values = np.abs(rng.normal(size=size))
            values[rng.random(size) < 0.2] = np.inf
            values[: size // 3] = values[0]  # ties
            for k in {0, size // 4, size - 1}:
                found = kth_smallest_nonnegative(jnp.asarray(values), k)
                assert found.dtype == jnp.float64 and float(found) == np.sort(values)[k]
        # values that float32 cannot tell apart (the old float32 cast merged them)
        close = jnp.asarray([1.0, 1.0 + 1e-12, 1.0 + 2e-12])
        assert float(kth_smallest_nonnegative(close, 1)) == 1.0 + 1e-12


# --- float64 across XLA:CPU thread settings -----------------------------------------------------------------

_THREAD_SCRIPT = textwrap.dedent("""
    import sys, numpy as np, jax
    sys.path.insert(0, {tests!r}); sys.path.insert(0, {root!r})
    from conftest import la1000_images
    from la_iprop.attribution import get_method
    from la_iprop.models import load_model
    model = load_model("efficientnet_lite0")
    images, _ = la1000_images([905])
    key = jax.random.PRNGKey(0)
    out = {{"la": get_method("la").fn(model, images, None, key=key, max_iter=3, sampling_times=3, precision="float64"),
            "gig": get_method("gig").fn(model, images, None, steps=3, precision="float64")}}
    np.savez(sys.argv[1], **{{k: np.asarray(v) for k, v in out.items()}})
""")


@pytest.mark.slow
def test_float64_maps_do_not_depend_on_the_thread_count(tmp_path):
    """The same float64 maps with XLA:CPU's default intra-op threads and with one thread (subprocesses)."""
    script = tmp_path / "maps.py"
    script.write_text(_THREAD_SCRIPT.format(tests=str(ROOT / "tests"), root=str(ROOT)))
    results = {}
    for name, flags in (("default", ""), ("one_thread", "--xla_cpu_multi_thread_eigen=false "
                                                        "intra_op_parallelism_threads=1")):
        env = dict(os.environ, XLA_FLAGS=flags, JAX_PLATFORMS="cpu")
        subprocess.run([sys.executable, str(script), str(tmp_path / f"{name}.npz")], check=True, env=env,
                       cwd=ROOT, timeout=900)
        results[name] = dict(np.load(tmp_path / f"{name}.npz"))
    for method in ("la", "gig"):
        a, b = results["default"][method], results["one_thread"][method]
        assert a.dtype == np.float64
        np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-10 * np.abs(a).max())


# --- metric and IProp in float64 ----------------------------------------------------------------------------

def test_evaluate_in_float64_scores_like_float32(tiny):
    images = _images(2, seed=6)
    maps = np.random.default_rng(7).normal(size=images.shape)
    r32 = evaluate(tiny, images, maps, protocol="la")
    r64 = evaluate(tiny, images, maps, protocol="la", precision="float64")
    # Same map, same ranking: the curves differ by the model's float32 rounding only (measured ~1e-7).
    np.testing.assert_allclose(r64.insertion_curves, r32.insertion_curves, rtol=0, atol=1e-5)
    np.testing.assert_allclose(r64.deletion_curves, r32.deletion_curves, rtol=0, atol=1e-5)
    assert not jax.config.jax_enable_x64


def test_iprop_in_float64_is_the_exact_fixed_point():
    images = _images(2, seed=8, size=9)
    maps = np.random.default_rng(9).normal(size=images.shape).astype(np.float32)
    hp = dict(k=4, radius=1, gamma=0.9, tol=1e-13, max_iter=10_000, reward="sum")
    values = np.asarray(iprop(images, maps, precision="float64", **hp))
    assert values.dtype == np.float64
    with jax.enable_x64(True):
        for i in range(2):
            graph = knn_graph(jnp.asarray(images[i], jnp.float64), k=4, radius=1)
            dense = np.asarray(to_dense(graph, 81))
            assert dense.dtype == np.float64
            reward = maps[i].astype(np.float64).sum(-1).ravel()
            exact = np.linalg.solve(np.eye(81) - 0.9 * dense, reward).reshape(9, 9)
            np.testing.assert_allclose(values[i], exact, rtol=0, atol=1e-10 * np.abs(exact).max())
    # float32 reaches the same fixed point up to its rounding
    np.testing.assert_allclose(iprop(images, maps, **hp), values, rtol=0, atol=1e-4 * np.abs(values).max())


# --- the runner ---------------------------------------------------------------------------------------------

def test_precision_is_part_of_a_runs_identity(tmp_path):
    base = RunConfig(methods=("sm",), out=str(tmp_path))
    check_identity(tmp_path, base)
    with pytest.raises(ConfigError, match="different settings .*precision"):
        check_identity(tmp_path, RunConfig(methods=("sm",), out=str(tmp_path), precision="float64"))
    assert json.loads((pathlib.Path(tmp_path) / "run.json").read_text())["precision"] == "float32"
    with pytest.raises(ConfigError, match="--precision"):
        validate(RunConfig(methods=("sm",), precision="half"))
