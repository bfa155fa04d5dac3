"""Adversarial Gradient Integration (``agi``; Pan, Li, Zhu, IJCAI 2021; official code ``pd90506/AGI``).

Notation: ``p = softmax(logit_fn(x))``, ``x0`` the image, ``y`` the explained class (``labels``),
``eps`` = ``epsilon``, ``T`` = ``max_iter``, ``K`` = ``num_targets``.

For each of ``K`` false classes ``c != y`` a targeted attack walks at most ``T`` steps; at
``x_t`` (``x_0 = x0``) one forward pass gives ``p``, ``g_c = grad p_c`` and ``g_y = grad p_y``:

- if ``argmax p(x_t) == c`` the target is reached and the run stops (nothing more is added);
- ``x_{t+1} = clip(b_t + eps * sign(g_c), 0, 1)``,  ``A_c += -g_y * (x_{t+1} - b_t)``.

``update="restart"`` (default; the official code, and the version the LA paper compared
with): ``b_t = x0``, every step jumps from the input to the corner of the box
``[x0 - eps, x0 + eps] ∩ [0, 1]`` chosen by ``sign(g_c(x_t))``, exactly like LA's targeted
runs with a fixed radius. ``update="path"`` (the paper's steepest-ascent curve, as in the
TensorFlow port): ``b_t = x_t``, so ``A_c`` is the path integral of ``-grad p_y`` along the
walk, which can move ``t * eps`` away from ``x0``. A normalised-gradient step (the TensorFlow
port divides the gradient by an L2 norm before the sign; the official code computes the norm
and leaves it unused) is this same sign step: a positive scale does not change signs.
Result: ``A = sum_c A_c`` (no division by ``K``, as the official code).

Deviations from the official code, all deliberate: the ``K`` false classes are drawn per
image from ``key`` uniformly among the classes ``!= y`` (the official code draws one fixed set
from ``0..998`` with ``random.seed(3407)`` and replaces a class equal to the prediction by its
neighbour); ``y`` is the class passed in ``labels`` (the official code always uses the clean
prediction, which is what the experiments pass); every image is explained on its own (the LA
repository's batched copy sums probabilities over the batch and its early-stop bookkeeping
depends on the batch; this matches its batch-size-1 behaviour and the original single-image
code). Model evaluations per image: at most ``K * T``, each one forward and two backward
passes (fewer when every run in a vmapped group reaches its target early).
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp

from la_iprop.attribution.attack import map_in_chunks, probability_gradients, sign_step, walk_path
from la_iprop.attribution.base import (
    check_target_classes,
    num_classes_of,
    prepare_inputs,
    register_method,
    split_per_image,
)
from la_iprop.checks import check_choice, check_int_at_least, check_positive

__all__ = ["agi", "draw_false_classes", "num_classes_of"]

UPDATES = ("restart", "path")


def draw_false_classes(key: jax.Array, num: int, num_classes: int, label: jax.Array) -> jax.Array:
    """``num`` distinct classes drawn uniformly from ``[0, num_classes) \\ {label}`` (one image).

    Draws from the ``num_classes - 1`` other classes and shifts those ``>= label`` up by one.
    """
    drawn = jax.random.choice(key, num_classes - 1, (num,), replace=False).astype(jnp.int32)
    return drawn + (drawn >= label).astype(jnp.int32)


def _explain_one(logit_fn, x0, label, targets, *, epsilon, max_iter, update, run_chunk, keep_path):
    lower, upper = jnp.zeros_like(x0), jnp.ones_like(x0)

    def run(target):
        classes = jnp.stack([target, label])

        def step(x, state, t):
            probs, (g_target, g_label) = probability_gradients(logit_fn, x, classes)  # one forward, two cotangents
            reached = jnp.argmax(probs) == target
            base = x0 if update == "restart" else x
            x_next = sign_step(base, g_target, epsilon, lower, upper)
            return x_next, state, -g_label, x_next - base, reached

        walk = walk_path(step, x0, max_iter, stoppable=True, keep_path=keep_path)
        return walk.total, walk.num_steps, walk.path

    totals, steps, paths = map_in_chunks(run, (targets,), run_chunk)
    return totals.sum(axis=0), steps, paths


@functools.partial(jax.jit, static_argnames=("epsilon", "max_iter", "update", "run_chunk", "keep_path"))
def _agi_batch(logit_fn, images, labels, targets, **static):
    return jax.vmap(functools.partial(_explain_one, logit_fn, **static))(images, labels, targets)


@functools.partial(jax.jit, static_argnames=("num", "num_classes"))
def _draw_for_batch(image_keys, labels, num, num_classes):
    return jax.vmap(lambda k, y: draw_false_classes(k, num, num_classes, y))(image_keys, labels)


@register_method("agi", description="Adversarial Gradient Integration (Pan et al., IJCAI 2021): 20 targeted sign "
                 "attacks (eps 0.05, 20 steps), -grad p_y accumulated along each", quick={"num_targets": 4, "max_iter": 5})
def agi(logit_fn: Callable, images: Any, labels: Any = None, *, key: Any = None, epsilon: float = 0.05,
        max_iter: int = 20, num_targets: int = 20, update: str = "restart", target_classes: Any = None,
        run_chunk: int | None = 10, return_iterates: bool = False):
    """AGI maps, shape of ``images`` (NHWC, [0, 1]); see the module docstring for the rule.

    Args:
      logit_fn: ``images -> logits``.
      images: ``[B, H, W, 3]`` float in [0, 1].
      labels: ``[B]`` classes to explain; None: the predicted class.
      key: ``jax.random`` key for the false classes (image ``i`` uses ``fold_in(key, i)``, or
        pass one key per image); not needed with ``target_classes``.
      epsilon: step (and, for ``"restart"``, box radius) in [0, 1] pixel units.
      max_iter: ``T``, the most steps per false class.
      num_targets: ``K``, false classes per image (drawn without replacement, never ``y``).
      update: ``"restart"`` (official code) or ``"path"`` (walk from ``x_t``).
      target_classes: ``[K]`` or ``[B, K]`` explicit false classes instead of drawing them; a
        class equal to ``y`` is reached at ``x0`` and contributes nothing (as the official
        single-image code, which skips it).
      run_chunk: false classes whose runs are vmapped together (the model sees
        ``B * run_chunk`` images per step); None: all ``K``. The result does not depend on it.
      return_iterates: also return the iterates ``x_1..x_T`` ``[B, K, T, H, W, 3]`` (after a
        stop the last point repeats) and the steps taken ``[B, K]``.
    """
    check_positive("epsilon", epsilon)
    check_int_at_least("max_iter", max_iter, 1)
    check_int_at_least("num_targets", num_targets, 1)
    check_choice("update", update, UPDATES)
    if run_chunk is not None:
        check_int_at_least("run_chunk", run_chunk, 1)
    logit_fn, images, labels, key = prepare_inputs(logit_fn, images, labels, key=key,
                                                   need_key=target_classes is None)
    batch = images.shape[0]
    num_classes = num_classes_of(logit_fn, images)
    if target_classes is None:
        if num_targets > num_classes - 1:
            raise ValueError(f"num_targets = {num_targets} false classes cannot be drawn without replacement "
                             f"from the {num_classes - 1} classes other than the label")
        targets = _draw_for_batch(split_per_image(key, batch), labels, num_targets, num_classes)
    else:
        targets = check_target_classes(target_classes, batch, num_targets, num_classes)
    attributions, steps, iterates = _agi_batch(
        logit_fn, images, labels, targets, epsilon=float(epsilon), max_iter=int(max_iter), update=update,
        run_chunk=None if run_chunk is None else int(run_chunk), keep_path=bool(return_iterates))
    return (attributions, iterates, steps) if return_iterates else attributions
