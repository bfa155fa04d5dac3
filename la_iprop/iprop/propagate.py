"""The Markov Reward Process of IProp: rewards from an attribution, and its fixed point.

Given the transition matrix ``P`` of a :class:`~la_iprop.iprop.graph.PixelGraph` and a
per-pixel reward ``r``, the value ``V`` solves ``V = r + gamma * P V``. For ``0 <= gamma < 1``
the map ``V -> r + gamma P V`` is a ``gamma``-contraction in the max-norm (rows of ``P``
are non-negative and sum to 1), so the iteration

    V_0 = r,    V_{t+1} = r + gamma * P V_t

(``P V`` by ``segment_sum`` over the edges, or for window graphs (knn, random_window) by shifted
copies of ``V``, see :func:`window_matvec`)
converges to the unique fixed point ``(I - gamma P)^{-1} r``. Because
``V_t - V_{t-1} = gamma^t P^t r``, the stopping rule ``max|V_t - V_{t-1}| <= tol * max|r|``
is met after at most ``ceil(log(tol) / log(gamma))`` iterations, and then
``max|V_t - V*| <= gamma / (1 - gamma) * tol * max|r|``.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from la_iprop.checks import check_choice, check_finite, check_int_at_least
from la_iprop.iprop.defaults import (
    DEFAULT_GAMMA,
    DEFAULT_MAX_ITER,
    DEFAULT_REWARD,
    DEFAULT_TOL,
    REWARD_RULES,
    check_propagation_hparams,
)
from la_iprop.iprop.graph import PixelGraph
from la_iprop.precision import float_dtype

__all__ = ["reward_from_attribution", "propagate", "propagation_step", "transition_matvec", "window_matvec",
           "iteration_bound"]


def reward_from_attribution(attribution: jax.Array, rule: str = DEFAULT_REWARD) -> jax.Array:
    """Per-pixel reward ``[..., H, W]`` from an attribution ``[..., H, W, C]`` (channels last).

    ``sum``: ``sum_c a_c``; ``abs_sum``: ``sum_c |a_c|``; ``positive_sum``: ``max(sum_c a_c, 0)``.
    """
    check_choice("reward", rule, REWARD_RULES)
    attribution = jnp.asarray(attribution, float_dtype())
    if rule == "abs_sum":
        return jnp.sum(jnp.abs(attribution), axis=-1)
    total = jnp.sum(attribution, axis=-1)
    return jnp.maximum(total, 0.0) if rule == "positive_sum" else total


def transition_matvec(graph: PixelGraph, value: jax.Array) -> jax.Array:
    """``(P V)_i = sum_j P_ij V_j`` on flat arrays, by ``segment_sum`` over the edge list.

    Messages ``P_ij V_j`` are gathered from the receivers and summed into their senders;
    the edges are grouped by sender, so the segment sum is over sorted indices. Works for
    any edge list (not only :func:`~la_iprop.iprop.graph.knn_graph`'s).
    """
    messages = graph.transition * value[graph.receivers]
    return jax.ops.segment_sum(messages, graph.senders, num_segments=value.shape[0], indices_are_sorted=True)


def window_matvec(graph: PixelGraph, height: int, width: int, radius: int):
    """The same ``P V`` for a window graph (every edge in its node's clamped ``(2R+1)^2`` window: knn or
    random_window), by shifted copies.

    Interior pixels (at least ``R`` from the border) have their window centred, so their edge
    to window slot ``(a, b)`` is the pixel offset ``(a - R, b - R)``: ``P`` restricted to them
    is ``(2R+1)^2`` dense weight planes (zero where a slot was not kept), and ``(P V)`` there is
    ``sum_ab plane_ab * V[a : a + H - 2R, b : b + W - 2R]``, slices instead of gathers. The
    border strips (clamped windows) use their edge lists. Returns ``matvec(V_flat)``; the
    planes are built once per graph. Requires senders grouped by node, ``K`` per node.
    """
    n, size = height * width, 2 * radius + 1
    k = graph.senders.shape[0] // n
    senders, receivers = graph.senders, graph.receivers
    sy, sx, ry, rx = senders // width, senders % width, receivers // width, receivers % width
    interior = (sy >= radius) & (sy < height - radius) & (sx >= radius) & (sx < width - radius)
    slot = jnp.where(interior, (ry - sy + radius) * size + (rx - sx + radius), 0)
    planes = jnp.zeros((size * size, height, width), graph.transition.dtype)
    planes = planes.at[slot, sy, sx].add(jnp.where(interior, graph.transition, 0.0))
    core_h, core_w = height - 2 * radius, width - 2 * radius
    planes = planes[:, radius:height - radius, radius:width - radius]
    p_grid = graph.transition.reshape(height, width, k)
    r_grid = receivers.reshape(height, width, k)
    strips = {  # (P, receivers) of the border strips: top, bottom, left, right
        "top": (p_grid[:radius], r_grid[:radius]), "bottom": (p_grid[height - radius:], r_grid[height - radius:]),
        "left": (p_grid[radius:height - radius, :radius], r_grid[radius:height - radius, :radius]),
        "right": (p_grid[radius:height - radius, width - radius:], r_grid[radius:height - radius, width - radius:]),
    }

    def matvec(value: jax.Array) -> jax.Array:
        grid = value.reshape(height, width)
        core = planes[0] * grid[:core_h, :core_w]
        for m in range(1, size * size):
            a, b = divmod(m, size)
            core = core + planes[m] * grid[a:a + core_h, b:b + core_w]
        edge = {name: jnp.sum(p * value[r], axis=-1) for name, (p, r) in strips.items()}
        middle = jnp.concatenate([edge["left"], core, edge["right"]], axis=1)
        return jnp.concatenate([edge["top"], middle, edge["bottom"]], axis=0).reshape(n)

    return matvec


def propagation_step(graph: PixelGraph, reward: jax.Array, value: jax.Array, gamma) -> jax.Array:
    """One Bellman update on flat arrays: ``r + gamma * P V`` (``P V`` by :func:`transition_matvec`)."""
    return reward + gamma * transition_matvec(graph, value)


@functools.partial(jax.jit, static_argnames=("tol", "max_iter", "window"))
def _fixed_point(graph: PixelGraph, reward: jax.Array, gamma, *, tol: float, max_iter: int,
                 window: tuple[int, int, int] | None):
    flat = reward.reshape(-1)
    matvec = functools.partial(transition_matvec, graph) if window is None else window_matvec(graph, *window)
    threshold = tol * jnp.max(jnp.abs(flat))

    def cond(carry):
        iteration, _, delta = carry
        return (iteration < max_iter) & (delta > threshold)

    def body(carry):
        iteration, value, _ = carry
        new = flat + gamma * matvec(value)
        return iteration + 1, new, jnp.max(jnp.abs(new - value))

    init = (jnp.zeros((), jnp.int32), flat, jnp.full((), jnp.inf, flat.dtype))
    iterations, value, _ = lax.while_loop(cond, body, init)
    return value.reshape(reward.shape), iterations


def propagate(graph: PixelGraph, reward: jax.Array, *, gamma: float = DEFAULT_GAMMA, tol: float = DEFAULT_TOL,
              max_iter: int = DEFAULT_MAX_ITER, radius: int | None = None) -> tuple[jax.Array, jax.Array]:
    """Fixed point ``V = r + gamma P V`` of ONE graph; returns ``(V, iterations)``.

    ``reward`` has any shape with ``N = reward.size`` nodes (e.g. ``[H, W]``); ``V`` has the
    same shape. Stops when ``max|V_new - V| <= tol * max|r|`` or after ``max_iter``
    updates; ``iterations`` is the number of updates applied (``gamma = 0`` gives ``V = r``
    after one). Traceable and vmappable (inside ``vmap`` each image keeps its own count).

    ``P V`` is a ``segment_sum`` over the edges; with ``radius`` (every edge lies in its node's clamped
    window of that radius, as in :func:`~la_iprop.iprop.graph.knn_graph` and ``random_window`` graphs, and
    ``reward`` is ``[H, W]``) it
    is computed by :func:`window_matvec` instead: the same sums, in another order (equal to
    float rounding), faster on CPU because interior pixels use slices, not gathers.
    """
    check_propagation_hparams(gamma, tol, max_iter)
    reward = jnp.asarray(reward, float_dtype())
    check_finite(reward, "reward", "finite per-pixel rewards")   # eager calls (traced: nothing to look at)
    n = graph.senders.shape[0]
    if reward.size == 0 or n % reward.size != 0 or graph.receivers.shape != graph.senders.shape \
            or graph.transition.shape != graph.senders.shape:
        raise ValueError(f"reward (shape {reward.shape}, {reward.size} nodes) does not match the graph "
                         f"({n} edges; the edge count must be a multiple of the node count)")
    window = None
    if radius is not None:
        check_int_at_least("radius", radius, 1)
        if reward.ndim != 2 or min(reward.shape) < 2 * radius + 1:
            raise ValueError(f"with radius={radius}, reward must be an [H, W] map with H, W >= {2 * radius + 1}, "
                             f"got shape {reward.shape}")
        window = (int(reward.shape[0]), int(reward.shape[1]), int(radius))
        if not isinstance(graph.receivers, jax.core.Tracer):
            _check_window(graph, *window)
    return _fixed_point(graph, reward, jnp.asarray(gamma, reward.dtype), tol=float(tol), max_iter=int(max_iter),
                        window=window)


def _check_window(graph: PixelGraph, height: int, width: int, radius: int) -> None:
    """Eager calls only: the shifted-copies form needs every node's edges inside its (2R+1) window."""
    senders, receivers = np.asarray(graph.senders), np.asarray(graph.receivers)
    if senders.shape[0] % (height * width) or not np.array_equal(
            senders, np.repeat(np.arange(height * width), senders.shape[0] // (height * width))):
        raise ValueError("radius= needs a window graph from knn_graph or random_graph (edges grouped by node, the "
                         "same count per node)")
    sy, sx, ry, rx = senders // width, senders % width, receivers // width, receivers % width
    start_y = np.clip(sy - radius, 0, height - 2 * radius - 1)
    start_x = np.clip(sx - radius, 0, width - 2 * radius - 1)
    if np.any((ry < start_y) | (ry > start_y + 2 * radius) | (rx < start_x) | (rx > start_x + 2 * radius)):
        raise ValueError(f"radius={radius} does not match the graph: some edges leave the (2R+1) window "
                         "(pass the radius the graph was built with)")


def iteration_bound(gamma: float, tol: float) -> int:
    """The contraction bound ``ceil(log(tol) / log(gamma))`` on the iteration count (1 for ``gamma = 0``)."""
    check_propagation_hparams(gamma, tol, 1)
    if gamma == 0.0 or tol >= 1.0:
        return 1
    if tol == 0.0:
        raise ValueError("tol must be > 0 for a finite iteration bound")
    return max(1, math.ceil(math.log(tol) / math.log(gamma)))
