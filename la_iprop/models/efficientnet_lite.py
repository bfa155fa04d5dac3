"""EfficientNet-Lite0/1/2 in Flax linen, faithful to PyPI ``efficientnet-lite-pytorch``.

Lite variants differ from EfficientNet-B*: ReLU6 instead of swish, no
squeeze-excitation, and a fixed stem and head (the reference's ``fix_head_stem``).
Convolutions use TensorFlow "SAME" padding computed from the static input size,
BatchNorm eps 1e-3 in inference mode (running statistics from the checkpoint).

Scaling from Lite0 to LiteN (width multiplier ``w``, depth multiplier ``d``), as the
reference builds it and as the Lite1/Lite2 checkpoints' tensor shapes confirm:

* stem conv (32 channels) and head conv (1280 channels): never scaled;
* every stage's output width: ``round_filters(filters * w)`` (to a multiple of 8, never
  more than 10% below), the first and last stages included (Lite2: 16 -> 16, 320 -> 352);
* repeats: ``ceil(d * repeats)``, except the first and last stages (one block each);
* input size: 224 / 240 / 260 (the padding follows the input the model is called on).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from la_iprop.models.convert import default_torch_name
from la_iprop.models.layers import DepthwiseConv, same_padding

__all__ = ["EfficientNetLite", "EfficientNetLite0", "EfficientNetLite1", "EfficientNetLite2", "LiteVariant",
           "LITE_VARIANTS", "lite_stages", "lite_torch_name", "lite_preprocess"]

# (repeats, kernel, stride, expand_ratio, in_filters, out_filters) of EfficientNet-Lite0.
LITE_BLOCKS = (
    (1, 3, 1, 1, 32, 16),
    (2, 3, 2, 6, 16, 24),
    (2, 5, 2, 6, 24, 40),
    (3, 3, 2, 6, 40, 80),
    (3, 5, 1, 6, 80, 112),
    (4, 5, 2, 6, 112, 192),
    (1, 3, 1, 6, 192, 320),
)


def lite_preprocess(images: jax.Array) -> jax.Array:
    """[0,1] RGB -> the inputs the Lite checkpoints were trained on: (x*255 - 127) / 128."""
    return (images * 255.0 - 127.0) / 128.0


@dataclasses.dataclass(frozen=True)
class LiteVariant:
    """One member of the family: ``efficientnet_lite_builder.py``'s coefficients."""
    width: float
    depth: float
    input_size: int


LITE_VARIANTS = {
    "efficientnet_lite0": LiteVariant(width=1.0, depth=1.0, input_size=224),
    "efficientnet_lite1": LiteVariant(width=1.0, depth=1.1, input_size=240),
    "efficientnet_lite2": LiteVariant(width=1.1, depth=1.2, input_size=260),
}


