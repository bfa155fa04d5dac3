"""A run's configuration: its settings, their validation, and the hyperparameters in effect.

A run is ``methods x images`` under one model, data source, seed and precision; its
:meth:`RunConfig.identity` (settings plus every resolved hyperparameter) is what a resumed
run must match. Validation here is cheap and touches no model; :mod:`la_iprop.runs.prepare`
adds the checks that need the model and the images.

Every image's PRNG key is derived from the seed and the image's index in the data set
(:func:`image_keys`), never from its position in a batch.
"""

from __future__ import annotations

import ast
import dataclasses
import json
import math
import numbers
import os
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from la_iprop.attribution import available_methods, get_method
from la_iprop.attribution import method_hparams as _library_hparams
from la_iprop.data import open_source
from la_iprop.iprop import IPROP_SUFFIX, IPropConfig, with_iprop
from la_iprop.iprop.defaults import DEFAULT_PRESET, preset_hparams
from la_iprop.metrics import PROTOCOLS, get_protocol
from la_iprop.models import available_models
from la_iprop.precision import PRECISIONS
from la_iprop.runs.store import ConfigError

__all__ = ["RunConfig", "ConfigError", "validate", "method_variants", "split_variant", "parse_hparams",
           "resolve_hparams", "attribution_fn", "base_method", "method_hparams", "select_images", "image_keys",
           "CONTROL_SUFFIX", "SETTINGS", "REFERENCE_SET_SIZE", "RUNNER_SUPPLIED", "SEED_LIMIT"]

# The gamma = 0 control of an IProp comparison: the same reward rule (channel aggregation), no
# propagation; it separates the gain of propagation from that of turning the map per-pixel.
CONTROL_SUFFIX = "+ctrl"

SETTINGS = ("quick", "paper")
# Reference images handed to methods that need a reference set (Expected Gradients):
# the first images of the data source, fixed for the whole run.
REFERENCE_SET_SIZE = 8
# A named variant of a method, ``METHOD@LABEL`` (e.g. ``la@s5`` with ``hparams={"la@s5": {"spatial_range": 5}}``):
# several settings of one method in one run, computed batch-major and compared on the same images.
VARIANT_SEPARATOR = "@"


def base_method(name: str) -> str:
    """The registered method of a run's method name (``la@s5`` -> ``la``)."""
    return name.split(VARIANT_SEPARATOR, 1)[0]


def method_hparams(name: str) -> dict:
    """The library defaults of a run's method (a ``METHOD@LABEL`` variant has its method's)."""
    return _library_hparams(base_method(name))


