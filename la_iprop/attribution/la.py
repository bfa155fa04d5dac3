"""Local Attribution (LA): attribution from adversarial exploration inside a local box.

Zhu, Jin, Zhang, Chen, "Enhancing Model Interpretability with Local Attribution over
Global Exploration", ACM MM 2024 (arXiv 2408.07736). Notation: ``p = softmax(logit_fn(x))``,
``x0`` the image, ``y`` the explained class, ``s`` = ``spatial_range``, ``T`` = ``max_iter``,
``K`` = ``sampling_times``.

- Box: ``eps = x0 / s`` per element, ``B = [x0 - eps, x0 + eps] ∩ [0, 1]``.
- ``K - 1`` targeted runs, one per target class ``c`` (drawn without replacement; a
  class equal to ``y`` becomes ``y + 1``, or ``y - 1`` for the last class), and one
  untargeted run. Each run walks ``T`` steps from ``x0``; at ``x_t`` both ``g_c = grad p_c``
  and ``g_y = grad p_y`` come from one forward pass, and

      x_{t+1} = Proj_B(b_t + d * alpha * sign(g_c)),     A += -g_y * (x_{t+1} - b_t)

  with ``d = +1`` for targeted runs and ``c = y, d = -1`` for the untargeted run.
- ``update="restart"`` (the official code): ``b_t = x0`` and ``alpha = eps``: every step
  jumps from the input to a corner of the box chosen by the gradient at ``x_t``.
  ``update="pgd"``: ``b_t = x_t`` (projected sign-gradient ascent), so ``A`` is the path
  integral of ``-grad p_y`` along the walk, as in AGI/MFABA.
- Result: the plain element-wise sum of ``A`` over the ``K`` runs (no abs, no normalisation).

Cost per image: every run starts at ``x0``, so step 0 of all ``K`` runs is one forward pass
with ``K`` cotangents; each later step is one forward with two cotangents per run. That is
``1 + K (T - 1)`` forwards (official: ``K T``) and ``K (2T - 1)`` input-only backward passes
(official: ``(2K - 1) T``, each also computing weight gradients). The runs are vmapped,
``run_chunk`` at a time, so the model sees ``B * run_chunk`` images per step.

Unlike the official code (which sums probabilities over the batch), every image is
explained on its own: the map of an image does not depend on the rest of the batch.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp

from la_iprop.attribution.attack import local_box, map_in_chunks, path_sum, probability_gradients, sign_step
from la_iprop.attribution.base import (
    check_target_classes,
    num_classes_of,
    prepare_inputs,
    register_method,
    split_per_image,
)
from la_iprop.checks import check_choice, check_int_at_least, check_labels, check_positive

__all__ = ["local_attribution", "draw_target_classes", "avoid_label"]

UPDATES = ("restart", "pgd")


def avoid_label(classes: jax.Array, label: jax.Array, num_classes: int) -> jax.Array:
    """The official replacement rule: a target equal to ``label`` becomes the next class
    (the previous one if it is the last class)."""
    replacement = jnp.where(classes < num_classes - 1, classes + 1, classes - 1)
    return jnp.where(classes == label, replacement, classes)


def draw_target_classes(key: jax.Array, num_targets: int, num_classes: int) -> jax.Array:
    """``num_targets`` distinct classes drawn uniformly from ``[0, num_classes)`` (one image)."""
    return jax.random.choice(key, num_classes, (num_targets,), replace=False).astype(jnp.int32)


def _explain_one(logit_fn, x0, label, targets, *, spatial_range, max_iter, update, step_size, run_chunk, keep_path):
    """LA map of ONE image (HWC); ``targets`` [K-1] already obey the replacement rule."""
    eps, lower, upper = local_box(x0, spatial_range)
    alpha = step_size * eps
    move_classes = jnp.concatenate([targets, label[None]])           # the last run is the untargeted one
    directions = jnp.concatenate([jnp.ones(targets.shape, x0.dtype), -jnp.ones((1,), x0.dtype)])
    # Every run starts at x0, so the first step of all K runs needs one forward and K cotangents
    # (grad p_c for each target and grad p_y), not K forwards with 2 cotangents each.
    # Its backward pass takes 2 * run_chunk cotangents at a time, the load of a later step.
    first_chunk = None if run_chunk is None else 2 * run_chunk
    _, first_grads = probability_gradients(logit_fn, x0, move_classes, chunk=first_chunk)
    g_label_first = first_grads[-1]

    def run(move_class, direction, g_move_first):
        classes = jnp.stack([move_class, label])

        def step(x, _):
            _, (g_move, g_label) = probability_gradients(logit_fn, x, classes)   # one forward, two cotangents
            base = x0 if update == "restart" else x
            x_next = sign_step(base, g_move, alpha, lower, upper, direction)
            return x_next, -g_label, x_next - base

        x1 = sign_step(x0, g_move_first, alpha, lower, upper, direction)      # both updates start from x0
        total, path = path_sum(step, x1, max_iter - 1, keep_path=keep_path)
        total = total - g_label_first * (x1 - x0)
        return total, (jnp.concatenate([x1[None], path]) if keep_path else None)

    per_run, path = map_in_chunks(run, (move_classes, directions, first_grads), run_chunk)
    return per_run.sum(axis=0), path


@functools.partial(jax.jit, static_argnames=("spatial_range", "max_iter", "update", "step_size", "run_chunk",
                                             "keep_path"))
def _local_attribution_batch(logit_fn, images, labels, targets, **static):
    return jax.vmap(functools.partial(_explain_one, logit_fn, **static))(images, labels, targets)


@functools.partial(jax.jit, static_argnames=("num_targets", "num_classes"))
def _draw_for_batch(image_keys, num_targets, num_classes):
    return jax.vmap(lambda k: draw_target_classes(k, num_targets, num_classes))(image_keys)


@register_method("la", description="Local Attribution (Zhu et al., ACM MM 2024): adversarial exploration in a local box",
                 quick={"max_iter": 10, "sampling_times": 6})
def local_attribution(logit_fn: Callable, images: Any, labels: Any = None, *, key: Any = None,
                      spatial_range: float = 10.0, max_iter: int = 30, sampling_times: int = 20,
                      update: str = "restart", step_size: float | None = None, target_classes: Any = None,
                      run_chunk: int | None = None, return_iterates: bool = False):
    """Local Attribution maps, shape of ``images`` (NHWC, [0, 1]).

    Args:
      logit_fn: ``images -> logits`` (e.g. a :class:`~la_iprop.models.ModelFn`).
      images: ``[B, H, W, 3]`` float in [0, 1].
      labels: ``[B]`` classes to explain; None: the predicted class (as the official code).
      key: ``jax.random`` key for the target classes (image ``i`` uses ``fold_in(key, i)``);
        not needed when ``target_classes`` is given.
      spatial_range: ``s``; the box radius is ``eps = x0 / s``.
      max_iter: ``T``, steps per run.
      sampling_times: ``K``, runs per image: ``K - 1`` targeted + 1 untargeted.
      update: ``"restart"`` (official: every step from ``x0`` with step ``eps``) or ``"pgd"``
        (projected sign-gradient ascent from ``x_t``).
      step_size: the step ``alpha`` in units of the per-element radius ``eps``
        (``alpha = step_size * eps``). None: 1 for ``"restart"`` (the official step) and
        ``2 / max_iter`` for ``"pgd"`` (so ``T`` steps can cross the box from face to face).
      target_classes: ``[K-1]`` (same for every image) or ``[B, K-1]`` explicit targets;
        the replace-if-equal-to-label rule still applies. None: drawn from ``key``.
      run_chunk: runs evaluated together (the model sees ``B * run_chunk`` images per
        step); None: 1 on CPU (one run at a time: as fast as all ``K`` at once there --
        Lite0, s=10, T=10, K=6 on a 2-core CPU: 6.42 vs 6.69 s/image at batch 1, 1.83 vs
        1.80 s/image at batch 8, T=3 -- with ``K`` times less activation memory), all ``K``
        at once on accelerators. Bounds memory; the result does not depend on it.
      return_iterates: debugging: also return the iterates ``x_1..x_T`` of every run,
        shape ``[B, K, T, H, W, 3]`` (run ``K - 1`` is the untargeted one).

    Returns:
      The attributions (and the iterates when ``return_iterates``).
    """
    check_positive("spatial_range", spatial_range)
    check_int_at_least("max_iter", max_iter, 1)
    check_int_at_least("sampling_times", sampling_times, 1)
    check_choice("update", update, UPDATES)
    if step_size is not None:
        check_positive("step_size", step_size)
    if run_chunk is None and jax.default_backend() == "cpu":
        run_chunk = 1
    if run_chunk is not None:
        check_int_at_least("run_chunk", run_chunk, 1)
    num_targets = sampling_times - 1
    need_key = target_classes is None and num_targets > 0
    logit_fn, images, labels, key = prepare_inputs(logit_fn, images, labels, key=key, need_key=need_key)
    batch = images.shape[0]
    num_classes = num_classes_of(logit_fn, images)
    labels = check_labels(labels, batch, num_classes)  # also for callables without a num_classes attribute
    if target_classes is None:
        if num_targets > num_classes:
            raise ValueError(f"sampling_times - 1 = {num_targets} targets cannot be drawn without replacement "
                             f"from {num_classes} classes")
        if num_targets:
            targets = _draw_for_batch(split_per_image(key, batch), num_targets, num_classes)
        else:
            targets = jnp.zeros((batch, 0), jnp.int32)
    else:
        targets = check_target_classes(target_classes, batch, num_targets, num_classes, "sampling_times - 1")
    targets = avoid_label(targets, labels[:, None], num_classes)
    if step_size is None:
        step_size = 1.0 if update == "restart" else 2.0 / max_iter
    attributions, iterates = _local_attribution_batch(
        logit_fn, images, labels, targets, spatial_range=float(spatial_range), max_iter=int(max_iter),
        update=update, step_size=float(step_size), run_chunk=None if run_chunk is None else int(run_chunk),
        keep_path=bool(return_iterates))
    return (attributions, iterates) if return_iterates else attributions
