"""Validation of a run's settings: every flag checked cheaply, before any model is loaded.

Types, ranges and finiteness of every setting and hyperparameter (a hyperparameter the runner
supplies itself is refused, not ignored), known methods, models and protocols, the data source
(opened, so a bad labels file or image folder is refused here), named variants, IProp presets
and settings. Every refusal is a :class:`~la_iprop.runs.store.ConfigError` naming the flag.
:mod:`la_iprop.runs.prepare` adds the checks that need the model and the images.
"""

from __future__ import annotations

import math
import numbers
import os
from typing import Any

import jax
import numpy as np

from la_iprop.attribution import available_methods
from la_iprop.data import open_source
from la_iprop.iprop import IPropConfig
from la_iprop.iprop.defaults import preset_hparams
from la_iprop.models import available_models
from la_iprop.precision import PRECISIONS
from la_iprop.runs.config import (
    REFERENCE_SET_SIZE,
    SETTINGS,
    VARIANT_SEPARATOR,
    RunConfig,
    _iprop_hparams,
    base_method,
    method_hparams,
    resolve_protocol,
)
from la_iprop.runs.store import ConfigError

__all__ = ["validate", "RUNNER_SUPPLIED", "SEED_LIMIT"]


def _duplicates(names) -> list[str]:
    return sorted({n for n in names if list(names).count(n) > 1})


# Hyperparameters the runner supplies itself: a value given for them would be recorded in run.json and
# then replaced (EG's reference set is the first images of --data, recorded with their hashes).
RUNNER_SUPPLIED = {"reference_images": f"the runner passes the first {REFERENCE_SET_SIZE} images of --data"}
# A run's seed: jax.random.PRNGKey keeps its low 32 bits (without jax_enable_x64), so seeds that differ
# only above them (or a negative seed and its 2**32 complement) would give the same maps as another run.
SEED_LIMIT = 2 ** 32
MAX_NUDGE_ULPS = 1 << 16  # a probe of the last bits, not a perturbation (each ulp is one nextafter pass)
# Flag of each RunConfig field whose type validate checks (a study or sweep config may give any JSON type).
_FLAGS = {"methods": "--method", "protocols": "--protocol", "model": "--model", "weights": "--weights",
          "data": "--data", "tfds_data_dir": "--tfds_data_dir", "num_images": "--num_images", "start": "--start",
          "stride": "--stride", "batch_size": "--batch_size", "seed": "--seed", "iprop": "--iprop",
          "settings": "--settings", "hparams": "--hparams", "iprop_hparams": "--iprop_hparams", "out": "--out",
          "devices": "--devices", "save_attributions": "--save_attributions", "precision": "--precision"}
_INTEGERS = ("num_images", "start", "stride", "batch_size", "seed", "devices")  # num_images, devices: or None
_OPTIONAL = ("num_images", "devices", "weights", "tfds_data_dir")
_STRINGS = ("model", "weights", "data", "tfds_data_dir", "settings", "out", "precision")


def _check_types(config: RunConfig) -> None:
    """Each field of the type its checks assume: a JSON config's ``"8"``, ``1.5``, ``true`` or ``null`` is
    one line naming the setting, not a TypeError further on (``True`` is not an integer here)."""
    for name, flag in _FLAGS.items():
        value = getattr(config, name)
        if value is None and name in _OPTIONAL:
            continue
        if name in _INTEGERS and (isinstance(value, bool) or not isinstance(value, numbers.Integral)):
            raise ConfigError(f"{flag}: must be an integer, got {value!r}")
        if name in _STRINGS and not isinstance(value, str):
            raise ConfigError(f"{flag}: must be a string, got {value!r}")
        if name in ("iprop", "save_attributions") and not isinstance(value, (bool, np.bool_)):
            raise ConfigError(f"{flag}: must be true or false, got {value!r}")
        if name in ("methods", "protocols") and not (name == "protocols" and isinstance(value, str)) and (
                not isinstance(value, (tuple, list)) or not all(isinstance(v, str) and v for v in value)):
            raise ConfigError(f"{flag}: must be a list of names, got {value!r}")
        if name in ("hparams", "iprop_hparams") and not isinstance(value, dict):
            raise ConfigError(f"{flag}: must be a mapping of names to values, got {type(value).__name__}")
    for method, values in config.hparams.items():
        if not isinstance(values, dict) or not all(isinstance(k, str) for k in values):
            raise ConfigError(f"--hparams: {method!r}: expected a mapping of hyperparameter names to values, got "
                              f"{values!r}"[:200])
    if not 0 <= config.seed < SEED_LIMIT:
        raise ConfigError(f"--seed: must be in [0, 2**32), got {config.seed}: jax.random.PRNGKey keeps the low 32 "
                          "bits, so a larger or negative seed would repeat the maps of another seed")


