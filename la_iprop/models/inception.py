"""Inception-v3 (torchvision's ``Inception3``) in Flax linen, inference mode.

Every convolution is ``BasicConv2d``: conv without bias, BatchNorm with eps 1e-3, ReLU.
Pooling follows torchvision: max-pools 3x3/2 without padding (floor mode), branch
average pools 3x3/1 with padding 1 counting the zero padding (``count_include_pad``).
The auxiliary classifier only runs in training mode, so it is not part of the port
and its tensors (``AuxLogits.*``) are dropped when converting a checkpoint.

The ImageNet weights expect torchvision's ``transform_input``: after the ImageNet
normalisation, channel ``c`` is mapped to ``x * std_c / 0.5 + (mean_c - 0.5) / 0.5``
(i.e. back to the ``(pixel - 0.5) / 0.5`` scale the Google weights were trained on);
:func:`inception_preprocess` applies both steps.
"""

from __future__ import annotations

from typing import Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from la_iprop.models.convert import ConversionError
from la_iprop.models.layers import avg_pool2d, max_pool2d
from la_iprop.models.zoo import IMAGENET_MEAN, IMAGENET_STD, ModelFn, imagenet_normalize, model_fn_from_weights

__all__ = ["Inception3", "InceptionV3", "inception_torch_name", "inception_preprocess", "transform_input",
           "drop_aux_logits", "build_inception_v3"]

_LEAF_NAMES = {"kernel": "weight", "scale": "weight", "bias": "bias", "mean": "running_mean", "var": "running_var"}


def transform_input(x: jax.Array) -> jax.Array:
    """torchvision's ``Inception3._transform_input`` on ImageNet-normalised NHWC inputs."""
    std, mean = jnp.asarray(IMAGENET_STD), jnp.asarray(IMAGENET_MEAN)
    return x * (std / 0.5) + (mean - 0.5) / 0.5


def inception_preprocess(images: jax.Array) -> jax.Array:
    """[0,1] RGB -> ImageNet normalisation -> ``transform_input`` (what ``inception_v3(weights=...)`` sees)."""
    return transform_input(imagenet_normalize(images))


class BasicConv2d(nn.Module):
    """Conv (no bias) -> BatchNorm (eps 1e-3) -> activation; torch-style symmetric padding."""
    features: int
    kernel_size: Sequence[int]
    stride: int = 1
    padding: Sequence[int] = (0, 0)
    activation: Callable = jax.nn.relu

    @nn.compact
    def __call__(self, x):
        ph, pw = self.padding
        x = nn.Conv(self.features, tuple(self.kernel_size), (self.stride, self.stride),
                    padding=((ph, ph), (pw, pw)), use_bias=False, name="conv")(x)
        x = nn.BatchNorm(use_running_average=True, epsilon=1e-3, name="bn")(x)
        return self.activation(x)


def _branch_pool(x):
    return avg_pool2d(x, 3, 1, 1)  # count_include_pad=True, torch's default


class InceptionA(nn.Module):
    pool_features: int
    activation: Callable = jax.nn.relu

    @nn.compact
    def __call__(self, x):
        conv = lambda f, k, p=(0, 0), name=None: BasicConv2d(f, k, 1, p, self.activation, name=name)  # noqa: E731
        b1 = conv(64, (1, 1), name="branch1x1")(x)
        b5 = conv(48, (1, 1), name="branch5x5_1")(x)
        b5 = conv(64, (5, 5), (2, 2), name="branch5x5_2")(b5)
        b3 = conv(64, (1, 1), name="branch3x3dbl_1")(x)
        b3 = conv(96, (3, 3), (1, 1), name="branch3x3dbl_2")(b3)
        b3 = conv(96, (3, 3), (1, 1), name="branch3x3dbl_3")(b3)
        bp = conv(self.pool_features, (1, 1), name="branch_pool")(_branch_pool(x))
        return jnp.concatenate([b1, b5, b3, bp], axis=-1)


