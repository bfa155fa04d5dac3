"""The pixel graph of IProp: a KNN graph in the joint spatial + colour space.

For ONE image (HWC, values in [0, 1]) every pixel ``i`` is a node. Its candidates are
the other pixels of a ``(2R+1) x (2R+1)`` window; among them it keeps the ``K`` nearest in

    d_ij^2 = |pos_i - pos_j|^2 / sigma_s^2 + |col_i - col_j|^2 / sigma_c^2

and weights them ``w_ij = exp(-d_ij^2)``; the transition matrix is row-normalised,
``P_ij = w_ij / sum_j w_ij``.

Choices (the paper leaves them open):

- **No self-loops.** The pixel itself is not a candidate (it would always be the nearest,
  at distance 0, and only slow the propagation down); ``K <= (2R+1)^2 - 1``.
- **Border windows are clamped, not clipped.** Near the border the window is shifted
  inwards so that it lies inside the image (rows ``clip(y - R, 0, H - 2R - 1) ...``, same
  for columns). So every pixel has exactly ``(2R+1)^2 - 1`` distinct in-image candidates
  and exactly ``K`` out-edges; no edge crosses the border and there is no padding. The
  spatial term uses the true positions, so far candidates of a border pixel cost more.
  The image must be at least ``2R+1`` pixels in each dimension.
- **Colour spaces.** ``rgb``: the [0, 1] values. ``lab``: CIELab (sRGB, D65) divided by
  100, so that ``L`` is in [0, 1] and the same ``sigma_c`` means roughly the same in both.
- **Stable normalisation.** ``P`` is computed as a softmax of ``-d^2`` over the ``K``
  neighbours (subtracting the row minimum), so rows never become 0/0 when all ``w_ij``
  underflow; ``weights`` are the raw ``exp(-d^2)``.

Edges are stored flat and grouped by node: ``senders = [0]*K + [1]*K + ...`` (the node
whose row of ``P`` the edge is in) and ``receivers`` the neighbour, both of length
``N*K`` with ``N = H*W`` (row-major pixel index ``y*W + x``).
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from la_iprop.checks import check_finite
from la_iprop.iprop.defaults import (
    DEFAULT_COLOR_SPACE,
    DEFAULT_K,
    DEFAULT_RADIUS,
    DEFAULT_SIGMA_C,
    DEFAULT_SIGMA_S,
    check_graph_hparams,
)
from la_iprop.precision import float_dtype

__all__ = ["PixelGraph", "knn_graph", "rgb_to_lab", "color_features", "window_candidates", "to_dense",
           "check_bandwidths"]


class PixelGraph(NamedTuple):
    """Flat edge arrays of length ``N*K``, grouped by sender (``senders[e] == e // K``)."""

    senders: jax.Array      # int32, node i (row of P)
    receivers: jax.Array    # int32, neighbour j
    weights: jax.Array      # working float type, w_ij = exp(-d_ij^2)
    transition: jax.Array   # working float type, P_ij = w_ij / sum_j w_ij (rows sum to 1)


# sRGB (D65) -> CIE XYZ, and the D65 reference white.
_RGB_TO_XYZ = np.array([[0.412453, 0.357580, 0.180423],
                        [0.212671, 0.715160, 0.072169],
                        [0.019334, 0.119193, 0.950227]])
_WHITE_D65 = np.array([0.95047, 1.0, 1.08883])


def rgb_to_lab(rgb: jax.Array) -> jax.Array:
    """sRGB in [0, 1] (last axis RGB) to CIELab (D65), ``L`` in [0, 100].

    Linearise (``c/12.92`` below 0.04045, else ``((c+0.055)/1.055)^2.4``), map to XYZ,
    divide by the white point, ``f(t) = t^(1/3)`` above ``(6/29)^3`` else
    ``t/(3 (6/29)^2) + 4/29``; ``L = 116 f(Y) - 16``, ``a = 500 (f(X) - f(Y))``,
    ``b = 200 (f(Y) - f(Z))``.
    """
    rgb = jnp.asarray(rgb, float_dtype())
    linear = jnp.where(rgb > 0.04045, ((jnp.maximum(rgb, 0.04045) + 0.055) / 1.055) ** 2.4, rgb / 12.92)
    xyz = linear @ jnp.asarray(_RGB_TO_XYZ, rgb.dtype).T / jnp.asarray(_WHITE_D65, rgb.dtype)
    delta = 6.0 / 29.0
    f = jnp.where(xyz > delta ** 3, jnp.cbrt(jnp.maximum(xyz, delta ** 3)), xyz / (3 * delta ** 2) + 4.0 / 29.0)
    fx, fy, fz = f[..., 0], f[..., 1], f[..., 2]
    return jnp.stack([116.0 * fy - 16.0, 500.0 * (fx - fy), 200.0 * (fy - fz)], axis=-1)


def color_features(image: jax.Array, color_space: str) -> jax.Array:
    """The colour coordinates used in the distance: RGB as is, or CIELab / 100."""
    if color_space == "rgb":
        return jnp.asarray(image, float_dtype())
    if color_space == "lab":
        return rgb_to_lab(image) / 100.0
    raise ValueError(f"color_space must be one of ['lab', 'rgb'], got {color_space!r}")


def _clamped_window(size: int, radius: int) -> np.ndarray:
    """``[2R+1, size]``: row ``a`` holds ``clip(p - R, 0, size - 2R - 1) + a`` for every position ``p``."""
    start = np.clip(np.arange(size) - radius, 0, size - 2 * radius - 1)
    return (start[None, :] + np.arange(2 * radius + 1)[:, None]).astype(np.int32)


def window_candidates(height: int, width: int, radius: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Static candidate structure of the clamped windows.

    Returns ``(index, spatial_d2, is_self)``, each ``[H, W, (2R+1)^2]``: the flat pixel index
    of each candidate, its squared spatial distance to the centre, and whether it is the
    centre itself. Candidate ``m = a*(2R+1) + b`` is window row ``a``, column ``b``.
    """
    if height < 2 * radius + 1 or width < 2 * radius + 1:
        raise ValueError(f"images must be at least 2*radius+1 = {2 * radius + 1} pixels in height and width "
                         f"for radius={radius}, got {height}x{width}")
    rows, cols = _clamped_window(height, radius), _clamped_window(width, radius)  # [2R+1, H], [2R+1, W]
    cand_y = np.broadcast_to(rows.T[:, None, :, None], (height, width, 2 * radius + 1, 2 * radius + 1))
    cand_x = np.broadcast_to(cols.T[None, :, None, :], (height, width, 2 * radius + 1, 2 * radius + 1))
    y = np.arange(height)[:, None, None, None]
    x = np.arange(width)[None, :, None, None]
    shape = (height, width, (2 * radius + 1) ** 2)
    index = (cand_y * width + cand_x).reshape(shape).astype(np.int32)
    spatial_d2 = ((cand_y - y) ** 2 + (cand_x - x) ** 2).reshape(shape).astype(np.float32)  # small integers: exact
    is_self = ((cand_y == y) & (cand_x == x)).reshape(shape)
    return index, spatial_d2, is_self


def _shifted_copies(features: jax.Array, radius: int) -> jax.Array:
    """``[H, W, (2R+1)^2, C]``: the features of every clamped-window candidate.

    Built from ``2R+1`` row-shifted and ``2R+1`` column-shifted copies of the image
    (shifts clamped at the border), not by a per-pixel loop.
    """
    height, width, channels = features.shape
    rows, cols = _clamped_window(height, radius), _clamped_window(width, radius)
    row_shifted = features[jnp.asarray(rows)]                 # [2R+1(a), H, W, C]
    both = row_shifted[:, :, jnp.asarray(cols)]               # [2R+1(a), H, 2R+1(b), W, C]
    both = jnp.transpose(both, (1, 3, 0, 2, 4))               # [H, W, a, b, C]
    return both.reshape(height, width, (2 * radius + 1) ** 2, channels)


def knn_graph(image: jax.Array, *, k: int = DEFAULT_K, radius: int = DEFAULT_RADIUS,
              sigma_s: float = DEFAULT_SIGMA_S, sigma_c: float = DEFAULT_SIGMA_C,
              color_space: str = DEFAULT_COLOR_SPACE) -> PixelGraph:
    """The KNN pixel graph of ONE image ``[H, W, 3]`` (see the module docstring).

    Traceable (call it inside ``jit``/``vmap``); hyperparameters are static Python values.
    """
    check_graph_hparams(k, radius, sigma_s, sigma_c, color_space)
    image = jnp.asarray(image)
    if image.ndim != 3 or image.shape[-1] != 3:
        raise ValueError(f"image must have shape [height, width, 3] (one HWC image), got {image.shape}")
    window_candidates(image.shape[0], image.shape[1], radius)  # checks the size before tracing
    check_finite(image, "image", "finite pixel values in [0, 1]")   # eager calls (traced: nothing to look at)
    check_bandwidths(radius, sigma_s, sigma_c, color_space, float_dtype())
    return _knn_graph(image, k=k, radius=radius, sigma_s=float(sigma_s), sigma_c=float(sigma_c),
                      color_space=color_space)


# Largest squared colour distance between two pixels of [0, 1] images: RGB 3; CIELab / 100 about 8.5
# (L in [0, 1], a in [-0.87, 0.99], b in [-1.08, 0.95] over the sRGB cube), rounded up.
_MAX_COLOR_D2 = {"rgb": 3.0, "lab": 9.0}


def check_bandwidths(radius: int, sigma_s: float, sigma_c: float, color_space: str, dtype) -> None:
    """The distances ``d^2 = |dpos|^2 / sigma_s^2 + |dcol|^2 / sigma_c^2`` must stay finite in ``dtype``.

    An overflow to ``inf`` for every candidate of a pixel would make its row of ``P`` 0/0 (NaN), so
    bandwidths that small are refused (each term is kept below a quarter of the largest float).
    Spatial offsets in a clamped window reach ``2R`` per axis (``8 R^2`` squared).
    """
    limit = float(np.finfo(dtype).max) / 4
    for name, sigma, largest, what in (("sigma_s", sigma_s, 8.0 * radius ** 2, "spatial offsets"),
                                       ("sigma_c", sigma_c, _MAX_COLOR_D2.get(color_space, 9.0), "colour differences")):
        if largest / float(sigma) / float(sigma) > limit:
            smallest = math.sqrt(largest / limit)
            raise ValueError(f"{name}={sigma:g} is too small for {np.dtype(dtype).name}: squared {what} (up to "
                             f"{largest:g}) / {name}**2 overflow, every pixel-graph weight would underflow to 0 "
                             f"and IProp would be NaN; use {name} >= {smallest:.2g}")


@functools.partial(jax.jit, static_argnames=("k", "radius", "sigma_s", "sigma_c", "color_space"))
def _knn_graph(image, *, k, radius, sigma_s, sigma_c, color_space) -> PixelGraph:
    height, width, _ = image.shape
    index, spatial_d2, is_self = window_candidates(height, width, radius)

    features = color_features(image, color_space)
    candidates = _shifted_copies(features, radius)                          # [H, W, M, C]
    color_d2 = jnp.sum((candidates - features[:, :, None, :]) ** 2, axis=-1)  # [H, W, M]
    d2 = jnp.asarray(spatial_d2) / sigma_s ** 2 + color_d2 / sigma_c ** 2
    d2 = jnp.where(jnp.asarray(is_self), jnp.inf, d2)                       # no self-loops

    neg_d2, chosen = lax.top_k(-d2, k)                                      # K nearest, [H, W, K]
    receivers = jnp.take_along_axis(jnp.asarray(index), chosen, axis=-1)
    n = height * width
    # Softmax of -d^2 over the K neighbours == w / sum(w), without underflow to 0/0.
    transition = jax.nn.softmax(neg_d2, axis=-1)
    senders = jnp.repeat(jnp.arange(n, dtype=jnp.int32), k)
    return PixelGraph(senders=senders, receivers=receivers.reshape(n * k).astype(jnp.int32),
                      weights=jnp.exp(neg_d2).reshape(n * k), transition=transition.reshape(n * k))


@functools.partial(jax.jit, static_argnames=("num_nodes", "normalized"))
def to_dense(graph: PixelGraph, num_nodes: int, *, normalized: bool = True) -> jax.Array:
    """The ``[N, N]`` transition matrix ``P`` (or the weight matrix ``W``); for tests and small images."""
    values = graph.transition if normalized else graph.weights
    return jnp.zeros((num_nodes, num_nodes), values.dtype).at[graph.senders, graph.receivers].add(values)
