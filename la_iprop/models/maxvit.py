"""MaxViT-T (torchvision's ``maxvit_t``) in Flax linen, inference mode.

Structure (torchvision ``MaxVit``): a stem (3x3/2 conv + BatchNorm + GELU, then a
3x3 conv with bias), four blocks of ``MaxVitLayer`` (MBConv, window attention, grid
attention), then average pooling, LayerNorm, Linear, tanh and a bias-free Linear.

* BatchNorm (convolutional part) eps 1e-3; LayerNorm (attention part) eps 1e-5.
* GELU is the exact (erf) form, as ``nn.GELU()``; the squeeze-excitation uses SiLU and
  a sigmoid gate.
* MBConv: pre-norm BatchNorm, 1x1 expansion (x4), 3x3 depthwise conv (with the
  block's stride), squeeze-excitation (``int(out * 0.25)`` channels), 1x1 projection
  with bias. The first layer of a block downsamples the shortcut with a 3x3/2 average
  pool (padding 1, zeros counted) and a 1x1 conv with bias.
* Attention over partitions of ``P = 7 x 7`` positions: "window" partitions are 7x7
  patches, "grid" partitions take every ``(H/7)``-th position (torchvision partitions
  into ``H/7``-sized windows and swaps the two middle axes). Scores are
  ``q . (k * D**-0.5) + B``, with ``D`` the *feature* width (not the head width, as in
  torchvision) and ``B[h, i, j] = table[index(i, j), h]`` the relative position bias.
* Stochastic depth and dropout are identities at inference.
"""

from __future__ import annotations

import functools
from typing import Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from la_iprop.models.convert import ConversionError, default_torch_name
from la_iprop.models.layers import DepthwiseConv, avg_pool2d
from la_iprop.models.zoo import ModelFn, imagenet_normalize, model_fn_from_weights

__all__ = ["MaxVit", "MaxVitT", "maxvit_torch_name", "relative_position_index", "check_relative_position_index",
           "gelu", "build_maxvit_t"]


def gelu(x: jax.Array) -> jax.Array:
    """Exact GELU ``x * Phi(x)`` (torch ``nn.GELU()`` default; jax's default is the tanh form)."""
    return jax.nn.gelu(x, approximate=False)


def relative_position_index(size: int) -> np.ndarray:
    """Index [size**2, size**2] into the (2*size-1)**2 bias table for each pair of positions.

    For positions ``i = (yi, xi)`` and ``j = (yj, xj)`` in row-major order the index is
    ``(yi - yj + size - 1) * (2*size - 1) + (xi - xj + size - 1)``.
    """
    ys, xs = np.meshgrid(np.arange(size), np.arange(size), indexing="ij")
    ys, xs = ys.reshape(-1), xs.reshape(-1)
    dy = ys[:, None] - ys[None, :] + size - 1
    dx = xs[:, None] - xs[None, :] + size - 1
    return (dy * (2 * size - 1) + dx).astype(np.int32)


def _bn(name: str) -> nn.BatchNorm:
    return nn.BatchNorm(use_running_average=True, epsilon=1e-3, name=name)


class ConvNormAct(nn.Module):
    """torchvision ``Conv2dNormActivation``: conv (bias only without norm), BatchNorm, activation."""
    features: int
    kernel_size: int
    stride: int = 1
    norm: bool = True
    activation: Callable | None = gelu

    @nn.compact
    def __call__(self, x):
        pad = (self.kernel_size - 1) // 2
        x = nn.Conv(self.features, (self.kernel_size,) * 2, (self.stride,) * 2, padding=((pad, pad), (pad, pad)),
                    use_bias=not self.norm, name="conv")(x)
        if self.norm:
            x = _bn("bn")(x)
        return x if self.activation is None else self.activation(x)


class DepthwiseConvNormAct(nn.Module):
    kernel_size: int
    stride: int
    activation: Callable = gelu
    impl: str | None = None

    @nn.compact
    def __call__(self, x):
        x = DepthwiseConv(self.kernel_size, self.stride, self.impl, padding="symmetric", name="conv")(x)
        return self.activation(_bn("bn")(x))


class SqueezeExcitation(nn.Module):
    """``x * sigmoid(fc2(silu(fc1(mean_hw(x)))))`` with 1x1 convs (torchvision ``SqueezeExcitation``)."""
    squeeze_channels: int
    activation: Callable = jax.nn.silu

    @nn.compact
    def __call__(self, x):
        scale = jnp.mean(x, axis=(1, 2), keepdims=True)
        scale = self.activation(nn.Conv(self.squeeze_channels, (1, 1), name="fc1")(scale))
        scale = jax.nn.sigmoid(nn.Conv(x.shape[-1], (1, 1), name="fc2")(scale))
        return x * scale


