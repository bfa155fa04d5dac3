"""A nudge of every input element by a few float32 ulps: the probe of a method's sensitivity to its input's
last bits (the stability study compares the maps of the nudged and the unchanged images).

Each element moves towards 0.5 (``np.nextafter`` ``ulps`` times), so it stays in [0, 1] and moves by
exactly ``ulps`` representable float32 values, whatever its magnitude.
"""

from __future__ import annotations

import numpy as np

__all__ = ["nudge_toward_half"]


def nudge_toward_half(images, ulps: int = 1) -> np.ndarray:
    """``images`` as float32, every element moved ``ulps`` float32 ulps towards 0.5."""
    images = np.asarray(images, np.float32)
    target = np.where(images < 0.5, np.float32(1), np.float32(0))
    for _ in range(int(ulps)):
        images = np.nextafter(images, target)
    return images