@dataclasses.dataclass(frozen=True)
class RunConfig:
    methods: tuple[str, ...]
    model: str = "efficientnet_lite0"
    weights: str | None = None
    data: str = "samples"
    tfds_data_dir: str | None = None
    num_images: int | None = None        # None: every image of the source (from start, every stride-th)
    start: int = 0                       # first image index
    stride: int = 1                      # images start, start + stride, start + 2 * stride, ...
    batch_size: int = 8
    seed: int = 0
    protocols: tuple[str, ...] = ("la",)  # insertion/deletion protocols the maps are scored under
    iprop: bool = False                  # also run every method + IProp, and its gamma = 0 control
    settings: str = "quick"              # "quick": cheap CPU settings; "paper": the methods' defaults
    hparams: dict = dataclasses.field(default_factory=dict)        # {method: {name: value}}
    iprop_hparams: dict = dataclasses.field(default_factory=dict)  # {name: value}, on top of the preset
    iprop_preset: str = DEFAULT_PRESET   # the IProp settings METHOD+iprop starts from (la_iprop.iprop.PRESETS)
    corruption: str | None = None        # an ImageNet-C corruption of every image, NAME:SEVERITY (la_iprop.data)
    corruption_seed: int = 0             # its per-image randomness is drawn from this seed and the image id
    out: str = ""
    devices: int | None = None           # local devices to shard over (None: all)
    save_attributions: bool = True
    precision: str = "float32"           # "float64": model, images, maps and metric in float64 (bit-reproducible)
    # Named IProp settings {LABEL: hyperparameters}, each run on every method's stored maps as METHOD+iprop@LABEL.
    # Like the protocols they post-process stored maps, so they are not part of the run's identity: each
    # variant's resolved settings are recorded (and checked) in batches/<variant>/iprop.json, and a
    # setting can be added to a finished run (a tuning search adds them step by step).
    iprop_variants: dict = dataclasses.field(default_factory=dict)
    # Maps made elsewhere (:class:`la_iprop.runs.external_maps.ExternalMaps`, ``python -m experiments.evaluate``):
    # ``methods`` are then the file's keys, read from it instead of computed (not registered methods).
    external: Any = None

    @classmethod
    def from_mapping(cls, fields: Any, **overrides: Any) -> "RunConfig":
        """A run from a mapping of its fields (a study's ``ml_collections`` config, JSON): lists become
        tuples, nested mappings plain dicts; ``protocol`` is accepted for ``protocols``. An unknown
        key is a ConfigError naming it."""
        fields = dict(_plain(fields), **overrides)
        if "protocol" in fields:
            if "protocols" in fields:
                raise ConfigError("config: give 'protocols' or 'protocol', not both")
            protocol = fields.pop("protocol")
            fields["protocols"] = (protocol,) if isinstance(protocol, str) else protocol
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(fields) - known)
        if unknown:
            raise ConfigError(f"config: unknown run settings {unknown}; known: {', '.join(sorted(known))}")
        for name in ("methods", "protocols"):
            if name in fields and isinstance(fields[name], list):
                fields[name] = tuple(fields[name])
        return cls(**fields)

    def identity(self) -> dict:
        """The settings that determine the maps (a resumed run must match them). The protocols are
        not among them: stored maps are scored under any protocol (each records its own settings)."""
        keep = ("methods", "model", "weights", "data", "num_images", "start", "stride", "batch_size", "seed",
                "iprop", "settings", "hparams", "iprop_hparams", "save_attributions", "precision")
        # Settings added later enter the identity only when they are not at their default, so a run
        # folder written before they existed keeps its identity.
        extra = {k: getattr(self, k) for k in ("iprop_preset",) if getattr(self, k) != DEFAULT_PRESET}
        if self.corruption is not None:
            extra.update(corruption=self.corruption, corruption_seed=self.corruption_seed)
        return json.loads(json.dumps({**{k: getattr(self, k) for k in keep}, **extra, "resolved": self.resolved()},
                                     default=str))

    def resolved(self) -> dict:
        """Every hyperparameter in effect (library defaults, quick settings, overrides): results
        stored under an older library default must not be resumed into a run under a new one."""
        if self.external is not None:  # the file's content hash and how it is read
            resolved = {"methods": {m: {} for m in self.methods}, "external": self.external.identity()}
        else:
            resolved = {"methods": {m: {k: v for k, v in {**method_hparams(m), **resolve_hparams(self, m)}.items()
                                        if k != "reference_images"} for m in self.methods}}
        if self.iprop:
            resolved["iprop"] = IPropConfig(**_iprop_hparams(self)).as_dict()
            resolved["iprop_control"] = IPropConfig(**_control_hparams(self)).as_dict()
        return json.loads(json.dumps(resolved, default=str))


def resolve_protocol(name: str):
    """A protocol by name: a preset (``la``, ``rise``), or ``<preset>_every<k>``, the preset's curve
    sampled at every k-th point (its step times k: k times cheaper, exactly the preset's curve
    there), the cheap protocol of a tuning search."""
    preset, _, every = name.partition("_every")
    if preset in PROTOCOLS and every.isdigit() and int(every) >= 1:
        k = int(every)
        return get_protocol(preset, step=get_protocol(preset).step * k, name=name) if k > 1 else get_protocol(preset)
    if name not in PROTOCOLS:
        raise ValueError(f"unknown protocol {name!r}; available: {', '.join(PROTOCOLS)}, or PRESET_every<k> "
                         "(the preset's curve at every k-th point)")
    return get_protocol(name)


def _plain(value: Any) -> Any:
    """A config value as plain Python: mappings (ConfigDict included) to dicts, sequences to lists."""
    if hasattr(value, "to_dict"):
        value = value.to_dict()
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


# ----------------------------------------------------------------------------- validation
def parse_hparams(text: str, methods: tuple[str, ...]) -> dict:
    """``"la.max_iter=30,la.sampling_times=20"`` -> ``{"la": {"max_iter": 30, ...}}``.

    The method prefix may be omitted when exactly one method is run. Values are Python
    literals (``30``, ``0.5``, ``'pgd'``, ``None``); anything else is kept as a string.
    """
    result: dict[str, dict[str, Any]] = {}
    for item in filter(None, (part.strip() for part in (text or "").split(","))):
        if "=" not in item:
            raise ConfigError(f"--hparams: expected METHOD.NAME=VALUE, got {item!r}")
        name, value = item.split("=", 1)
        if "." in name:
            method, name = name.split(".", 1)
        elif len(methods) == 1:
            method = methods[0]
        else:
            raise ConfigError(f"--hparams: {item!r} must name its method (METHOD.NAME=VALUE) when running "
                              f"several methods")
        method, name = method.strip(), name.strip()
        try:
            parsed = ast.literal_eval(value)
        except (ValueError, SyntaxError, TypeError):
            parsed = value
        except (RecursionError, MemoryError):
            raise ConfigError(f"--hparams: {method}.{name}: the value is nested too deeply to read") from None
        if name in result.get(method, {}):  # the last one silently winning would hide a typo
            raise ConfigError(f"--hparams: {method}.{name} given more than once")
        result.setdefault(method, {})[name] = parsed
    return result


