"""The calling convention shared by every attribution method, and its registry.

A method is a pure function::

    method(logit_fn, images, labels, *, key, **hparams) -> attributions

with ``images`` NHWC float32 in [0, 1], ``labels`` the classes to explain (None: the
predicted class), ``key`` a ``jax.random`` key and ``attributions.shape ==
images.shape``. Hyperparameters are static (keyword-only, with defaults).

Every registered method also takes ``precision="float32" | "float64"`` (added by
:func:`register_method`, see :mod:`la_iprop.precision`): float64 runs the weights, the
images and the kernel in float64 with JAX's x64 mode scoped to the call.
"""

from __future__ import annotations

import dataclasses
import inspect
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from la_iprop.checks import check_images, check_labels
from la_iprop.precision import cast_floats, with_precision

__all__ = ["MethodSpec", "register_method", "get_method", "available_methods", "as_pytree_fn",
           "prepare_inputs", "check_logits_follow_precision", "class_probability", "method_hparams", "split_per_image", "check_target_classes", "num_classes_of"]


def as_pytree_fn(logit_fn: Callable) -> Callable:
    """Makes ``logit_fn`` safe to pass *into* ``jax.jit`` as an argument.

    A :class:`~la_iprop.models.ModelFn` already is a pytree (weights as leaves); any
    other callable becomes a leafless ``Partial`` (static, cached by identity).
    """
    if not callable(logit_fn):
        raise TypeError(f"logit_fn must be callable (images -> logits), got {type(logit_fn).__name__}")
    leaves, treedef = jax.tree_util.tree_flatten(logit_fn)
    if isinstance(logit_fn, jax.tree_util.Partial) or (leaves and not _is_opaque(treedef)):
        return logit_fn
    return jax.tree_util.Partial(logit_fn)


def _is_opaque(treedef) -> bool:
    return treedef.num_leaves == 1 and treedef.num_nodes == 1


def prepare_inputs(logit_fn: Callable, images: Any, labels: Any, *, key: Any = None,
                   need_key: bool = False) -> tuple[Callable, jax.Array, jax.Array, jax.Array | None]:
    """Validates the convention's arguments; ``labels=None`` means the predicted class.

    The classifier's floating weights (a :class:`~la_iprop.models.ModelFn`'s variables) and the
    images come back in the working float type of the call (float64 inside a float64 call).
    """
    logit_fn = cast_floats(as_pytree_fn(logit_fn))
    images = check_images(images)
    check_logits_follow_precision(logit_fn, images)
    if labels is None:
        labels = _predict(logit_fn, images)
    num_classes = getattr(logit_fn, "num_classes", None)
    labels = check_labels(labels, images.shape[0], num_classes)
    if need_key:
        if key is None:
            raise ValueError("key is required: pass key=jax.random.PRNGKey(seed)")
        key = jnp.asarray(key) if not isinstance(key, jax.Array) else key
        batch = images.shape[0]
        typed = jnp.issubdtype(key.dtype, jax.dtypes.prng_key)
        single = key.shape == () if typed else key.shape == (2,) and key.dtype == jnp.uint32
        batched = key.shape == (batch,) if typed else key.shape == (batch, 2) and key.dtype == jnp.uint32
        if not (single or batched):
            raise ValueError(f"key must be a jax.random key (PRNGKey(seed)) or one key per image "
                             f"(shape ({batch}, 2)), got shape {key.shape} dtype {key.dtype}")
    return logit_fn, images, labels, key


def check_logits_follow_precision(logit_fn: Callable, images: jax.Array) -> None:
    """In a float64 call the classifier must compute in float64: a plain function whose weights are
    float32 constants fails (lax ops refuse mixed dtypes) or returns float32 logits (silently float32).
    Both become one clear error. A :class:`~la_iprop.models.ModelFn` always passes (its weights are cast)."""
    if images.dtype != jnp.float64:
        return
    hint = ("with precision='float64' the classifier must compute in float64: pass a la_iprop ModelFn (its "
            "weights are cast for the call) or a function whose weights follow the input dtype "
            "(e.g. w.astype(images.dtype))")
    try:
        logits = jax.eval_shape(logit_fn, images[:1])
    except TypeError as err:
        raise TypeError(f"logit_fn failed on float64 images ({str(err).splitlines()[0]}); {hint}") from None
    if getattr(logits, "dtype", None) != jnp.float64:
        raise TypeError(f"logit_fn returned {getattr(logits, 'dtype', type(logits).__name__)} logits for float64 "
                        f"images; {hint}")


