"""IProp as a meta-method: post-process any attribution map, or wrap any method.

``iprop(images, attributions, **hp)`` builds each image's pixel graph, turns its
attribution into a per-pixel reward and returns the fixed point ``V`` of the Markov Reward
Process (``[B, H, W]``). ``with_iprop(method, **hp)`` returns a method with the standard
calling convention whose attributions are ``V`` broadcast to the image's channels.
``check_iprop_settings(image_shape, **hp)`` raises every error of the settings that ``iprop``
would raise for that image size, without running anything (for run engines: before the first write).

Hyperparameters ``hp``: the fields of :class:`~la_iprop.iprop.defaults.IPropConfig` as keywords,
``preset=`` a name in :data:`~la_iprop.iprop.defaults.PRESETS` (the keywords override it), or
``config=`` an ``IPropConfig`` (not both ``preset`` and ``config``).
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from la_iprop.checks import check_finite, check_images, check_int_at_least
from la_iprop.iprop.defaults import IPropConfig, resolve_config, uses_window
from la_iprop.iprop.graph import check_graph_settings, pixel_graph
from la_iprop.iprop.propagate import propagate, reward_from_attribution
from la_iprop.precision import float_dtype, resolve_precision, with_precision

__all__ = ["iprop", "iprop_single", "with_iprop", "check_iprop_settings", "iprop_name", "parse_iprop_name",
           "default_chunk_size", "IPROP_SUFFIX"]

IPROP_SUFFIX = "+iprop"


def iprop_single(image: jax.Array, attribution: jax.Array, config: IPropConfig) -> tuple[jax.Array, jax.Array]:
    """IProp for ONE image ``[H, W, 3]`` and its attribution ``[H, W, C]``: ``(V [H, W], iterations)``.

    ``V`` is positively homogeneous in the attribution (every reward rule is, and
    ``V = (I - gamma P)^{-1} r`` is linear in ``r``; the stopping rule is relative to ``max|r|``), so the
    attribution is divided by a power of two ``s`` near its largest magnitude before the reward and ``V``
    is multiplied by ``s`` after: exact in floating point (a power-of-two scaling only moves exponents),
    so the result equals the unscaled computation, but the channel sums and the iteration (values up to
    ``max|r| / (1 - gamma)``) work on magnitudes near 1: only a final ``V * s`` beyond the float range is
    left non-finite (and refused by :func:`iprop`).
    """
    attribution = jnp.asarray(attribution, float_dtype())
    scale, inverse = _power_of_two_near_max(attribution)
    reward = reward_from_attribution(attribution * inverse, config.reward)
    if config.gamma == 0.0:  # the control: channel aggregation only, no graph needed
        return reward * scale, jnp.ones((), jnp.int32)
    graph = pixel_graph(image, config)
    # radius: P V by shifted copies (window_matvec), the faster of the two equal forms on CPU; it needs every
    # edge inside the clamped window (knn, random_window). random_image: segment_sum over the edge list.
    values, iterations = propagate(graph, reward, gamma=config.gamma, tol=config.tol, max_iter=config.max_iter,
                                   radius=config.radius if uses_window(config.graph) else None)
    return values * scale, iterations


def _power_of_two_near_max(array: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``(2**e, 2**-e)`` with ``2**e <= max|array| < 2**(e+1)``, built from the exponent bits (so exactly powers of
    two), ``e`` clipped so that both are normal numbers (a zero or subnormal maximum: the smallest such ``e``)."""
    dtype = array.dtype
    finfo = jnp.finfo(dtype)
    int_dtype = jnp.int64 if dtype == jnp.float64 else jnp.int32
    bias, mantissa_bits = int(finfo.maxexp) - 1, int(finfo.nmant)
    peak = jnp.max(jnp.abs(array))
    exponent = (lax.bitcast_convert_type(peak, int_dtype) >> mantissa_bits) - bias   # |peak| >= 0: no sign bit
    exponent = jnp.clip(exponent, int(finfo.minexp), bias - 1)

    def power(e):
        return lax.bitcast_convert_type((e + bias) << mantissa_bits, dtype)

    return power(exponent), power(-exponent)


@functools.partial(jax.jit, static_argnames=("config", "chunk_size"))
def _iprop_batch(images, attributions, config, chunk_size):
    single = functools.partial(iprop_single, config=config)
    if chunk_size == 1:
        # Unbatched, one image at a time: vmapping even one image batches the loop and the plane
        # scatter, measured 1.9x slower per image on CPU.
        return lax.map(lambda pair: single(*pair), (images, attributions))
    if chunk_size >= images.shape[0]:
        return jax.vmap(single)(images, attributions)
    # Chunks of chunk_size images, vmapped within a chunk.
    return lax.map(lambda pair: single(*pair), (images, attributions), batch_size=chunk_size)


def default_chunk_size() -> int:
    """Images propagated together: 1 on CPU, where each image's planes (~5 MB) then stay in cache and
    each loop stops at its own count (measured 1.5x faster per image than vmapping 8), else 64."""
    return 1 if jax.default_backend() == "cpu" else 64


