"""Local Attribution (LA): attribution from adversarial exploration inside a local box.

Zhu, Jin, Zhang, Chen, "Enhancing Model Interpretability with Local Attribution over
Global Exploration", ACM MM 2024 (arXiv 2408.07736). Notation: ``p = softmax(logit_fn(x))``,
``x0`` the image, ``y`` the explained class, ``s`` = ``spatial_range``, ``T`` = ``max_iter``,
``K`` = ``sampling_times``.

- Box: ``eps = x0 / s`` per element, ``B = [x0 - eps, x0 + eps] ∩ [0, 1]``.
- ``K`` runs per image. ``strategy="mixed"`` (the official mix): ``K - 1`` targeted runs, one
  per target class ``c`` (drawn without replacement; a class equal to ``y`` becomes ``y + 1``,
  or ``y - 1`` for the last class), and one untargeted run. ``"targeted"``: ``K`` targeted runs
  (``K`` classes drawn by the same rule). ``"untargeted"``: ``K`` untargeted runs. Each run walks
  ``T`` steps from ``x0``; at ``x_t`` both ``g_c = grad p_c`` and ``g_y = grad p_y`` come from
  one forward pass, and

      x_{t+1} = Proj_C(b_t + d * alpha * sign(g_c)),     A += -g_y * (x_{t+1} - b_t)

  with ``d = +1`` for targeted runs and ``c = y, d = -1`` for the untargeted run.
- ``update="restart"`` (the official code): ``b_t = x0`` and ``alpha = eps``: every step
  jumps from the input to a corner of the box chosen by the gradient at ``x_t``.
  ``update="pgd"``: ``b_t = x_t`` (projected sign-gradient ascent), so ``A`` is the path
  integral of ``-grad p_y`` along the walk, as in AGI/MFABA. In general
  ``alpha = step_size * eps``.
- ``constraint="box"`` (the paper's local space): ``C = B``. ``constraint="none"`` (global
  exploration, everything else equal): ``C = [0, 1]``, the same steps ``alpha = step_size * eps``
  only clipped to the image range. Only with ``update="pgd"``: a restart step goes from ``x0``
  by ``eps`` and never leaves ``B``, so there the two constraints would be the same walk.
- Result: the plain element-wise sum of ``A`` over the ``K`` runs (no abs, no normalisation).
  The untargeted run is deterministic (it starts at ``x0`` and follows ``grad p_y``), so
  ``strategy="untargeted"`` walks it once and returns ``K`` times its ``A`` (= ``K`` identical
  runs summed): the map is the single-run map scaled by ``K`` (the same ranking for every ``K``),
  and its cost does not grow with ``K``.

Cost per image (:func:`la_cost`): every run starts at ``x0``, so step 0 of all runs is one
forward pass with one cotangent per run (plus ``grad p_y`` for ``"targeted"``); each later step
is one forward with two cotangents per run. For ``"mixed"`` that is ``1 + K (T - 1)`` forwards
(official: ``K T``) and ``K (2T - 1)`` input-only backward passes (official: ``(2K - 1) T``, each
also computing weight gradients); ``"targeted"``: ``1 + K (T - 1)`` and ``K (2T - 1) + 1``;
``"untargeted"`` (one run, one cotangent per step): ``T`` and ``T``. The runs are vmapped,
``run_chunk`` at a time, so the model sees ``B * run_chunk`` images per step.

Unlike the official code (which sums probabilities over the batch), every image is
explained on its own: the map of an image does not depend on the rest of the batch.
"""

from __future__ import annotations

import functools
import inspect
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from la_iprop.attribution.attack import local_box, map_in_chunks, path_sum, probability_gradients, sign_step
from la_iprop.attribution.base import (
    check_target_classes,
    num_classes_of,
    prepare_inputs,
    register_method,
    split_per_image,
)
from la_iprop.checks import check_choice, check_int_at_least, check_labels, check_positive

__all__ = ["local_attribution", "draw_target_classes", "avoid_label", "la_cost", "LACost", "STRATEGIES",
           "CONSTRAINTS", "UPDATES"]

UPDATES = ("restart", "pgd")
STRATEGIES = ("mixed", "targeted", "untargeted")
CONSTRAINTS = ("box", "none")


def _check_option(name: str, value: Any, choices: tuple[str, ...]) -> None:
    """``value`` must be one of the strings ``choices`` (a one-line TypeError/ValueError naming ``name``)."""
    if not isinstance(value, str):
        raise TypeError(f"{name} must be a string, one of {list(choices)}, got {value!r}")
    if value not in choices:
        raise ValueError(f"{name} must be one of {list(choices)}, got {value!r}")


