"""Local Attribution: seconds per image, images/s and efficiency against the fused gradient step.

Efficiency = ideal / measured, where ideal is the LA call reduced to its model work:
``T x sum over run chunks of t_step(B * runs_in_chunk)``, with ``t_step(n)`` the time of one
fused forward + 2-cotangent VJP (``grad p_c`` and ``grad p_y``) on ``n`` images. So 1.0 means
the scan, the vmapped runs, the sign steps and the projection cost nothing beyond the
gradients themselves; for ``run_chunk`` = K this is ``K*T x`` the per-(image, run) step cost.
"""

from __future__ import annotations

import os
import resource
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags
from bench_common import block, define_shared, peak_memory_bytes

from la_iprop.attribution.attack import probability_gradients
from la_iprop.attribution.la import _local_attribution_batch, local_attribution
from la_iprop.models import load_model

# The flags this subcommand reads (scripts/benchmark.py refuses the other subcommands' flags with it).
FLAG_NAMES = ("model", "batch", "spatial_range", "max_iter", "sampling_times", "run_chunk", "update", "repeats",
              "random_weights")


def define_flags() -> None:
    define_shared("model", "batch", "spatial_range", "max_iter", "sampling_times", "run_chunk", "repeats",
                  "random_weights")
    flags.DEFINE_enum("update", "restart", ["restart", "pgd"], "la: LA's update rule.")


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _measure(fn, repeats: int) -> tuple[float, float]:
    """Median wall-clock and median process CPU seconds of ``fn()`` after one warm-up call.

    CPU seconds (all threads) are reported too because wall time on a shared CPU
    depends on what else runs; on an idle machine wall ~ CPU / cores used.
    """
    block(fn())
    walls, cpus = [], []
    for _ in range(repeats):
        wall, cpu = time.perf_counter(), _cpu_seconds()
        block(fn())
        walls.append(time.perf_counter() - wall)
        cpus.append(_cpu_seconds() - cpu)
    return float(np.median(walls)), float(np.median(cpus))


@jax.jit
def _fused_step(logit_fn, images, classes):
    """What one LA step costs in model work: one forward and a 2-cotangent VJP per image."""
    return jax.vmap(lambda x, c: probability_gradients(logit_fn, x, c)[1])(images, classes)


def _step_seconds(model, n: int, size: int, repeats: int) -> tuple[float, float]:
    images = jnp.asarray(np.random.default_rng(1).uniform(size=(n, size, size, 3)), jnp.float32)
    classes = jnp.tile(jnp.array([[3, 7]], jnp.int32), (n, 1))
    return _measure(lambda: _fused_step(model, images, classes), max(repeats, 3))


def _compiled_memory(model, images, settings) -> dict:
    """XLA's planned buffer sizes for the LA program (reported on every backend, CPU included)."""
    labels = jnp.zeros((images.shape[0],), jnp.int32)
    targets = jnp.zeros((images.shape[0], settings["sampling_times"] - 1), jnp.int32)
    try:
        stats = _local_attribution_batch.lower(
            model, images, labels, targets, spatial_range=settings["spatial_range"], max_iter=settings["max_iter"],
            update=settings["update"], step_size=1.0, run_chunk=settings["run_chunk"],
            keep_path=False).compile().memory_analysis()
    except Exception:  # noqa: BLE001 - not every backend implements memory_analysis
        return {}
    if stats is None:
        return {}
    return {"xla_temp_mb": stats.temp_size_in_bytes / 2**20, "xla_argument_mb": stats.argument_size_in_bytes / 2**20}


def run(args) -> dict:
    batches = args.batch or ([1] if args.quick else [1, 8])
    max_iter = args.max_iter or (2 if args.quick else 10)
    repeats = args.repeats or (1 if args.quick else 2)
    k = args.sampling_times or 6
    default_chunk = 1 if jax.default_backend() == "cpu" else k   # local_attribution's run_chunk=None
    chunk = min(args.run_chunk or default_chunk, k)
    if args.random_weights:  # e.g. ResNet-50, whose weights cannot be downloaded here: the cost is the same
        from bench_models import random_model_fn
        model = random_model_fn(args.model, jax.random.PRNGKey(0))
    else:
        model = load_model(args.model)
    size = model.input_size
    settings = dict(spatial_range=args.spatial_range, max_iter=max_iter, sampling_times=k, update=args.update,
                    run_chunk=args.run_chunk)
    results = {"model": args.model, "random_weights": bool(args.random_weights), **settings, "rows": []}
    key = jax.random.PRNGKey(0)
    for batch in batches:
        images = jnp.asarray(np.random.default_rng(0).uniform(size=(batch, size, size, 3)), jnp.float32)
        seconds, cpu = _measure(lambda images=images: local_attribution(model, images, None, key=key, **settings),
                                repeats)
        full, rest = divmod(k, chunk)
        step_full, step_full_cpu = _step_seconds(model, batch * chunk, size, repeats)
        ideal, ideal_cpu = max_iter * full * step_full, max_iter * full * step_full_cpu
        if rest:
            step_rest, step_rest_cpu = _step_seconds(model, batch * rest, size, repeats)
            ideal, ideal_cpu = ideal + max_iter * step_rest, ideal_cpu + max_iter * step_rest_cpu
        row = {"batch": batch, "seconds": seconds, "seconds_per_image": seconds / batch,
               "images_per_second": batch / seconds, "cpu_seconds_per_image": cpu / batch,
               "fused_step_seconds": step_full, "fused_step_images": batch * chunk, "ideal_seconds": ideal,
               "efficiency": ideal / seconds, "efficiency_cpu": ideal_cpu / cpu,
               "peak_device_memory_bytes": peak_memory_bytes(), **_compiled_memory(model, images, settings),
               "process_peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
               "load_average_1min": os.getloadavg()[0]}
        print(f"la batch={batch}: {row['seconds_per_image']:.2f} s/image, {row['images_per_second']:.3f} images/s, "
              f"{row['cpu_seconds_per_image']:.2f} CPU-s/image, efficiency {row['efficiency']:.2f} "
              f"(CPU time: {row['efficiency_cpu']:.2f}; fused step on {batch * chunk} images: {step_full * 1e3:.0f} ms)",
              flush=True)
        results["rows"].append(row)
    return results