def _check_attributions(attributions: Any, images: jax.Array) -> jax.Array:
    """``[B, H, W, C]`` with ``C`` = 3 (the images' channels) or 1 (a per-pixel map, also given as ``[B, H, W]``)."""
    if not hasattr(attributions, "shape"):
        raise TypeError(f"attributions must be an array, got {type(attributions).__name__}")
    given = attributions
    with np.errstate(over="ignore"):   # values beyond the working float become inf: refused below, by name
        attributions = jnp.asarray(attributions)
    if attributions.shape == images.shape[:3]:  # already one score per pixel
        attributions = attributions[..., None]
    if attributions.shape not in (images.shape, images.shape[:3] + (1,)):
        raise ValueError(f"attributions must have the shape of images {tuple(images.shape)} (or "
                         f"{tuple(images.shape[:3])} / {tuple(images.shape[:3]) + (1,)} for per-pixel maps), "
                         f"got {tuple(attributions.shape)}")
    if not (jnp.issubdtype(attributions.dtype, jnp.floating) or jnp.issubdtype(attributions.dtype, jnp.integer)):
        raise ValueError(f"attributions must be real numbers, got dtype {attributions.dtype}")
    check_finite(given if isinstance(given, np.ndarray) else attributions, "attributions", "finite scores")
    attributions = attributions.astype(images.dtype)
    check_finite(attributions, "attributions", f"scores that fit in {images.dtype} (the working float type)")
    return attributions


def _check_values(values: jax.Array, attributions: jax.Array, config: IPropConfig) -> None:
    """Eager calls: refuse non-finite IProp values, naming the likely cause."""
    if isinstance(values, jax.core.Tracer):
        return
    finite = np.asarray(jnp.all(jnp.isfinite(values), axis=(1, 2)))
    if finite.all():
        return
    rows = np.flatnonzero(~finite)
    peak = float(np.max(np.abs(np.asarray(attributions[rows]), dtype=np.float64)))
    gain = attributions.shape[-1] / (1.0 - config.gamma)   # |r| <= C max|a| for every rule, |V| <= max|r| / (1 - gamma)
    dtype = values.dtype
    if peak * gain > float(jnp.finfo(dtype).max) / 2:
        remedy = "rescale them, or pass precision='float64'" if dtype == jnp.float32 else "rescale them"
        raise ValueError(f"attributions too large for IProp in {dtype}: IProp values are NaN or infinite for images "
                         f"{rows[:5].tolist()}: attribution magnitudes up to {peak:.3g} give values up to "
                         f"~{peak * gain:.3g} (channels x max|a| / (1 - gamma)); IProp is linear in the attributions: "
                         f"{remedy}")
    raise ValueError(f"IProp values are NaN or infinite for images {rows[:5].tolist()}: check "
                     f"sigma_s={config.sigma_s:g} and sigma_c={config.sigma_c:g} (too small a bandwidth makes every "
                     "pixel-graph weight underflow) and gamma")


def _image_size(image_shape: Any) -> tuple[int, int]:
    """``(height, width)`` of ``(H, W)``, ``(H, W, 3)`` or ``(B, H, W, 3)``."""
    expected = "(height, width), (height, width, 3) or (batch, height, width, 3)"
    try:
        shape = tuple(image_shape)
    except TypeError:
        raise TypeError(f"image_shape must be a tuple {expected}, got {image_shape!r}") from None
    if not all(isinstance(d, (int, np.integer)) and not isinstance(d, bool) and d >= 1 for d in shape) \
            or len(shape) not in (2, 3, 4) or (len(shape) > 2 and shape[-1] != 3):
        raise ValueError(f"image_shape must be {expected} of positive integers, got {image_shape!r}")
    height, width = shape[:2] if len(shape) < 4 else shape[1:3]
    return int(height), int(width)


def _check_settings(config: IPropConfig, height: int, width: int, dtype) -> None:
    """The settings against the image size and float type (gamma = 0 builds no graph: nothing to check)."""
    if config.gamma > 0.0:
        check_graph_settings(config, height, width, dtype)


def check_iprop_settings(image_shape: Any, *, precision: str | None = None, **hparams: Any) -> IPropConfig:
    """Raises every error about the settings that :func:`iprop` would raise for images of ``image_shape``,
    and returns the resolved :class:`~la_iprop.iprop.defaults.IPropConfig`; computes nothing.

    ``image_shape``: ``(H, W)``, ``(H, W, 3)`` or ``(B, H, W, 3)``. ``hparams``: as for :func:`iprop`
    (keywords, ``preset=``, ``config=``). ``precision``: ``"float32"`` (default), ``"float32_fast"`` or ``"float64"`` (the
    bandwidth limits depend on it). Checked: every hyperparameter's value (``TypeError`` for an unknown
    name), an unknown preset, and for ``gamma > 0`` the image size (``H, W >= 2R+1`` for the window graphs;
    ``K <= H*W - 1`` for ``random_image``) and bandwidths small enough to overflow ``d^2``. The same
    functions run inside :func:`iprop`, so the two agree; what only the data can show (non-finite or
    too large attributions, images outside [0, 1]) is left to :func:`iprop`.
    """
    config = resolve_config(**hparams)
    height, width = _image_size(image_shape)
    dtype = np.float64 if resolve_precision(precision) == "float64" else np.float32
    _check_settings(config, height, width, dtype)
    return config


