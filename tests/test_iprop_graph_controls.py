"""IProp's structure controls (random graphs, spatial-only / colour-only similarity, uniform weights),
named presets, the settings check a run engine calls before writing, and maps too large for IProp."""

from __future__ import annotations

import json
import pathlib

import jax
import numpy as np
import pytest

from la_iprop.iprop import (
    PRESETS,
    SIMILARITIES,
    IPropConfig,
    check_iprop_settings,
    iprop,
    knn_graph,
    pixel_graph,
    preset_hparams,
    random_graph,
    random_receivers,
    resolve_config,
    reward_from_attribution,
    to_dense,
    with_iprop,
)
from la_iprop.iprop.graph import color_features
from la_iprop.precision import precision_scope


def _image(shape, seed=0):
    # Piecewise-constant blocks plus noise: colour structure and no exact distance ties.
    rng = np.random.default_rng(seed)
    h, w = shape
    blocks = rng.random((h // 4 + 1, w // 4 + 1, 3))
    image = np.repeat(np.repeat(blocks, 4, 0), 4, 1)[:h, :w] + 0.05 * rng.random((h, w, 3))
    return np.clip(image, 0, 1).astype(np.float32)


def _window_start(position, size, radius):
    return np.clip(position - radius, 0, size - 2 * radius - 1)


def _check_edges(graph, h, w, k, radius=None):
    """K distinct out-edges per node, grouped by sender, no self-loops, (radius) inside the clamped window,
    rows of P summing to 1."""
    n = h * w
    senders, receivers = np.asarray(graph.senders), np.asarray(graph.receivers)
    assert senders.shape == receivers.shape == graph.weights.shape == graph.transition.shape == (n * k,)
    np.testing.assert_array_equal(senders, np.repeat(np.arange(n), k))
    per_node = receivers.reshape(n, k)
    assert per_node.min() >= 0 and per_node.max() < n
    assert all(len(set(row)) == k for row in per_node.tolist())
    assert not np.any(per_node == np.arange(n)[:, None])
    if radius is not None:
        sy, sx, ry, rx = senders // w, senders % w, receivers // w, receivers % w
        y0, x0 = _window_start(sy, h, radius), _window_start(sx, w, radius)
        assert np.all((ry >= y0) & (ry <= y0 + 2 * radius) & (rx >= x0) & (rx <= x0 + 2 * radius))
    transition = np.asarray(graph.transition, np.float64).reshape(n, k)
    assert np.all(transition >= 0)
    np.testing.assert_allclose(transition.sum(axis=1), 1.0, atol=1e-6)


# ------------------------------------------------------------------------------------------ random graphs

@pytest.mark.parametrize("graph,shape,k,radius", [("random_window", (9, 13), 8, 1), ("random_window", (16, 11), 5, 2),
                                                  ("random_window", (7, 7), 48, 3), ("random_image", (9, 13), 8, 1),
                                                  ("random_image", (5, 6), 29, 2), ("random_image", (12, 10), 40, 1)])
@pytest.mark.slow
def test_random_graph_structure(graph, shape, k, radius):
    h, w = shape
    g = random_graph(_image(shape, seed=k), graph=graph, k=k, radius=radius, graph_seed=3)
    _check_edges(g, h, w, k, radius if graph == "random_window" else None)
    # Uniform weights (the default for random graphs): w = 1, P = 1/K exactly.
    np.testing.assert_array_equal(np.asarray(g.weights), 1.0)
    np.testing.assert_allclose(np.asarray(g.transition), 1.0 / k, rtol=1e-7)
    np.testing.assert_array_equal(np.asarray(g.receivers).reshape(h * w, k),
                                  np.asarray(random_receivers(h, w, graph=graph, k=k, radius=radius, seed=3)))
    if k == (2 * radius + 1) ** 2 - 1 and graph == "random_window":   # the whole window: the knn graph's edges
        knn = knn_graph(_image(shape), k=k, radius=radius)
        assert [set(r) for r in np.asarray(g.receivers).reshape(h * w, k).tolist()] == \
               [set(r) for r in np.asarray(knn.receivers).reshape(h * w, k).tolist()]


@pytest.mark.parametrize("graph", ["random_window", "random_image"])
def test_random_graph_is_seeded_and_independent_of_the_image_and_precision(graph):
    shape, k = (14, 12), 6
    first = random_graph(_image(shape, seed=0), graph=graph, k=k, radius=2, graph_seed=11)
    again = random_graph(_image(shape, seed=5), graph=graph, k=k, radius=2, graph_seed=11)   # another image
    np.testing.assert_array_equal(np.asarray(first.receivers), np.asarray(again.receivers))
    with precision_scope("float64"):
        wide = random_graph(_image(shape, seed=0), graph=graph, k=k, radius=2, graph_seed=11)
        assert wide.transition.dtype == np.float64
    np.testing.assert_array_equal(np.asarray(first.receivers), np.asarray(wide.receivers))
    other = random_graph(_image(shape, seed=0), graph=graph, k=k, radius=2, graph_seed=12)
    assert np.mean(np.asarray(first.receivers) != np.asarray(other.receivers)) > 0.3
    big = random_receivers(*shape, graph=graph, k=k, radius=2, seed=2 ** 64 - 1)   # the 64-bit range is usable
    assert not np.array_equal(np.asarray(big), np.asarray(random_receivers(*shape, graph=graph, k=k, radius=2,
                                                                         seed=2 ** 32 - 1)))


def test_random_window_draws_uniformly_among_the_window_candidates():
    # Interior pixels (centred windows): each of the 24 other slots is kept with probability K / 24.
    h = w = 40
    radius, k = 2, 8
    receivers = np.asarray(random_receivers(h, w, graph="random_window", k=k, radius=radius, seed=0))
    y, x = np.divmod(np.arange(h * w), w)
    interior = (y >= radius) & (y < h - radius) & (x >= radius) & (x < w - radius)
    dy = receivers[interior] // w - y[interior, None]
    dx = receivers[interior] % w - x[interior, None]
    counts = np.zeros((5, 5))
    np.add.at(counts, (dy.ravel() + 2, dx.ravel() + 2), 1)
    assert counts[2, 2] == 0
    others = np.delete(counts.ravel(), 12)
    p, m = k / 24, interior.sum()
    assert np.all(np.abs(others - m * p) < 5 * np.sqrt(m * p * (1 - p))), others


def test_random_image_draws_uniformly_over_the_other_pixels():
    # One node across 600 seeds: each of the 24 other pixels of a 5x5 image is kept with probability 3 / 24.
    k, seeds = 3, 600
    counts = np.zeros(25)
    for seed in range(seeds):
        row = np.asarray(random_receivers(5, 5, graph="random_image", k=k, seed=seed))[12]   # the centre pixel
        counts[row] += 1
    assert counts[12] == 0
    p = k / 24
    others = np.delete(counts, 12)
    assert np.all(np.abs(others - seeds * p) < 5 * np.sqrt(seeds * p * (1 - p))), others
    # And not local: on a 30x30 image few edges stay within a 5x5 window (uniform: about 24 / 899).
    receivers = np.asarray(random_receivers(30, 30, graph="random_image", k=4, seed=1))
    y, x = np.divmod(np.arange(900), 30)
    near = (np.abs(receivers // 30 - y[:, None]) <= 2) & (np.abs(receivers % 30 - x[:, None]) <= 2)
    assert near.mean() < 0.06


# ------------------------------------------------------------------------------------------ similarity and weights

def _brute_d2(image, senders, receivers, sigma_s, sigma_c, color_space, similarity):
    h, w, _ = image.shape
    features = np.asarray(color_features(image, color_space), np.float64).reshape(h * w, 3)
    spatial = ((senders // w - receivers // w) ** 2 + (senders % w - receivers % w) ** 2) / sigma_s ** 2
    colour = np.sum((features[senders] - features[receivers]) ** 2, axis=-1) / sigma_c ** 2
    return {"joint": spatial + colour, "spatial": spatial, "color": colour}[similarity]


@pytest.mark.parametrize("color_space", ["rgb", "lab"])
def test_spatial_only_is_the_knn_graph_of_a_constant_image(color_space):
    image = _image((11, 13), seed=2)
    spatial = knn_graph(image, k=8, radius=2, sigma_s=1.7, sigma_c=0.1, color_space=color_space, similarity="spatial")
    constant = knn_graph(np.full_like(image, 0.4), k=8, radius=2, sigma_s=1.7, sigma_c=0.1, color_space=color_space)
    for a, b in zip(spatial, constant, strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # sigma_c and the colours do not matter.
    other = knn_graph(_image((11, 13), seed=9), k=8, radius=2, sigma_s=1.7, sigma_c=3.0, color_space=color_space,
                      similarity="spatial")
    np.testing.assert_array_equal(np.asarray(other.transition), np.asarray(spatial.transition))
    np.testing.assert_array_equal(np.asarray(other.receivers), np.asarray(spatial.receivers))
    _check_edges(spatial, 11, 13, 8, 2)


@pytest.mark.parametrize("color_space", ["rgb", "lab"])
def test_colour_only_weights_do_not_depend_on_position(color_space):
    h, w, k, radius = 10, 12, 10, 2
    image = _image((h, w), seed=3)
    graph = knn_graph(image, k=k, radius=radius, sigma_s=0.3, sigma_c=0.2, color_space=color_space,
                      similarity="color")
    _check_edges(graph, h, w, k, radius)
    senders, receivers = np.asarray(graph.senders), np.asarray(graph.receivers)
    d2 = _brute_d2(image, senders, receivers, 0.3, 0.2, color_space, "color")
    np.testing.assert_allclose(-np.log(np.asarray(graph.weights, np.float64)), d2, rtol=1e-4, atol=1e-4)
    # The K kept are the K nearest in colour among the window's candidates: every dropped candidate is no nearer.
    features = np.asarray(color_features(image, color_space), np.float64).reshape(h * w, 3)
    for node in range(0, h * w, 7):
        y, x = divmod(node, w)
        y0, x0 = _window_start(y, h, radius), _window_start(x, w, radius)
        window = [yy * w + xx for yy in range(y0, y0 + 2 * radius + 1) for xx in range(x0, x0 + 2 * radius + 1)]
        dropped = set(window) - set(receivers[node * k:(node + 1) * k]) - {node}
        kept_max = d2[node * k:(node + 1) * k].max()
        assert all(np.sum((features[j] - features[node]) ** 2) / 0.2 ** 2 >= kept_max - 1e-4 for j in dropped)
    # sigma_s plays no part.
    wide = knn_graph(image, k=k, radius=radius, sigma_s=50.0, sigma_c=0.2, color_space=color_space,
                     similarity="color")
    np.testing.assert_array_equal(np.asarray(wide.transition), np.asarray(graph.transition))


def test_colour_only_moves_a_same_coloured_far_pixel_ahead_of_a_near_one():
    # Pixel (5, 5): a same-coloured pixel 2 columns away beats a different-coloured direct neighbour with
    # colour only; with space only the direct neighbour is the nearer.
    image = np.full((11, 11, 3), 0.5, np.float32)
    image[5, 6] = [0.9, 0.1, 0.1]
    node, near, far = 5 * 11 + 5, 5 * 11 + 6, 5 * 11 + 7
    colour = np.asarray(to_dense(knn_graph(image, k=24, radius=2, similarity="color"), 121))
    spatial = np.asarray(to_dense(knn_graph(image, k=24, radius=2, similarity="spatial"), 121))
    assert colour[node, far] > 10 * colour[node, near]
    assert spatial[node, near] > 10 * spatial[node, far]


def test_uniform_weights_keep_the_knn_edges():
    image = _image((9, 10), seed=4)
    similarity = knn_graph(image, k=6, radius=1, sigma_c=0.2)
    uniform = knn_graph(image, k=6, radius=1, sigma_c=0.2, edge_weights="uniform")
    np.testing.assert_array_equal(np.asarray(uniform.receivers), np.asarray(similarity.receivers))
    np.testing.assert_allclose(np.asarray(uniform.transition), 1 / 6, rtol=1e-7)
    auto = knn_graph(image, k=6, radius=1, sigma_c=0.2, edge_weights="auto")
    np.testing.assert_array_equal(np.asarray(auto.transition), np.asarray(similarity.transition))


@pytest.mark.parametrize("graph", ["random_window", "random_image"])
@pytest.mark.parametrize("similarity", SIMILARITIES)
def test_random_graph_with_similarity_weights(graph, similarity):
    h, w, k = 10, 9, 6
    image = _image((h, w), seed=5)
    sigma_s = 1.5 if graph == "random_window" else 6.0
    g = random_graph(image, graph=graph, k=k, radius=2, graph_seed=4, sigma_s=sigma_s, sigma_c=0.3,
                     similarity=similarity, edge_weights="similarity")
    _check_edges(g, h, w, k, 2 if graph == "random_window" else None)
    uniform = random_graph(image, graph=graph, k=k, radius=2, graph_seed=4)
    np.testing.assert_array_equal(np.asarray(g.receivers), np.asarray(uniform.receivers))   # same draw
    senders, receivers = np.asarray(g.senders), np.asarray(g.receivers)
    d2 = _brute_d2(image, senders, receivers, sigma_s, 0.3, "rgb", similarity)
    np.testing.assert_allclose(np.asarray(g.weights, np.float64), np.exp(-d2), rtol=1e-5, atol=1e-30)
    expected = np.exp(-d2).reshape(h * w, k)
    expected /= expected.sum(axis=1, keepdims=True)
    np.testing.assert_allclose(np.asarray(g.transition).reshape(h * w, k), expected, rtol=1e-4, atol=1e-7)


# ------------------------------------------------------------------------------------------ the fixed point

_SETTINGS = [dict(graph="knn"), dict(graph="knn", similarity="spatial"), dict(graph="knn", similarity="color"),
             dict(graph="knn", edge_weights="uniform"), dict(graph="random_window", graph_seed=1),
             dict(graph="random_window", edge_weights="similarity", sigma_c=0.3),
             dict(graph="random_image", graph_seed=2), dict(graph="random_image", k=30),
             dict(graph="random_image", edge_weights="similarity", similarity="color", sigma_c=0.5)]


@pytest.mark.parametrize("settings", _SETTINGS, ids=lambda s: "-".join(f"{v}" for v in s.values()))
@pytest.mark.slow
def test_float64_fixed_point_equals_the_dense_solve(settings):
    h, w, gamma = 12, 14, 0.9
    images = np.stack([_image((h, w), seed=s) for s in range(2)])
    attributions = np.random.default_rng(6).standard_normal(images.shape)
    hp = {"k": 8, "radius": 2, "gamma": gamma, "reward": "sum", **settings}
    values, iterations = iprop(images, attributions, precision="float64", tol=1e-13, max_iter=2000,
                               return_iterations=True, **hp)
    assert values.dtype == np.float64 and np.all(np.asarray(iterations) < 2000)   # converged, not capped
    config = IPropConfig(**hp)
    for b in range(2):
        with precision_scope("float64"):
            p = np.asarray(to_dense(pixel_graph(images[b], config), h * w), np.float64)
            r = np.asarray(reward_from_attribution(attributions[b], "sum"), np.float64).reshape(-1)
        np.testing.assert_allclose(p.sum(axis=1), 1.0, atol=1e-12)
        assert np.count_nonzero(np.diag(p)) == 0
        exact = np.linalg.solve(np.eye(h * w) - gamma * p, r)
        np.testing.assert_allclose(np.asarray(values[b]).reshape(-1), exact, rtol=0, atol=1e-10 * np.abs(exact).max())
    if settings.get("graph_seed") or settings.get("edge_weights") == "uniform":   # a few: each is a compile
        # float32 (the default) agrees within its rounding and tolerance.
        single = iprop(images.astype(np.float32), attributions.astype(np.float32), tol=1e-6, **hp)
        np.testing.assert_allclose(np.asarray(single), np.asarray(values), rtol=0, atol=1e-4 * np.abs(values).max())


@pytest.mark.parametrize("graph", ["random_window", "random_image"])
@pytest.mark.slow
def test_random_graph_results_do_not_depend_on_the_batch(graph):
    images = np.stack([_image((10, 12), seed=s) for s in range(3)])
    attributions = np.random.default_rng(7).standard_normal(images.shape).astype(np.float32)
    hp = dict(graph=graph, k=6, radius=1, gamma=0.8, reward="sum", graph_seed=5)
    batch = np.asarray(iprop(images, attributions, chunk_size=1, **hp))
    for b in (2, 0):   # each image alone, in another order
        single = np.asarray(iprop(images[b:b + 1], attributions[b:b + 1], chunk_size=1, **hp))
        np.testing.assert_array_equal(batch[b], single[0])
    vmapped = np.asarray(iprop(images, attributions, chunk_size=3, **hp))
    np.testing.assert_allclose(vmapped, batch, rtol=0, atol=2 * 0.8 / 0.2 * 1e-4 * 3 * np.abs(attributions).max())


def test_jit_and_with_iprop_run_the_controls():
    images = np.stack([_image((10, 10), seed=s) for s in range(2)])
    maps = np.random.default_rng(8).standard_normal(images.shape).astype(np.float32)
    hp = dict(graph="random_image", k=4, gamma=0.8, reward="sum")
    eager = np.asarray(iprop(images, maps, **hp))
    traced = np.asarray(jax.jit(lambda x, a: iprop(x, a, **hp))(images, maps))
    np.testing.assert_allclose(traced, eager, rtol=1e-6, atol=1e-6)
    wrapped = with_iprop(lambda logit_fn, x, labels, *, key=None: maps, **hp)
    out = np.asarray(wrapped(None, images, None))
    np.testing.assert_allclose(out[..., 1], eager, rtol=1e-6, atol=1e-6)
    assert wrapped.iprop_config == IPropConfig(**hp)


# ------------------------------------------------------------------------------------------ identity

def test_config_identity_is_json_and_tags_name_the_controls():
    default = IPropConfig()
    assert default.tag() == "k16_r2_ss1_sc0.1_rgb_g0.99_positive_sum_tol0.0001_it1000"   # unchanged by the controls
    settings = [dict(), dict(graph="random_window"), dict(graph="random_window", graph_seed=7),
                dict(graph="random_image"), dict(graph="random_window", edge_weights="similarity"),
                dict(edge_weights="uniform"), dict(similarity="spatial"), dict(similarity="color")]
    controls = {"graph", "graph_seed", "similarity", "edge_weights"}
    tags = set()
    for hp in settings:
        config = IPropConfig(**hp)
        for full in (False, True):
            record = json.loads(json.dumps(config.as_dict(full=full), allow_nan=False))
            assert IPropConfig(**record) == config
            # The controls are recorded whenever one is set (all four), and always with full=True.
            assert set(record) >= controls if (hp or full) else not set(record) & controls
        tags.add(config.tag())
    assert len(tags) == len(settings)
    # The paper's graph keeps the record it had before the controls existed (stored runs still resume).
    assert set(default.as_dict()) == {"k", "radius", "sigma_s", "sigma_c", "color_space", "gamma", "reward", "tol",
                                      "max_iter"}
    # Same computation, same tag: the seed of a knn graph and "auto" spelled out.
    assert IPropConfig(graph_seed=3).tag() == default.tag() == IPropConfig(edge_weights="similarity").tag()
    assert IPropConfig(graph="random_image", edge_weights="uniform").tag() == IPropConfig(graph="random_image").tag()
    # numpy numbers are normalised (JSON and hashing).
    config = IPropConfig(k=np.int64(8), graph_seed=np.uint32(3), gamma=np.float32(0.5))
    assert type(config.k) is int and type(config.graph_seed) is int and type(config.gamma) is float
    json.dumps(config.as_dict())


# ------------------------------------------------------------------------------------------ presets

def test_the_rise_preset_is_the_setting_its_tuning_study_chose():
    """PRESETS["rise"] is the chosen setting recorded in results/iprop_tuning_rise.json (the study's evidence)."""
    record = json.loads((pathlib.Path(__file__).resolve().parents[1] / "results" / "iprop_tuning_rise.json").read_text())
    assert record["study"]["protocol"] == "rise" and record["tuning"]["criterion"] == "dir"
    chosen = record["tuning"]["chosen"]
    assert {k: chosen[k] for k in PRESETS["rise"]} == PRESETS["rise"]
    assert IPropConfig.from_preset("rise") == IPropConfig(**chosen)


def test_presets():
    assert "la" in PRESETS and "rise" in PRESETS
    assert IPropConfig.from_preset("la") == IPropConfig() == resolve_config(preset="la")
    fields = set(IPropConfig().as_dict(full=True))
    for name, hparams in PRESETS.items():
        assert set(hparams) <= fields, name
        IPropConfig.from_preset(name)                      # every preset is a valid setting
        json.dumps(hparams, allow_nan=False)
    assert preset_hparams("la") == PRESETS["la"] and preset_hparams("la") is not PRESETS["la"]
    assert resolve_config(preset="la", gamma=0.5) == IPropConfig(gamma=0.5)
    assert resolve_config(config=IPropConfig(k=8), gamma=0.5) == IPropConfig(k=8, gamma=0.5)
    images = _image((8, 8))[None]
    maps = np.random.default_rng(9).standard_normal(images.shape).astype(np.float32)
    np.testing.assert_array_equal(np.asarray(iprop(images, maps, preset="la", k=4, radius=1)),
                                  np.asarray(iprop(images, maps, k=4, radius=1)))
    assert with_iprop(lambda *a, **k: maps, preset="la", gamma=0.5).iprop_config == IPropConfig(gamma=0.5)
    with pytest.raises(ValueError, match=r"^preset must be one of \['la'.*\], got 'no_such'$"):
        iprop(images, maps, preset="no_such")
    with pytest.raises(ValueError, match="preset must be one of"):
        with_iprop("sm", preset=3)
    with pytest.raises(ValueError, match="either preset= or config="):
        resolve_config(preset="la", config=IPropConfig())
    with pytest.raises(TypeError, match="unknown IProp hyperparameter"):
        IPropConfig.from_preset("la", neighbours=3)


# ------------------------------------------------------------------------------------------ bad values

_BAD = [
    (dict(graph="grid"), ValueError, "graph must be one of \\['knn', 'random_image', 'random_window'\\], got 'grid'"),
    (dict(graph=None), ValueError, "graph must be one of"),
    (dict(graph_seed=-1), ValueError, "graph_seed must be an integer in \\[0, 2\\*\\*64\\), got -1"),
    (dict(graph_seed=2 ** 64), ValueError, "graph_seed must be an integer in \\[0, 2\\*\\*64\\)"),
    (dict(graph_seed=1.5), TypeError, "graph_seed must be an integer"),
    (dict(graph_seed=True), TypeError, "graph_seed must be an integer"),
    (dict(similarity="colour"), ValueError,
     "similarity must be one of \\['color', 'joint', 'spatial'\\], got 'colour'"),
    (dict(edge_weights="none"), ValueError, "edge_weights must be one of \\['auto', 'similarity', 'uniform'\\]"),
    (dict(sigma_c=float("inf")), ValueError, "sigma_c must be a finite number, got inf .*similarity='spatial'"),
    (dict(sigma_s=float("inf")), ValueError, "sigma_s must be a finite number, got inf .*similarity='color'"),
    (dict(sigma_s=float("nan")), ValueError, "sigma_s must be"),
    (dict(graph="random_window", k=9, radius=1), ValueError, "k must be <= \\(2\\*radius\\+1\\)\\*\\*2 - 1 = 8"),
]


@pytest.mark.parametrize("hp,error,match", _BAD, ids=lambda v: str(v)[:40])
def test_bad_values_are_one_line_errors_naming_the_argument(hp, error, match):
    images = _image((8, 8))[None]
    for call in (lambda: IPropConfig(**hp), lambda: iprop(images, np.zeros_like(images), **hp),
                 lambda: check_iprop_settings((8, 8), **hp), lambda: with_iprop("sm", **hp)):
        with pytest.raises(error, match=match) as info:
            call()
        assert "\n" not in str(info.value)


def test_random_image_allows_more_neighbours_than_a_window():
    # The window bound does not apply; the image's pixel count does.
    assert IPropConfig(graph="random_image", k=30, radius=1).k == 30
    images = _image((4, 4))[None]
    assert iprop(images, np.ones_like(images), graph="random_image", k=15, gamma=0.5).shape == (1, 4, 4)
    with pytest.raises(ValueError, match="^k must be <= height\\*width - 1 = 15 .* got k=16$"):
        iprop(images, np.ones_like(images), graph="random_image", k=16, gamma=0.5)


# ------------------------------------------------------------------------------------------ check_iprop_settings

_SIZE_CASES = [   # (image shape, settings) that are wrong for that size, or right
    ((6, 10), dict(radius=3)),                                     # window larger than the image
    ((10, 6), dict(radius=3, k=8)),
    ((6, 10), dict(graph="random_window", radius=3, k=8)),
    ((4, 4), dict(graph="random_image", k=16)),                     # K > H*W - 1
    ((8, 8), dict(sigma_c=1e-30)),                                  # d^2 overflows float32
    ((8, 8), dict(sigma_s=1e-25, similarity="spatial")),
    ((300, 300), dict(graph="random_image", edge_weights="similarity", sigma_s=1e-17)),  # the diagonal
    ((8, 8), dict(k=25, radius=2)),                                 # not size-dependent
    ((8, 8), dict(gamma=1.0)),
    ((8, 8), dict(reward="max")),
    ((8, 8), dict(neighbours=3)),
    ((8, 8), dict(preset="no_such")),
    ((8, 8), dict(tol=float("inf"))),
    # valid: no error from either
    ((6, 10), dict(radius=3, gamma=0.0)),                           # gamma = 0 builds no graph
    ((5, 5), dict(radius=2, k=24)),
    ((8, 8), dict(sigma_c=1e-30, similarity="spatial")),            # the unused term is not checked
    ((300, 300), dict(graph="random_image", sigma_s=1e-17)),        # uniform weights: no distances
    ((8, 8), dict(preset="la", k=4)),
]


@pytest.mark.parametrize("shape,hp", _SIZE_CASES, ids=lambda v: str(v)[:40])
@pytest.mark.slow
def test_check_iprop_settings_agrees_with_iprop(shape, hp):
    def outcome(call):
        try:
            result = call()
        except (TypeError, ValueError) as err:
            assert "\n" not in str(err)
            return type(err), str(err)
        return result

    checked = outcome(lambda: check_iprop_settings(shape, **hp))
    checked_batch = outcome(lambda: check_iprop_settings((2, *shape, 3), **hp))
    if isinstance(checked, IPropConfig):
        assert checked_batch == checked == resolve_config(**hp)
        if shape[0] * shape[1] <= 100:   # the big cases would only be slow: their settings are checked above
            images = _image(shape)[None]
            assert iprop(images, np.ones_like(images), **hp).shape == (1, *shape)
        return
    assert checked_batch == checked
    if shape[0] * shape[1] <= 100:
        images = _image(shape)[None]
        assert outcome(lambda: iprop(images, np.ones_like(images), **hp)) == checked
        assert outcome(lambda: iprop(images, np.ones_like(images), precision="float32", **hp)) == checked


def test_check_iprop_settings_arguments():
    assert check_iprop_settings((8, 8, 3)) == IPropConfig()
    assert check_iprop_settings((8, 8), sigma_c=1e-30, precision="float64") == IPropConfig(sigma_c=1e-30)
    with pytest.raises(ValueError, match="sigma_c=1e-30 is too small for float32"):
        check_iprop_settings((8, 8), sigma_c=1e-30, precision="float32")
    with pytest.raises(ValueError, match="precision must be one of"):
        check_iprop_settings((8, 8), precision="float16")
    for bad in [(8,), (8, 8, 4), (1, 8, 8, 1), (0, 8), (8, -1), (8.0, 8), (8, True), (1, 2, 8, 8, 3)]:
        with pytest.raises(ValueError, match="^image_shape must be \\(height, width\\)"):
            check_iprop_settings(bad)
    with pytest.raises(TypeError, match="^image_shape must be a tuple"):
        check_iprop_settings(8)


# ------------------------------------------------------------------------------------------ magnitudes (issue 29)

@pytest.mark.slow
def test_maps_that_overflow_iprop_are_one_line_errors_naming_attributions():
    images = np.stack([_image((8, 8), seed=s) for s in range(2)])
    small = np.random.default_rng(10).standard_normal(images.shape).astype(np.float32)
    huge = small.copy()
    huge[1] = 2e38   # finite in float32; V (and for gamma = 0 the channel sum, 6e38) is not
    cases = [
        (dict(k=4, radius=1), huge, "attributions too large for IProp in float32: .*images \\[1\\].*"
                                    "precision='float64'"),
        (dict(k=4, radius=1, gamma=0.0), huge, "attributions too large for IProp in float32"),
        (dict(k=4, radius=1, precision="float64"), np.full(images.shape, 1e306), "attributions too large for IProp "
                                                                                  "in float64: .*rescale them$"),
        (dict(k=4, radius=1), np.full(images.shape, 1e300), "attributions contains infinite values .*fit in "
                                                            "float32"),
    ]
    for hp, maps, match in cases:
        with pytest.raises(ValueError, match=match) as info:
            iprop(images, maps, **hp)
        assert "\n" not in str(info.value)
    # Values just inside the range pass (the computation is scaled by a power of two internally).
    assert np.isfinite(np.asarray(iprop(images, small * np.float32(1e35), k=4, radius=1))).all()
    wrapped = with_iprop(lambda logit_fn, x, labels, *, key=None: huge, k=4, radius=1)
    with pytest.raises(ValueError, match="^<lambda>\\+iprop: attributions too large for IProp") as info:
        wrapped(None, images, None)
    assert "\n" not in str(info.value)