class InceptionB(nn.Module):
    activation: Callable = jax.nn.relu
    max_pool: Callable = max_pool2d

    @nn.compact
    def __call__(self, x):
        b3 = BasicConv2d(384, (3, 3), 2, activation=self.activation, name="branch3x3")(x)
        bd = BasicConv2d(64, (1, 1), activation=self.activation, name="branch3x3dbl_1")(x)
        bd = BasicConv2d(96, (3, 3), 1, (1, 1), self.activation, name="branch3x3dbl_2")(bd)
        bd = BasicConv2d(96, (3, 3), 2, activation=self.activation, name="branch3x3dbl_3")(bd)
        return jnp.concatenate([b3, bd, self.max_pool(x, 3, 2, 0)], axis=-1)


class InceptionC(nn.Module):
    channels_7x7: int
    activation: Callable = jax.nn.relu

    @nn.compact
    def __call__(self, x):
        c7 = self.channels_7x7
        conv = lambda f, k, p=(0, 0), name=None: BasicConv2d(f, k, 1, p, self.activation, name=name)  # noqa: E731
        b1 = conv(192, (1, 1), name="branch1x1")(x)
        b7 = conv(c7, (1, 1), name="branch7x7_1")(x)
        b7 = conv(c7, (1, 7), (0, 3), name="branch7x7_2")(b7)
        b7 = conv(192, (7, 1), (3, 0), name="branch7x7_3")(b7)
        bd = conv(c7, (1, 1), name="branch7x7dbl_1")(x)
        bd = conv(c7, (7, 1), (3, 0), name="branch7x7dbl_2")(bd)
        bd = conv(c7, (1, 7), (0, 3), name="branch7x7dbl_3")(bd)
        bd = conv(c7, (7, 1), (3, 0), name="branch7x7dbl_4")(bd)
        bd = conv(192, (1, 7), (0, 3), name="branch7x7dbl_5")(bd)
        bp = conv(192, (1, 1), name="branch_pool")(_branch_pool(x))
        return jnp.concatenate([b1, b7, bd, bp], axis=-1)


class InceptionD(nn.Module):
    activation: Callable = jax.nn.relu
    max_pool: Callable = max_pool2d

    @nn.compact
    def __call__(self, x):
        conv = lambda f, k, s=1, p=(0, 0), name=None: BasicConv2d(f, k, s, p, self.activation, name=name)  # noqa: E731
        b3 = conv(192, (1, 1), name="branch3x3_1")(x)
        b3 = conv(320, (3, 3), 2, name="branch3x3_2")(b3)
        b7 = conv(192, (1, 1), name="branch7x7x3_1")(x)
        b7 = conv(192, (1, 7), 1, (0, 3), name="branch7x7x3_2")(b7)
        b7 = conv(192, (7, 1), 1, (3, 0), name="branch7x7x3_3")(b7)
        b7 = conv(192, (3, 3), 2, name="branch7x7x3_4")(b7)
        return jnp.concatenate([b3, b7, self.max_pool(x, 3, 2, 0)], axis=-1)


class InceptionE(nn.Module):
    activation: Callable = jax.nn.relu

    @nn.compact
    def __call__(self, x):
        conv = lambda f, k, p=(0, 0), name=None: BasicConv2d(f, k, 1, p, self.activation, name=name)  # noqa: E731
        b1 = conv(320, (1, 1), name="branch1x1")(x)
        b3 = conv(384, (1, 1), name="branch3x3_1")(x)
        b3 = jnp.concatenate([conv(384, (1, 3), (0, 1), name="branch3x3_2a")(b3),
                              conv(384, (3, 1), (1, 0), name="branch3x3_2b")(b3)], axis=-1)
        bd = conv(448, (1, 1), name="branch3x3dbl_1")(x)
        bd = conv(384, (3, 3), (1, 1), name="branch3x3dbl_2")(bd)
        bd = jnp.concatenate([conv(384, (1, 3), (0, 1), name="branch3x3dbl_3a")(bd),
                              conv(384, (3, 1), (1, 0), name="branch3x3dbl_3b")(bd)], axis=-1)
        bp = conv(192, (1, 1), name="branch_pool")(_branch_pool(x))
        return jnp.concatenate([b1, b3, bd, bp], axis=-1)


