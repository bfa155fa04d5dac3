"""Every check a run makes before it writes anything (:func:`prepare`).

The flags (:func:`la_iprop.runs.config.validate`), the model and its weights, the reference
set of the methods that need one, each method's hyperparameters (probed with a classifier
that stops at its first call), and every image of the run decoded once: its content hash is
part of the run's identity.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import Any

import numpy as np

from la_iprop.attribution import get_method
from la_iprop.data import open_source
from la_iprop.models import load_model
from la_iprop.runs import store
from la_iprop.runs.config import (
    REFERENCE_SET_SIZE,
    ConfigError,
    RunConfig,
    attribution_fn,
    base_method,
    image_keys,
    resolve_hparams,
    select_images,
    validate,
)

__all__ = ["Prepared", "prepare", "check_method_hparams"]

log = logging.getLogger("la_iprop")


class _ModelCalled(Exception):
    """Raised by the probe classifier of :func:`check_method_hparams` at its first call."""


def _stop_at_model(images):
    raise _ModelCalled


def check_method_hparams(config: RunConfig, model, reference_images: np.ndarray | None) -> None:
    """Every method checks its hyperparameters before it first calls the classifier, so each method
    is called once with a probe (the run's model, whose first call stops the method): the
    hyperparameters in effect are accepted or refused before anything is computed or written. (A
    check a method makes only after its first model call is not covered.)"""
    if not hasattr(model, "replace"):  # not a ModelFn: nothing to probe with
        return
    probe = model.replace(preprocess=_stop_at_model)
    size = model.input_size
    images = np.full((1, size, size, 3), 0.5, np.float32)
    labels = np.zeros(1, np.int32)
    keys = image_keys(config.seed, np.zeros(1, np.int64))
    probe_config = dataclasses.replace(config, precision="float32")  # the checks do not depend on it
    for method in config.methods:
        attribute = attribution_fn(probe_config, method, reference_images)
        try:
            attribute(probe, images, labels, keys)
        except _ModelCalled:
            continue
        except (TypeError, ValueError) as err:
            message = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            flag = "--hparams" if config.hparams.get(method) else "--method"
            raise ConfigError(f"{flag}: {method} ({_hparams_text(config, method)}): {message}") from None


def _hparams_text(config: RunConfig, method: str) -> str:
    hparams = resolve_hparams(config, method)
    return ", ".join(f"{k}={v!r}" for k, v in hparams.items()) or "defaults"


@dataclasses.dataclass
class Prepared:
    """A run that passed every check: what it reads and the fingerprint of its data."""
    source: Any
    model: Any
    indices: np.ndarray
    hashes: list[str]
    reference_images: np.ndarray | None
    data: dict  # the images (and the reference set) as recorded in run.json


def prepare(config: RunConfig, *, model=None) -> Prepared:
    """Every check a run makes before it writes anything: the flags, the model and its weights, the
    reference set (only when a method needs one), the methods' hyperparameters, and every image of
    the run decoded once (its content hash is part of the run's identity). Raises ConfigError."""
    source = validate(config)
    if model is None:
        log.info("loading model %s", config.model)
        try:
            model = load_model(config.model, config.weights)
        except (ValueError, FileNotFoundError) as err:
            raise ConfigError(f"--model/--weights: {err}") from None
    if model.input_size != source.size:
        source = open_source(config.data, size=model.input_size, tfds_data_dir=config.tfds_data_dir)
    data, reference = {}, None
    needing = [m for m in config.methods if config.external is None and get_method(base_method(m)).needs_reference_set]
    if needing:
        count = min(REFERENCE_SET_SIZE, len(source))
        what = f"the reference set of {', '.join(needing)} (images 0-{count - 1} of {config.data})"
        try:
            reference = source.load(range(count)).images
            data["reference"] = {"ids": source.ids[:count], "hashes": store.image_hashes(source, range(count))}
        except (ValueError, OSError) as err:
            raise ConfigError(f"--data: {what}: {err}") from None
    if config.external is not None:  # sizes, ids, labels and every value of the supplied maps
        config.external.check(model, source, config.precision)
    else:
        check_method_hparams(config, model, reference)
    indices = select_images(config, source)
    started = time.perf_counter()
    try:
        hashes = store.image_hashes(source, indices)
    except (ValueError, OSError) as err:
        raise ConfigError(f"--data: {err}") from None
    log.info("fingerprinted %d images in %.1f s", len(indices), time.perf_counter() - started)
    data["images"] = {"count": int(len(indices)), "digest": store.digest([indices.tolist(), hashes]),
                      "indices": indices.tolist(), "ids": [source.ids[int(i)] for i in indices], "hashes": hashes,
                      "size": int(source.size)}  # resized (and centre-cropped) to the model's input size
    return Prepared(source, model, indices, hashes, reference, data)