class MBConv(nn.Module):
    out_channels: int
    stride: int
    expansion_ratio: float = 4.0
    squeeze_ratio: float = 0.25
    activation: Callable = gelu
    depthwise_impl: str | None = None

    @nn.compact
    def __call__(self, x):
        if self.stride not in (1, 2):
            raise ValueError(f"MBConv stride must be 1 or 2, got {self.stride}")
        mid = int(self.out_channels * self.expansion_ratio)
        shortcut = x
        if self.stride == 2:
            shortcut = nn.Conv(self.out_channels, (1, 1), name="proj_1")(avg_pool2d(x, 3, 2, 1))
        elif x.shape[-1] != self.out_channels:
            shortcut = nn.Conv(self.out_channels, (1, 1), name="proj_0")(x)
        h = _bn("pre_norm")(x)
        h = ConvNormAct(mid, 1, activation=self.activation, name="conv_a")(h)
        h = DepthwiseConvNormAct(3, self.stride, self.activation, self.depthwise_impl, name="conv_b")(h)
        h = SqueezeExcitation(int(self.out_channels * self.squeeze_ratio), name="squeeze_excitation")(h)
        h = nn.Conv(self.out_channels, (1, 1), name="conv_c")(h)
        return shortcut + h


class RelativePositionalMultiHeadAttention(nn.Module):
    """Multi-head self-attention over ``[B, G, P, D]`` with a learned relative position bias."""
    head_dim: int
    partition_size: int

    @nn.compact
    def __call__(self, x):
        b, g, p, d = x.shape
        heads = d // self.head_dim
        if p != self.partition_size ** 2:
            raise ValueError(f"attention expects {self.partition_size ** 2} positions per partition, got {p}")
        table = self.param("relative_position_bias_table", nn.initializers.truncated_normal(0.02),
                           ((2 * self.partition_size - 1) ** 2, heads))
        qkv = nn.Dense(3 * d, name="to_qkv")(x)
        q, k, v = (t.reshape(b, g, p, heads, self.head_dim) for t in jnp.split(qkv, 3, axis=-1))
        k = k * d ** -0.5  # torchvision scales by the feature width
        scores = jnp.einsum("bgihd,bgjhd->bghij", q, k)
        bias = table[relative_position_index(self.partition_size)].transpose(2, 0, 1)  # [heads, P, P]
        weights = jax.nn.softmax(scores + bias, axis=-1)
        out = jnp.einsum("bghij,bgjhd->bgihd", weights, v).reshape(b, g, p, d)
        return nn.Dense(d, name="merge")(out)


