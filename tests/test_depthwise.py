"""The CPU depthwise path (shift-and-add over stride phases, hand-written VJP) equals the
library grouped convolution: forward, input and kernel cotangents, in float64 to ~1e-12."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from la_iprop.models import load_model
from la_iprop.models.layers import DEPTHWISE_IMPLS, depthwise_conv, depthwise_impl_for_backend, same_padding


def _rel(a, b) -> float:
    a, b = np.asarray(a), np.asarray(b)
    assert a.shape == b.shape and a.dtype == b.dtype == np.float64, (a.shape, b.shape, a.dtype, b.dtype)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-300))


def _forward_and_vjp(impl, x, w, stride, pad, g):
    out, pullback = jax.vjp(lambda v, k: depthwise_conv(v, k, stride, pad, impl), x, w)
    return (out, *pullback(g))


@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("kernel", [3, 5])
@pytest.mark.parametrize("size", [(7, 8), (12, 11), (5, 5)])
@pytest.mark.parametrize("padding", ["same", "uneven"])
@pytest.mark.slow
def test_depthwise_forms_agree_in_float64(stride, kernel, size, padding):
    with jax.enable_x64(True):
        rng = np.random.default_rng(100 * stride + 10 * kernel + size[0])
        x = jnp.asarray(rng.normal(size=(2, *size, 5)), jnp.float64)
        w = jnp.asarray(rng.normal(size=(kernel, kernel, 5)), jnp.float64)
        if padding == "same":
            pad = tuple(same_padding(n, kernel, stride) for n in size)
        else:
            pad = ((2, 1), (0, 3))
        ref_out = depthwise_conv(x, w, stride, pad, "library")
        g = jnp.asarray(rng.normal(size=ref_out.shape), jnp.float64)
        ref = _forward_and_vjp("library", x, w, stride, pad, g)
        ours = _forward_and_vjp("shift_add", x, w, stride, pad, g)
        for a, b in zip(ours, ref, strict=True):
            assert _rel(a, b) < 1e-12


def test_depthwise_vjp_under_vmap_and_jit_float64():
    """LA vmaps the VJP over runs and cotangents: the custom VJP must batch like the library form."""
    with jax.enable_x64(True):
        rng = np.random.default_rng(3)
        x = jnp.asarray(rng.normal(size=(3, 1, 9, 10, 4)), jnp.float64)
        w = jnp.asarray(rng.normal(size=(5, 5, 4)), jnp.float64)
        pad = (same_padding(9, 5, 2), same_padding(10, 5, 2))

        def grads(impl):
            def loss(v, k):
                return jnp.sum(jnp.sin(depthwise_conv(v, k, 2, pad, impl)))

            return jax.jit(jax.vmap(jax.grad(loss, argnums=(0, 1)), in_axes=(0, None)))(x, w)

        for a, b in zip(grads("shift_add"), grads("library"), strict=True):
            assert _rel(a, b) < 1e-12


def test_depthwise_float32_stays_float32():
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(1, 8, 8, 3)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(3, 3, 3)), jnp.float32)
    out, (dx, dw) = jax.value_and_grad(lambda v, k: depthwise_conv(v, k, 2, ((0, 1), (0, 1)), "shift_add").sum(),
                                       argnums=(0, 1))(x, w)
    assert out.dtype == dx.dtype == dw.dtype == jnp.float32


def test_impl_choice():
    assert depthwise_impl_for_backend("cpu") == "shift_add"
    assert depthwise_impl_for_backend("gpu") == "library"
    assert set(DEPTHWISE_IMPLS) == {"shift_add", "shift_add_plain", "library"}
    with pytest.raises(ValueError, match="impl"):
        depthwise_conv(jnp.zeros((1, 4, 4, 2)), jnp.zeros((3, 3, 2)), impl="nope")


@pytest.mark.slow
def test_lite0_logits_and_input_gradient_float64_match_library():
    """Whole Lite0 in float64 on a 68x68 input (odd sizes after the stride-2 stages:
    34, 17, 9, 5, 3): logits and the input gradient of a probability agree with the
    library convolution to ~1e-12."""
    base = load_model("efficientnet_lite0")
    with jax.enable_x64(True):
        variables = jax.tree_util.tree_map(lambda a: jnp.asarray(np.asarray(a), jnp.float64), base.variables)
        rng = np.random.default_rng(5)
        images = jnp.asarray(rng.uniform(size=(2, 68, 68, 3)), jnp.float64)

        def run(impl):
            model = base.with_module(depthwise_impl=impl).replace(variables=variables)

            def prob(image, label):
                return jax.nn.softmax(model(image[None])[0])[label]

            logits = jax.jit(lambda x: model(x))(images)
            grads = jax.jit(jax.vmap(jax.grad(prob)))(images, jnp.array([3, 500]))
            return logits, grads

        (logits_a, grads_a), (logits_b, grads_b) = run("shift_add"), run("library")
        assert logits_a.dtype == grads_a.dtype == jnp.float64
        assert _rel(logits_a, logits_b) < 1e-12
        assert _rel(grads_a, grads_b) < 1e-11
