"""The Markov Reward Process of IProp: rewards from an attribution, and its fixed point.

Given the transition matrix ``P`` of a :class:`~la_iprop.iprop.graph.PixelGraph` and a
per-pixel reward ``r``, the value ``V`` solves ``V = r + gamma * P V``. For ``0 <= gamma < 1``
the map ``V -> r + gamma P V`` is a ``gamma``-contraction in the max-norm (rows of ``P``
are non-negative and sum to 1), so the iteration

    V_0 = r,    V_{t+1} = r + gamma * P V_t      (P V by segment_sum over the edges)

converges to the unique fixed point ``(I - gamma P)^{-1} r``. Because
``V_t - V_{t-1} = gamma^t P^t r``, the stopping rule ``max|V_t - V_{t-1}| <= tol * max|r|``
is met after at most ``ceil(log(tol) / log(gamma))`` iterations, and then
``max|V_t - V*| <= gamma / (1 - gamma) * tol * max|r|``.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from la_iprop.checks import check_choice
from la_iprop.iprop.defaults import (DEFAULT_GAMMA, DEFAULT_MAX_ITER, DEFAULT_REWARD, DEFAULT_TOL, REWARD_RULES,
                                     check_propagation_hparams)
from la_iprop.iprop.graph import PixelGraph

__all__ = ["reward_from_attribution", "propagate", "propagation_step", "iteration_bound"]


def reward_from_attribution(attribution: jax.Array, rule: str = DEFAULT_REWARD) -> jax.Array:
    """Per-pixel reward ``[..., H, W]`` from an attribution ``[..., H, W, C]`` (channels last).

    ``sum``: ``sum_c a_c``; ``abs_sum``: ``sum_c |a_c|``; ``positive_sum``: ``max(sum_c a_c, 0)``.
    """
    check_choice("reward", rule, REWARD_RULES)
    attribution = jnp.asarray(attribution, jnp.float32)
    if rule == "abs_sum":
        return jnp.sum(jnp.abs(attribution), axis=-1)
    total = jnp.sum(attribution, axis=-1)
    return jnp.maximum(total, 0.0) if rule == "positive_sum" else total


def propagation_step(graph: PixelGraph, reward: jax.Array, value: jax.Array, gamma) -> jax.Array:
    """One Bellman update on flat arrays: ``r_i + gamma * sum_j P_ij V_j``.

    Messages ``P_ij V_j`` are gathered from the receivers and summed into their senders;
    the edges are grouped by sender, so the segment sum is over sorted indices.
    """
    messages = graph.transition * value[graph.receivers]
    return reward + gamma * jax.ops.segment_sum(messages, graph.senders, num_segments=reward.shape[0],
                                                indices_are_sorted=True)


@functools.partial(jax.jit, static_argnames=("tol", "max_iter"))
def _fixed_point(graph: PixelGraph, reward: jax.Array, gamma, *, tol: float, max_iter: int):
    threshold = tol * jnp.max(jnp.abs(reward))

    def cond(carry):
        iteration, _, delta = carry
        return (iteration < max_iter) & (delta > threshold)

    def body(carry):
        iteration, value, _ = carry
        new = propagation_step(graph, reward, value, gamma)
        return iteration + 1, new, jnp.max(jnp.abs(new - value))

    init = (jnp.zeros((), jnp.int32), reward, jnp.full((), jnp.inf, reward.dtype))
    iterations, value, _ = lax.while_loop(cond, body, init)
    return value, iterations


def propagate(graph: PixelGraph, reward: jax.Array, *, gamma: float = DEFAULT_GAMMA, tol: float = DEFAULT_TOL,
              max_iter: int = DEFAULT_MAX_ITER) -> tuple[jax.Array, jax.Array]:
    """Fixed point ``V = r + gamma P V`` of ONE graph; returns ``(V, iterations)``.

    ``reward`` has any shape with ``N = reward.size`` nodes (e.g. ``[H, W]``); ``V`` has the
    same shape. Stops when ``max|V_new - V| <= tol * max|r|`` or after ``max_iter``
    updates; ``iterations`` is the number of updates applied (``gamma = 0`` gives ``V = r``
    after one). Traceable and vmappable (inside ``vmap`` each image keeps its own count).
    """
    check_propagation_hparams(gamma, tol, max_iter)
    reward = jnp.asarray(reward, jnp.float32)
    n = graph.senders.shape[0]
    if reward.size == 0 or n % reward.size != 0 or graph.receivers.shape != graph.senders.shape \
            or graph.transition.shape != graph.senders.shape:
        raise ValueError(f"reward (shape {reward.shape}, {reward.size} nodes) does not match the graph "
                         f"({n} edges; the edge count must be a multiple of the node count)")
    value, iterations = _fixed_point(graph, reward.reshape(-1), jnp.float32(gamma), tol=float(tol),
                                     max_iter=int(max_iter))
    return value.reshape(reward.shape), iterations


def iteration_bound(gamma: float, tol: float) -> int:
    """The contraction bound ``ceil(log(tol) / log(gamma))`` on the iteration count (1 for ``gamma = 0``)."""
    import math
    check_propagation_hparams(gamma, tol, 1)
    if gamma == 0.0 or tol >= 1.0:
        return 1
    if tol == 0.0:
        raise ValueError("tol must be > 0 for a finite iteration bound")
    return max(1, math.ceil(math.log(tol) / math.log(gamma)))