def method_variants(config: RunConfig) -> list[str]:
    """Names of the attribution variants run: each method; with --iprop also ``method+ctrl`` and
    ``method+iprop``; then ``method+iprop@LABEL`` for every named IProp setting of ``iprop_variants``
    (after the methods: they post-process the methods' stored maps)."""
    names = list(config.methods)
    if config.iprop:
        names += [m + CONTROL_SUFFIX for m in config.methods] + [m + IPROP_SUFFIX for m in config.methods]
    names += [f"{m}{IPROP_SUFFIX}{VARIANT_SEPARATOR}{label}" for label in config.iprop_variants for m in config.methods]
    return names


def _iprop_hparams(config: RunConfig) -> dict:
    """METHOD+iprop's settings: the run's preset with its ``iprop_hparams`` on top."""
    return {**preset_hparams(config.iprop_preset), **config.iprop_hparams}


def _control_hparams(config: RunConfig) -> dict:
    return {**_iprop_hparams(config), "gamma": 0.0}


def split_variant(config: RunConfig, variant: str) -> tuple[str, dict | None]:
    """``(method, IProp hyperparameters)`` of a variant; None for the method's own map."""
    named = IPROP_SUFFIX + VARIANT_SEPARATOR
    if named in variant:
        method, label = variant.rsplit(named, 1)
        return method, dict(config.iprop_variants[label])
    if variant.endswith(IPROP_SUFFIX):
        return variant[: -len(IPROP_SUFFIX)], _iprop_hparams(config)
    if variant.endswith(CONTROL_SUFFIX):
        return variant[: -len(CONTROL_SUFFIX)], _control_hparams(config)
    return variant, None


def _duplicates(names) -> list[str]:
    return sorted({n for n in names if list(names).count(n) > 1})


# Hyperparameters the runner supplies itself: a value given for them would be recorded in run.json and
# then replaced (EG's reference set is the first images of --data, recorded with their hashes).
RUNNER_SUPPLIED = {"reference_images": f"the runner passes the first {REFERENCE_SET_SIZE} images of --data"}
# A run's seed: jax.random.PRNGKey keeps its low 32 bits (without jax_enable_x64), so seeds that differ
# only above them (or a negative seed and its 2**32 complement) would give the same maps as another run.
SEED_LIMIT = 2 ** 32
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


def select_images(config: RunConfig, source) -> np.ndarray:
    """Dataset indices of the run's images: ``start, start + stride, ...`` (``num_images`` of them,
    or up to the end of the source); for supplied maps, the file's ids in its order."""
    if config.external is not None:
        return config.external.indices(source)
    indices = np.arange(config.start, len(source), config.stride, dtype=np.int64)
    return indices[: config.num_images] if config.num_images is not None else indices


def resolve_hparams(config: RunConfig, method: str) -> dict:
    hparams = get_method(base_method(method)).settings_hparams(config.settings)
    hparams.update(config.hparams.get(method, {}))
    return hparams


def attribution_fn(config: RunConfig, variant: str, reference_images: np.ndarray | None) -> Callable:
    method, iprop_hparams = split_variant(config, variant)
    if config.external is not None:  # read from the file (KEY) or IProp of the stored maps (KEY+iprop/+ctrl)
        def supplied(*args):
            raise RuntimeError(f"{variant}: the maps of {method} are read from {config.external.path}, not computed")
        return supplied
    spec = get_method(base_method(method))
    hparams = resolve_hparams(config, method)
    if spec.needs_reference_set:
        hparams["reference_images"] = reference_images
    fn = spec.fn
    if iprop_hparams is not None:
        fn = with_iprop(fn, **iprop_hparams)
    return lambda model, images, labels, keys: fn(model, images, labels, key=keys, precision=config.precision,
                                                  **hparams)


def image_keys(seed: int, indices: np.ndarray) -> jax.Array:
    """Per-image keys from the seed and each image's dataset index (batching-independent)."""
    base = jax.random.PRNGKey(seed)
    return jax.vmap(lambda i: jax.random.fold_in(base, i))(jnp.asarray(indices, jnp.uint32))
