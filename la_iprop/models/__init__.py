"""Classifiers: Flax ports of ImageNet CNNs behind one pure ``logit_fn`` interface."""

from la_iprop.models.checkpoint import CheckpointError, load_state_dict
from la_iprop.models.convert import ConversionError
from la_iprop.models.zoo import (
                                 ModelFn,
                                 ModelSpec,
                                 available_models,
                                 imagenet_normalize,
                                 load_model,
                                 predict,
                                 register_model,
)

__all__ = ["CheckpointError", "ConversionError", "ModelFn", "ModelSpec", "available_models",
           "imagenet_normalize", "load_model", "load_state_dict", "predict", "register_model"]
