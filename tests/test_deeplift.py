"""DeepLIFT (rescale rule): closed form, summation-to-delta, the activation swap, errors."""

from __future__ import annotations

from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import la1000_images

from la_iprop.attribution.deeplift import RescaleActivation, _deeplift_core, deeplift, deeplift_model
from la_iprop.models import ModelFn


def _identity(x):
    return x


class ReluCNN(nn.Module):
    num_classes: int = 5
    activation: Callable = jax.nn.relu

    @nn.compact
    def __call__(self, x):
        x = self.activation(nn.Conv(6, (3, 3))(x))
        skip = x
        x = self.activation(nn.Conv(6, (3, 3))(x)) + skip  # a residual add is linear: still exact
        x = self.activation(nn.Conv(8, (3, 3), strides=(2, 2))(x))
        return nn.Dense(self.num_classes)(jnp.mean(x, axis=(1, 2)))


class MLP(nn.Module):
    hidden: int = 16
    num_classes: int = 3
    activation: Callable = jax.nn.relu

    @nn.compact
    def __call__(self, x):
        h = nn.Dense(self.hidden, name="hidden")(x.reshape(x.shape[0], -1))
        return nn.Dense(self.num_classes, name="out")(self.activation(h))


class NoActivationField(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(3)(x.reshape(x.shape[0], -1))


def _model(module, size, seed=0):
    variables = module.init(jax.random.PRNGKey(seed), jnp.zeros((1, size, size, 3)))
    # random biases (Flax initialises them to 0, which makes a ReLU net homogeneous)
    rng = np.random.RandomState(seed)
    variables = jax.tree_util.tree_map_with_path(
        lambda path, a: a + 0.2 * rng.standard_normal(a.shape).astype(np.float32)
        if path[-1].key == "bias" else a, variables)
    return ModelFn(variables=variables, module=module, preprocess=_identity, name="toy", input_size=size,
                   num_classes=module.num_classes if hasattr(module, "num_classes") else 3)


def _images(n, size, seed=0):
    return np.random.RandomState(seed).uniform(0, 1, (n, size, size, 3)).astype(np.float32)


def test_closed_form_on_one_hidden_layer():
    """attr_i = (x_i - b) sum_j W1_ij m_j W2_jy with m_j = (relu(h_j) - relu(h0_j)) / (h_j - h0_j)."""
    model = _model(MLP(), 4, seed=2)
    x = _images(3, 4, seed=1)
    labels = np.array([0, 2, 1], np.int32)
    params = jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64), model.variables["params"])
    w1, b1 = params["hidden"]["kernel"], params["hidden"]["bias"]
    w2 = params["out"]["kernel"]
    for baseline in (0.0, 0.4):
        ours = np.asarray(deeplift(model, x, labels, baseline=baseline))
        crossed = 0
        for i in range(3):
            flat = x[i].reshape(-1).astype(np.float64)
            ref = np.full_like(flat, baseline)
            h, h0 = flat @ w1 + b1, ref @ w1 + b1
            m = (np.maximum(h, 0) - np.maximum(h0, 0)) / (h - h0)
            crossed += np.sum((h > 0) != (h0 > 0))
            expected = (flat - ref) * (w1 @ (m * w2[:, labels[i]]))
            np.testing.assert_allclose(ours[i].reshape(-1), expected, rtol=1e-4, atol=1e-6 * np.abs(expected).max())
        assert crossed > 0  # some units switch on/off between x and x0: multipliers differ from gradients


@pytest.mark.slow
def test_summation_to_delta_on_relu_cnn():
    model = _model(ReluCNN(), 10, seed=3)
    x = _images(4, 10, seed=4)
    labels = np.array([0, 1, 3, 4], np.int32)
    logit_grads = jax.jit(jax.vmap(jax.grad(lambda im, y: model(im[None])[0, y])))
    for baseline in (0.0, 0.7):
        attr = np.asarray(deeplift(model, x, labels, baseline=baseline))
        logits = np.asarray(model(jnp.asarray(np.concatenate([x, np.full_like(x[:1], baseline)]))), np.float64)
        delta = logits[np.arange(4), labels] - logits[4, labels]
        np.testing.assert_allclose(attr.sum(axis=(1, 2, 3)), delta, rtol=1e-5, atol=1e-6)
        # the plain gradient x input does NOT sum to the delta on this net: the test can fail
        grads = logit_grads(jnp.asarray(x), jnp.asarray(labels))
        gxi = np.asarray((x - baseline) * grads).sum(axis=(1, 2, 3))
        assert np.abs(gxi - delta).max() > 1e-3 * np.abs(delta).max()


def test_input_equal_to_reference_gives_zero():
    model = _model(ReluCNN(), 10, seed=3)
    x = np.full((1, 10, 10, 3), 0.25, np.float32)
    attr = np.asarray(deeplift(model, x, np.array([2], np.int32), baseline=0.25))
    assert np.all(np.isfinite(attr)) and np.all(attr == 0)


def test_activation_swap_is_hashable_and_compiles_once():
    model = _model(ReluCNN(), 10, seed=3)
    swapped = deeplift_model(model)
    assert swapped.module.activation == RescaleActivation(jax.nn.relu)
    assert hash(swapped.module.activation) == hash(RescaleActivation(jax.nn.relu))
    assert deeplift_model(swapped) is swapped  # already swapped: unchanged
    x = _images(2, 10)
    deeplift(model, x, np.array([0, 1], np.int32))
    size = _deeplift_core._cache_size()
    deeplift(model, x, np.array([2, 3], np.int32))
    assert _deeplift_core._cache_size() == size


def test_rescale_activation_needs_pairs():
    act = RescaleActivation(jax.nn.relu)
    with pytest.raises(ValueError, match="paired"):
        jax.grad(lambda z: act(z).sum())(jnp.ones((3, 2)))
    # forward and multipliers on a pair: secant where z != z0, derivative where equal
    z = jnp.array([[2.0, -1.0, 3.0, 0.5], [-2.0, -3.0, 1.0, 0.5]])
    out, vjp = jax.vjp(act, z)
    np.testing.assert_allclose(out, jax.nn.relu(z))
    (ct,) = vjp(jnp.ones_like(z))
    np.testing.assert_allclose(ct[0], [0.5, 0.0, 1.0, 1.0])
    np.testing.assert_allclose(ct[1], ct[0])


def test_needs_a_model_with_an_activation_field():
    x = _images(1, 4)
    with pytest.raises(TypeError, match="ModelFn"):
        deeplift(lambda im: im.reshape(im.shape[0], -1)[:, :3], x, np.zeros(1, np.int32))
    plain = _model(NoActivationField(), 4)
    with pytest.raises(TypeError, match="activation"):
        deeplift(plain, x, np.zeros(1, np.int32))
    with pytest.raises(ValueError, match="baseline"):
        deeplift(_model(MLP(), 4), x, np.zeros(1, np.int32), baseline=-1.0)


@pytest.mark.slow
def test_summation_to_delta_on_lite0(lite0):
    images, _ = la1000_images([3, 700])
    logits = np.asarray(lite0(jnp.asarray(np.concatenate([images, np.zeros_like(images[:1])]))), np.float64)
    labels = np.argmax(logits[:2], -1).astype(np.int32)
    attr = np.asarray(deeplift(lite0, images, labels), np.float64)
    delta = logits[[0, 1], labels] - logits[2, labels]
    rel = np.abs(attr.sum(axis=(1, 2, 3)) - delta) / np.abs(delta)
    assert np.all(rel < 1e-3), (rel, delta)
