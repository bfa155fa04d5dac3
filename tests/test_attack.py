"""The shared adversarial core: fused class gradients, the local box, sign steps, the path scan."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from la_iprop.attribution.attack import local_box, path_sum, probability_gradients, project_box, sign_step


def _toy_logits(seed: int = 0, size: int = 6, classes: int = 5):
    """A small nonlinear classifier on [N, size, size, 3] images (tanh features, then linear)."""
    rng = np.random.default_rng(seed)
    w1 = jnp.asarray(rng.normal(size=(size * size * 3, 16)) / 4, jnp.float32)
    w2 = jnp.asarray(rng.normal(size=(16, classes)), jnp.float32)
    return lambda images: jnp.tanh(images.reshape(images.shape[0], -1) @ w1) @ w2


@pytest.mark.slow
def test_probability_gradients_match_separate_gradients():
    logit_fn = _toy_logits()
    x = jnp.asarray(np.random.default_rng(1).uniform(size=(6, 6, 3)), jnp.float32)
    classes = jnp.array([3, 0, 3])
    probs, grads = probability_gradients(logit_fn, x, classes)
    np.testing.assert_allclose(probs, jax.nn.softmax(logit_fn(x[None])[0]), rtol=1e-6)
    assert grads.shape == (3, 6, 6, 3)
    for i, c in enumerate(classes):
        expected = jax.grad(lambda v, c=c: jax.nn.softmax(logit_fn(v[None])[0])[c])(x)
        np.testing.assert_allclose(grads[i], expected, rtol=1e-5, atol=1e-7)
    np.testing.assert_array_equal(grads[0], grads[2])
    _, chunked = probability_gradients(logit_fn, x, classes, chunk=2)  # cotangents 2 at a time
    np.testing.assert_allclose(chunked, grads, rtol=1e-6, atol=1e-9)


def test_probability_gradients_use_one_forward_pass():
    calls = []
    base = _toy_logits()

    def counting(images):
        calls.append(images.shape)  # runs once per trace of the forward
        return base(images)

    x = jnp.full((6, 6, 3), 0.5, jnp.float32)
    jax.make_jaxpr(lambda v: probability_gradients(counting, v, jnp.array([0, 1, 2, 4])))(x)
    assert len(calls) == 1


def test_local_box_is_relative_and_clipped_to_unit_interval():
    x0 = jnp.array([0.0, 0.5, 0.95, 1.0])
    eps, lower, upper = local_box(x0, 10.0)
    np.testing.assert_allclose(eps, [0.0, 0.05, 0.095, 0.1], rtol=1e-6)
    np.testing.assert_allclose(lower, [0.0, 0.45, 0.855, 0.9], rtol=1e-6)
    np.testing.assert_allclose(upper, [0.0, 0.55, 1.0, 1.0], rtol=1e-6)


def test_project_and_sign_step_stay_in_box():
    lower, upper = jnp.array([0.1, 0.2, 0.3]), jnp.array([0.2, 0.4, 0.3])
    np.testing.assert_allclose(project_box(jnp.array([0.0, 0.3, 0.9]), lower, upper), [0.1, 0.3, 0.3])
    base = jnp.array([0.15, 0.3, 0.3])
    grad = jnp.array([2.0, -1e-9, 0.0])
    np.testing.assert_allclose(sign_step(base, grad, 0.1, lower, upper), [0.2, 0.2, 0.3], rtol=1e-6)
    np.testing.assert_allclose(sign_step(base, grad, 0.01, lower, upper, direction=-1.0), [0.14, 0.31, 0.3],
                               rtol=1e-6)
    # sign(0) = 0: an element with a zero gradient does not move.
    assert float(sign_step(base, grad, 0.05, lower, jnp.ones(3))[2]) == pytest.approx(0.3)


def test_path_sum_matches_python_loop():
    rng = np.random.default_rng(2)
    x0 = jnp.asarray(rng.uniform(size=(4, 3)), jnp.float32)
    weights = jnp.asarray(rng.normal(size=(4, 3)), jnp.float32)

    def step(x, t):
        x_next = x * 0.9 + 0.01 * t
        return x_next, weights * x, x_next - x

    total, path = path_sum(step, x0, 5, keep_path=True)
    x, expected, iterates = np.asarray(x0), np.zeros((4, 3), np.float32), []
    for t in range(5):
        x_next = x * 0.9 + 0.01 * t
        expected += np.asarray(weights) * x * (x_next - x)
        iterates.append(x_next)
        x = x_next
    np.testing.assert_allclose(total, expected, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(path, np.stack(iterates), rtol=1e-6)
    total_only, none = path_sum(step, x0, 5)
    assert none is None
    np.testing.assert_allclose(total_only, total, rtol=1e-6)
