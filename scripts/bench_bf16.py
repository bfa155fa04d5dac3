"""A bfloat16 forward of Lite0 against float32, side by side (is a bfloat16 metric worth a mode?).

    python scripts/benchmark.py bf16 --batch=8

The weights and the images are cast to bfloat16 (the same program otherwise) and the two forwards
alternate call by call (medians of ``--repeats`` rounds, after a warm-up call of each); the machine's
load is recorded around every round (``bench_common.RoundMonitor``). Also: the largest difference of
the softmax probabilities from float32's on the same random images, the cost in fidelity a bfloat16
metric would pay. Whether the CPU has ``avx512_bf16`` is recorded (``/proc/cpuinfo``): XLA:CPU may
emulate bfloat16 arithmetic without it. A bfloat16 precision mode would be worth adding only if it
were at least 1.5x faster than float32.
"""

from __future__ import annotations

import pathlib

import jax
import jax.numpy as jnp
from bench_common import RoundMonitor, available_cpus, block, define_shared, not_idle_note, one_batch, side_by_side

from la_iprop.models import load_model

FLAG_NAMES = ("batch", "repeats")


def define_flags() -> None:
    define_shared("batch", "repeats")


@jax.jit
def _forward(model_fn, images):
    return model_fn(images)


def _cpu_flags() -> list[str]:
    try:
        text = pathlib.Path("/proc/cpuinfo").read_text()
    except OSError:
        return []
    return sorted({flag for flag in ("avx512_bf16", "amx_bf16") if flag in text.split()})


def run(args) -> dict:
    quick = getattr(args, "quick", False)
    batch = one_batch(args, 2 if quick else 8)
    repeats = args.repeats or (1 if quick else 5)
    model = load_model("efficientnet_lite0")
    to_bf16 = lambda v: v.astype(jnp.bfloat16) if v.dtype == jnp.float32 else v  # noqa: E731
    model_bf16 = model.replace(variables=jax.tree.map(to_bf16, model.variables))
    images = jax.random.uniform(jax.random.key(0), (batch, model.input_size, model.input_size, 3), jnp.float32)
    calls = {"float32": lambda: block(_forward(model, images)),
             "bfloat16": lambda: block(_forward(model_bf16, images.astype(jnp.bfloat16)))}
    monitor = RoundMonitor(own_load=float(available_cpus()))
    seconds, load = side_by_side(calls, repeats, monitor)
    ms = {name: 1e3 * t for name, t in seconds.items()}
    p32 = jax.nn.softmax(_forward(model, images))
    p16 = jax.nn.softmax(_forward(model_bf16, images.astype(jnp.bfloat16)).astype(jnp.float32))
    result = {"batch": batch, "repeats": repeats, "cpu_flags": _cpu_flags(), "forward_ms": ms,
              "bfloat16_speedup": ms["float32"] / ms["bfloat16"],
              "max_abs_probability_difference": float(jnp.abs(p32 - p16).max()), "load": load}
    print(f"bf16: Lite0 forward at batch {batch}: float32 {ms['float32']:.1f} ms, bfloat16 {ms['bfloat16']:.1f} ms "
          f"(bfloat16 x{result['bfloat16_speedup']:.2f} the speed of float32); max |p_bf16 - p_f32| "
          f"{result['max_abs_probability_difference']:.3g}; CPU flags {result['cpu_flags'] or 'none'}"
          f"{not_idle_note(load)}", flush=True)
    return result
