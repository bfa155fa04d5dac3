"""IProp: ms per image for the graph and the propagation, against a scipy.sparse CSR reference.

    python scripts/benchmark.py iprop               # 224x224 la1000 images, batch 1 and 8
    python scripts/benchmark.py iprop --quick       # batch 1, fewer repeats

The reference computes the same fixed point ``V = r + gamma P V`` with the same stopping rule
by mat-vec iteration with a ``scipy.sparse`` CSR matrix built from the same edges; the
JSON reports both timings and the relative max difference of the two ``V``.
"""

from __future__ import annotations

import functools
import os
import pathlib
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags
from bench_common import define_shared, refuse, time_call

from la_iprop.iprop import IPropConfig, iprop, knn_graph, propagate, reward_from_attribution

LA1000 = pathlib.Path(os.environ.get("LA_IPROP_SHARED", pathlib.Path(__file__).resolve().parents[2] / "shared"))
LA1000 = LA1000 / "data" / "la1000" / "images"


_IPROP_SETTINGS = (("k", flags.DEFINE_integer), ("radius", flags.DEFINE_integer), ("sigma_s", flags.DEFINE_float),
                   ("sigma_c", flags.DEFINE_float), ("color_space", flags.DEFINE_string),
                   ("gamma", flags.DEFINE_float), ("reward", flags.DEFINE_string), ("tol", flags.DEFINE_float))
# The flags this subcommand reads (scripts/benchmark.py refuses the other subcommands' flags with it).
FLAG_NAMES = ("batch", "size", "repeats", *(name for name, _ in _IPROP_SETTINGS), "max_iter")


def define_flags() -> None:
    define_shared("batch", "size", "repeats", "max_iter")
    for name, definer in _IPROP_SETTINGS:
        definer(name, None, "iprop: IProp setting (default: the library default).")


