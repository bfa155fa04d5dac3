"""The calling convention shared by every attribution method, and its registry.

A method is a pure function::

    method(logit_fn, images, labels, *, key, **hparams) -> attributions

with ``images`` NHWC float32 in [0, 1], ``labels`` the classes to explain (None: the
predicted class), ``key`` a ``jax.random`` key and ``attributions.shape ==
images.shape``. Hyperparameters are static (keyword-only, with defaults).

Every registered method also takes ``precision="float32" | "float64" | "float32_fast"`` (added by
:func:`register_method`, see :mod:`la_iprop.precision`): float64 runs the weights, the
images and the kernel in float64 with JAX's x64 mode scoped to the call.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import inspect
import math
import numbers
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from la_iprop.checks import check_images, check_labels, check_seed
from la_iprop.precision import cast_floats, float_dtype, with_precision

__all__ = ["MethodSpec", "register_method", "get_method", "available_methods", "as_pytree_fn",
           "prepare_inputs", "check_logits", "check_logits_follow_precision", "model_label", "class_probability",
           "method_hparams", "split_per_image", "check_target_classes", "num_classes_of",
           "check_key", "key_from_seed", "check_finite_hparams", "NonFiniteAttributionError"]


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
    Checked before any kernel is traced: images (rank, channels, dtype, finite, in [0, 1]); the
    classifier's output for them (``[batch, num_classes]`` floating logits, found abstractly by
    ``jax.eval_shape``, no forward pass); labels (one integer per image, in ``[0, num_classes)``
    with ``num_classes`` the logits' width, for any callable); with ``labels=None`` the logits of
    the prediction forward must be finite; the key.
    """
    model = logit_fn
    logit_fn = cast_floats(as_pytree_fn(logit_fn))
    images = check_images(images)
    num_classes = check_logits(logit_fn, images, model=model)
    if labels is None:
        labels, finite = _predict(logit_fn, images)
        if not isinstance(finite, jax.core.Tracer) and not bool(jnp.all(finite)):
            rows = np.flatnonzero(~np.asarray(finite))
            raise ValueError(f"{model_label(model)} returned NaN or infinite logits for images {rows[:5].tolist()} "
                             "(labels=None: the class to explain is the prediction); expected finite logits")
    labels = check_labels(labels, images.shape[0], num_classes)
    if need_key and key is None:
        raise ValueError("key is required: pass key=jax.random.PRNGKey(seed)")
    if key is not None:
        key = check_key(key, images.shape[0] if need_key else None)
    return logit_fn, images, labels, key


def check_key(key: Any, batch: int | None = None, name: str = "key") -> jax.Array:
    """A ``jax.random`` key: one key (``PRNGKey(seed)``: uint32 ``(2,)``, or a typed key ``()``) or, with
    ``batch``, one key per image (``(batch, 2)`` / ``(batch,)``). Anything else (a string, a float, an int
    seed, a wrong shape) is one error naming ``name`` instead of a trace error inside a kernel."""
    expected = "a jax.random key (jax.random.PRNGKey(seed) or jax.random.key(seed))"
    if batch is not None:
        expected += f" or one key per image (shape ({batch}, 2))"
    if not isinstance(key, jax.Array):
        if not isinstance(key, np.ndarray) or key.dtype != np.uint32:
            shown = type(key).__name__ if not isinstance(key, (int, float, str, bytes)) else repr(key)[:40]
            raise TypeError(f"{name} must be {expected}, got {shown}")
        key = jnp.asarray(key)
    typed = jnp.issubdtype(key.dtype, jax.dtypes.prng_key)
    single = key.shape == () if typed else key.shape == (2,) and key.dtype == jnp.uint32
    batched = batch is not None and (key.shape == (batch,) if typed else key.shape == (batch, 2)
                                     and key.dtype == jnp.uint32)
    if not single and not batched and batch is None and key.ndim == (1 if typed else 2):
        batched = typed or (key.shape[-1] == 2 and key.dtype == jnp.uint32)   # per-image keys, batch not known
    if not (single or batched):
        raise ValueError(f"{name} must be {expected}, got shape {key.shape} dtype {key.dtype}")
    return key


def key_from_seed(seed: Any, name: str = "seed") -> jax.Array:
    """``jax.random.PRNGKey(seed)`` for any seed in ``[0, 2**64)``, the same key with x64 on or off.

    Why: with x64 off PRNGKey keeps only a seed's low 32 bits (seed ``2**32 + 5`` gives the key of ``5``)
    and beyond 63 bits it raises OverflowError. Seeds below ``2**32`` give exactly ``PRNGKey(seed)``;
    larger ones fold their high 32 bits into that key."""
    seed = check_seed(name, seed)
    key = jax.random.PRNGKey(seed & 0xFFFFFFFF)
    return key if seed < 2**32 else jax.random.fold_in(key, np.uint32(seed >> 32))


