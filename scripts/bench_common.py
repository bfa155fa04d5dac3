"""Timing helpers shared by the benchmark subcommands (figures, never assertions)."""

from __future__ import annotations

import platform
import time
from typing import Any, Callable

import jax


def block(tree: Any) -> Any:
    return jax.block_until_ready(tree)


def time_call(fn: Callable[[], Any], *, repeats: int = 3, warmup: int = 1) -> float:
    """Median wall-clock seconds of ``fn()`` after ``warmup`` calls (compilation excluded)."""
    for _ in range(warmup):
        block(fn())
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        block(fn())
        times.append(time.perf_counter() - start)
    times.sort()
    return times[len(times) // 2]


def peak_memory_bytes() -> int | None:
    """Peak device memory where the backend reports it (GPU/TPU), else None."""
    try:
        stats = jax.local_devices()[0].memory_stats()
    except Exception:  # noqa: BLE001 - CPU backends raise or return None
        return None
    return None if not stats else stats.get("peak_bytes_in_use")


def environment() -> dict:
    device = jax.devices()[0]
    return {"jax": jax.__version__, "backend": jax.default_backend(),
            "device": getattr(device, "device_kind", str(device)), "device_count": jax.device_count(),
            "python": platform.python_version(), "machine": platform.machine(),
            "processor": platform.processor() or platform.machine()}
