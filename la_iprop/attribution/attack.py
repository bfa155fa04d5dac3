"""The adversarial core shared by path/exploration attributions (LA, and later AGI, MFABA, BIG, AttEXplore).

Everything here is written for ONE image ``x`` (HWC) and is meant to be lifted with
``jax.vmap`` (over runs, then over the batch):

- :func:`probability_gradients`: ``p = softmax(logit_fn(x))`` and ``grad_x p_c`` for
  several classes ``c`` from ONE forward pass (``jax.vjp`` applied to stacked one-hot
  cotangents), instead of one forward per class.
- :func:`local_box`: the box ``[x0 - eps, x0 + eps] ∩ [0, 1]`` with ``eps = x0 / s``.
- :func:`project_box` and :func:`sign_step`: ``Proj_B(base + alpha * direction * sign(g))``.
- :func:`path_sum`: a ``lax.scan`` that walks ``x_0 -> x_1 -> ... -> x_T`` with a
  caller-supplied step and accumulates ``sum_t g_t * d_t`` (gradient times displacement).
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
from jax import lax

__all__ = ["probability_gradients", "local_box", "project_box", "sign_step", "path_sum"]


def probability_gradients(logit_fn: Callable, x: jax.Array, classes: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Softmax probabilities of ONE image and their input gradients for several classes.

    Returns ``(p, grads)`` with ``p = softmax(logit_fn(x[None])[0])`` (shape ``[C]``) and
    ``grads[i] = d p[classes[i]] / d x`` (shape ``[len(classes), *x.shape]``). One forward
    pass; the backward pass is vmapped over the one-hot cotangents, so it sees
    ``len(classes)`` images while the forward activations are shared. Only ``x`` is
    differentiated (no weight gradients).
    """
    probs, pullback = jax.vjp(lambda image: jax.nn.softmax(logit_fn(image[None])[0]), x)
    cotangents = jax.nn.one_hot(classes, probs.shape[-1], dtype=probs.dtype)
    (grads,) = jax.vmap(pullback)(cotangents)
    return probs, grads


def local_box(x0: jax.Array, spatial_range: float) -> tuple[jax.Array, jax.Array, jax.Array]:
    """``(eps, lower, upper)``: radius ``eps = x0 / s`` per element, box ``[x0 - eps, x0 + eps] ∩ [0, 1]``.

    The radius is relative to the pixel value, so a zero pixel has an empty box (it never moves).
    """
    eps = x0 / spatial_range
    return eps, jnp.clip(x0 - eps, 0.0, 1.0), jnp.clip(x0 + eps, 0.0, 1.0)


def project_box(x: jax.Array, lower: jax.Array, upper: jax.Array) -> jax.Array:
    """Euclidean (and max-norm) projection onto the box ``[lower, upper]``: element-wise clipping."""
    return jnp.minimum(jnp.maximum(x, lower), upper)


def sign_step(base: jax.Array, grad: jax.Array, step: jax.Array | float, lower: jax.Array, upper: jax.Array,
              direction: jax.Array | float = 1.0) -> jax.Array:
    """Projected sign-gradient step ``Proj_[lower, upper](base + direction * step * sign(grad))``.

    ``direction = +1`` ascends (targeted: raise ``p_c``), ``-1`` descends (untargeted: lower
    ``p_y``); ``step`` may be per element (e.g. ``eps``). ``sign(0) = 0``: flat elements stay.
    """
    return project_box(base + direction * step * jnp.sign(grad), lower, upper)


def path_sum(step_fn: Callable, x_init: jax.Array, num_steps: int, *,
             keep_path: bool = False) -> tuple[jax.Array, jax.Array | None]:
    """Walks a path with ``lax.scan`` and sums gradient times displacement.

    ``step_fn(x_t, t) -> (x_next, g_t, d_t)``; the result is ``sum_{t<T} g_t * d_t``
    (element-wise, shape of ``x_init``). Path methods choose ``g_t`` (e.g. ``-grad p_y(x_t)``)
    and ``d_t`` (``x_{t+1} - x_t`` for a path integral as in AGI/MFABA, ``x_{t+1} - x_0``
    for LA's restarted steps). With ``keep_path`` the iterates ``x_1..x_T`` are returned
    too (shape ``[T, *x_init.shape]``; for tests and debugging), else ``None``.
    """
    def body(carry, t):
        x, total = carry
        x_next, grad, displacement = step_fn(x, t)
        return (x_next, total + grad * displacement), (x_next if keep_path else None)

    (_, total), path = lax.scan(body, (x_init, jnp.zeros_like(x_init)), jnp.arange(num_steps))
    return total, path