def model_label(logit_fn: Callable) -> str:
    """``logit_fn`` named for error messages: ``logit_fn 'efficientnet_lite0'`` (a ModelFn's name) or the function's."""
    fn = logit_fn.func if isinstance(logit_fn, jax.tree_util.Partial) else logit_fn
    name = getattr(fn, "name", None)
    if not isinstance(name, str):
        name = getattr(fn, "__name__", None) or type(fn).__name__
    return f"logit_fn {name!r}"


_LOGITS_CACHE: collections.OrderedDict = collections.OrderedDict()
_LOGITS_CACHE_SIZE = 16


def _logits_shape(logit_fn: Callable, images: jax.Array) -> Any:
    """``jax.eval_shape`` of ``logit_fn`` on the batch (abstract: no forward), cached by the classifier's
    structure (static part, weight shapes) and the images' shape: tracing Lite0 costs ~0.5 s on CPU."""
    spec = jax.ShapeDtypeStruct(images.shape, images.dtype)
    leaves, treedef = jax.tree_util.tree_flatten(logit_fn)
    try:
        key = (treedef, tuple((getattr(x, "shape", None), str(getattr(x, "dtype", type(x)))) for x in leaves),
               spec.shape, str(spec.dtype), str(float_dtype()))
        hash(key)
    except TypeError:  # an unhashable static part: no caching
        key = None
    if key is not None and key in _LOGITS_CACHE:
        _LOGITS_CACHE.move_to_end(key)
        return _LOGITS_CACHE[key]
    out = jax.eval_shape(logit_fn, spec)
    if key is not None:
        _LOGITS_CACHE[key] = out
        while len(_LOGITS_CACHE) > _LOGITS_CACHE_SIZE:
            _LOGITS_CACHE.popitem(last=False)
    return out


_FLOAT64_HINT = ("with precision='float64' the classifier must compute in float64: pass a la_iprop ModelFn (its "
                 "weights are cast for the call) or a function whose weights follow the input dtype "
                 "(e.g. w.astype(images.dtype))")


def check_logits(logit_fn: Callable, images: jax.Array, *, model: Callable | None = None) -> int:
    """The classifier's output for ``images`` must be floating logits ``[batch, num_classes]``; returns ``num_classes``.

    Found with ``jax.eval_shape`` (no forward pass), so a wrong output (1-D logits, another batch
    size, integer scores, a tuple) is one clear error naming the model instead of a trace error
    inside a kernel. In a float64 call the logits must be float64 (see
    :func:`check_logits_follow_precision`). A classifier with an integer ``num_classes`` attribute
    (a :class:`~la_iprop.models.ModelFn`) must agree with its logits' width. ``model``: the
    callable as the user passed it (for the name in messages; default ``logit_fn``).
    """
    label = model_label(model if model is not None else logit_fn)
    float64 = images.dtype == jnp.float64
    try:
        out = _logits_shape(logit_fn, images)
    except TypeError as err:
        if not float64:
            raise
        raise TypeError(f"{label} failed on float64 images ({str(err).splitlines()[0]}); {_FLOAT64_HINT}") from None
    batch = images.shape[0]
    expected = f"[batch, num_classes] = [{batch}, num_classes] for images of shape {tuple(images.shape)}"
    if not (hasattr(out, "shape") and hasattr(out, "dtype")):
        kind = type(out).__name__
        raise TypeError(f"{label} must return one array of logits {expected}, got a {kind}: "
                        f"{jax.tree_util.tree_map(lambda x: tuple(x.shape), out)}")
    if float64 and out.dtype != jnp.float64 and jnp.issubdtype(out.dtype, jnp.floating):
        raise TypeError(f"{label} returned {out.dtype} logits for float64 images; {_FLOAT64_HINT}")
    if not jnp.issubdtype(out.dtype, jnp.floating):
        raise TypeError(f"{label} must return floating-point logits {expected}, got dtype {out.dtype}")
    if out.ndim != 2 or out.shape[0] != batch or out.shape[1] < 1:
        hint = ""
        if out.ndim < 2:
            hint = " (rank < 2: did it drop the batch axis or reduce over classes?)"
        elif out.ndim == 2 and out.shape[0] != batch:
            hint = " (a different batch size: it must return one row of logits per image)"
        raise ValueError(f"{label} must return logits of shape {expected}, got shape {tuple(out.shape)}{hint}")
    width = int(out.shape[1])
    declared = getattr(model if model is not None else logit_fn, "num_classes", None)
    if isinstance(declared, int) and not isinstance(declared, bool) and declared != width:
        raise ValueError(f"{label} declares num_classes={declared} but returns {width} logits per image")
    return width


def check_logits_follow_precision(logit_fn: Callable, images: jax.Array) -> None:
    """In a float64 call the classifier must compute in float64: a plain function whose weights are
    float32 constants fails (lax ops refuse mixed dtypes) or returns float32 logits (silently float32).
    Both become one clear error. A :class:`~la_iprop.models.ModelFn` always passes (its weights are cast).
    (Part of :func:`check_logits`, which also checks the logits' shape.)"""
    check_logits(logit_fn, images)


