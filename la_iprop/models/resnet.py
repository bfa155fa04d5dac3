"""ResNet (torchvision's ResNet-50, "V1.5": the stride sits on the 3x3 conv) in Flax linen.

Inference mode only: BatchNorm uses the running statistics (eps 1e-5, torchvision's
default). Also home of the PyTorch-compatible pooling functions shared by the
torchvision ports (``max_pool2d``, ``avg_pool2d``, ``adaptive_avg_pool2d``), which
reproduce ``torch.nn.functional``'s output sizes, padding and divisors exactly.
"""

from __future__ import annotations

import functools
from typing import Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from la_iprop.models.convert import default_torch_name
from la_iprop.models.layers import max_pool2d
from la_iprop.models.zoo import ModelFn, imagenet_normalize, model_fn_from_weights

__all__ = ["ResNet", "ResNet50", "Bottleneck", "resnet_torch_name", "build_resnet50"]


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
