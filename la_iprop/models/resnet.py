"""ResNet (torchvision's ResNet-50, "V1.5": the stride sits on the 3x3 conv) in Flax linen.

Inference mode only: BatchNorm uses the running statistics (eps 1e-5, torchvision's
default). Also home of the PyTorch-compatible pooling functions shared by the
torchvision ports (``max_pool2d``, ``avg_pool2d``, ``adaptive_avg_pool2d``), which
reproduce ``torch.nn.functional``'s output sizes, padding and divisors exactly.
"""

from __future__ import annotations

import functools
import math
from typing import Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from la_iprop.models.convert import default_torch_name
from la_iprop.models.zoo import ModelFn, imagenet_normalize, model_fn_from_weights

__all__ = ["ResNet", "ResNet50", "Bottleneck", "resnet_torch_name", "build_resnet50", "max_pool2d", "avg_pool2d",
           "adaptive_avg_pool2d", "pool_output_size"]


# ----------------------------------------------------------------------------- pooling
def pool_output_size(size: int, kernel: int, stride: int, padding: int, ceil_mode: bool = False) -> int:
    """PyTorch's pooled length: ``floor((size + 2p - k) / s) + 1`` (ceil with ``ceil_mode``,
    where a last window that would start in the right padding is dropped)."""
    span = size + 2 * padding - kernel
    if span < 0:
        raise ValueError(f"pooling window {kernel} (padding {padding}) is larger than the input ({size})")
    if not ceil_mode:
        return span // stride + 1
    out = math.ceil(span / stride) + 1
    if (out - 1) * stride >= size + padding:
        out -= 1
    return out


def _pool_padding(size: int, kernel: int, stride: int, padding: int, ceil_mode: bool) -> tuple[int, int, int]:
    """(output size, left pad, right pad); the right pad includes ceil_mode's overhang."""
    out = pool_output_size(size, kernel, stride, padding, ceil_mode)
    extra = max((out - 1) * stride + kernel - (size + 2 * padding), 0)
    return out, padding, padding + extra


def _windows(x: jax.Array, kernel: int, stride: int, out_h: int, out_w: int) -> list[jax.Array]:
    """The ``kernel**2`` strided views ``x[:, i::stride, j::stride]`` of an already padded input."""
    return [lax.slice(x, (0, i, j, 0), (x.shape[0], i + (out_h - 1) * stride + 1, j + (out_w - 1) * stride + 1,
                                        x.shape[3]), (1, stride, stride, 1))
            for i in range(kernel) for j in range(kernel)]


@functools.partial(jax.custom_jvp, nondiff_argnums=(1, 2, 3, 4))
def _window_max(x: jax.Array, kernel: int, stride: int, out_h: int, out_w: int) -> jax.Array:
    return functools.reduce(jnp.maximum, _windows(x, kernel, stride, out_h, out_w))


@_window_max.defjvp
def _window_max_jvp(kernel, stride, out_h, out_w, primals, tangents):
    # PyTorch routes a window's derivative to its FIRST maximal element (row-major scan);
    # jnp.maximum would split ties (flat image regions make them common). The tangent is
    # linear in ``t``, so reverse mode comes from JAX's transpose of it.
    (x,), (t,) = primals, tangents
    views, tangent_views = _windows(x, kernel, stride, out_h, out_w), _windows(t, kernel, stride, out_h, out_w)
    out = functools.reduce(jnp.maximum, views)
    claimed, tangent_out = None, None
    for view, tangent in zip(views, tangent_views, strict=True):
        first = view == out if claimed is None else (view == out) & ~claimed
        claimed = first if claimed is None else claimed | first
        term = jnp.where(first, tangent, jnp.zeros_like(tangent))
        tangent_out = term if tangent_out is None else tangent_out + term
    return out, tangent_out


def max_pool2d(x: jax.Array, kernel: int, stride: int, padding: int = 0, ceil_mode: bool = False) -> jax.Array:
    """``F.max_pool2d`` on NHWC: max over each ``kernel x kernel`` window; padding is -inf.

    Written as a maximum of ``kernel**2`` strided views (on XLA:CPU 3x faster forward and
    10x faster input gradient than ``lax.reduce_window``, whose gradient is a
    select-and-scatter); the derivative goes to the first maximal element, as in PyTorch.
    """
    out_h, pad_h0, pad_h1 = _pool_padding(x.shape[1], kernel, stride, padding, ceil_mode)
    out_w, pad_w0, pad_w1 = _pool_padding(x.shape[2], kernel, stride, padding, ceil_mode)
    if pad_h0 or pad_h1 or pad_w0 or pad_w1:
        x = jnp.pad(x, ((0, 0), (pad_h0, pad_h1), (pad_w0, pad_w1), (0, 0)), constant_values=-jnp.inf)
    return _window_max(x, kernel, stride, out_h, out_w)