@jax.jit
def _predict(logit_fn, images):
    logits = logit_fn(images)
    return jnp.argmax(logits, axis=-1).astype(jnp.int32), jnp.all(jnp.isfinite(logits), axis=-1)


def num_classes_of(logit_fn: Callable, images: jax.Array) -> int:
    """The classifier's number of classes (its ``num_classes`` or the width of its logits)."""
    count = getattr(logit_fn, "num_classes", None)
    if isinstance(count, int) and not isinstance(count, bool):
        return count
    out = _logits_shape(logit_fn, images)
    return int(out.shape[-1])


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

    def settings_hparams(self, settings: str) -> dict[str, Any]:
        """The overrides of a settings level: ``quick`` -> the cheap settings, ``paper`` -> none."""
        if settings not in ("quick", "paper"):
            raise ValueError(f"settings must be 'quick' or 'paper', got {settings!r}")
        return dict(self.quick) if settings == "quick" else {}


_METHODS: dict[str, MethodSpec] = {}


class NonFiniteAttributionError(ValueError):
    """A registered method returned NaN or infinite attributions; ``method`` and ``rows`` (batch positions)
    let a runner name the images."""

    def __init__(self, message: str, method: str, rows: list[int]):
        super().__init__(message)
        self.method, self.rows = method, rows


def register_method(name: str, *, description: str, quick: Mapping[str, Any] | None = None,
                    needs_reference_set: bool = False):
    """Decorator: ``@register_method("ig", description=...)``.

    The registered (and returned) function also takes ``precision`` (see :mod:`la_iprop.precision`),
    so every method has it without writing it. It also refuses non-finite numeric hyperparameters and
    non-finite maps (see :func:`_checked_method`): NaN logits or an infinite radius give NaN or all-zero
    maps that would otherwise be scored as results.
    """
    def wrap(fn):
        if name in _METHODS:
            raise ValueError(f"method {name!r} is already registered")
        fn = _checked_method(name, with_precision(fn))
        _METHODS[name] = MethodSpec(name, fn, description, dict(quick or {}), needs_reference_set)
        return fn
    return wrap


def _checked_method(name: str, fn: Callable) -> Callable:
    """``fn`` with two checks of every call: numeric hyperparameters (scalars, or lists/tuples of them)
    must be finite, and the maps it returns (the first element of a tuple) must be finite (concrete
    outputs only: under an outer ``jax.jit`` there is nothing to look at)."""
    hparams = {p.name for p in inspect.signature(fn).parameters.values()
               if p.kind is inspect.Parameter.KEYWORD_ONLY and p.name not in ("key", "precision")}

    @functools.wraps(fn)
    def method(*args, **kwargs):
        check_finite_hparams(name, {k: kwargs[k] for k in hparams & set(kwargs)})
        out = fn(*args, **kwargs)
        maps = out[0] if isinstance(out, tuple) else out
        if isinstance(maps, (jax.Array, np.ndarray)) and not isinstance(maps, jax.core.Tracer) \
                and jnp.issubdtype(maps.dtype, jnp.inexact) and maps.ndim >= 1:
            finite = np.asarray(jnp.isfinite(maps).reshape(maps.shape[0], -1).all(axis=1))
            if not finite.all():
                rows = np.flatnonzero(~finite).tolist()
                model = args[0] if args else kwargs.get("logit_fn")
                shown = ", ".join(map(str, rows[:8])) + (", ..." if len(rows) > 8 else "")
                raise NonFiniteAttributionError(
                    f"method {name!r} returned NaN or infinite attributions for image(s) [{shown}] of the batch "
                    f"({len(rows)} of {maps.shape[0]}); likely cause: non-finite logits or gradients of "
                    f"{model_label(model) if model is not None else 'the classifier'} on the inputs the method "
                    "evaluates (the image or its perturbations); expected finite maps", name, rows)
        return out

    return method


def check_finite_hparams(method: str, hparams: Mapping[str, Any]) -> None:
    """Every number among ``hparams`` (scalars, and lists/tuples of them) must be finite; one line naming the
    method and the hyperparameter. Every registered method runs this on its call; a runner can run it before
    it writes anything."""
    for hparam in sorted(hparams):
        _check_finite_hparam(method, hparam, hparams[hparam])


def _check_finite_hparam(method: str, hparam: str, value: Any) -> None:
    values = value if isinstance(value, (list, tuple)) else [value]
    for i, item in enumerate(values):
        if isinstance(item, (np.ndarray, jax.Array)) and item.ndim == 0 and not isinstance(item, jax.core.Tracer):
            item = item.item()
        if isinstance(item, numbers.Real) and not isinstance(item, (bool, numbers.Integral)) \
                and not math.isfinite(item):
            where = f"{hparam}[{i}]" if values is value else hparam
            raise ValueError(f"method {method!r}: hyperparameter {where}={item!r} must be a finite number")


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