def _check_walk(max_iter: Any, sampling_times: Any, update: Any, strategy: Any, constraint: Any) -> None:
    """The checks shared by :func:`local_attribution` and :func:`la_cost` (no model involved)."""
    check_int_at_least("max_iter", max_iter, 1)
    check_int_at_least("sampling_times", sampling_times, 1)
    check_choice("update", update, UPDATES)
    _check_option("strategy", strategy, STRATEGIES)
    _check_option("constraint", constraint, CONSTRAINTS)
    if constraint == "none" and update == "restart":
        raise ValueError("constraint='none' needs update='pgd': a restart step goes from x0 by eps and never "
                         "leaves the box, so with update='restart' it would be the same walk as constraint='box'")


def _num_targets(strategy: str, sampling_times: int) -> tuple[int, str]:
    """Target classes per image for ``strategy`` and how the count is named in errors."""
    if strategy == "mixed":
        return sampling_times - 1, "sampling_times - 1"
    if strategy == "targeted":
        return sampling_times, "sampling_times (strategy='targeted')"
    return 0, "strategy='untargeted' (no targeted runs)"


def avoid_label(classes: jax.Array, label: jax.Array, num_classes: int) -> jax.Array:
    """The official replacement rule: a target equal to ``label`` becomes the next class
    (the previous one if it is the last class)."""
    replacement = jnp.where(classes < num_classes - 1, classes + 1, classes - 1)
    return jnp.where(classes == label, replacement, classes)


def draw_target_classes(key: jax.Array, num_targets: int, num_classes: int) -> jax.Array:
    """``num_targets`` distinct classes drawn uniformly from ``[0, num_classes)`` (one image)."""
    return jax.random.choice(key, num_classes, (num_targets,), replace=False).astype(jnp.int32)


class LACost(NamedTuple):
    """Model passes per image of one :func:`local_attribution` call."""
    forwards: int   # forward passes (model evaluations) of one image
    backwards: int  # input-only backward passes (one per cotangent; no weight gradients)


def la_cost(*, max_iter: int = 30, sampling_times: int = 20, strategy: str = "mixed", **hparams: Any) -> LACost:
    """Forward and input-only backward passes per image of :func:`local_attribution`.

    ``"mixed"``: ``1 + K (T - 1)`` forwards and ``K (2T - 1)`` backward passes (step 0 of the
    ``K`` runs shares one forward at ``x0`` with ``K`` cotangents; each later step is one forward
    with two cotangents per run). ``"targeted"``: ``1 + K (T - 1)`` and ``K (2T - 1) + 1`` (step 0
    also needs ``grad p_y``). ``"untargeted"``: ``T`` and ``T`` (the one deterministic run, one
    cotangent per step, is computed once and scaled by ``K``). Independent of ``update``,
    ``constraint``, ``spatial_range``, ``step_size``, ``run_chunk`` and the batch size; the
    prediction forward of ``labels=None`` (one more forward per image) is not counted.

    Takes the keyword hyperparameters of :func:`local_attribution` (defaults as there), so a
    study can call ``la_cost(**hparams)``; the ones that do not change the count are checked
    by name only, except ``update`` and ``constraint`` (checked as :func:`local_attribution` does).
    """
    unknown = sorted(set(hparams) - _OTHER_HPARAMS)
    if unknown:
        raise TypeError(f"la_cost got unknown hyperparameter(s) {unknown}; expected those of local_attribution")
    _check_walk(max_iter, sampling_times, hparams.get("update", "restart"), strategy, hparams.get("constraint", "box"))
    t, k = int(max_iter), int(sampling_times)
    if strategy == "untargeted":
        return LACost(t, t)
    extra = 1 if strategy == "targeted" else 0
    return LACost(1 + k * (t - 1), k * (2 * t - 1) + extra)