def _round_filters(filters: int, width: float, divisor: int = 8) -> int:
    """``filters * width`` to a multiple of ``divisor``, never more than 10% below."""
    if width == 1.0:
        return filters
    scaled = filters * width
    new = max(divisor, int(scaled + divisor / 2) // divisor * divisor)
    return int(new + divisor if new < 0.9 * scaled else new)


def _round_repeats(repeats: int, depth: float) -> int:
    return int(math.ceil(depth * repeats))


def lite_stages(width: float = 1.0, depth: float = 1.0,
                blocks: Sequence[tuple[int, int, int, int, int, int]] = LITE_BLOCKS
                ) -> list[tuple[int, int, int, int, int]]:
    """The scaled stages ``(repeats, kernel, stride, expand_ratio, out_filters)``.

    The first and last stages keep their repeats (``fix_head_stem``); every stage's
    width is scaled. The stem (32) and head (1280) are fixed and not listed here.
    """
    stages = []
    for index, (repeats, kernel, stride, expand, _, out_filters) in enumerate(blocks):
        fixed = index in (0, len(blocks) - 1)
        stages.append((repeats if fixed else _round_repeats(repeats, depth), kernel, stride, expand,
                       _round_filters(out_filters, width)))
    return stages


def _bn(name: str) -> nn.BatchNorm:
    return nn.BatchNorm(use_running_average=True, momentum=0.99, epsilon=1e-3, name=name)


POINTWISE_IMPLS = ("matmul", "conv")


class _ConvKernel(nn.Module):
    """Just ``nn.Conv``'s ``kernel`` parameter (same name, shape and initialiser)."""
    shape: tuple[int, ...]

    @nn.compact
    def __call__(self):
        return self.param("kernel", nn.initializers.lecun_normal(), self.shape, jnp.float32)


class SameConv(nn.Module):
    """Dense conv with TF "SAME" padding (input size known at trace time), no bias.

    ``pointwise="matmul"``: a 1x1 stride-1 conv is ``x.reshape(-1, C) @ W`` (on XLA:CPU the
    forward + input VJP of Lite0 at batch 8 is ~12% faster than with ``lax.conv``, measured
    side by side); ``"conv"``: always ``nn.Conv``. Same parameter tree either way.
    """
    features: int
    kernel_size: int
    stride: int = 1
    pointwise: str = "matmul"

    @nn.compact
    def __call__(self, x):
        if self.pointwise not in POINTWISE_IMPLS:
            raise ValueError(f"pointwise must be one of {POINTWISE_IMPLS}, got {self.pointwise!r}")
        if self.kernel_size == 1 and self.stride == 1 and self.pointwise == "matmul":
            kernel = _ConvKernel((1, 1, x.shape[-1], self.features), name="conv")().astype(x.dtype)
            n, h, w, c = x.shape
            return (x.reshape(n * h * w, c) @ kernel[0, 0]).reshape(n, h, w, self.features)
        pad = [same_padding(x.shape[i], self.kernel_size, self.stride) for i in (1, 2)]
        return nn.Conv(self.features, (self.kernel_size, self.kernel_size), (self.stride, self.stride),
                       padding=pad, use_bias=False, name="conv")(x)


class MBConv(nn.Module):
    kernel_size: int
    stride: int
    expand_ratio: int
    out_filters: int
    activation: Callable
    depthwise_impl: str | None = None
    pointwise: str = "matmul"

    @nn.compact
    def __call__(self, inputs):
        x = inputs
        in_filters = inputs.shape[-1]
        if self.expand_ratio != 1:
            x = SameConv(in_filters * self.expand_ratio, 1, pointwise=self.pointwise, name="expand_conv")(x)
            x = self.activation(_bn("bn0")(x))
        x = DepthwiseConv(self.kernel_size, self.stride, self.depthwise_impl, name="depthwise_conv")(x)
        x = self.activation(_bn("bn1")(x))
        x = SameConv(self.out_filters, 1, pointwise=self.pointwise, name="project_conv")(x)
        x = _bn("bn2")(x)
        if self.stride == 1 and in_filters == self.out_filters:
            x = x + inputs  # identity skip (drop-connect is off at inference)
        return x


class EfficientNetLite(nn.Module):
    """EfficientNet-Lite on preprocessed NHWC inputs; returns logits.

    ``activation`` is the model's only nonlinearity (ReLU6): DeepLIFT swaps it for a
    multiplier-aware version with ``module.clone(activation=...)``.
    """
    width: float = 1.0
    depth: float = 1.0
    num_classes: int = 1000
    blocks: Sequence[tuple[int, int, int, int, int, int]] = LITE_BLOCKS
    activation: Callable = jax.nn.relu6
    depthwise_impl: str | None = None
    pointwise: str = "matmul"  # 1x1 convs as matmuls ("conv": nn.Conv), see SameConv

    @nn.compact
    def __call__(self, x):
        x = SameConv(32, 3, 2, name="conv_stem")(x)  # fixed stem: not scaled by width
        x = self.activation(_bn("bn0")(x))
        index = 0
        for repeats, kernel, stride, expand, out_filters in lite_stages(self.width, self.depth, self.blocks):
            for r in range(repeats):
                x = MBConv(kernel, stride if r == 0 else 1, expand, out_filters, self.activation,
                           self.depthwise_impl, self.pointwise, name=f"blocks_{index}")(x)
                index += 1
        x = SameConv(1280, 1, pointwise=self.pointwise, name="conv_head")(x)  # fixed head
        x = self.activation(_bn("bn1")(x))
        x = jnp.mean(x, axis=(1, 2))
        return nn.Dense(self.num_classes, name="fc")(x)


def _preset(name: str):
    variant = LITE_VARIANTS[name]
    return functools.partial(EfficientNetLite, width=variant.width, depth=variant.depth)


EfficientNetLite0 = _preset("efficientnet_lite0")
EfficientNetLite1 = _preset("efficientnet_lite1")
EfficientNetLite2 = _preset("efficientnet_lite2")


def lite_torch_name(path: tuple[str, ...]) -> str:
    """Flax path -> ``efficientnet-lite-pytorch`` name (``_blocks.3._bn1.running_var``)."""
    path = tuple(p for p in path if p != "conv")  # SameConv wraps an nn.Conv named "conv"
    name = default_torch_name(path)
    parts = name.split(".")
    return ".".join(p if p.isdigit() or i == len(parts) - 1 else f"_{p}" for i, p in enumerate(parts))
