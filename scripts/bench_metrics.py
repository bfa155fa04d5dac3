"""Insertion + deletion on EfficientNet-Lite0: images/s and efficiency vs bare forward passes.

efficiency = (forwards per image x time of one batched forward, per image) / (metric time per image),
where a game of S steps costs S + 1 forwards per image (450 for both games at 224 steps), and the
reference forward runs at the metric's chunk size (timed just before and just after the metric,
averaged). 1.0 means the metric costs nothing beyond the classifier's forward passes. Both wall-clock
and process CPU time are reported: on a shared machine the CPU-time figure is the steadier one.

A forward inside ``lax.map`` is cheaper than the same forward as its own jitted call on XLA:CPU
(measured ~30% less CPU time for Lite0 at batch 8), so ``efficiency`` can exceed 1; ``efficiency_vs_loop``
compares with a bare ``lax.map`` of forwards over chunks and isolates the metric's own overhead
(ranking, building the perturbed images, scoring).
"""

from __future__ import annotations

import functools
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags
from bench_common import block, define_int_list, define_shared

from la_iprop.metrics import evaluate, get_protocol
from la_iprop.models import load_model

# Stated in docs/design.md for the official PyTorch evaluation on a 2-core CPU (not measured here):
# ~18 minutes per game per 100 Lite0 images.
OFFICIAL_SECONDS_PER_IMAGE_BOTH_GAMES = 2 * 18 * 60 / 100


# The flags this subcommand reads (scripts/benchmark.py refuses the other subcommands' flags with it).
FLAG_NAMES = ("images", "protocol", "chunk", "repeats")


def define_flags() -> None:
    flags.DEFINE_integer("images", 8, "metrics: images per evaluation (--quick: 2).", lower_bound=1)
    flags.DEFINE_list("protocol", ["la"], "metrics: presets to time, comma separated (la, rise).")
    define_int_list("chunk", [8], "metrics: chunk sizes (images per forward), comma separated.")
    define_shared("repeats")


@jax.jit
def _forward(model, images):
    return model(images)


@jax.jit
def _forward_loop(model, chunks):
    return jax.lax.map(model, chunks)


def _timed(fn, repeats: int) -> tuple[float, float]:
    """Median (wall, process CPU) seconds of ``fn()`` over ``repeats`` calls."""
    walls, cpus = [], []
    for _ in range(repeats):
        w, c = time.perf_counter(), time.process_time()
        block(fn())
        walls.append(time.perf_counter() - w)
        cpus.append(time.process_time() - c)
    return float(np.median(walls)), float(np.median(cpus))


def run(args) -> dict:
    n = 2 if args.quick else args.images
    model = load_model("efficientnet_lite0")
    rng = np.random.default_rng(0)
    size = model.input_size
    images = rng.uniform(0, 1, (n, size, size, 3)).astype(np.float32)
    maps = rng.normal(size=images.shape).astype(np.float32)
    rows = []
    for chunk in args.chunk:
        batch = jnp.asarray(rng.uniform(0, 1, (chunk, size, size, 3)), jnp.float32)
        chunks = jnp.broadcast_to(batch, (16,) + batch.shape)
        block(_forward(model, batch))
        block(_forward_loop(model, chunks))
        for name in args.protocol:
            protocol = get_protocol(name)
            forwards = 2 * (protocol.num_steps(size, size) + 1)
            call = functools.partial(evaluate, model, images, maps, protocol=protocol, chunk_size=chunk)
            start = time.perf_counter()
            call()
            first = time.perf_counter() - start
            before = _timed(functools.partial(_forward, model, batch), 5)
            loop_before = _timed(functools.partial(_forward_loop, model, chunks), 1)
            wall, cpu = _timed(call, args.repeats or 1)
            loop_after = _timed(functools.partial(_forward_loop, model, chunks), 1)
            after = _timed(functools.partial(_forward, model, batch), 5)
            fwd_wall, fwd_cpu = ((before[0] + after[0]) / 2 / chunk, (before[1] + after[1]) / 2 / chunk)
            loop_wall = (loop_before[0] + loop_after[0]) / 2 / (16 * chunk)
            rows.append({
                "protocol": name, "images": n, "chunk_size": chunk, "forwards_per_image": forwards,
                "seconds": wall, "cpu_seconds": cpu, "compile_and_first_call_s": first,
                "images_per_s": n / wall, "seconds_per_image": wall / n,
                "forward_ms_per_image": 1e3 * fwd_wall, "forward_cpu_ms_per_image": 1e3 * fwd_cpu,
                "efficiency": forwards * fwd_wall / (wall / n),
                "efficiency_cpu_time": forwards * fwd_cpu / (cpu / n),
                "forward_in_loop_ms_per_image": 1e3 * loop_wall,
                "efficiency_vs_loop": forwards * loop_wall / (wall / n),
                "speedup_vs_official_stated": OFFICIAL_SECONDS_PER_IMAGE_BOTH_GAMES / (wall / n),
            })
            r = rows[-1]
            print(f"metrics {name:5s} chunk={chunk:3d} n={n}: {r['images_per_s']:.3f} images/s "
                  f"({r['seconds_per_image']:.2f} s/image; forward {r['forward_ms_per_image']:.1f} ms/image), "
                  f"efficiency {r['efficiency']:.3f} (CPU time {r['efficiency_cpu_time']:.3f}; "
                  f"vs lax.map forwards {r['efficiency_vs_loop']:.3f})", flush=True)
    return {"model": "efficientnet_lite0", "backend": jax.default_backend(), "results": rows,
            "official_seconds_per_image_both_games_stated": OFFICIAL_SECONDS_PER_IMAGE_BOTH_GAMES}