@with_precision
def iprop(images: Any, attributions: Any, *, return_iterations: bool = False, chunk_size: int | None = None,
          **hparams: Any):
    """IProp values ``V [B, H, W]`` of a batch (``return_iterations``: also the per-image counts ``[B]``).

    ``images`` NHWC in [0, 1]; ``attributions`` of the same shape, or a per-pixel map ``[B, H, W]``
    (or ``[B, H, W, 1]``), which is a one-channel attribution: the reward rule applies to it as is, so
    a map ``m`` gives the result of any ``[B, H, W, 3]`` attribution ``a`` whose channel sum is ``m``
    for the ``sum`` and ``positive_sum`` rules (``m = sum_c |a_c|`` for ``abs_sum``).
    Attributions and values must be finite (NaN/Inf are refused with the likely cause).
    Hyperparameters (keyword, static; defaults in :mod:`la_iprop.iprop.defaults`): ``k``,
    ``radius``, ``sigma_s``, ``sigma_c``, ``color_space``, ``gamma``, ``reward``, ``tol``,
    ``max_iter`` and the structure controls ``graph``, ``graph_seed``, ``similarity``, ``edge_weights``;
    ``preset=`` a named setting (the keywords override it), or ``config=IPropConfig(...)``. Settings that
    cannot work for the images' size are refused before anything runs (:func:`check_iprop_settings`, the
    same checks). Per image: reward ``r = reward_rule(attribution)``, graph ``P`` of the image
    (:func:`~la_iprop.iprop.graph.pixel_graph`), ``V = r + gamma P V``.
    The per-image kernel is vmapped over chunks of ``chunk_size`` images (None:
    :func:`default_chunk_size`), so each image's result is independent of the others.
    ``precision``: "float32" (default), "float32_fast" or "float64" (x64 scoped to the call, see
    :mod:`la_iprop.precision`).
    """
    config = resolve_config(**hparams)
    images = check_images(images)
    attributions = _check_attributions(attributions, images)
    _check_settings(config, images.shape[1], images.shape[2], images.dtype)   # before tracing
    if chunk_size is None:
        chunk_size = default_chunk_size()
    check_int_at_least("chunk_size", chunk_size, 1)
    values, iterations = _iprop_batch(images, attributions, config, min(chunk_size, images.shape[0]))
    _check_values(values, attributions, config)
    return (values, iterations) if return_iterations else values


def iprop_name(method_name: str) -> str:
    """``"la"`` -> ``"la+iprop"``."""
    return method_name + IPROP_SUFFIX


def parse_iprop_name(name: str) -> tuple[str, bool]:
    """``"la+iprop"`` -> ``("la", True)``; ``"la"`` -> ``("la", False)``."""
    if name.endswith(IPROP_SUFFIX):
        return name[: -len(IPROP_SUFFIX)], True
    return name, False


def with_iprop(method: Callable | str, **iprop_hparams: Any) -> Callable:
    """Wrap an attribution method (a callable or a registered name) so its maps go through IProp.

    The result follows the standard convention
    ``wrapped(logit_fn, images, labels, *, key, **hparams) -> attributions`` (``hparams`` go to
    ``method``), returning ``V`` broadcast to the image channels so that
    ``attributions.shape == images.shape``; ``precision`` applies to both. ``iprop_hparams`` (keywords,
    ``preset=`` or ``config=``, as for :func:`iprop`) fix IProp's settings; the wrapper exposes them as
    ``wrapped.iprop_config``. Errors of the IProp step (e.g. maps too large for IProp) are one line
    prefixed with the wrapper's name.
    """
    config = resolve_config(**iprop_hparams)
    if isinstance(method, str):
        from la_iprop.attribution import get_method  # the registry lives above this package
        base_name, method = method, get_method(method).fn
    elif callable(method):
        base_name = getattr(method, "__name__", type(method).__name__)
    else:
        raise TypeError(f"method must be a callable attribution method or a registered name, got {method!r}")

    @with_precision
    def wrapped(logit_fn, images, labels=None, *, key=None, **hparams):
        images = check_images(images)
        attributions = method(logit_fn, images, labels, key=key, **hparams)  # inherits the precision
        try:
            values = iprop(images, attributions, config=config)
        except (TypeError, ValueError) as err:   # one line that names the wrapped method
            raise (ValueError if isinstance(err, ValueError) else TypeError)(f"{wrapped.__name__}: {err}") from None
        return jnp.broadcast_to(values[..., None], images.shape)

    wrapped.__name__ = iprop_name(base_name)
    wrapped.__qualname__ = wrapped.__name__
    wrapped.__doc__ = f"{base_name} followed by IProp ({config.tag()})."
    wrapped.iprop_config = config
    wrapped.base_method = method
    return wrapped