class Inception3(nn.Module):
    """torchvision Inception-v3 on already transformed NHWC inputs (see :func:`inception_preprocess`).

    ``activation`` (ReLU, in every BasicConv2d) and ``max_pool`` (stem and reduction
    blocks) are fields so that DeepLIFT-like methods can swap them.
    """
    num_classes: int = 1000
    activation: Callable = jax.nn.relu
    max_pool: Callable = max_pool2d

    @nn.compact
    def __call__(self, x):
        act, pool = self.activation, self.max_pool
        x = BasicConv2d(32, (3, 3), 2, activation=act, name="Conv2d_1a_3x3")(x)
        x = BasicConv2d(32, (3, 3), activation=act, name="Conv2d_2a_3x3")(x)
        x = BasicConv2d(64, (3, 3), 1, (1, 1), act, name="Conv2d_2b_3x3")(x)
        x = pool(x, 3, 2, 0)
        x = BasicConv2d(80, (1, 1), activation=act, name="Conv2d_3b_1x1")(x)
        x = BasicConv2d(192, (3, 3), activation=act, name="Conv2d_4a_3x3")(x)
        x = pool(x, 3, 2, 0)
        x = InceptionA(32, act, name="Mixed_5b")(x)
        x = InceptionA(64, act, name="Mixed_5c")(x)
        x = InceptionA(64, act, name="Mixed_5d")(x)
        x = InceptionB(act, pool, name="Mixed_6a")(x)
        x = InceptionC(128, act, name="Mixed_6b")(x)
        x = InceptionC(160, act, name="Mixed_6c")(x)
        x = InceptionC(160, act, name="Mixed_6d")(x)
        x = InceptionC(192, act, name="Mixed_6e")(x)
        x = InceptionD(act, pool, name="Mixed_7a")(x)
        x = InceptionE(act, name="Mixed_7b")(x)
        x = InceptionE(act, name="Mixed_7c")(x)
        x = jnp.mean(x, axis=(1, 2))  # adaptive average pool to 1x1; dropout is off at inference
        return nn.Dense(self.num_classes, name="fc")(x)


InceptionV3 = Inception3


def inception_torch_name(path: tuple[str, ...]) -> str:
    """``('params', 'Mixed_6b', 'branch7x7_1', 'conv', 'kernel')`` -> ``'Mixed_6b.branch7x7_1.conv.weight'``.

    torchvision's Inception names contain ``_<digit>`` that are not list indices, so
    module names are joined unchanged (no ``default_torch_name`` index rule).
    """
    *modules, leaf = path[1:]
    return ".".join([*modules, _LEAF_NAMES.get(leaf, leaf)])


def drop_aux_logits(state_dict: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The state dict without the auxiliary classifier (``AuxLogits.*``), unused at inference.

    torchvision's ImageNet checkpoint contains it (``inception_v3`` loads it with
    ``aux_logits=True``); a checkpoint without it is accepted as well.
    """
    if not isinstance(state_dict, dict):
        raise ConversionError(f"expected a state dict, got {type(state_dict).__name__}")
    return {k: v for k, v in state_dict.items() if not k.startswith("AuxLogits.")}


def build_inception_v3(weights) -> ModelFn:
    """Inception-v3 from torchvision weights (``.pth`` path or state dict, ``AuxLogits`` dropped) or a
    ``.msgpack`` Flax checkpoint; 224x224 input as in the LA paper."""
    return model_fn_from_weights(InceptionV3(), weights, name="inception_v3", preprocess=inception_preprocess,
                                 torch_name=inception_torch_name, prepare=drop_aux_logits)
