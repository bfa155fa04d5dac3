"""Boundary-based Integrated Gradients (``big``; Wang et al., "Robust Models Are More Interpretable
Because Attributions Look Normal", 2021 / ICML 2022), in the version of the LA repository's
``saliency/core/big.py``.

Notation: ``p = softmax(logit_fn(x))``, ``x0`` the image, ``y`` the explained class (``labels``),
``E = (eps_1, ..., eps_M)`` = ``epsilons``, ``S``/``a`` = ``attack_steps``/``attack_step_size``.

1. Boundary search: one iterative FGSM attack per radius ``eps_m`` (vmapped over the radii),
   ``x_{s+1} = Proj_{B_m}(x_s + a * sign(grad_x L(x_s)))``, ``B_m = [x0 - eps_m, x0 + eps_m] ∩ [0, 1]``,
   ``s < S``, from ``x_0 = x0``, with ``L`` the cross-entropy of ``y``. A candidate ``x_S^m``
   succeeds when ``argmax p(x_S^m) != y``.
2. Baseline ``b``: the successful candidate closest to ``x0`` in L2 (ties: the first in
   ``epsilons`` order). If none succeeds, ``b`` is the first candidate's end point (the
   official code keeps its first attack's point then): the map is IG from that point, still on
   the explained class's side, and ``return_baselines`` reports the failure.
3. ``A = IG_b(x0) = (x0 - b) * sum_k w_k grad p_y(b + a_k (x0 - b))`` with ``steps`` nodes of
   the quadrature ``rule`` (default ``riemann_trapezoid``, 50 steps, as the official code; the
   trapezoid weights sum to 1, see :func:`~la_iprop.attribution.integrated.quadrature`).

Settings and deviations. The official radii are ``{36, 64, 0.3*255, 0.5*255, 0.7*255,
0.9*255, 1.1*255}/255``, each attack takes ``S = 50`` steps of ``a = 0.001``: it moves at
most ``S * a = 0.05`` per element, less than the smallest radius ``36/255 ~ 0.141``, so no
radius ever binds and every candidate is the same point. We compute every distinct walk once
(candidates whose radius is at least ``S * a`` share one), so the default costs one attack;
set ``attack_step_size=None`` for ``a = eps_m / S`` (then ``S = 1`` is the classic one-step
FGSM and the radii matter). The official search keeps the first successful candidate in radius
order; we keep the closest one, the rule of the original BIG (the two agree whenever the
candidates coincide). ``attack_loss="probability_ce"`` (default) is the official loss: its
model ends in a softmax and ``CrossEntropyLoss`` is applied to those probabilities,
``L = -log softmax(p)_y``; ``"ce"`` is the usual ``-log p_y`` (sign-equivalent to descending
``p_y``). ``y`` is the class passed in ``labels`` (the experiments pass the clean prediction; the
LA repository passes its dataset labels). Every image is explained on its own. Model
evaluations per image: ``W * (S + 1) + steps``, with ``W`` the number of distinct walks (1 by
default).
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
from jax import lax

from la_iprop.attribution.attack import cross_entropy, linf_box, map_in_chunks, sign_step
from la_iprop.attribution.base import prepare_inputs, register_method
from la_iprop.attribution.gradients import chunked_sum, probability_grad
from la_iprop.attribution.integrated import quadrature
from la_iprop.checks import check_choice, check_int_at_least, check_positive

__all__ = ["big", "EPSILONS", "distinct_walks"]

EPSILONS = tuple(v / 255 for v in (36.0, 64.0, 76.5, 127.5, 178.5, 229.5, 280.5))
ATTACK_LOSSES = ("probability_ce", "ce")


def distinct_walks(epsilons: tuple[float, ...], attack_steps: int,
                   attack_step_size: float | None) -> tuple[tuple[tuple[float, float], ...], tuple[int, ...]]:
    """``(walks, index)``: the distinct ``(radius, step)`` attacks and, per candidate, its walk.

    A radius of at least ``attack_steps * step`` is never reached, so all such candidates
    with the same step walk identically; they share the walk with the smallest such radius.
    """
    walks: list[tuple[float, float]] = []
    index = []
    for eps in epsilons:
        step = eps / attack_steps if attack_step_size is None else attack_step_size
        unbounded = eps >= attack_steps * step
        match = next((i for i, (r, s) in enumerate(walks)
                      if s == step and (r == eps or (unbounded and r >= attack_steps * s))), None)
        if match is None:
            walks.append((eps, step))
            match = len(walks) - 1
        index.append(match)
    return tuple(walks), tuple(index)


def _attack(logit_fn, x0, label, radius, step, *, attack_steps, on_probabilities):
    """The iterative FGSM walk of ONE image for one radius; returns its end point."""
    lower, upper = linf_box(x0, radius)

    def loss(x):
        return cross_entropy(logit_fn(x[None])[0], label, on_probabilities=on_probabilities)

    def body(_, x):
        return sign_step(x, jax.grad(loss)(x), step, lower, upper)

    return lax.fori_loop(0, attack_steps, body, x0)


def _explain_one(logit_fn, x0, label, *, walks, index, attack_steps, attack_loss, steps, rule, step_chunk,
                 candidate_chunk):
    radii = jnp.asarray([r for r, _ in walks], x0.dtype)
    step_sizes = jnp.asarray([s for _, s in walks], x0.dtype)
    attack = functools.partial(_attack, logit_fn, x0, label, attack_steps=attack_steps,
                               on_probabilities=attack_loss == "probability_ce")
    ends = map_in_chunks(attack, (radii, step_sizes), candidate_chunk)           # [W, H, W, C]
    success = jnp.argmax(logit_fn(ends), axis=-1) != label                      # one forward of the W end points
    distance = jnp.sqrt(jnp.sum(jnp.square(ends - x0), axis=(1, 2, 3)))
    # Per candidate (in ``epsilons`` order); argmin keeps the first of equal distances.
    index = jnp.asarray(index)
    cand_success, cand_distance = success[index], distance[index]
    best = jnp.argmin(jnp.where(cand_success, cand_distance, jnp.inf))
    chosen = jnp.where(jnp.any(cand_success), best, 0)
    baseline = ends[index[chosen]]

    alphas, weights = (jnp.asarray(a, x0.dtype) for a in quadrature(rule, steps))
    delta = x0 - baseline

    def weighted_grads(idx):
        grads = jax.vmap(lambda a: probability_grad(logit_fn, baseline + a * delta, label))(alphas[idx])
        return grads * weights[idx][:, None, None, None]

    attribution = delta * chunked_sum(weighted_grads, steps, step_chunk)
    return attribution, baseline, jnp.any(cand_success)


@functools.partial(jax.jit, static_argnames=("walks", "index", "attack_steps", "attack_loss", "steps", "rule",
                                             "step_chunk", "candidate_chunk"))
def _big_batch(logit_fn, images, labels, **static):
    return jax.vmap(functools.partial(_explain_one, logit_fn, **static))(images, labels)


@register_method("big", description="Boundary IG (Wang et al. 2022): IG (50 steps) from the closest misclassified "
                 "iterative-FGSM point over 7 radii", quick={"steps": 8, "attack_steps": 5, "attack_step_size": 0.01})
def big(logit_fn: Callable, images: Any, labels: Any = None, *, key: Any = None, epsilons: Any = EPSILONS,
        attack_steps: int = 50, attack_step_size: float | None = 0.001, attack_loss: str = "probability_ce",
        steps: int = 50, rule: str = "riemann_trapezoid", step_chunk: int = 10, candidate_chunk: int | None = None,
        return_baselines: bool = False):
    """Boundary IG maps, shape of ``images`` (NHWC, [0, 1]); see the module docstring for the rule.

    Args:
      logit_fn: ``images -> logits``.
      images: ``[B, H, W, 3]`` float in [0, 1].
      labels: ``[B]`` classes to explain; None: the predicted class.
      key: unused (deterministic).
      epsilons: attack radii in [0, 1] pixel units (the official values divided by 255).
      attack_steps: ``S``, sign steps per attack.
      attack_step_size: ``a`` per step; None: ``eps / S`` for each radius.
      attack_loss: ``"probability_ce"`` (official: cross-entropy of the softmax outputs) or ``"ce"``.
      steps: IG quadrature nodes; ``rule``: the quadrature (see ``integrated.quadrature``).
      step_chunk: IG path points per model call (per image); bounds memory.
      candidate_chunk: distinct attacks vmapped together; None: all. Neither chunk changes the result.
      return_baselines: also return the baselines ``[B, H, W, 3]`` and whether a candidate
        succeeded ``[B]`` (bool).
    """
    try:
        epsilons = tuple(float(e) for e in epsilons)
    except TypeError:
        raise TypeError(f"epsilons must be a sequence of radii, got {epsilons!r}") from None
    if not epsilons:
        raise ValueError("epsilons must hold at least one attack radius")
    for eps in epsilons:
        check_positive("epsilons", eps)
    check_int_at_least("attack_steps", attack_steps, 1)
    if attack_step_size is not None:
        check_positive("attack_step_size", attack_step_size)
    check_choice("attack_loss", attack_loss, ATTACK_LOSSES)
    check_int_at_least("step_chunk", step_chunk, 1)
    if candidate_chunk is not None:
        check_int_at_least("candidate_chunk", candidate_chunk, 1)
    quadrature(rule, steps)  # validates rule and steps before any tracing
    logit_fn, images, labels, _ = prepare_inputs(logit_fn, images, labels, key=key)
    walks, index = distinct_walks(epsilons, int(attack_steps),
                                  None if attack_step_size is None else float(attack_step_size))
    attributions, baselines, success = _big_batch(
        logit_fn, images, labels, walks=walks, index=index, attack_steps=int(attack_steps), attack_loss=attack_loss,
        steps=int(steps), rule=rule, step_chunk=int(step_chunk),
        candidate_chunk=None if candidate_chunk is None else int(candidate_chunk))
    return (attributions, baselines, success) if return_baselines else attributions
