"""VGG (torchvision's VGG-16, configuration "D", no BatchNorm) in Flax linen.

3x3 convolutions (padding 1, with bias) and ReLU, 2x2/2 max-pooling, adaptive average
pooling to 7x7 (the identity at 224x224 input), then three fully connected layers with
dropout (off at inference). torchvision flattens the pooled features in C, H, W order,
so the NHWC features are transposed before flattening and the first classifier matrix is
used unchanged.
"""

from __future__ import annotations

import functools
from typing import Callable, Sequence

import flax.linen as nn
import jax

from la_iprop.models.convert import default_torch_name
from la_iprop.models.layers import adaptive_avg_pool2d, max_pool2d
from la_iprop.models.zoo import ModelFn, imagenet_normalize, model_fn_from_weights

__all__ = ["VGG", "VGG16", "VGG16_CONFIG", "vgg_torch_name", "build_vgg16"]

# Output channels of each 3x3 conv; "M" is a 2x2/2 max-pool (torchvision's cfgs["D"]).
VGG16_CONFIG = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M")


class VGG(nn.Module):
    """torchvision VGG on ImageNet-normalised NHWC inputs; returns logits.

    Flax names follow torchvision's ``nn.Sequential`` indices (``features_0`` is
    ``features.0``; ReLU and pooling layers take indices too). ``activation`` (ReLU) and
    ``max_pool`` are fields so that DeepLIFT-like methods can swap them.
    """
    config: Sequence[int | str] = VGG16_CONFIG
    num_classes: int = 1000
    activation: Callable = jax.nn.relu
    max_pool: Callable = max_pool2d

    @nn.compact
    def __call__(self, x):
        index = 0
        for item in self.config:
            if item == "M":
                x = self.max_pool(x, 2, 2, 0)
                index += 1
            else:
                x = nn.Conv(int(item), (3, 3), padding=((1, 1), (1, 1)), name=f"features_{index}")(x)
                x = self.activation(x)
                index += 2
        x = adaptive_avg_pool2d(x, (7, 7))
        x = x.transpose(0, 3, 1, 2).reshape(x.shape[0], -1)  # torch.flatten of NCHW
        x = self.activation(nn.Dense(4096, name="classifier_0")(x))
        x = self.activation(nn.Dense(4096, name="classifier_3")(x))
        return nn.Dense(self.num_classes, name="classifier_6")(x)


VGG16 = functools.partial(VGG, config=VGG16_CONFIG)

# Flax ``features_0/kernel`` is torchvision's ``features.0.weight``.
vgg_torch_name = default_torch_name


def build_vgg16(weights) -> ModelFn:
    """VGG-16 from torchvision weights (``.pth`` path or state dict) or a ``.msgpack`` Flax checkpoint."""
    return model_fn_from_weights(VGG16(), weights, name="vgg16", preprocess=imagenet_normalize,
                                 torch_name=vgg_torch_name)