@jax.jit
def _predict(logit_fn, images):
    return jnp.argmax(logit_fn(images), axis=-1).astype(jnp.int32)


def num_classes_of(logit_fn: Callable, images: jax.Array) -> int:
    """The classifier's number of classes (its ``num_classes`` or the width of its logits)."""
    count = getattr(logit_fn, "num_classes", None)
    if isinstance(count, int):
        return count
    return int(jax.eval_shape(logit_fn, images[:1]).shape[-1])


def check_target_classes(target_classes: Any, batch: int, num_targets: int, num_classes: int,
                         count_name: str = "num_targets") -> jax.Array:
    """Explicit target classes ``[num_targets]`` (same for every image) or ``[batch, num_targets]``."""
    targets = np.asarray(target_classes)
    if not np.issubdtype(targets.dtype, np.integer):
        raise ValueError(f"target_classes must be integer class indices, got dtype {targets.dtype}")
    if targets.ndim == 1:
        targets = np.broadcast_to(targets, (batch, targets.shape[0]))
    if targets.shape != (batch, num_targets):
        raise ValueError(f"target_classes must have shape ({num_targets},) or ({batch}, {num_targets}) "
                         f"({count_name} = {num_targets} targets per image), got {np.shape(target_classes)}")
    if targets.size and (targets.min() < 0 or targets.max() >= num_classes):
        raise ValueError(f"target_classes must be class indices in [0, {num_classes}), "
                         f"got range [{targets.min()}, {targets.max()}]")
    return jnp.asarray(targets, jnp.int32)


def class_probability(logit_fn: Callable, image: jax.Array, label: jax.Array) -> jax.Array:
    """Softmax probability of ``label`` for ONE image (HWC); scalar."""
    return jax.nn.softmax(logit_fn(image[None])[0])[label]


def split_per_image(key: jax.Array, batch: int) -> jax.Array:
    """One independent key per image.

    ``key`` is either one key (image i gets ``fold_in(key, i)``) or already one key per
    image (returned unchanged). The experiment runner passes per-image keys derived from
    each image's index in the dataset, so a map never depends on how images are batched.
    """
    typed = jnp.issubdtype(key.dtype, jax.dtypes.prng_key)
    if key.ndim == (1 if typed else 2):
        return key
    return jax.vmap(lambda i: jax.random.fold_in(key, i))(jnp.arange(batch))


@dataclasses.dataclass(frozen=True)
class MethodSpec:
    name: str
    fn: Callable
    description: str
    quick: Mapping[str, Any] = dataclasses.field(default_factory=dict)  # cheap settings for CPU smoke runs
    needs_reference_set: bool = False  # e.g. Expected Gradients: pass reference_images=...


_METHODS: dict[str, MethodSpec] = {}


def register_method(name: str, *, description: str, quick: Mapping[str, Any] | None = None,
                    needs_reference_set: bool = False):
    """Decorator: ``@register_method("ig", description=...)``.

    The registered (and returned) function also takes ``precision`` (see :mod:`la_iprop.precision`),
    so every method has it without writing it.
    """
    def wrap(fn):
        if name in _METHODS:
            raise ValueError(f"method {name!r} is already registered")
        fn = with_precision(fn)
        _METHODS[name] = MethodSpec(name, fn, description, dict(quick or {}), needs_reference_set)
        return fn
    return wrap


def available_methods() -> list[str]:
    return sorted(_METHODS)


def get_method(name: str) -> MethodSpec:
    if name not in _METHODS:
        raise ValueError(f"unknown method {name!r}; registered methods: {', '.join(available_methods())}")
    return _METHODS[name]


def method_hparams(name: str) -> dict[str, Any]:
    """The keyword hyperparameters of a registered method and their defaults."""
    sig = inspect.signature(get_method(name).fn)
    return {p.name: p.default for p in sig.parameters.values()
            if p.kind is inspect.Parameter.KEYWORD_ONLY and p.name not in ("key", "precision")}
