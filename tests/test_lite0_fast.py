"""EfficientNet-Lite0's 1x1 convolutions as matmuls (``pointwise="matmul"``, the default)
agree with ``nn.Conv`` (``pointwise="conv"``) in float64: logits and input gradients, same
parameter tree."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from la_iprop.models.efficientnet_lite import EfficientNetLite0


def _random_variables(module, key, shape):
    variables = module.init(key, jnp.zeros(shape, jnp.float32))
    # Non-trivial BatchNorm statistics so every layer matters.
    leaves, tree = jax.tree_util.tree_flatten(variables)
    keys = jax.random.split(jax.random.PRNGKey(7), len(leaves))
    leaves = [leaf + 0.1 * jnp.abs(jax.random.normal(k, leaf.shape)) for leaf, k in zip(leaves, keys, strict=True)]
    return jax.tree_util.tree_unflatten(tree, leaves)


@pytest.mark.slow
def test_pointwise_matmul_same_parameter_tree():
    shape = (1, 40, 40, 3)
    matmul = EfficientNetLite0(num_classes=10).init(jax.random.PRNGKey(0), jnp.zeros(shape))
    conv = EfficientNetLite0(num_classes=10, pointwise="conv").init(jax.random.PRNGKey(0), jnp.zeros(shape))
    assert jax.tree_util.tree_structure(matmul) == jax.tree_util.tree_structure(conv)
    for a, b in zip(jax.tree_util.tree_leaves(matmul), jax.tree_util.tree_leaves(conv), strict=True):
        assert a.shape == b.shape and a.dtype == b.dtype


@pytest.mark.slow
def test_pointwise_matmul_matches_conv_float64():
    module = EfficientNetLite0(num_classes=10)
    reference = module.clone(pointwise="conv")
    assert module.clone(activation=jax.nn.relu).pointwise == "matmul"   # DeepLIFT's swap keeps it
    variables = _random_variables(module, jax.random.PRNGKey(0), (1, 68, 68, 3))
    with jax.enable_x64(True):
        variables = jax.tree_util.tree_map(lambda a: jnp.asarray(a, jnp.float64), variables)
        x = jax.random.uniform(jax.random.PRNGKey(1), (2, 68, 68, 3), jnp.float64) * 2.0 - 1.0
        cotangent = jnp.linspace(-1.0, 1.0, 20, dtype=jnp.float64).reshape(2, 10)
        results = []
        for m in (module, reference):
            logits, pullback = jax.vjp(lambda image, m=m: m.apply(variables, image), x)
            (grad,) = pullback(cotangent)
            assert logits.dtype == grad.dtype == jnp.float64
            results.append((np.asarray(logits), np.asarray(grad)))
    (logits, grad), (ref_logits, ref_grad) = results
    np.testing.assert_allclose(logits, ref_logits, rtol=0, atol=1e-12 * np.abs(ref_logits).max())
    np.testing.assert_allclose(grad, ref_grad, rtol=0, atol=1e-12 * np.abs(ref_grad).max())


def test_pointwise_rejects_unknown():
    with pytest.raises(ValueError, match="pointwise"):
        EfficientNetLite0(num_classes=10, pointwise="dense").init(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)))