def _is_number(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _check_finite(where: str, value: Any, numeric: bool) -> None:
    """Numbers must be finite (an infinite radius or noise level gives all-zero maps that score well);
    ``numeric``: the default is a number, so a string that reads as one (``inf``, ``nan``) is one too."""
    if isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            _check_finite(f"{where}[{i}]", item, numeric)
        return
    if isinstance(value, np.ndarray):
        bad = np.issubdtype(value.dtype, np.number) and not np.isfinite(value).all()
    elif _is_number(value):
        try:
            bad = not math.isfinite(value)
        except OverflowError:  # an integer beyond float's range is still a finite number
            bad = False
    elif numeric and isinstance(value, str):
        try:
            bad = not math.isfinite(float(value))
        except ValueError:
            bad = False  # not a number at all: the method's own check names what it expects
    else:
        bad = False
    if bad:
        raise ConfigError(f"{where}={value!r}: must be a finite number")


def _check_hparam(method: str, name: str, value: Any, default: Any) -> None:
    """Refuses what a run cannot honour: a value the runner supplies itself, an output other than maps,
    a non-finite number."""
    where = f"--hparams: {method}.{name}"
    if name in RUNNER_SUPPLIED:
        raise ConfigError(f"{where}: supplied by the runner ({RUNNER_SUPPLIED[name]}), it cannot be set")
    if name.startswith("return_") and value is not False:
        raise ConfigError(f"{where}={value!r}: a run stores the maps only; {name} changes what {base_method(method)} "
                          "returns (call the library function for it)")
    _check_finite(where, value, _is_number(default))


def validate(config: RunConfig):
    """Checks every flag cheaply; returns the opened image source. Raises ConfigError."""
    _check_types(config)
    if not config.methods:
        raise ConfigError("--method: give at least one method, e.g. --method=la")
    if config.precision not in PRECISIONS:
        raise ConfigError(f"--precision: must be one of {', '.join(PRECISIONS)}, got {config.precision!r}")
    if config.metric_precision is not None and config.metric_precision not in PRECISIONS:
        raise ConfigError(f"metric_precision: must be None (the run's precision) or one of {', '.join(PRECISIONS)}, "
                          f"got {config.metric_precision!r}")
    if isinstance(config.nudge_ulps, bool) or not isinstance(config.nudge_ulps, numbers.Integral) or not (
            0 <= config.nudge_ulps <= MAX_NUDGE_ULPS):
        raise ConfigError(f"nudge_ulps: must be an integer in [0, {MAX_NUDGE_ULPS}], got {config.nudge_ulps!r}")
    if config.nudge_ulps and config.precision != "float32":
        raise ConfigError(f"nudge_ulps: moves the images by float32 ulps, so it needs precision float32, got "
                          f"{config.precision!r}")
    if _duplicates(config.methods):
        raise ConfigError(f"--method: {', '.join(_duplicates(config.methods))} given more than once")
    if config.external is not None:
        _validate_external(config)
    for method in config.methods if config.external is None else ():
        if base_method(method) not in available_methods():
            raise ConfigError(f"--method: unknown method {method!r}; available: {', '.join(available_methods())} "
                              f"(a named variant is METHOD{VARIANT_SEPARATOR}LABEL)")
        if VARIANT_SEPARATOR in method and not method.split(VARIANT_SEPARATOR, 1)[1].replace("_", "").isalnum():
            raise ConfigError(f"--method: {method!r}: the label of a named variant is letters, digits and _")
    for method, values in config.hparams.items():
        if method not in config.methods:
            raise ConfigError(f"--hparams: method {method!r} is not among --method ({', '.join(config.methods)})")
        known = method_hparams(method)
        for name, value in values.items():
            if name not in known:
                raise ConfigError(f"--hparams: {method} has no hyperparameter {name!r}; it has: {', '.join(known)}")
            _check_hparam(method, name, value, known[name])
    if config.model not in available_models():
        raise ConfigError(f"--model: unknown model {config.model!r}; available: {', '.join(available_models())}")
    if config.weights is not None and not os.path.isfile(config.weights):
        raise ConfigError(f"--weights: file not found: {config.weights}")
    if isinstance(config.protocols, str) or not config.protocols:
        raise ConfigError(f"--protocol: give a list of protocols, e.g. la,rise; got {config.protocols!r}")
    for protocol in config.protocols:
        try:
            resolve_protocol(protocol)
        except ValueError as err:
            raise ConfigError(f"--protocol: {err}") from None
    if _duplicates(config.protocols):
        raise ConfigError(f"--protocol: {', '.join(_duplicates(config.protocols))} given more than once")
    if config.settings not in SETTINGS:
        raise ConfigError(f"--settings: expected one of {', '.join(SETTINGS)}, got {config.settings!r}")
    if config.num_images is not None and config.num_images <= 0:
        raise ConfigError(f"--num_images: must be > 0, got {config.num_images}")
    if config.batch_size <= 0:
        raise ConfigError(f"--batch_size: must be > 0, got {config.batch_size}")
    if config.start < 0:
        raise ConfigError(f"--start: must be >= 0, got {config.start}")
    if config.stride <= 0:
        raise ConfigError(f"--stride: must be >= 1, got {config.stride}")
    if config.devices is not None and not 1 <= config.devices <= jax.local_device_count():
        raise ConfigError(f"--devices: must be in [1, {jax.local_device_count()}], got {config.devices}")
    if not config.out:
        raise ConfigError("--out: an output directory is required")
    if os.path.exists(config.out) and not os.path.isdir(config.out):
        raise ConfigError(f"--out: {config.out} exists and is not a folder")
    try:
        source = open_source(config.data, tfds_data_dir=config.tfds_data_dir, corruption=config.corruption,
                             corruption_seed=config.corruption_seed)
    except (ValueError, OSError, ImportError) as err:  # (ImportError: the corruptions extra is not installed)
        raise ConfigError(f"--data: {err}") from None
    if config.start >= len(source):
        raise ConfigError(f"--start: {config.start} is past the end of {config.data} ({len(source)} images)")
    for name, value in config.iprop_hparams.items():
        _check_finite(f"--iprop_hparams: {name}", value, True)
    try:
        preset_hparams(config.iprop_preset)
    except ValueError as err:
        raise ConfigError(f"--iprop_preset: {err}") from None
    if config.iprop_hparams:
        try:
            IPropConfig(**_iprop_hparams(config))
        except (TypeError, ValueError) as err:
            raise ConfigError(f"--iprop_hparams: {err}") from None
    for label, hparams in config.iprop_variants.items():
        if not isinstance(label, str) or not label.replace("_", "").isalnum():
            raise ConfigError(f"iprop_variants: label {label!r} must be letters, digits and _")
        try:
            IPropConfig(**hparams)
        except (TypeError, ValueError) as err:
            raise ConfigError(f"iprop_variants: {label}: {err}") from None
    return source


def _validate_external(config: RunConfig) -> None:
    """A run of maps made elsewhere: its variants are the file's keys, nothing is computed but IProp."""
    if tuple(config.methods) != tuple(config.external.keys):
        raise ConfigError(f"--method: a run of supplied maps runs the file's keys ({', '.join(config.external.keys)}),"
                          f" got {', '.join(config.methods)}")
    if config.hparams:
        raise ConfigError("--hparams: supplied maps have no hyperparameters")
    if not config.save_attributions:
        raise ConfigError("--save_attributions: supplied maps are always stored (IProp and new protocols read them)")
    if config.num_images is not None or config.start or config.stride != 1:
        raise ConfigError("--num_images/--start/--stride: the images of supplied maps are the file's ids")