def _explain_one(logit_fn, x0, label, targets, *, spatial_range, max_iter, update, step_size, run_chunk, keep_path,
                 strategy="mixed", constraint="box", sampling_times=None):
    """LA map of ONE image (HWC); ``targets`` (``[K-1]``, ``[K]`` or ``[0]`` by ``strategy``) already obey
    the replacement rule. ``sampling_times`` is needed by ``"untargeted"`` only (the others count ``targets``);
    the defaults keep callers of the official walk (``scripts/bench_la.py``) working."""
    eps, lower, upper = local_box(x0, spatial_range)
    if constraint == "none":  # global exploration: the same steps, only kept in the image range
        lower, upper = jnp.zeros_like(x0), jnp.ones_like(x0)
    alpha = step_size * eps

    def run(move_class, direction, g_move_first, g_label_first, untargeted_only=False):
        classes = label[None] if untargeted_only else jnp.stack([move_class, label])

        def step(x, _):
            _, grads = probability_gradients(logit_fn, x, classes)   # one forward, one or two cotangents
            g_move, g_label = (grads[0], grads[0]) if untargeted_only else (grads[0], grads[1])
            base = x0 if update == "restart" else x
            x_next = sign_step(base, g_move, alpha, lower, upper, direction)
            return x_next, -g_label, x_next - base

        x1 = sign_step(x0, g_move_first, alpha, lower, upper, direction)      # both updates start from x0
        total, path = path_sum(step, x1, max_iter - 1, keep_path=keep_path)
        total = total - g_label_first * (x1 - x0)
        return total, (jnp.concatenate([x1[None], path]) if keep_path else None)

    if strategy == "untargeted":
        # K untargeted runs are K copies of one deterministic walk: walk it once (one cotangent per step).
        _, (g_first,) = probability_gradients(logit_fn, x0, label[None])
        total, path = run(label, -jnp.ones((), x0.dtype), g_first, g_first, untargeted_only=True)
        path = None if path is None else jnp.broadcast_to(path, (sampling_times, *path.shape))
        return sampling_times * total, path

    if strategy == "mixed":
        move_classes = jnp.concatenate([targets, label[None]])           # the last run is the untargeted one
        directions = jnp.concatenate([jnp.ones(targets.shape, x0.dtype), -jnp.ones((1,), x0.dtype)])
        first_classes = move_classes
    else:  # targeted: step 0 needs grad p_y besides the K targets' gradients
        move_classes = targets
        directions = jnp.ones(targets.shape, x0.dtype)
        first_classes = jnp.concatenate([targets, label[None]])
    # Every run starts at x0, so the first step of all K runs needs one forward and one cotangent per run
    # (grad p_c for each target and grad p_y), not K forwards with 2 cotangents each.
    # Its backward pass takes 2 * run_chunk cotangents at a time, the load of a later step.
    first_chunk = None if run_chunk is None else 2 * run_chunk
    _, first_grads = probability_gradients(logit_fn, x0, first_classes, chunk=first_chunk)
    g_label_first = first_grads[-1]
    move_first = first_grads[:move_classes.shape[0]]

    per_run, path = map_in_chunks(lambda c, d, g: run(c, d, g, g_label_first), (move_classes, directions, move_first),
                                  run_chunk)
    return per_run.sum(axis=0), path


@functools.partial(jax.jit, static_argnames=("spatial_range", "max_iter", "sampling_times", "update", "step_size",
                                             "strategy", "constraint", "run_chunk", "keep_path"))
def _local_attribution_batch(logit_fn, images, labels, targets, **static):
    return jax.vmap(functools.partial(_explain_one, logit_fn, **static))(images, labels, targets)


@functools.partial(jax.jit, static_argnames=("num_targets", "num_classes"))
def _draw_for_batch(image_keys, num_targets, num_classes):
    return jax.vmap(lambda k: draw_target_classes(k, num_targets, num_classes))(image_keys)


@register_method("la",
                 description="Local Attribution (Zhu et al., ACM MM 2024): adversarial exploration in a local box",
                 quick={"max_iter": 10, "sampling_times": 6})