def _partition(x: jax.Array, p: int) -> jax.Array:
    """[B, H, W, C] -> [B, (H/p)*(W/p), p*p, C]: non-overlapping p x p windows (row-major)."""
    b, h, w, c = x.shape
    x = x.reshape(b, h // p, p, w // p, p, c).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(b, (h // p) * (w // p), p * p, c)


def _departition(x: jax.Array, p: int, h_parts: int, w_parts: int) -> jax.Array:
    """Inverse of :func:`_partition`."""
    b, _, _, c = x.shape
    x = x.reshape(b, h_parts, w_parts, p, p, c).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(b, h_parts * p, w_parts * p, c)


class PartitionAttentionLayer(nn.Module):
    """Pre-norm attention then pre-norm MLP (x4, GELU) inside window or grid partitions."""
    head_dim: int
    partition_size: int
    partition_type: str
    mlp_ratio: int = 4
    activation: Callable = gelu

    @nn.compact
    def __call__(self, x):
        _, h, w, c = x.shape
        if self.partition_type not in ("window", "grid"):
            raise ValueError(f"partition_type must be 'window' or 'grid', got {self.partition_type!r}")
        if h % self.partition_size:
            raise ValueError(f"feature map height {h} is not divisible by the partition size {self.partition_size}")
        # torchvision derives the partition from the height (grid_size[0]) for both axes.
        p = self.partition_size if self.partition_type == "window" else h // self.partition_size
        if h % p or w % p:
            raise ValueError(f"feature map {h}x{w} is not divisible into {p}x{p} partitions")
        x = _partition(x, p)
        if self.partition_type == "grid":
            x = x.swapaxes(1, 2)
        y = nn.LayerNorm(epsilon=1e-5, name="attn_layer_0")(x)
        x = x + RelativePositionalMultiHeadAttention(self.head_dim, self.partition_size, name="attn_layer_1")(y)
        y = nn.LayerNorm(epsilon=1e-5, name="mlp_layer_0")(x)
        y = self.activation(nn.Dense(c * self.mlp_ratio, name="mlp_layer_1")(y))
        x = x + nn.Dense(c, name="mlp_layer_3")(y)
        if self.partition_type == "grid":
            x = x.swapaxes(1, 2)
        return _departition(x, p, h // p, w // p)


class MaxVitLayer(nn.Module):
    out_channels: int
    stride: int
    head_dim: int
    partition_size: int
    activation: Callable = gelu
    depthwise_impl: str | None = None

    @nn.compact
    def __call__(self, x):
        x = MBConv(self.out_channels, self.stride, activation=self.activation, depthwise_impl=self.depthwise_impl,
                   name="MBconv")(x)
        for kind in ("window", "grid"):
            x = PartitionAttentionLayer(self.head_dim, self.partition_size, kind, activation=self.activation,
                                        name=f"{kind}_attention")(x)
        return x


class MaxVitBlock(nn.Module):
    """``num_layers`` MaxVitLayers; the first one halves the resolution."""
    out_channels: int
    num_layers: int
    head_dim: int
    partition_size: int
    activation: Callable = gelu
    depthwise_impl: str | None = None

    @nn.compact
    def __call__(self, x):
        for index in range(self.num_layers):
            x = MaxVitLayer(self.out_channels, 2 if index == 0 else 1, self.head_dim, self.partition_size,
                            self.activation, self.depthwise_impl, name=f"layers_{index}")(x)
        return x


class MaxVit(nn.Module):
    """torchvision MaxVit on ImageNet-normalised NHWC inputs; returns logits.

    ``activation`` (GELU, used in the stem, MBConv and the MLPs) is a field so that
    attribution methods can swap it with ``module.clone``.
    """
    stem_channels: int = 64
    block_channels: Sequence[int] = (64, 128, 256, 512)
    block_layers: Sequence[int] = (2, 2, 5, 2)
    head_dim: int = 32
    partition_size: int = 7
    num_classes: int = 1000
    activation: Callable = gelu
    depthwise_impl: str | None = None

    @nn.compact
    def __call__(self, x):
        x = ConvNormAct(self.stem_channels, 3, 2, activation=self.activation, name="stem_0")(x)
        x = ConvNormAct(self.stem_channels, 3, 1, norm=False, activation=None, name="stem_1")(x)
        for block, (channels, layers) in enumerate(zip(self.block_channels, self.block_layers, strict=True)):
            x = MaxVitBlock(channels, layers, self.head_dim, self.partition_size, self.activation,
                            self.depthwise_impl, name=f"blocks_{block}")(x)
        x = jnp.mean(x, axis=(1, 2))
        x = nn.LayerNorm(epsilon=1e-5, name="classifier_2")(x)
        x = jnp.tanh(nn.Dense(self.block_channels[-1], name="classifier_3")(x))
        return nn.Dense(self.num_classes, use_bias=False, name="classifier_5")(x)


MaxVitT = functools.partial(MaxVit, stem_channels=64, block_channels=(64, 128, 256, 512), block_layers=(2, 2, 5, 2),
                            head_dim=32, partition_size=7)

# Flax module name -> torchvision path fragment where the two differ.
_TORCH_MODULE_NAMES = {
    "conv": "0", "bn": "1",  # Conv2dNormActivation is an nn.Sequential
    # Children of MaxVitLayer.layers and MBConv.layers (both nn.Sequential of named modules).
    **{name: f"layers.{name}" for name in ("MBconv", "window_attention", "grid_attention", "pre_norm", "conv_a",
                                           "conv_b", "squeeze_excitation", "conv_c")},
}


def maxvit_torch_name(path: tuple[str, ...]) -> str:
    """Flax path -> torchvision name, e.g. ``blocks_0/layers_1/MBconv/conv_b/bn/var`` ->
    ``blocks.0.layers.1.layers.MBconv.layers.conv_b.1.running_var``."""
    *modules, leaf = path[1:]
    parts = [_TORCH_MODULE_NAMES.get(module, module) for module in modules]
    # default_torch_name turns list indices such as "blocks_0" / "attn_layer_1" into "blocks.0" / "attn_layer.1".
    return default_torch_name((path[0], *parts, leaf))


def check_relative_position_index(state_dict: dict[str, np.ndarray], partition_size: int = 7) -> dict:
    """Drops torchvision's ``relative_position_index`` buffers after checking them.

    They are constants recomputed by the port (:func:`relative_position_index`); a
    checkpoint whose buffers differ was made for another partition size.
    """
    if not isinstance(state_dict, dict):
        raise ConversionError(f"expected a state dict, got {type(state_dict).__name__}")
    expected = relative_position_index(partition_size)
    bad = [name for name, value in state_dict.items() if name.endswith(".relative_position_index")
           and (np.shape(value) != expected.shape or not np.array_equal(np.asarray(value), expected))]
    if bad:
        raise ConversionError(f"relative_position_index buffer(s) differ from MaxViT's {partition_size}x"
                              f"{partition_size} partition index: " + "; ".join(bad[:20]))
    return {k: v for k, v in state_dict.items() if not k.endswith(".relative_position_index")}


def build_maxvit_t(weights) -> ModelFn:
    """MaxViT-T from torchvision weights (``.pth`` path or state dict) or a ``.msgpack`` Flax checkpoint."""
    return model_fn_from_weights(MaxVitT(), weights, name="maxvit_t", preprocess=imagenet_normalize,
                                 torch_name=maxvit_torch_name, prepare=check_relative_position_index)
