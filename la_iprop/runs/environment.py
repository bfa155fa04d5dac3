"""The environment a result was computed in: package versions, device, processor.

Every report records it (a run's ``summary.json``, the studies' JSON), so a figure can be traced
to the software and hardware that produced it.
"""

from __future__ import annotations

import pathlib
import platform
from importlib import metadata

import jax

__all__ = ["versions", "device", "processor", "environment"]


def versions() -> dict:
    """Python and the versions of the packages that determine the numbers."""
    out = {"python": platform.python_version()}
    for package in ("jax", "jaxlib", "flax", "numpy", "la_iprop"):
        try:
            out[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            out[package] = None
    if out["la_iprop"] is None:  # run from the checkout, not installed
        from la_iprop import __version__
        out["la_iprop"] = __version__
    return out


def device() -> dict:
    """The JAX backend and device kind (e.g. ``cpu``, ``NVIDIA H100 80GB HBM3``), device and process counts."""
    first = jax.devices()[0]
    return {"backend": jax.default_backend(), "kind": getattr(first, "device_kind", str(first)),
            "local_devices": jax.local_device_count(), "processes": jax.process_count()}


def processor() -> str:
    """The CPU's model name (``/proc/cpuinfo`` on Linux), else what ``platform`` knows."""
    try:
        for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment() -> dict:
    """Versions, device and processor in one record."""
    return {**versions(), "device": device(), "processor": processor()}
