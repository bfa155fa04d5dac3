"""IProp: the KNN pixel graph, the Markov Reward Process fixed point and the meta-method."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.sparse

from la_iprop.iprop import (
    IPropConfig,
    iprop,
    iteration_bound,
    knn_graph,
    parse_iprop_name,
    propagate,
    reward_from_attribution,
    rgb_to_lab,
    to_dense,
    transition_matvec,
    window_matvec,
    with_iprop,
)
from la_iprop.iprop.graph import color_features


def _random_image(shape, seed=0):
    # Piecewise-constant blocks plus noise: real colour structure, and no exact distance ties.
    rng = np.random.default_rng(seed)
    h, w = shape
    blocks = rng.random((h // 4 + 1, w // 4 + 1, 3))
    image = np.repeat(np.repeat(blocks, 4, 0), 4, 1)[:h, :w] + 0.05 * rng.random((h, w, 3))
    return np.clip(image, 0, 1).astype(np.float32)


def _dense(graph, n):
    return np.asarray(to_dense(graph, n), np.float64)


def _positions(index, width):
    return np.asarray(index) // width, np.asarray(index) % width


# --------------------------------------------------------------------------------------------- propagation

@pytest.mark.parametrize("gamma,color_space", [(0.5, "rgb"), (0.9, "lab"), (0.95, "rgb")])
def test_propagate_equals_dense_solve(gamma, color_space):
    image = _random_image((16, 16), seed=1)
    graph = knn_graph(image, k=8, radius=2, sigma_s=1.5, sigma_c=0.3, color_space=color_space)
    reward = np.random.default_rng(2).standard_normal((16, 16)).astype(np.float32)
    exact = np.linalg.solve(np.eye(256) - gamma * _dense(graph, 256), reward.reshape(-1).astype(np.float64))
    for radius in (None, 2):  # segment_sum over the edges, and the shifted-copies form
        value, _ = propagate(graph, reward, gamma=gamma, tol=1e-7, max_iter=3000, radius=radius)
        assert value.shape == (16, 16)
        rel = np.max(np.abs(np.asarray(value, np.float64).reshape(-1) - exact)) / np.max(np.abs(exact))
        assert rel <= 1e-5
    # And propagation really moved mass: the fixed point is far from the reward itself.
    assert np.max(np.abs(exact - reward.reshape(-1))) > 0.1 * np.max(np.abs(reward))


def test_gamma_zero_returns_reward():
    graph = knn_graph(_random_image((12, 10)), k=4, radius=1)
    reward = np.random.default_rng(3).standard_normal((12, 10)).astype(np.float32)
    value, iterations = propagate(graph, reward, gamma=0.0)
    np.testing.assert_array_equal(np.asarray(value), reward)
    assert int(iterations) == 1


@pytest.mark.parametrize("k,radius,gamma,rtol", [(4, 1, 0.5, 1e-5), (8, 2, 0.9, 1e-5), (16, 3, 0.99, 1e-4)])
def test_constant_reward_gives_geometric_sum(k, radius, gamma, rtol):
    # P 1 = 1 on any row-stochastic graph, so V = c / (1 - gamma). float32 rounding (eps ~ 6e-8 per
    # step) is amplified by 1 / (1 - gamma), hence the looser tolerance at gamma = 0.99.
    graph = knn_graph(_random_image((14, 18), seed=k), k=k, radius=radius, sigma_c=0.05)
    reward = jnp.full((14, 18), 0.7, jnp.float32)
    value, _ = propagate(graph, reward, gamma=gamma, tol=1e-7, max_iter=5000)
    np.testing.assert_allclose(np.asarray(value), 0.7 / (1 - gamma), rtol=rtol)
    # dV_t = gamma^t c exactly, so the count is the contraction bound itself, up to float32 rounding:
    # max|dV| carries a few ulps of V = c / (1 - gamma), which delays the stop by at most
    # log(1 + 8 eps / ((1 - gamma) tol)) / -log(gamma) iterations.
    tol = 1e-3 if gamma > 0.95 else 1e-4
    _, iterations = propagate(graph, reward, gamma=gamma, tol=tol, max_iter=5000)
    bound = iteration_bound(gamma, tol)
    assert bound - 1 <= int(iterations) <= bound + 1 + _float32_margin(gamma, tol)


def _float32_margin(gamma: float, tol: float) -> int:
    """Iterations by which float32 rounding can delay the stop (see the test above)."""
    return math.ceil(math.log1p(8 * np.finfo(np.float32).eps / ((1 - gamma) * tol)) / -math.log(gamma))


@pytest.mark.parametrize("gamma", [0.5, 0.8, 0.9, 0.95])
def test_iteration_count_within_contraction_bound(gamma):
    graph = knn_graph(_random_image((20, 20), seed=4), k=8, radius=2)
    reward = np.random.default_rng(5).standard_normal((20, 20)).astype(np.float32)
    tol = 1e-4
    _, iterations = propagate(graph, reward, gamma=gamma, tol=tol)
    bound = math.log(tol) / math.log(gamma)
    assert 1 <= int(iterations) <= math.ceil(bound) + 1


@pytest.mark.parametrize("k,radius,shape", [(3, 1, (9, 13)), (8, 2, (16, 11)), (16, 3, (7, 20))])
def test_window_matvec_equals_segment_sum(k, radius, shape):
    # The shifted-copies form of P V (interior) + border strips is the same operator as the edge list.
    graph = knn_graph(_random_image(shape, seed=k), k=k, radius=radius, sigma_c=0.2)
    value = jnp.asarray(np.random.default_rng(radius).standard_normal(shape[0] * shape[1]), jnp.float32)
    by_edges = transition_matvec(graph, value)
    by_window = jax.jit(lambda g, v: window_matvec(g, *shape, radius)(v))(graph, value)
    np.testing.assert_allclose(np.asarray(by_window), np.asarray(by_edges), rtol=1e-5, atol=1e-6)
    dense = _dense(graph, shape[0] * shape[1]) @ np.asarray(value, np.float64)
    np.testing.assert_allclose(np.asarray(by_window), dense, rtol=1e-5, atol=1e-5)


def test_max_iter_caps_the_loop():
    graph = knn_graph(_random_image((10, 10)), k=4, radius=1)
    _, iterations = propagate(graph, jnp.ones((10, 10)), gamma=0.99, tol=0.0, max_iter=7)
    assert int(iterations) == 7


def test_reward_rules():
    a = jnp.asarray([[[1.0, -3.0, 0.5], [2.0, 1.0, -0.5]]])  # [1, 2, 3]
    np.testing.assert_allclose(reward_from_attribution(a, "sum"), [[-1.5, 2.5]])
    np.testing.assert_allclose(reward_from_attribution(a, "abs_sum"), [[4.5, 3.5]])
    np.testing.assert_allclose(reward_from_attribution(a, "positive_sum"), [[0.0, 2.5]])


def test_propagation_follows_colour_regions():
    # Left half red, right half blue; one rewarded pixel next to the edge on the red side.
    image = np.zeros((16, 16, 3), np.float32)
    image[:, :8, 0] = 0.9
    image[:, 8:, 2] = 0.9
    reward = np.zeros((16, 16), np.float32)
    reward[8, 7] = 1.0
    graph = knn_graph(image, k=8, radius=2, sigma_s=2.0, sigma_c=0.1, color_space="lab")
    value = np.asarray(propagate(graph, reward, gamma=0.9, tol=1e-6)[0])
    # Same spatial distance (2 columns) from the source: red-side pixel gets far more than blue-side.
    assert value[8, 5] > 10 * value[8, 9]
    assert value[8, 6] > 10 * value[8, 8]


# --------------------------------------------------------------------------------------------- graph

def _brute_force_knn(image, k, radius, sigma_s, sigma_c, color_space):
    """Per-pixel loop over the clamped window: the sorted K smallest d^2 of every pixel."""
    h, w, _ = image.shape
    features = np.asarray(color_features(jnp.asarray(image), color_space), np.float64)
    out = np.zeros((h, w, k))
    for y in range(h):
        for x in range(w):
            y0 = min(max(y - radius, 0), h - 2 * radius - 1)
            x0 = min(max(x - radius, 0), w - 2 * radius - 1)
            d2 = [((yy - y) ** 2 + (xx - x) ** 2) / sigma_s ** 2
                  + np.sum((features[yy, xx] - features[y, x]) ** 2) / sigma_c ** 2
                  for yy in range(y0, y0 + 2 * radius + 1) for xx in range(x0, x0 + 2 * radius + 1)
                  if (yy, xx) != (y, x)]
            out[y, x] = np.sort(d2)[:k]
    return out


@pytest.mark.parametrize("k,radius,color_space", [(5, 1, "rgb"), (8, 2, "lab"), (16, 3, "rgb")])
def test_graph_is_the_knn_of_the_window(k, radius, color_space):
    h, w = 11, 9
    image = _random_image((h, w), seed=6)
    graph = knn_graph(image, k=k, radius=radius, sigma_s=1.3, sigma_c=0.2, color_space=color_space)
    n = h * w
    senders, receivers = np.asarray(graph.senders), np.asarray(graph.receivers)
    assert senders.shape == receivers.shape == graph.weights.shape == graph.transition.shape == (n * k,)
    np.testing.assert_array_equal(senders, np.repeat(np.arange(n), k))

    # Exactly K distinct out-edges per node, never to itself, all inside the node's clamped window.
    per_node = receivers.reshape(n, k)
    assert all(len(set(row)) == k for row in per_node)
    assert not np.any(per_node == np.arange(n)[:, None])
    sy, sx = _positions(senders, w)
    ry, rx = _positions(receivers, w)
    y0 = np.clip(sy - radius, 0, h - 2 * radius - 1)
    x0 = np.clip(sx - radius, 0, w - 2 * radius - 1)
    assert np.all((ry >= y0) & (ry <= y0 + 2 * radius) & (rx >= x0) & (rx <= x0 + 2 * radius))

    # The kept neighbours are the K nearest in the joint space, weighted exp(-d^2).
    expected = _brute_force_knn(image, k, radius, 1.3, 0.2, color_space)
    d2 = -np.log(np.asarray(graph.weights, np.float64)).reshape(h, w, k)
    np.testing.assert_allclose(np.sort(d2, axis=-1), expected, rtol=1e-4, atol=1e-4)


def test_rows_of_transition_sum_to_one():
    # Large colour contrasts with a small sigma_c: raw weights underflow, rows must still sum to 1.
    image = np.random.default_rng(7).random((13, 17, 3)).astype(np.float32)
    graph = knn_graph(image, k=8, radius=2, sigma_c=0.02)
    rows = np.asarray(graph.transition).reshape(13 * 17, 8).sum(axis=1)
    np.testing.assert_allclose(rows, 1.0, atol=1e-6)
    assert np.all(np.asarray(graph.transition) >= 0)
    dense = _dense(graph, 13 * 17)
    np.testing.assert_allclose(dense.sum(axis=1), 1.0, atol=1e-6)


@pytest.mark.parametrize("color_space", ["rgb", "lab"])
def test_same_colour_neighbour_weighs_more(color_space):
    # Vertical colour edge between columns 4 and 5; pixel (5, 4) sees (4, 4) above (same colour)
    # and (5, 5) to the right (other colour), both at spatial distance 1.
    image = np.full((10, 10, 3), 0.2, np.float32)
    image[:, 5:] = [0.8, 0.3, 0.1]
    graph = knn_graph(image, k=8, radius=1, sigma_s=1.0, sigma_c=0.5, color_space=color_space)
    w = _dense(graph, 100)
    i, up, right = 5 * 10 + 4, 4 * 10 + 4, 5 * 10 + 5
    assert w[i, up] > 0 and w[i, right] > 0  # K = 8 = the full 3x3 window, both are neighbours
    assert w[i, up] > 2 * w[i, right]
    # With K smaller than the window, the different-colour pixels are the ones dropped.
    graph4 = knn_graph(image, k=4, radius=1, sigma_s=1.0, sigma_c=0.5, color_space=color_space)
    neighbours = set(np.asarray(graph4.receivers).reshape(100, 4)[i].tolist())
    assert neighbours == {4 * 10 + 4, 6 * 10 + 4, 5 * 10 + 3, 4 * 10 + 3}


def test_edges_never_cross_the_border():
    # A border pixel must not wrap around to the other side of the image (flat-index neighbours).
    h, w, radius = 12, 7, 2
    image = np.full((h, w, 3), 0.5, np.float32)
    image[:, 0] = image[:, -1] = 0.9  # left and right columns identical in colour: wrap-around would be "near"
    graph = knn_graph(image, k=16, radius=radius, sigma_s=10.0, sigma_c=0.01)
    sy, sx = _positions(graph.senders, w)
    ry, rx = _positions(graph.receivers, w)
    assert np.all(np.abs(sx - rx) <= 2 * radius) and np.all(np.abs(sy - ry) <= 2 * radius)
    # Corner pixels keep exactly K neighbours inside the image, the nearest ones first.
    corner = np.asarray(graph.receivers).reshape(h * w, 16)[0]
    cy, cx = _positions(corner, w)
    assert np.all((cy <= 2 * radius) & (cx <= 2 * radius))


def test_rgb_to_lab_matches_skimage():
    skcolor = pytest.importorskip("skimage.color")
    rgb = np.random.default_rng(8).random((7, 9, 3)).astype(np.float32)
    rgb[0, 0] = 0.0
    rgb[0, 1] = 1.0
    rgb[0, 2] = 0.02  # the linear segment of the sRGB curve
    np.testing.assert_allclose(np.asarray(rgb_to_lab(rgb)), skcolor.rgb2lab(rgb.astype(np.float64)), atol=2e-3)


# --------------------------------------------------------------------------------------------- meta-method

@pytest.mark.slow
def test_batch_equals_per_image():
    images = np.stack([_random_image((24, 20), seed=s) for s in range(3)])
    attributions = np.random.default_rng(9).standard_normal(images.shape).astype(np.float32)
    config = dict(k=8, radius=2, gamma=0.9, reward="sum", color_space="lab")
    singles = [iprop(images[b:b + 1], attributions[b:b + 1], return_iterations=True, chunk_size=1, **config)
               for b in range(3)]
    # One image at a time (chunk_size=1, the CPU default): bit-identical to per-image calls.
    values, iterations = iprop(images, attributions, return_iterations=True, chunk_size=1, **config)
    assert values.shape == (3, 24, 20) and iterations.shape == (3,)
    for b, (single, single_it) in enumerate(singles):
        np.testing.assert_array_equal(np.asarray(values[b]), np.asarray(single[0]))
        assert int(iterations[b]) == int(single_it[0])
    assert len(set(np.asarray(iterations).tolist())) > 1  # each image stops on its own
    # vmapped chunks compile the kernels for another shape, so float rounding can differ by an ulp and
    # the stopping test can fire one iteration apart: equal within the convergence error
    # gamma / (1 - gamma) * tol * max|r|. The unbatched kernels (segment_sum form) agree likewise.
    tol = IPropConfig().tol
    for chunk_size in (2, 3):
        values, iterations = iprop(images, attributions, return_iterations=True, chunk_size=chunk_size, **config)
        for b, (single, single_it) in enumerate(singles):
            graph = knn_graph(images[b], k=8, radius=2, color_space="lab")
            reward = reward_from_attribution(attributions[b], "sum")
            direct, direct_it = propagate(graph, reward, gamma=0.9)
            atol = 2 * 0.9 / (1 - 0.9) * tol * float(np.max(np.abs(reward)))
            for other, other_it in ((single[0], single_it[0]), (direct, direct_it)):
                np.testing.assert_allclose(np.asarray(values[b]), np.asarray(other), rtol=0, atol=atol)
                assert abs(int(iterations[b]) - int(other_it)) <= 1


@pytest.mark.parametrize("shape", [(224, 224), (48, 80)])
@pytest.mark.slow
def test_full_size_and_non_square_fixed_point(shape):
    h, w = shape
    image = _random_image(shape, seed=10)[None]
    attribution = np.random.default_rng(11).standard_normal((1, h, w, 3)).astype(np.float32)
    cfg = IPropConfig()
    tol = 1e-5
    bound = iteration_bound(cfg.gamma, tol) + 1 + _float32_margin(cfg.gamma, tol)
    values, iterations = iprop(image, attribution, return_iterations=True, tol=tol, max_iter=bound + 1)
    assert values.shape == (1, h, w) and bool(jnp.all(jnp.isfinite(values)))
    assert 1 < int(iterations[0]) <= bound
    # Residual of V = r + gamma P V with an independent (scipy CSR) mat-vec.
    graph = knn_graph(image[0], k=cfg.k, radius=cfg.radius, sigma_s=cfg.sigma_s, sigma_c=cfg.sigma_c,
                      color_space=cfg.color_space)
    p = scipy.sparse.csr_matrix((np.asarray(graph.transition, np.float64),
                                 (np.asarray(graph.senders), np.asarray(graph.receivers))), shape=(h * w, h * w))
    v = np.asarray(values[0], np.float64).reshape(-1)
    r = np.asarray(reward_from_attribution(attribution[0], cfg.reward), np.float64).reshape(-1)
    residual = np.max(np.abs(v - r - cfg.gamma * (p @ v)))
    assert residual <= 1e-4 * np.max(np.abs(r))


@pytest.mark.slow
def test_with_iprop_wraps_any_method():
    def grad_method(logit_fn, images, labels, *, key=None, scale=1.0):
        return scale * jax.grad(lambda x: jnp.sum(logit_fn(x)[:, 0]))(images)

    def logit_fn(x):
        return jnp.stack([jnp.sum(x[..., 0] * x[..., 1], axis=(1, 2)), jnp.sum(x, axis=(1, 2, 3))], -1)

    images = np.stack([_random_image((12, 14), seed=s) for s in range(2)])
    wrapped = with_iprop(grad_method, k=4, radius=1, gamma=0.8)
    assert wrapped.__name__ == "grad_method+iprop" and parse_iprop_name(wrapped.__name__) == ("grad_method", True)
    out = wrapped(logit_fn, images, None, key=jax.random.PRNGKey(0), scale=2.0)
    assert out.shape == images.shape
    expected = iprop(images, grad_method(logit_fn, jnp.asarray(images), None, scale=2.0), k=4, radius=1, gamma=0.8)
    for c in range(3):
        np.testing.assert_allclose(np.asarray(out[..., c]), np.asarray(expected), rtol=1e-6, atol=1e-6)
    assert wrapped.iprop_config == IPropConfig(k=4, radius=1, gamma=0.8)


def test_gamma_zero_control_is_channel_aggregation():
    images = _random_image((10, 12))[None]
    attributions = np.random.default_rng(12).standard_normal((1, 10, 12, 3)).astype(np.float32)
    for rule in ("sum", "abs_sum", "positive_sum"):
        values = iprop(images, attributions, gamma=0.0, reward=rule)
        np.testing.assert_array_equal(np.asarray(values), np.asarray(reward_from_attribution(attributions, rule)))


# --------------------------------------------------------------------------------------------- bad input

def test_bad_input_errors():
    images = _random_image((10, 10))[None]
    attributions = np.zeros_like(images)
    with pytest.raises(ValueError, match="gamma"):
        iprop(images, attributions, gamma=1.0)
    with pytest.raises(ValueError, match="gamma"):
        iprop(images, attributions, gamma=-0.1)
    with pytest.raises(ValueError, match="gamma"):
        propagate(knn_graph(images[0], k=4, radius=1), jnp.zeros((10, 10)), gamma=1.5)
    with pytest.raises(ValueError, match="k must be <= .* 8"):
        iprop(images, attributions, k=9, radius=1)
    with pytest.raises(ValueError, match="k must be"):
        knn_graph(images[0], k=25, radius=2)
    with pytest.raises(ValueError, match="attributions must have the shape of images"):
        iprop(images, np.zeros((1, 10, 9, 3), np.float32))
    with pytest.raises(ValueError, match="attributions must have the shape of images"):
        iprop(images, np.zeros((2, 10, 10, 3), np.float32))
    with pytest.raises(ValueError, match="color_space"):
        iprop(images, attributions, color_space="hsv")
    with pytest.raises(ValueError, match="reward"):
        iprop(images, attributions, reward="max")
    with pytest.raises(ValueError, match="at least 2\\*radius\\+1"):
        iprop(_random_image((6, 10))[None], np.zeros((1, 6, 10, 3), np.float32), radius=3)
    with pytest.raises(ValueError, match="sigma_c"):
        iprop(images, attributions, sigma_c=0.0)
    with pytest.raises(ValueError, match="chunk_size"):
        iprop(images, attributions, chunk_size=0)
    with pytest.raises(TypeError, match="unknown IProp hyperparameter"):
        iprop(images, attributions, neighbours=4)
    with pytest.raises(ValueError, match="reward .* does not match the graph"):
        propagate(knn_graph(images[0], k=4, radius=1), jnp.zeros((7, 10)), gamma=0.5)
    with pytest.raises(ValueError, match="images"):
        iprop(images * 2.0, attributions)
    with pytest.raises(ValueError, match="radius=1 does not match the graph"):
        propagate(knn_graph(images[0], k=8, radius=2), jnp.zeros((10, 10)), gamma=0.5, radius=1)
