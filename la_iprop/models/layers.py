"""Small building blocks shared by the model ports."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax import lax

__all__ = ["same_padding", "depthwise_conv", "depthwise_impl_for_backend"]


def same_padding(size: int, kernel: int, stride: int) -> tuple[int, int]:
    """TensorFlow "SAME" padding (extra pixel at the end) for one spatial axis."""
    out = math.ceil(size / stride)
    total = max((out - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


def _depthwise_shift_add(x: jax.Array, kernel: jax.Array, stride: int) -> jax.Array:
    """Depthwise conv of an already padded NHWC input as a sum of k*k shifted copies."""
    kh, kw, _ = kernel.shape
    out_h = (x.shape[1] - kh) // stride + 1
    out_w = (x.shape[2] - kw) // stride + 1
    out = None
    for i in range(kh):
        for j in range(kw):
            window = lax.slice(
                x, (0, i, j, 0),
                (x.shape[0], i + (out_h - 1) * stride + 1, j + (out_w - 1) * stride + 1, x.shape[3]),
                (1, stride, stride, 1))
            term = window * kernel[i, j]
            out = term if out is None else out + term
    return out


def _depthwise_library(x: jax.Array, kernel: jax.Array, stride: int) -> jax.Array:
    channels = kernel.shape[-1]
    return lax.conv_general_dilated(
        x, kernel[:, :, None, :], (stride, stride), "VALID",
        dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=channels)


def depthwise_impl_for_backend(backend: str | None = None) -> str:
    """Which depthwise implementation is fastest on a backend (measured, see DESIGN.md).

    XLA:CPU's grouped convolution is ~10x slower than shift-and-add (forward and input
    gradient); on GPU cuDNN's depthwise kernels win.
    """
    backend = backend or jax.default_backend()
    return "shift_add" if backend == "cpu" else "library"


def depthwise_conv(x: jax.Array, kernel: jax.Array, stride: int = 1,
                   padding: tuple[tuple[int, int], tuple[int, int]] = ((0, 0), (0, 0)),
                   impl: str | None = None) -> jax.Array:
    """Depthwise 2-D convolution, NHWC input, kernel ``[kh, kw, channels]``.

    ``impl`` is ``"shift_add"``, ``"library"`` or None (pick per backend). Both forms
    compute the same cross-correlation as PyTorch's grouped ``conv2d``.
    """
    if any(p for pair in padding for p in pair):
        x = jnp.pad(x, ((0, 0), padding[0], padding[1], (0, 0)))
    impl = impl or depthwise_impl_for_backend()
    if impl == "shift_add":
        return _depthwise_shift_add(x, kernel, stride)
    if impl == "library":
        return _depthwise_library(x, kernel, stride)
    raise ValueError(f"impl must be 'shift_add', 'library' or None, got {impl!r}")
