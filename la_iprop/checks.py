"""Argument checks shared by every public entry point.

Each check raises ``ValueError`` (or ``TypeError``) naming the argument and what was
expected, so bad input never surfaces as a traceback from inside XLA.
"""

from __future__ import annotations

import math
import numbers
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from la_iprop.precision import float_dtype

__all__ = [
    "check_images",
    "check_labels",
    "check_like",
    "check_positive",
    "check_nonnegative",
    "check_int_at_least",
    "check_in_range",
    "check_choice",
    "check_finite",
    "check_finite_number",
    "check_seed",
    "SEED_BITS",
]

SEED_BITS = 64   # seeds are unsigned 64-bit integers (see check_seed)


def _is_traced(x: Any) -> bool:
    return isinstance(x, jax.core.Tracer)


def check_images(images: Any, name: str = "images", *, check_range: bool = True) -> jax.Array:
    """Images must be float NHWC with 3 channels and values in [0, 1]; returned in the working float type
    (:func:`~la_iprop.precision.float_dtype`: float32, or float64 inside a float64 call)."""
    if not hasattr(images, "shape"):
        raise TypeError(f"{name} must be an array of shape [batch, height, width, 3], got {type(images).__name__}")
    images = jnp.asarray(images)
    if images.ndim != 4:
        raise ValueError(f"{name} must have rank 4 [batch, height, width, 3] (NHWC), got shape {images.shape}")
    if images.shape[-1] != 3:
        raise ValueError(f"{name} must have 3 channels in the last axis (NHWC RGB), got shape {images.shape}")
    if images.shape[0] == 0:
        raise ValueError(f"{name} must hold at least one image, got shape {images.shape}")
    if not jnp.issubdtype(images.dtype, jnp.floating):
        raise ValueError(f"{name} must be floating point with values in [0, 1], got dtype {images.dtype}")
    if not _is_traced(images):
        # isfinite, not min/max: XLA:CPU's vectorised min/max reductions drop NaN on large arrays (>= 64x64).
        _check_finite_values(images, name, "finite pixel values in [0, 1]")
        if check_range:
            lo, hi = float(jnp.min(images)), float(jnp.max(images))
            if lo < 0.0 or hi > 1.0:
                raise ValueError(f"{name} must have values in [0, 1], got range [{lo:.4g}, {hi:.4g}]")
    return images.astype(float_dtype())


def check_labels(labels: Any, batch: int, num_classes: int | None = None, name: str = "labels") -> jax.Array:
    """Labels must be integer class indices, one per image."""
    labels = jnp.asarray(labels)
    if labels.ndim == 0:
        labels = jnp.broadcast_to(labels, (batch,))
    if labels.shape != (batch,):
        raise ValueError(f"{name} must have shape ({batch},) (one class per image), got {labels.shape}")
    if not jnp.issubdtype(labels.dtype, jnp.integer):
        raise ValueError(f"{name} must be integer class indices, got dtype {labels.dtype}")
    if num_classes is not None and not _is_traced(labels):
        lo, hi = int(jnp.min(labels)), int(jnp.max(labels))
        if lo < 0 or hi >= num_classes:
            raise ValueError(f"{name} must be class indices in [0, {num_classes}) (the model has {num_classes} "
                             f"classes), got range [{lo}, {hi}]")
    return labels.astype(jnp.int32)


def check_like(array: Any, reference: jax.Array, name: str, reference_name: str = "images") -> jax.Array:
    """An array that must have exactly the shape of ``reference``."""
    if not hasattr(array, "shape"):
        raise TypeError(f"{name} must be an array, got {type(array).__name__}")
    array = jnp.asarray(array)
    if array.shape != reference.shape:
        raise ValueError(f"{name} must have the shape of {reference_name} {tuple(reference.shape)}, "
                         f"got {tuple(array.shape)}")
    return array


def check_finite(array: Any, name: str, expected: str = "finite values") -> None:
    """Refuses NaN or infinite entries (concrete arrays only: under tracing there is nothing to look at).

    Uses an explicit ``isfinite`` reduction: ``min``/``max`` do not propagate NaN on XLA:CPU for large arrays.
    A numpy array is checked as given (before any conversion to the working float type).
    """
    if not _is_traced(array):
        _check_finite_values(array if isinstance(array, np.ndarray) else jnp.asarray(array), name, expected)


def _check_finite_values(array: Any, name: str, expected: str) -> None:
    xp = np if isinstance(array, np.ndarray) else jnp
    if not xp.issubdtype(array.dtype, xp.inexact):
        return  # integers and booleans are always finite
    bad = int(xp.sum(~xp.isfinite(array)))
    if bad:
        kinds = [kind for kind, present in (("NaN", bool(xp.any(xp.isnan(array)))),
                                             ("infinite", bool(xp.any(xp.isinf(array))))) if present]
        where = ""
        if array.ndim >= 1 and array.shape[0] > 1:
            rows = np.flatnonzero(~np.asarray(xp.isfinite(array)).reshape(array.shape[0], -1).all(axis=1))
            shown = ", ".join(str(i) for i in rows[:5]) + (", ..." if rows.size > 5 else "")
            where = f", in batch item(s) [{shown}]"
        raise ValueError(f"{name} contains {' and '.join(kinds) or 'NaN or infinite'} values ({bad} of {array.size} "
                         f"entries{where}); expected {expected}")


def _check_number(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number, got {value!r}")


def check_finite_number(name: str, value: Any) -> None:
    """A real number that is not NaN or infinite: an infinite radius or a NaN noise level would run and give
    all-zero or NaN maps instead of an error."""
    _check_number(name, value)
    if not isinstance(value, numbers.Integral) and not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")


def check_positive(name: str, value: Any) -> None:
    """A finite number > 0 (NaN and infinity refused)."""
    check_finite_number(name, value)
    if not value > 0:
        raise ValueError(f"{name} must be > 0, got {value!r}")


def check_nonnegative(name: str, value: Any) -> None:
    """A finite number >= 0 (NaN and infinity refused)."""
    check_finite_number(name, value)
    if not value >= 0:
        raise ValueError(f"{name} must be >= 0, got {value!r}")


def check_seed(name: str, value: Any) -> int:
    """A seed: an integer in ``[0, 2**64)``, returned as a Python int. Larger or negative seeds are refused
    (jax.random.PRNGKey raises OverflowError beyond 63 bits and, with x64 off, keeps only the low 32 bits:
    :func:`~la_iprop.attribution.base.key_from_seed` makes a key from all 64)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an integer in [0, 2**{SEED_BITS}), got {value!r}")
    value = int(value)
    if not 0 <= value < 2**SEED_BITS:
        shown = value if abs(value) < 10**30 else f"an integer of {value.bit_length()} bits"
        raise ValueError(f"{name} must be an integer in [0, 2**{SEED_BITS}), got {shown}")
    return value


def check_int_at_least(name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an integer >= {minimum}, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")


def check_in_range(name: str, value: Any, low: float, high: float, *, high_inclusive: bool = False) -> None:
    """``low <= value < high`` (or ``<= high`` when ``high_inclusive``)."""
    _check_number(name, value)
    ok = low <= value <= high if high_inclusive else low <= value < high
    if not ok:
        bracket = "]" if high_inclusive else ")"
        raise ValueError(f"{name} must be in [{low}, {high}{bracket}, got {value!r}")


def check_choice(name: str, value: Any, choices) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {sorted(choices)}, got {value!r}")
