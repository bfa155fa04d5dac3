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
- :func:`walk_path`: the same walk with a carried state (e.g. momentum) and an optional
  early stop (a ``lax.while_loop`` that ends when the step function says so).
- :func:`linf_box`, :func:`normalized_step`, :func:`cross_entropy`: the fixed-radius ball
  ``[x0 - r, x0 + r] ∩ [0, 1]``, an L2-normalised gradient step, the attack losses.
- :func:`map_in_chunks`: ``vmap`` over runs/samples/candidates, ``chunk`` at a time.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

__all__ = ["probability_gradients", "local_box", "project_box", "sign_step", "path_sum", "linf_box",
           "normalized_step", "cross_entropy", "walk_path", "Walk", "map_in_chunks"]


def probability_gradients(logit_fn: Callable, x: jax.Array, classes: jax.Array, *,
                          chunk: int | None = None) -> tuple[jax.Array, jax.Array]:
    """Softmax probabilities of ONE image and their input gradients for several classes.

    Returns ``(p, grads)`` with ``p = softmax(logit_fn(x[None])[0])`` (shape ``[C]``) and
    ``grads[i] = d p[classes[i]] / d x`` (shape ``[len(classes), *x.shape]``). One forward
    pass; the backward pass is vmapped over the one-hot cotangents (``chunk`` at a time to
    bound memory), so it sees ``len(classes)`` images while the forward activations are
    shared. Only ``x`` is differentiated (no weight gradients).
    """
    probs, pullback = jax.vjp(lambda image: jax.nn.softmax(logit_fn(image[None])[0]), x)
    cotangents = jax.nn.one_hot(classes, probs.shape[-1], dtype=probs.dtype)
    (grads,) = map_in_chunks(pullback, (cotangents,), chunk)
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


def linf_box(x0: jax.Array, radius: jax.Array | float) -> tuple[jax.Array, jax.Array]:
    """``(lower, upper)`` of the max-norm ball ``[x0 - r, x0 + r] ∩ [0, 1]`` (fixed radius ``r``, unlike :func:`local_box`).

    Projecting onto it equals the official codes' ``clip(x0 + clip(x - x0, -r, r), 0, 1)``.
    """
    return jnp.clip(x0 - radius, 0.0, 1.0), jnp.clip(x0 + radius, 0.0, 1.0)


def normalized_step(base: jax.Array, grad: jax.Array, step: jax.Array | float, lower: jax.Array, upper: jax.Array,
                    direction: jax.Array | float = 1.0) -> jax.Array:
    """Projected L2-normalised gradient step ``Proj_[lower, upper](base + direction * step * g / ||g||_2)``.

    The norm is over the whole image; a zero gradient does not move.
    """
    norm = jnp.sqrt(jnp.sum(jnp.square(grad)))
    unit = grad / jnp.where(norm > 0, norm, 1.0)
    return project_box(base + direction * step * unit, lower, upper)


def cross_entropy(logits: jax.Array, label: jax.Array, *, on_probabilities: bool = False) -> jax.Array:
    """``-log softmax(z)_y`` of ONE image's logits ``z``; ``on_probabilities``: ``-log softmax(softmax(z))_y``.

    The second form is what the official BIG/AttEXplore code computes when its model already
    ends in a softmax (``CrossEntropyLoss`` applied to probabilities); it equals
    ``-p_y + log sum_j exp(p_j)``, so its gradient is ``-grad p_y + sum_j softmax(p)_j grad p_j``.
    """
    scores = jax.nn.softmax(logits) if on_probabilities else logits
    return -jax.nn.log_softmax(scores)[label]


class Walk(NamedTuple):
    """Result of :func:`walk_path`."""
    total: jax.Array             # sum over the steps taken of g_t * d_t (shape of x)
    num_steps: jax.Array         # steps taken (int32 scalar): T, or the t at which the walk stopped
    path: jax.Array | None       # x_1..x_T [T, *x.shape] (after a stop the last point repeats), or None
    state: Any                   # the carried state after the last step taken


