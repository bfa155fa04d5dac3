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
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from la_iprop.attribution import get_method
from la_iprop.attribution import method_hparams as _library_hparams
from la_iprop.iprop import IPROP_SUFFIX, IPropConfig, with_iprop
from la_iprop.iprop.defaults import DEFAULT_PRESET, preset_hparams
from la_iprop.metrics import PROTOCOLS, get_protocol
from la_iprop.runs.store import ConfigError

__all__ = ["RunConfig", "ConfigError", "method_variants", "split_variant", "parse_hparams", "resolve_hparams",
           "attribution_fn", "base_method", "method_hparams", "select_images", "image_keys", "resolve_protocol",
           "CONTROL_SUFFIX", "SETTINGS", "REFERENCE_SET_SIZE", "VARIANT_SEPARATOR"]

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
    nudge_ulps: int = 0                  # every input element moved this many float32 ulps towards 0.5 (a probe)
    out: str = ""
    devices: int | None = None           # local devices to shard over (None: all)
    save_attributions: bool = True
    precision: str = "float32"           # "float64": model, images, maps and metric in float64 (bit-reproducible)
    metric_precision: str | None = None  # the protocols' precision; None: the run's (float32: a float64 run's
                                         # maps scored by the float32 metric, so a difference is the maps' alone)
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
        if self.nudge_ulps:
            extra["nudge_ulps"] = self.nudge_ulps
        if self.metric_precision is not None:
            extra["metric_precision"] = self.metric_precision
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