def local_attribution(logit_fn: Callable, images: Any, labels: Any = None, *, key: Any = None,
                      spatial_range: float = 10.0, max_iter: int = 30, sampling_times: int = 20,
                      update: str = "restart", step_size: float | None = None, strategy: str = "mixed",
                      constraint: str = "box", target_classes: Any = None, run_chunk: int | None = None,
                      return_iterates: bool = False):
    """Local Attribution maps, shape of ``images`` (NHWC, [0, 1]).

    Args:
      logit_fn: ``images -> logits`` (e.g. a :class:`~la_iprop.models.ModelFn`).
      images: ``[B, H, W, 3]`` float in [0, 1].
      labels: ``[B]`` classes to explain; None: the predicted class (as the official code).
      key: ``jax.random`` key for the target classes (image ``i`` uses ``fold_in(key, i)``);
        not needed when ``target_classes`` is given or ``strategy="untargeted"``.
      spatial_range: ``s``; the box radius is ``eps = x0 / s``.
      max_iter: ``T``, steps per run.
      sampling_times: ``K``, runs per image (their kind set by ``strategy``).
      update: ``"restart"`` (official: every step from ``x0`` with step ``eps``) or ``"pgd"``
        (projected sign-gradient ascent from ``x_t``).
      step_size: the step ``alpha`` in units of the per-element radius ``eps``
        (``alpha = step_size * eps``). None: 1 for ``"restart"`` (the official step) and
        ``2 / max_iter`` for ``"pgd"`` (so ``T`` steps can cross the box from face to face).
      strategy: ``"mixed"`` (official: ``K - 1`` targeted runs + 1 untargeted), ``"targeted"``
        (``K`` targeted runs) or ``"untargeted"`` (``K`` untargeted runs; they are identical,
        so the one run is computed once and its map multiplied by ``K``: the cost of one run).
      constraint: ``"box"`` (the local box ``B``) or ``"none"`` (the same sign walk, steps of
        ``alpha = step_size * eps``, only clipped to [0, 1]: global exploration). ``"none"``
        needs ``update="pgd"`` (a restart step never leaves the box).
      target_classes: explicit targets, the same for every image (``[n]``) or per image
        (``[B, n]``), ``n = K - 1`` for ``"mixed"`` and ``K`` for ``"targeted"`` (not taken by
        ``"untargeted"``); the replace-if-equal-to-label rule still applies. None: drawn from ``key``.
      run_chunk: runs evaluated together (the model sees ``B * run_chunk`` images per
        step); None: 1 on CPU (one run at a time: as fast as all ``K`` at once there --
        Lite0, s=10, T=10, K=6 on a 2-core CPU: 6.42 vs 6.69 s/image at batch 1, 1.83 vs
        1.80 s/image at batch 8, T=3 -- with ``K`` times less activation memory), all ``K``
        at once on accelerators. Bounds memory; the result does not depend on it.
      return_iterates: debugging: also return the iterates ``x_1..x_T`` of every run,
        shape ``[B, K, T, H, W, 3]`` (for ``"mixed"`` run ``K - 1`` is the untargeted one;
        for ``"untargeted"`` the ``K`` runs are the same walk).

    Returns:
      The attributions (and the iterates when ``return_iterates``). Model passes per image:
      :func:`la_cost`.
    """
    check_positive("spatial_range", spatial_range)
    _check_walk(max_iter, sampling_times, update, strategy, constraint)
    if step_size is not None:
        check_positive("step_size", step_size)
    if run_chunk is None and jax.default_backend() == "cpu":
        run_chunk = 1
    if run_chunk is not None:
        check_int_at_least("run_chunk", run_chunk, 1)
    num_targets, count_name = _num_targets(strategy, sampling_times)
    if target_classes is not None:  # the count per image, before any model call (the rest is checked below)
        if strategy == "untargeted":
            raise ValueError("target_classes must be None with strategy='untargeted' (it has no targeted runs)")
        shape = np.shape(target_classes)
        if len(shape) in (1, 2) and shape[-1] != num_targets:
            raise ValueError(f"target_classes must have {num_targets} classes per image ({count_name} = "
                             f"{num_targets}), got shape {tuple(shape)}")
    need_key = target_classes is None and num_targets > 0
    logit_fn, images, labels, key = prepare_inputs(logit_fn, images, labels, key=key, need_key=need_key)
    batch = images.shape[0]
    num_classes = num_classes_of(logit_fn, images)
    labels = check_labels(labels, batch, num_classes)  # also for callables without a num_classes attribute
    if target_classes is None:
        if num_targets > num_classes:
            raise ValueError(f"{count_name} = {num_targets} targets cannot be drawn without replacement "
                             f"from {num_classes} classes")
        if num_targets:
            targets = _draw_for_batch(split_per_image(key, batch), num_targets, num_classes)
        else:
            targets = jnp.zeros((batch, 0), jnp.int32)
    else:
        targets = check_target_classes(target_classes, batch, num_targets, num_classes, count_name)
    targets = avoid_label(targets, labels[:, None], num_classes)
    if step_size is None:
        step_size = 1.0 if update == "restart" else 2.0 / max_iter
    attributions, iterates = _local_attribution_batch(
        logit_fn, images, labels, targets, spatial_range=float(spatial_range), max_iter=int(max_iter),
        sampling_times=int(sampling_times), update=update, step_size=float(step_size), strategy=strategy,
        constraint=constraint, run_chunk=None if run_chunk is None else int(run_chunk),
        keep_path=bool(return_iterates))
    return (attributions, iterates) if return_iterates else attributions


# The keyword hyperparameters of local_attribution that la_cost takes by name without counting them.
_OTHER_HPARAMS = {name for name, p in inspect.signature(local_attribution).parameters.items()
                  if p.kind is inspect.Parameter.KEYWORD_ONLY} - {"max_iter", "sampling_times", "strategy"}
