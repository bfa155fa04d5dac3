"""The pixel graph of IProp: a KNN graph in the joint spatial + colour space, and its controls.

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
- **Ties** in ``d^2`` (common with ``similarity="spatial"``: 4 candidates at each distance, or
  flat colour regions with ``"color"``) are broken by window slot, row-major (``lax.top_k``
  keeps the lower index), so the graph is deterministic.

Controls for the question "does the graph's structure matter" (hyperparameters of
:class:`~la_iprop.iprop.defaults.IPropConfig`; :func:`pixel_graph` builds the graph of a config):

- ``similarity="spatial"`` drops the colour term (``d^2 = |dpos|^2 / sigma_s^2``: the KNN graph
  of a constant image); ``"color"`` drops the spatial term (``d^2 = |dcol|^2 / sigma_c^2``: among
  the window's candidates, position does not matter).
- ``edge_weights="uniform"``: ``w_ij = 1`` and ``P_ij = 1/K`` (``"auto"``: exp(-d^2) for knn,
  uniform for the random graphs).
- :func:`random_graph`: the same ``K`` out-edges per pixel, no self-loops, drawn at random —
  ``"random_window"``: ``K`` of the ``(2R+1)^2 - 1`` clamped-window candidates, uniformly without
  replacement (a uniform random score per candidate, keep the ``K`` largest); ``"random_image"``:
  ``K`` of the other ``H*W - 1`` pixels, uniformly without replacement (Floyd's algorithm,
  vectorised over pixels). The draw depends on ``(H, W, K, R, graph_seed)`` only, not on the
  image nor its place in a batch: every image of a size gets the same graph. It uses JAX's
  threefry2x32 generator keyed by the 64-bit ``graph_seed`` and integer draws only, so float32
  and float64 calls give the same edges.

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

from la_iprop.checks import check_finite, check_int_at_least
from la_iprop.iprop.defaults import (
    DEFAULT_COLOR_SPACE,
    DEFAULT_EDGE_WEIGHTS,
    DEFAULT_GRAPH_SEED,
    DEFAULT_K,
    DEFAULT_RADIUS,
    DEFAULT_SIGMA_C,
    DEFAULT_SIGMA_S,
    DEFAULT_SIMILARITY,
    IPropConfig,
    check_graph_hparams,
    resolved_edge_weights,
    uses_window,
)
from la_iprop.precision import float_dtype

__all__ = ["PixelGraph", "knn_graph", "random_graph", "random_receivers", "pixel_graph", "rgb_to_lab",
           "color_features", "window_candidates", "to_dense", "check_bandwidths", "check_graph_size",
           "check_graph_settings"]


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
              color_space: str = DEFAULT_COLOR_SPACE, similarity: str = DEFAULT_SIMILARITY,
              edge_weights: str = DEFAULT_EDGE_WEIGHTS) -> PixelGraph:
    """The KNN pixel graph of ONE image ``[H, W, 3]`` (see the module docstring).

    ``similarity`` picks the terms of ``d^2`` (``"joint"``, ``"spatial"``, ``"color"``);
    ``edge_weights="uniform"`` keeps the K nearest but weighs them ``1/K``.
    Traceable (call it inside ``jit``/``vmap``); hyperparameters are static Python values.
    """
    check_graph_hparams(k, radius, sigma_s, sigma_c, color_space, similarity=similarity, edge_weights=edge_weights)
    image = _check_image(image)
    check_graph_size(image.shape[0], image.shape[1], graph="knn", k=k, radius=radius)
    check_bandwidths(radius, sigma_s, sigma_c, color_space, float_dtype(), similarity=similarity)
    return _knn_graph(image, k=k, radius=radius, sigma_s=float(sigma_s), sigma_c=float(sigma_c),
                      color_space=color_space, similarity=similarity,
                      uniform=resolved_edge_weights("knn", edge_weights) == "uniform")


def random_graph(image: jax.Array, *, graph: str = "random_window", k: int = DEFAULT_K, radius: int = DEFAULT_RADIUS,
                 graph_seed: int = DEFAULT_GRAPH_SEED, sigma_s: float = DEFAULT_SIGMA_S,
                 sigma_c: float = DEFAULT_SIGMA_C, color_space: str = DEFAULT_COLOR_SPACE,
                 similarity: str = DEFAULT_SIMILARITY, edge_weights: str = DEFAULT_EDGE_WEIGHTS) -> PixelGraph:
    """A random pixel graph of ONE image ``[H, W, 3]``: ``K`` out-edges per pixel drawn by
    :func:`random_receivers` (``graph`` = ``"random_window"`` or ``"random_image"``, see the module docstring).

    Weights: ``edge_weights`` ``"auto"``/``"uniform"``: ``w_ij = 1``, ``P_ij = 1/K``; ``"similarity"``:
    ``w_ij = exp(-d_ij^2)`` of the drawn edges (the ``similarity`` terms, true positions), ``P`` their
    softmax. The edges depend on the image's size only; the image matters only for similarity weights.
    """
    if graph not in ("random_window", "random_image"):
        raise ValueError(f"graph must be one of ['random_image', 'random_window'] for random_graph, got {graph!r}")
    check_graph_hparams(k, radius, sigma_s, sigma_c, color_space, graph=graph, graph_seed=graph_seed,
                        similarity=similarity, edge_weights=edge_weights)
    image = _check_image(image)
    height, width = image.shape[0], image.shape[1]
    check_graph_size(height, width, graph=graph, k=k, radius=radius)
    uniform = resolved_edge_weights(graph, edge_weights) == "uniform"
    if not uniform:
        check_bandwidths(radius, sigma_s, sigma_c, color_space, float_dtype(), similarity=similarity,
                         largest_spatial_d2=_largest_spatial_d2(graph, height, width, radius))
    receivers = random_receivers(height, width, graph=graph, k=k, radius=radius, seed=graph_seed)
    return _weighted_graph(image, receivers, sigma_s=float(sigma_s), sigma_c=float(sigma_c), color_space=color_space,
                           similarity=similarity, uniform=uniform)


def pixel_graph(image: jax.Array, config: IPropConfig) -> PixelGraph:
    """The graph of ONE image under ``config``: :func:`knn_graph` or :func:`random_graph` per ``config.graph``."""
    if not isinstance(config, IPropConfig):
        raise TypeError(f"config must be an IPropConfig, got {type(config).__name__}")
    common = dict(k=config.k, radius=config.radius, sigma_s=config.sigma_s, sigma_c=config.sigma_c,
                  color_space=config.color_space, similarity=config.similarity, edge_weights=config.edge_weights)
    if config.graph == "knn":
        return knn_graph(image, **common)
    return random_graph(image, graph=config.graph, graph_seed=config.graph_seed, **common)


def _check_image(image: jax.Array) -> jax.Array:
    image = jnp.asarray(image)
    if image.ndim != 3 or image.shape[-1] != 3:
        raise ValueError(f"image must have shape [height, width, 3] (one HWC image), got {image.shape}")
    check_finite(image, "image", "finite pixel values in [0, 1]")   # eager calls (traced: nothing to look at)
    return image


def check_graph_size(height: int, width: int, *, graph: str, k: int, radius: int) -> None:
    """The image size a graph needs: ``H, W >= 2R+1`` for the window graphs (``knn``, ``random_window``),
    ``K <= H*W - 1`` for ``random_image`` (K distinct pixels other than the node itself)."""
    if uses_window(graph):
        if height < 2 * radius + 1 or width < 2 * radius + 1:
            raise ValueError(f"images must be at least 2*radius+1 = {2 * radius + 1} pixels in height and width "
                             f"for radius={radius}, got {height}x{width}")
    elif k > height * width - 1:
        raise ValueError(f"k must be <= height*width - 1 = {height * width - 1} (the image's other pixels) for "
                         f"graph='random_image' on {height}x{width} images, got k={k}")


def check_graph_settings(config: IPropConfig, height: int, width: int, dtype) -> None:
    """Everything about ``config``'s graph that depends on the image size and the float type: the size
    (:func:`check_graph_size`) and, where ``d^2`` is used (knn's selection, or similarity weights),
    the bandwidths (:func:`check_bandwidths`)."""
    check_graph_size(height, width, graph=config.graph, k=config.k, radius=config.radius)
    if config.graph == "knn" or config.effective_edge_weights == "similarity":
        check_bandwidths(config.radius, config.sigma_s, config.sigma_c, config.color_space, dtype,
                         similarity=config.similarity,
                         largest_spatial_d2=_largest_spatial_d2(config.graph, height, width, config.radius))


# Largest squared colour distance between two pixels of [0, 1] images: RGB 3; CIELab / 100 about 8.5
# (L in [0, 1], a in [-0.87, 0.99], b in [-1.08, 0.95] over the sRGB cube), rounded up.
_MAX_COLOR_D2 = {"rgb": 3.0, "lab": 9.0}


def _largest_spatial_d2(graph: str, height: int, width: int, radius: int) -> float:
    """Largest squared spatial offset of an edge: ``8 R^2`` in a clamped window (``2R`` per axis), else the
    image's diagonal."""
    return 8.0 * radius ** 2 if uses_window(graph) else float((height - 1) ** 2 + (width - 1) ** 2)


def check_bandwidths(radius: int, sigma_s: float, sigma_c: float, color_space: str, dtype, *,
                     similarity: str = DEFAULT_SIMILARITY, largest_spatial_d2: float | None = None) -> None:
    """The distances ``d^2 = |dpos|^2 / sigma_s^2 + |dcol|^2 / sigma_c^2`` must stay finite in ``dtype``.

    An overflow to ``inf`` for every candidate of a pixel would make its row of ``P`` 0/0 (NaN), so
    bandwidths that small are refused (each term is kept below a quarter of the largest float). Only the
    terms ``similarity`` uses are checked. Spatial offsets reach ``largest_spatial_d2`` (default: a clamped
    window's ``8 R^2``, ``2R`` per axis).
    """
    limit = float(np.finfo(dtype).max) / 4
    spatial = 8.0 * radius ** 2 if largest_spatial_d2 is None else largest_spatial_d2
    terms = []
    if similarity != "color":
        terms.append(("sigma_s", sigma_s, spatial, "spatial offsets"))
    if similarity != "spatial":
        terms.append(("sigma_c", sigma_c, _MAX_COLOR_D2.get(color_space, 9.0), "colour differences"))
    for name, sigma, largest, what in terms:
        if largest / float(sigma) / float(sigma) > limit:
            smallest = math.sqrt(largest / limit)
            raise ValueError(f"{name}={sigma:g} is too small for {np.dtype(dtype).name}: squared {what} (up to "
                             f"{largest:g}) / {name}**2 overflow, every pixel-graph weight would underflow to 0 "
                             f"and IProp would be NaN; use {name} >= {smallest:.2g}")


def _squared_distance(spatial_d2, color_d2, sigma_s: float, sigma_c: float, similarity: str):
    """``d^2`` from its two terms, each present only when ``similarity`` uses it (the other is never computed)."""
    if similarity == "spatial":
        return spatial_d2 / sigma_s ** 2
    if similarity == "color":
        return color_d2 / sigma_c ** 2
    return spatial_d2 / sigma_s ** 2 + color_d2 / sigma_c ** 2


def _normalised(neg_d2: jax.Array, uniform: bool) -> tuple[jax.Array, jax.Array]:
    """``(weights, transition)`` of ``[..., K]`` edges: ``exp(-d^2)`` and its softmax, or ``1`` and ``1/K``."""
    if uniform:
        return jnp.ones_like(neg_d2), jnp.full_like(neg_d2, 1.0 / neg_d2.shape[-1])
    # Softmax of -d^2 over the K neighbours == w / sum(w), without underflow to 0/0.
    return jnp.exp(neg_d2), jax.nn.softmax(neg_d2, axis=-1)


@functools.partial(jax.jit, static_argnames=("k", "radius", "sigma_s", "sigma_c", "color_space", "similarity",
                                             "uniform"))
def _knn_graph(image, *, k, radius, sigma_s, sigma_c, color_space, similarity, uniform) -> PixelGraph:
    height, width, _ = image.shape
    index, spatial_d2, is_self = window_candidates(height, width, radius)

    dtype = float_dtype()
    color_d2 = None
    if similarity != "spatial":
        features = color_features(image, color_space)
        candidates = _shifted_copies(features, radius)                          # [H, W, M, C]
        color_d2 = jnp.sum((candidates - features[:, :, None, :]) ** 2, axis=-1)  # [H, W, M]
    # The barrier keeps XLA from constant-folding the top_k of an image-independent d^2 (spatial only): folded
    # at compile time, that sort took minutes for a 224 x 224 image.
    spatial = lax.optimization_barrier(jnp.asarray(spatial_d2, dtype))
    d2 = _squared_distance(spatial, color_d2, sigma_s, sigma_c, similarity)
    d2 = jnp.where(jnp.asarray(is_self), jnp.inf, d2)                       # no self-loops

    neg_d2, chosen = lax.top_k(-d2, k)                                      # K nearest, [H, W, K]
    receivers = jnp.take_along_axis(jnp.asarray(index), chosen, axis=-1)
    n = height * width
    weights, transition = _normalised(neg_d2, uniform)
    senders = jnp.repeat(jnp.arange(n, dtype=jnp.int32), k)
    return PixelGraph(senders=senders, receivers=receivers.reshape(n * k).astype(jnp.int32),
                      weights=weights.reshape(n * k), transition=transition.reshape(n * k))


def random_receivers(height: int, width: int, *, graph: str, k: int, radius: int = DEFAULT_RADIUS,
                     seed: int = DEFAULT_GRAPH_SEED) -> jax.Array:
    """``[H*W, K]`` int32: the neighbours of each pixel in a random graph (see the module docstring).

    ``"random_window"``: ``K`` distinct candidates of the pixel's clamped window, never itself;
    ``"random_image"``: ``K`` distinct pixels of the image other than itself, each row sorted. Uniform
    without replacement; the same output for the same arguments (``radius`` is unused by ``random_image``).
    """
    if graph not in ("random_window", "random_image"):
        raise ValueError(f"graph must be one of ['random_image', 'random_window'], got {graph!r}")
    check_int_at_least("height", height, 1)
    check_int_at_least("width", width, 1)
    check_graph_hparams(k, radius, DEFAULT_SIGMA_S, DEFAULT_SIGMA_C, DEFAULT_COLOR_SPACE, graph=graph, graph_seed=seed)
    check_graph_size(height, width, graph=graph, k=k, radius=radius)
    seed = int(seed)
    key_data = jnp.asarray(np.array([seed >> 32, seed & 0xFFFFFFFF], np.uint32))
    return _random_receivers(key_data, height=int(height), width=int(width), graph=graph, k=int(k),
                             radius=int(radius))


@functools.partial(jax.jit, static_argnames=("height", "width", "graph", "k", "radius"))
def _random_receivers(key_data, *, height, width, graph, k, radius):
    # The barrier keeps XLA from constant-folding the draw when the seed is a compile-time constant (inside
    # iprop's jit the config is static): folding the bits and their top_k costs minutes of compile time.
    key = jax.random.wrap_key_data(lax.optimization_barrier(key_data), impl="threefry2x32")
    n = height * width
    if graph == "random_window":
        index, _, is_self = window_candidates(height, width, radius)
        bits = jax.random.bits(key, index.shape, jnp.uint32)
        score = jnp.where(jnp.asarray(is_self), jnp.uint32(0), (bits >> 1) + jnp.uint32(1))  # self strictly last
        _, chosen = lax.top_k(score, k)                                    # a uniform K-subset of the others
        return jnp.take_along_axis(jnp.asarray(index), chosen, axis=-1).reshape(n, k).astype(jnp.int32)
    # Floyd's algorithm over the n - 1 other pixels (labels 0 .. n - 2), all pixels at once: for
    # j = n-1-K .. n-2 draw t uniform in [0, j]; keep t, or j if t was kept already.
    others = n - 1
    keys = jax.random.split(key, k)

    def draw(step, chosen):
        j = others - k + step
        t = jax.random.randint(keys[step], (n,), 0, j + 1, dtype=jnp.int32)
        taken = jnp.any(chosen == t[:, None], axis=1)
        return chosen.at[:, step].set(jnp.where(taken, j, t))

    chosen = lax.fori_loop(0, k, draw, jnp.full((n, k), -1, jnp.int32))
    chosen = jnp.sort(chosen, axis=1)
    node = jnp.arange(n, dtype=jnp.int32)[:, None]
    return chosen + (chosen >= node).astype(jnp.int32)                     # skip the pixel itself


@functools.partial(jax.jit, static_argnames=("sigma_s", "sigma_c", "color_space", "similarity", "uniform"))
def _weighted_graph(image, receivers, *, sigma_s, sigma_c, color_space, similarity, uniform) -> PixelGraph:
    """A :class:`PixelGraph` of given ``[N, K]`` receivers, weighted uniformly or by ``exp(-d^2)``."""
    height, width, _ = image.shape
    n, k = receivers.shape
    node = jnp.arange(n, dtype=jnp.int32)[:, None]
    if uniform:
        neg_d2 = jnp.zeros((n, k), float_dtype())
    else:
        dtype = float_dtype()
        dy = (receivers // width - node // width).astype(dtype)
        dx = (receivers % width - node % width).astype(dtype)
        spatial_d2 = dy ** 2 + dx ** 2   # integers: exact below 2**24 in float32
        color_d2 = None
        if similarity != "spatial":
            features = color_features(image, color_space).reshape(n, -1)
            color_d2 = jnp.sum((features[receivers] - features[:, None, :]) ** 2, axis=-1)
        neg_d2 = -_squared_distance(spatial_d2, color_d2, sigma_s, sigma_c, similarity)
    weights, transition = _normalised(neg_d2, uniform)
    return PixelGraph(senders=jnp.repeat(node[:, 0], k), receivers=receivers.reshape(n * k),
                      weights=weights.reshape(n * k), transition=transition.reshape(n * k))


@functools.partial(jax.jit, static_argnames=("num_nodes", "normalized"))
def to_dense(graph: PixelGraph, num_nodes: int, *, normalized: bool = True) -> jax.Array:
    """The ``[N, N]`` transition matrix ``P`` (or the weight matrix ``W``); for tests and small images."""
    values = graph.transition if normalized else graph.weights
    return jnp.zeros((num_nodes, num_nodes), values.dtype).at[graph.senders, graph.receivers].add(values)