def _images(batch: int, size: tuple[int, int]) -> np.ndarray:
    """la1000 images when available (real colour structure), else smooth random images."""
    h, w = size
    if LA1000.is_dir() and (h, w) == (224, 224):
        from PIL import Image
        return np.stack([np.asarray(Image.open(LA1000 / f"{i}.png").convert("RGB"), np.float32) / 255.0
                         for i in range(batch)])
    rng = np.random.default_rng(0)
    coarse = rng.random((batch, h // 8 + 1, w // 8 + 1, 3))
    return np.repeat(np.repeat(coarse, 8, 1), 8, 2)[:, :h, :w].astype(np.float32)


def _attributions(images: np.ndarray) -> np.ndarray:
    # A stand-in for a saliency map: signed, spatially correlated, noisy (no model needed).
    rng = np.random.default_rng(1)
    return (images - images.mean(axis=(1, 2), keepdims=True) + 0.3 * rng.standard_normal(images.shape)
            ).astype(np.float32)


def scipy_fixed_point(graph, reward: np.ndarray, *, gamma: float, tol: float, max_iter: int,
                      dtype=np.float64) -> tuple[np.ndarray, int, float, float]:
    """``(V, iterations, build_seconds, iterate_seconds)`` by CSR mat-vec iteration, same stopping rule."""
    import scipy.sparse
    n = reward.size
    start = time.perf_counter()
    p = scipy.sparse.csr_matrix((np.asarray(graph.transition, dtype),
                                 (np.asarray(graph.senders), np.asarray(graph.receivers))), shape=(n, n))
    build = time.perf_counter() - start
    r = np.asarray(reward, dtype).reshape(-1)
    threshold = tol * np.max(np.abs(r))
    start = time.perf_counter()
    v, iterations = r, 0
    while iterations < max_iter:
        new = r + gamma * (p @ v)
        iterations += 1
        delta = np.max(np.abs(new - v))
        v = new
        if delta <= threshold:
            break
    return v.reshape(reward.shape), iterations, build, time.perf_counter() - start


def run(args) -> dict:
    overrides = {k: getattr(args, k) for k in ("k", "radius", "sigma_s", "sigma_c", "color_space", "gamma",
                                               "reward", "tol", "max_iter") if getattr(args, k, None) is not None}
    config = IPropConfig().replace(**overrides)
    repeats = 3 if args.quick else (args.repeats or 9)
    batches = [1] if args.quick else (args.batch or [1, 8])
    if args.size is not None and len(args.size) not in (1, 2):
        refuse(f"--size: iprop takes H,W or one side, got {','.join(map(str, args.size))}")
    size = (224, 224) if args.size is None else (args.size[0], args.size[-1])
    graph_fn = jax.jit(lambda x: knn_graph(x, k=config.k, radius=config.radius, sigma_s=config.sigma_s,
                                           sigma_c=config.sigma_c, color_space=config.color_space))
    prop_fns = {  # the two equal forms of P V: edge-list segment_sum, and shifted copies (what iprop uses)
        form: jax.jit(lambda g, r, radius=radius: propagate(g, r, gamma=config.gamma, tol=config.tol,
                                                            max_iter=config.max_iter, radius=radius))
        for form, radius in (("segment_sum", None), ("window", config.radius))}
    out = {"config": config.as_dict(), "size": list(size),
           "timing": "[median, min] ms per image over repeats, compiled; min is the least noisy on a shared machine"}

    # One image: graph and propagation separately, in rounds interleaved with the scipy.sparse reference
    # (CSR mat-vec iteration, same stopping rule) so that all see the same machine load.
    image = jnp.asarray(_images(1, size)[0])
    reward = reward_from_attribution(jnp.asarray(_attributions(np.asarray(image)[None])[0]), config.reward)
    graph = graph_fn(image)
    values = {form: fn(graph, reward) for form, fn in prop_fns.items()}
    reward_np = np.asarray(reward)
    times: dict[str, list[float]] = {name: [] for name in ["graph", *prop_fns, "scipy_float32", "scipy_float64"]}
    scipy_runs = {}
    for _ in range(max(repeats, 5)):
        times["graph"].append(time_call(functools.partial(graph_fn, image), repeats=1))
        for form, fn in prop_fns.items():
            times[form].append(time_call(functools.partial(fn, graph, reward), repeats=1))
        for dtype in (np.float32, np.float64):
            scipy_runs[dtype] = scipy_fixed_point(graph, reward_np, gamma=config.gamma, tol=config.tol,
                                                  max_iter=config.max_iter, dtype=dtype)
            times[f"scipy_{np.dtype(dtype).name}"].append(scipy_runs[dtype][3])
    figures = {name: [1e3 * float(np.median(t)), 1e3 * float(np.min(t))] for name, t in times.items()}
    out["single_image_ms"] = {"graph": figures["graph"],
                              **{f"propagate_{form}": figures[form] for form in prop_fns},
                              "graph_plus_propagate_window": [a + b for a, b in zip(figures["graph"],
                                                                                    figures["window"], strict=True)],
                              "scipy_csr_iterate_float32": figures["scipy_float32"],
                              "scipy_csr_iterate_float64": figures["scipy_float64"]}
    out["iterations"] = {form: int(values[form][1]) for form in prop_fns}
    out["scipy_reference"] = {}
    for dtype, (v_ref, its, build, _) in scipy_runs.items():
        out["scipy_reference"][np.dtype(dtype).name] = {
            "csr_build_ms": 1e3 * build, "iterations": its,
            "rel_max_diff_vs_jax": {form: float(np.max(np.abs(np.asarray(v[0], np.float64) - v_ref))
                                                / np.max(np.abs(v_ref))) for form, v in values.items()}}
    out["propagate_speedup_vs_scipy_float32"] = {  # median over median; scipy excludes the CSR build
        form: figures["scipy_float32"][0] / figures[form][0] for form in prop_fns}

    # Whole batches through iprop(): the CPU default (one image at a time) and one vmap over the batch.
    out["iprop_ms_per_image"] = []
    for batch in batches:
        images = jnp.asarray(_images(batch, size))
        attributions = jnp.asarray(_attributions(np.asarray(images)))
        row = {"batch": batch}
        for label, chunk in (("default_chunk", None), ("vmap_whole_batch", batch)):
            fn = functools.partial(iprop, images, attributions, config=config, chunk_size=chunk)
            row[label] = _ms(fn, repeats, batch)
        out["iprop_ms_per_image"].append(row)
    out["target_ms_per_image"] = 100.0
    return out


def _ms(fn, repeats: int, batch: int) -> list[float]:
    """[median, min] milliseconds per image."""
    times = []
    for _ in range(repeats):
        times.append(time_call(fn, repeats=1, warmup=0 if times else 1))
    return [1e3 * float(np.median(times)) / batch, 1e3 * float(np.min(times)) / batch]
