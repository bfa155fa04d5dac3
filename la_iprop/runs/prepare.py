"""Every check a run makes before it writes anything (:func:`prepare`).

The flags (:func:`la_iprop.runs.validation.validate`), the output folder (:mod:`la_iprop.runs.outdir`:
empty or the run's own, not ``/``, home or inside the data), the model and its weights, the reference
set of the methods that need one, each method's hyperparameters (probed with a stand-in classifier, see
:func:`check_method_hparams`), the IProp settings against the image size, and every image of the run
decoded once: its content hash is part of the run's identity. Why all of it first: a refusal after
``run.json`` is written leaves a folder that the corrected command is then refused for ("different
settings"); a refused command must leave the folder exactly as it was.
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
from la_iprop.runs import outdir, store
from la_iprop.runs.config import (
    REFERENCE_SET_SIZE,
    ConfigError,
    RunConfig,
    attribution_fn,
    base_method,
    image_keys,
    method_variants,
    resolve_hparams,
    select_images,
)
from la_iprop.runs.validation import validate

try:  # the IProp settings against an image size, without running IProp (la_iprop.iprop >= its hardening)
    from la_iprop.iprop import check_iprop_settings
except ImportError:  # pragma: no cover - an older la_iprop.iprop: IProp checks its settings when it runs
    check_iprop_settings = None

__all__ = ["Prepared", "prepare", "check_method_hparams", "check_iprop_hparams"]

log = logging.getLogger("la_iprop")


class _ModelCalled(Exception):
    """Raised by the probe classifier of :func:`check_method_hparams` at its second call."""


def _probe_classifier(model):
    """The run's classifier, whose first call goes through (what a method's checks of the classifier
    make: ``jax.eval_shape`` of its logits, or a trace) and whose second call stops the method: the
    checks a method makes after its first look at the classifier (target classes against the class
    count, ...) run, and no attribution is computed."""
    calls = []
    preprocess = model.preprocess

    def probe(images):
        calls.append(1)
        if len(calls) > 1:
            raise _ModelCalled
        return preprocess(images)

    return model.replace(preprocess=probe)


def check_method_hparams(config: RunConfig, model, reference_images: np.ndarray | None) -> None:
    """Every method is called once, on one image, with the run's classifier wrapped so that its first
    call goes through and its second stops the method (:func:`_probe_classifier`): the hyperparameters
    in effect are accepted or refused, including what a method checks only after its first look at the
    classifier (LA's ``sampling_times`` above the class count, explicit target classes of the wrong
    length), before anything is computed or written."""
    if not hasattr(model, "replace"):  # not a ModelFn: nothing to probe with
        return
    size = model.input_size
    images = np.full((1, size, size, 3), 0.5, np.float32)
    labels = np.zeros(1, np.int32)
    keys = image_keys(config.seed, np.zeros(1, np.int64))
    probe_config = dataclasses.replace(config, precision="float32")  # the checks do not depend on it
    for method in config.methods:
        attribute = attribution_fn(probe_config, method, reference_images)
        try:
            attribute(_probe_classifier(model), images, labels, keys)
        except _ModelCalled:
            continue
        except (TypeError, ValueError) as err:
            message = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            flag = "--hparams" if config.hparams.get(method) else "--method"
            raise ConfigError(f"{flag}: {method} ({_hparams_text(config, method)}): {message}") from None


def check_iprop_hparams(config: RunConfig, image_size: int) -> None:
    """IProp's settings (and its gamma = 0 control's) against the run's image size and precision: a
    neighbourhood larger than the image is refused now, not at the first IProp batch."""
    if not config.iprop or check_iprop_settings is None:
        return
    for hparams in (config.iprop_hparams, {**config.iprop_hparams, "gamma": 0.0}):
        try:
            check_iprop_settings((image_size, image_size, 3), precision=config.precision, **hparams)
        except (TypeError, ValueError) as err:
            message = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise ConfigError(f"--iprop_hparams: {message} (images of {image_size}x{image_size})") from None


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
    outdir.check_out(config.out, data=config.data, tfds_data_dir=config.tfds_data_dir,
                     inner=outdir.run_inner_paths(method_variants(config), config.protocols))
    if model is None:
        log.info("loading model %s", config.model)
        try:
            model = load_model(config.model, config.weights)
        except (ValueError, FileNotFoundError) as err:
            raise ConfigError(f"--model/--weights: {err}") from None
    if model.input_size != source.size:
        source = open_source(config.data, size=model.input_size, tfds_data_dir=config.tfds_data_dir,
                             corruption=config.corruption, corruption_seed=config.corruption_seed)
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
    check_iprop_hparams(config, int(model.input_size))
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
