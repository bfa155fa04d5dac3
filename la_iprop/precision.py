"""Numerical precision of a call: ``"float32"`` (the default), ``"float64"`` or ``"float32_fast"``.

Every public entry point (the registered attribution methods, :func:`~la_iprop.iprop.iprop`,
:func:`~la_iprop.iprop.with_iprop`, :func:`~la_iprop.metrics.evaluate`) takes ``precision``.

- ``"float32"``: float32 arrays, and every matrix multiplication and convolution at full
  float32 precision on every backend (JAX's ``default_matmul_precision("highest")`` for the
  call). Why: JAX's default for float32 dots/convolutions is the backend's fast mode -- TF32
  (10 mantissa bits) on NVIDIA Ampere/Hopper GPUs, single-pass bfloat16 (8 bits) on TPUs --
  so without it a GPU/TPU "float32" run would compute its gradients at a third of float32's
  mantissa. The CPU always computes them in float32, so there the setting changes nothing.
- ``"float32_fast"``: float32 arrays with the backend's default (fast) dot/convolution
  precision (TF32 on NVIDIA Ampere/Hopper, bfloat16 passes on TPU; identical to ``"float32"``
  on CPU). An explicit opt-in for speed over fidelity, never a default.
- ``"float64"``: the model weights, the images, the kernel and the metric in float64 under
  JAX's x64 mode. Its dot/convolution precision setting is left as it is (float64 operations
  have no reduced-precision mode on CPU or GPU).

x64 is switched on (``"float64"``) or off (the two float32 modes) for the call only, and so is
the matmul precision: the caller's global JAX configuration is as it was afterwards, also after
an exception, and a float32 result does not depend on the caller's configuration either.

Why float64 exists: the sign- and rank-driven methods (LA, Guided IG, AGI, MFABA, BIG,
AttEXplore) are chaotic in float32 (a rounding difference between thread counts, CPUs or
batch sizes flips a near-zero gradient sign or a near-tied rank and the maps diverge). In
float64 those differences are ~1e-16 and the maps agree across batch sizes and thread
counts (see ``results/stability.md``).

The precision is applied while a function is *traced*: a jitted kernel called inside the
scope (also one nested in the caller's own ``jax.jit``) bakes it into its program, and JAX
retraces when the setting differs, so no program compiled in one mode is reused in another.
Inside a scope, :func:`float_dtype` is the working float type; kernels use it (or their
inputs' dtype) instead of a hard-coded float32. See ``docs/precision.md``.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import inspect
from typing import Any, Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["PRECISIONS", "DEFAULT_PRECISION", "MATMUL_PRECISIONS", "check_precision", "resolve_precision",
           "precision_scope", "precision_dtype", "random_normal", "random_uniform", "float_dtype", "cast_floats",
           "with_precision"]

PRECISIONS = ("float32", "float64", "float32_fast")
DEFAULT_PRECISION = "float32"

# The value of JAX's ``jax_default_matmul_precision`` inside each scope (None: JAX's default, i.e. the
# backend's fast mode). float64 is absent: its scope leaves the setting as it is.
MATMUL_PRECISIONS = {"float32": "highest", "float32_fast": None}

# The precision of the la_iprop call in progress (None outside any call), so that a call made
# inside another one (with_iprop -> method, BIG -> its IG) inherits it instead of resetting it.
_ACTIVE: contextvars.ContextVar[str | None] = contextvars.ContextVar("la_iprop_precision", default=None)


def check_precision(precision: Any) -> str:
    """``precision`` must be one of :data:`PRECISIONS`."""
    if not isinstance(precision, str) or precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {list(PRECISIONS)}, got {precision!r}")
    return precision


def resolve_precision(precision: str | None) -> str:
    """``precision``, or when None the enclosing call's precision (float32 at top level)."""
    if precision is None:
        return _ACTIVE.get() or DEFAULT_PRECISION
    return check_precision(precision)


def precision_dtype(precision: str) -> np.dtype:
    """The float type a precision stores its arrays in: float64 for ``"float64"``, else float32
    (e.g. the dtype of a run's saved maps; ``np.dtype("float32_fast")`` does not exist)."""
    return np.dtype(np.float64 if check_precision(precision) == "float64" else np.float32)


@contextlib.contextmanager
def precision_scope(precision: str | None) -> Iterator[str]:
    """Runs the body with JAX's x64 mode on (``"float64"``) or off (the float32 modes) and, in the
    float32 modes, JAX's default matmul/convolution precision set to :data:`MATMUL_PRECISIONS`
    (``"highest"`` for ``"float32"``: full float32 on GPU/TPU too); restores both after."""
    precision = resolve_precision(precision)
    token = _ACTIVE.set(precision)
    try:
        with contextlib.ExitStack() as stack:
            stack.enter_context(jax.enable_x64(precision == "float64"))
            if precision in MATMUL_PRECISIONS:
                stack.enter_context(jax.default_matmul_precision(MATMUL_PRECISIONS[precision]))
            yield precision
    finally:
        _ACTIVE.reset(token)


def float_dtype() -> np.dtype:
    """The working float type: float64 inside a float64 scope (x64 on), else float32."""
    return np.dtype(jax.dtypes.canonicalize_dtype(np.float64))


def cast_floats(tree: Any, dtype: Any = None) -> Any:
    """A pytree (e.g. a :class:`~la_iprop.models.ModelFn` and its weights) with its floating
    leaves cast to ``dtype`` (None: :func:`float_dtype`); other leaves unchanged."""
    dtype = float_dtype() if dtype is None else np.dtype(dtype)

    def cast(leaf):
        if hasattr(leaf, "dtype") and jnp.issubdtype(leaf.dtype, jnp.floating) and leaf.dtype != dtype:
            return jnp.asarray(leaf, dtype)
        return leaf

    return jax.tree_util.tree_map(cast, tree)


def with_precision(fn: Callable) -> Callable:
    """Gives an entry point a keyword ``precision`` (one of :data:`PRECISIONS`; None: float32, or the
    enclosing call's) and runs it inside :func:`precision_scope`. The wrapped signature shows the
    extra keyword."""
    @functools.wraps(fn)
    def wrapper(*args, precision: str | None = None, **kwargs):
        with precision_scope(precision):
            return fn(*args, **kwargs)

    signature = inspect.signature(fn)
    if "precision" not in signature.parameters:
        parameters = list(signature.parameters.values())
        extra = inspect.Parameter("precision", inspect.Parameter.KEYWORD_ONLY, default=None, annotation="str | None")
        position = next((i for i, p in enumerate(parameters) if p.kind is inspect.Parameter.VAR_KEYWORD),
                        len(parameters))
        parameters.insert(position, extra)
        wrapper.__signature__ = signature.replace(parameters=parameters)
    return wrapper


# Random draws are made in float32 and then cast, so that a float64 call sees exactly the samples of
# the float32 call with the same key (jax.random draws other bits for float64): the two precisions then
# differ by rounding only, never by the noise realisation.
def random_normal(key: jax.Array, shape: tuple[int, ...], dtype: Any) -> jax.Array:
    """Standard normal samples, drawn in float32 and cast to ``dtype``."""
    return jax.random.normal(key, shape, jnp.float32).astype(dtype)


def random_uniform(key: jax.Array, shape: tuple[int, ...], dtype: Any, minval: float = 0.0,
                   maxval: float = 1.0) -> jax.Array:
    """Uniform samples in ``[minval, maxval)``, drawn in float32 and cast to ``dtype``."""
    return jax.random.uniform(key, shape, jnp.float32, minval, maxval).astype(dtype)
