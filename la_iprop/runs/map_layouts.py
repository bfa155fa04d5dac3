"""The layouts of maps made elsewhere: which of NCHW, NHWC or per pixel (HW) an array's shape is.

A shape that fits one layout is read so; one that two layouts fit (e.g. ``[N,3,3,3]``) needs the
user's ``--layout``. :class:`MapArray` is one array of a maps file and turns rows of it into the
run's NHWC maps (per-pixel maps broadcast to the three channels).
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from la_iprop.runs.store import ConfigError

__all__ = ["LAYOUTS", "MapArray", "parse_layouts", "detect_layout", "few", "shape_text"]

LAYOUTS = ("nchw", "nhwc", "hw")
LAYOUT_SHAPES = {"nchw": "[N,3,H,W]", "nhwc": "[N,H,W,3]", "hw": "[N,H,W], [N,1,H,W] or [N,H,W,1]"}
EXPECTED = "[N,3,H,W] (nchw), [N,H,W,3] (nhwc), or one value per pixel: [N,H,W], [N,1,H,W], [N,H,W,1] (hw)"


def few(names: Sequence[Any], limit: int = 3) -> str:
    shown = ", ".join(repr(str(n)) for n in list(names)[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def shape_text(shape: Sequence[int]) -> str:
    return "[" + ",".join(str(int(s)) for s in shape) + "]"


# ----------------------------------------------------------------------------- layouts
def parse_layouts(items: Sequence[str]) -> dict[str, str]:
    """``--layout`` values: ``LAYOUT`` (every key) or ``KEY=LAYOUT``; returns ``{key or "*": layout}``."""
    layouts: dict[str, str] = {}
    for item in filter(None, (str(i).strip() for i in items or ())):
        key, _, layout = item.rpartition("=")
        key = key.strip() or "*"
        if layout not in LAYOUTS:
            raise ConfigError(f"--layout: expected LAYOUT or KEY=LAYOUT with LAYOUT one of {', '.join(LAYOUTS)}, "
                              f"got {item!r}")
        if key in layouts:
            raise ConfigError(f"--layout: {'every key' if key == '*' else key} given more than once")
        layouts[key] = layout
    return layouts


def _fits(shape: tuple[int, ...]) -> list[str]:
    """The layouts a map array's shape fits (one per reading: ``hw`` may fit twice)."""
    if len(shape) == 3:
        return ["hw"]
    if len(shape) != 4:
        return []
    fits = []
    if shape[1] == 3:
        fits.append("nchw")
    if shape[1] == 1:
        fits.append("hw")
    if shape[3] == 3:
        fits.append("nhwc")
    if shape[3] == 1 and "hw" not in fits:
        fits.append("hw")
    return fits


def detect_layout(key: str, shape: Sequence[int], layout: str | None = None) -> str:
    """The layout of map array ``key`` from its shape (``layout``: the one ``--layout`` names)."""
    shape = tuple(int(s) for s in shape)
    fits = _fits(shape)
    if not fits:
        raise ConfigError(f"--maps: {key} has shape {shape_text(shape)}; expected {EXPECTED}")
    if layout is not None:
        if layout not in fits:
            raise ConfigError(f"--layout: {key} has shape {shape_text(shape)}, which is not {layout} "
                              f"({LAYOUT_SHAPES[layout]})")
        return layout
    if len(fits) > 1:
        raise ConfigError(f"--maps: {key} has shape {shape_text(shape)}, which fits both "
                          f"{' and '.join(f'{f} ({LAYOUT_SHAPES[f]})' for f in fits)}; name it with "
                          f"--layout={key}={fits[0]} (or {'/'.join(fits[1:])})")
    return fits[0]


class MapArray:
    """One map array of the file: its ``.npy`` header and layout (its data stay in the file)."""

    def __init__(self, key: str, shape: tuple[int, ...], dtype: np.dtype, layout: str, offset: int):
        self.key, self.shape, self.dtype, self.layout, self.offset = key, shape, dtype, layout, offset

    @property
    def per_pixel(self) -> bool:
        return self.layout == "hw"

    @property
    def spatial(self) -> tuple[int, int]:
        s = self.shape
        if self.layout == "nchw" or (self.layout == "hw" and len(s) == 4 and s[1] == 1):
            return s[2], s[3]
        return s[1], s[2]

    @property
    def row_bytes(self) -> int:
        return int(np.prod(self.shape[1:], dtype=np.int64)) * self.dtype.itemsize

    def to_nhwc(self, rows: np.ndarray, dtype: Any) -> np.ndarray:
        """``rows`` (``[n, *shape[1:]]`` as stored) as ``[n, H, W, 3]`` of ``dtype``."""
        rows = rows.astype(dtype, copy=False)
        if self.layout == "nchw":
            return np.ascontiguousarray(rows.transpose(0, 2, 3, 1))
        if self.layout == "nhwc":
            return np.ascontiguousarray(rows)
        values = rows.reshape(len(rows), *self.spatial)  # [n,H,W], [n,1,H,W] or [n,H,W,1]: one value per pixel
        return np.ascontiguousarray(np.broadcast_to(values[..., None], values.shape + (3,)))

    def describe(self) -> dict:
        return {"shape": list(self.shape), "dtype": self.dtype.name, "layout": self.layout,
                "per_pixel": self.per_pixel}


# ----------------------------------------------------------------------------- the file