def walk_path(step_fn: Callable, x_init: jax.Array, num_steps: int, *, state: Any = (), stoppable: bool = False,
              keep_path: bool = False) -> Walk:
    """Walks ``x_0 -> x_1 -> ...`` for at most ``num_steps`` steps and sums gradient times displacement.

    ``step_fn(x_t, state_t, t) -> (x_next, state_next, g_t, d_t, stop_t)``. With ``stoppable``
    the walk ends at ``x_t`` as soon as ``stop_t`` (a bool scalar computed at ``x_t``, e.g. from
    the same forward pass as ``g_t``) is true: that step and all later ones contribute nothing
    and ``x``/``state`` stay. It is then a ``lax.while_loop``, so a vmapped batch of walks exits
    once every walk has stopped; without ``stoppable`` it is a ``lax.scan`` and ``stop_t`` is
    ignored. The sum is ``sum_{t < num_steps taken} g_t * d_t``; :func:`path_sum` is the
    stateless, unstoppable case.
    """
    zeros = jnp.zeros_like(x_init)
    if not stoppable:
        def body(carry, t):
            x, st, total = carry
            x_next, st_next, grad, displacement, _ = step_fn(x, st, t)
            return (x_next, st_next, total + grad * displacement), (x_next if keep_path else None)

        (x, st, total), path = lax.scan(body, (x_init, state, zeros), jnp.arange(num_steps, dtype=jnp.int32))
        return Walk(total, jnp.asarray(num_steps, jnp.int32), path, st)

    buffer = jnp.broadcast_to(x_init, (num_steps, *x_init.shape)) if keep_path else None

    def cond(carry):
        _, _, _, t, stopped, _ = carry
        return (t < num_steps) & jnp.logical_not(stopped)

    def body(carry):
        x, st, total, t, _, buf = carry
        x_next, st_next, grad, displacement, stop = step_fn(x, st, t)
        stop = jnp.asarray(stop, bool)
        x_new = jnp.where(stop, x, x_next)
        st_new = jax.tree_util.tree_map(lambda old, new: jnp.where(stop, old, new), st, st_next)
        total = jnp.where(stop, total, total + grad * displacement)
        if buf is not None:
            buf = buf.at[t].set(x_new)
        return x_new, st_new, total, jnp.where(stop, t, t + 1), stop, buf

    x, st, total, taken, _, buf = lax.while_loop(
        cond, body, (x_init, state, zeros, jnp.asarray(0, jnp.int32), jnp.asarray(False), buffer))
    if buf is not None:  # steps never taken: the walk stays at its last point
        buf = jnp.where((jnp.arange(num_steps) < taken).reshape(-1, *([1] * x.ndim)), buf, x)
    return Walk(total, taken, buf, st)


def map_in_chunks(fn: Callable, args: tuple, chunk: int | None):
    """``jax.vmap(fn)(*args)`` over the leading axis of ``args``, ``chunk`` entries at a time.

    Full chunks go through ``lax.map`` (sequential, so memory scales with ``chunk``, not with
    the number of entries); a remainder is one more vmapped call. Outputs may be any pytree
    (``None`` leaves are kept). The result does not depend on ``chunk``.
    """
    count = args[0].shape[0]
    if chunk is None or chunk >= count:
        return jax.vmap(fn)(*args)
    full = count // chunk * chunk
    head = lax.map(lambda a: jax.vmap(fn)(*a), tuple(a[:full].reshape(-1, chunk, *a.shape[1:]) for a in args))
    head = jax.tree_util.tree_map(lambda o: o.reshape(full, *o.shape[2:]), head)
    if full == count:
        return head
    tail = jax.vmap(fn)(*(a[full:] for a in args))
    return jax.tree_util.tree_map(lambda h, t: jnp.concatenate([h, t]), head, tail)