def avg_pool2d(x: jax.Array, kernel: int, stride: int, padding: int = 0, ceil_mode: bool = False,
               count_include_pad: bool = True) -> jax.Array:
    """``F.avg_pool2d`` on NHWC: window sum / divisor.

    The divisor is ``kernel**2`` when the window lies inside the zero-padded input and
    ``count_include_pad`` (PyTorch's default); otherwise it counts the window's
    elements inside the input (plus the explicit padding if ``count_include_pad``),
    never ceil_mode's overhang.
    """
    out_h, pad_h0, pad_h1 = _pool_padding(x.shape[1], kernel, stride, padding, ceil_mode)
    out_w, pad_w0, pad_w1 = _pool_padding(x.shape[2], kernel, stride, padding, ceil_mode)
    # A sum of strided views, like max_pool2d (3x faster than lax.reduce_window on XLA:CPU).
    padded = jnp.pad(x, ((0, 0), (pad_h0, pad_h1), (pad_w0, pad_w1), (0, 0)))
    summed = functools.reduce(jnp.add, _windows(padded, kernel, stride, out_h, out_w))
    counted = np.ones(x.shape[1:3], np.float32)
    if count_include_pad:
        counted = np.pad(counted, padding, constant_values=1.0)
        pads = ((0, pad_h1 - padding), (0, pad_w1 - padding))
    else:
        pads = ((pad_h0, pad_h1), (pad_w0, pad_w1))
    counted = np.pad(counted, pads)
    # Window counts depend only on shapes: computed once in numpy at trace time.
    windows = np.lib.stride_tricks.sliding_window_view(counted, (kernel, kernel))[::stride, ::stride]
    divisor = windows.sum(axis=(-1, -2))[:out_h, :out_w]
    return summed / jnp.asarray(divisor, x.dtype)[None, :, :, None]


def _adaptive_matrix(size: int, out: int) -> np.ndarray:
    """Averaging matrix [out, size] of PyTorch's adaptive pooling bins [floor(i*n/o), ceil((i+1)*n/o))."""
    matrix = np.zeros((out, size), np.float32)
    for i in range(out):
        start, end = (i * size) // out, -(-((i + 1) * size) // out)
        matrix[i, start:end] = 1.0 / (end - start)
    return matrix


def adaptive_avg_pool2d(x: jax.Array, output_size: int | tuple[int, int]) -> jax.Array:
    """``F.adaptive_avg_pool2d`` on NHWC (identity when the input already has that size)."""
    out_h, out_w = (output_size, output_size) if isinstance(output_size, int) else output_size
    if (out_h, out_w) == x.shape[1:3]:
        return x
    if (out_h, out_w) == (1, 1):
        return jnp.mean(x, axis=(1, 2), keepdims=True)
    rows = jnp.asarray(_adaptive_matrix(x.shape[1], out_h))
    cols = jnp.asarray(_adaptive_matrix(x.shape[2], out_w))
    return jnp.einsum("ih,nhwc,jw->nijc", rows, x, cols)


# ----------------------------------------------------------------------------- ResNet
def _bn(name: str) -> nn.BatchNorm:
    return nn.BatchNorm(use_running_average=True, epsilon=1e-5, name=name)


def _conv(features: int, kernel: int, stride: int = 1, padding: int = 0, name: str | None = None) -> nn.Conv:
    return nn.Conv(features, (kernel, kernel), (stride, stride), padding=((padding, padding), (padding, padding)),
                   use_bias=False, name=name)


class Bottleneck(nn.Module):
    """1x1 -> 3x3 (stride) -> 1x1 (x4 channels), each with BatchNorm; identity or projected skip."""
    planes: int
    stride: int = 1
    project: bool = False
    activation: Callable = jax.nn.relu
    expansion = 4

    @nn.compact
    def __call__(self, x):
        out = self.activation(_bn("bn1")(_conv(self.planes, 1, name="conv1")(x)))
        out = self.activation(_bn("bn2")(_conv(self.planes, 3, self.stride, 1, name="conv2")(out)))
        out = _bn("bn3")(_conv(self.planes * self.expansion, 1, name="conv3")(out))
        identity = x
        if self.project:
            identity = _conv(self.planes * self.expansion, 1, self.stride, name="downsample_0")(x)
            identity = _bn("downsample_1")(identity)
        return self.activation(out + identity)


class ResNet(nn.Module):
    """torchvision ResNet with bottleneck blocks on ImageNet-normalised NHWC inputs; returns logits.

    ``activation`` (ReLU) and ``max_pool`` (the stem's 3x3/2 pooling) are fields so that
    attribution methods such as DeepLIFT can swap them with ``module.clone``.
    """
    stage_sizes: Sequence[int] = (3, 4, 6, 3)
    num_classes: int = 1000
    activation: Callable = jax.nn.relu
    max_pool: Callable = max_pool2d

    @nn.compact
    def __call__(self, x):
        x = _conv(64, 7, 2, 3, name="conv1")(x)
        x = self.activation(_bn("bn1")(x))
        x = self.max_pool(x, 3, 2, 1)
        for stage, blocks in enumerate(self.stage_sizes):
            for index in range(blocks):
                stride = 2 if stage > 0 and index == 0 else 1
                # The first block of every stage changes the width (64 -> 256 in stage 1), so it projects.
                x = Bottleneck(64 * 2 ** stage, stride, project=index == 0, activation=self.activation,
                               name=f"layer{stage + 1}_{index}")(x)
        x = jnp.mean(x, axis=(1, 2))
        return nn.Dense(self.num_classes, name="fc")(x)


ResNet50 = functools.partial(ResNet, stage_sizes=(3, 4, 6, 3))

# Flax ``layer1_0/downsample_1/scale`` is torchvision's ``layer1.0.downsample.1.weight``.
resnet_torch_name = default_torch_name


def build_resnet50(weights) -> ModelFn:
    """ResNet-50 from torchvision weights (``.pth`` path or state dict) or a ``.msgpack`` Flax checkpoint."""
    return model_fn_from_weights(ResNet50(), weights, name="resnet50", preprocess=imagenet_normalize,
                                 torch_name=resnet_torch_name)
