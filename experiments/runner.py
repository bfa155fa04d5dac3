"""One experiment run: methods x images -> attributions, insertion/deletion, reports.

Attributions once, metrics many: the maps of each (variant, batch) are computed once and
written atomically to ``<out>/batches/<variant>/batch_<b>.npz``; they are scored under every
requested protocol into ``<out>/scores/<protocol>/<variant>/batch_<b>.npz`` (layout and
checks: :mod:`experiments.store`). Finished files are skipped, so a run killed at any point
and restarted ends with exactly the records of an uninterrupted run, and the same ``--out``
with a protocol added scores the stored maps without computing any. Every image's PRNG key
is derived from the seed and the image's index in the data set, never from its position in
a batch.

Batches are sharded over the local devices (a 1-D ``data`` mesh); with
``jax.distributed`` initialised, each process takes every ``process_count``-th batch and
process 0 merges all batch files into the reports.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import pathlib
import threading
import time
import zipfile
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from experiments import multihost, report, store
from experiments.store import ConfigError, atomic_write, batch_path, load_records, maps_path, scores_path
from la_iprop.attribution import available_methods, get_method, method_hparams
from la_iprop.data import open_source
from la_iprop.iprop import IPROP_SUFFIX, IPropConfig, iprop, with_iprop
from la_iprop.metrics import PROTOCOLS, evaluate, get_protocol
from la_iprop.models import available_models, load_model
from la_iprop.precision import PRECISIONS, cast_floats, precision_scope

__all__ = ["RunConfig", "ConfigError", "validate", "prepare", "run", "method_variants", "atomic_write",
           "parse_hparams", "batch_path", "load_records", "select_images", "check_method_hparams",
           "CONTROL_SUFFIX"]

log = logging.getLogger("la_iprop")
# The gamma = 0 control of an IProp comparison: the same reward rule (channel aggregation), no
# propagation; it separates the gain of propagation from that of turning the map per-pixel.
CONTROL_SUFFIX = "+ctrl"

SETTINGS = ("quick", "paper")
# Reference images handed to methods that need a reference set (Expected Gradients):
# the first images of the data source, fixed for the whole run.
REFERENCE_SET_SIZE = 8


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
    iprop_hparams: dict = dataclasses.field(default_factory=dict)  # {name: value}
    out: str = ""
    devices: int | None = None           # local devices to shard over (None: all)
    save_attributions: bool = True
    precision: str = "float32"           # "float64": model, images, maps and metric in float64 (bit-reproducible)
    # Maps made elsewhere (experiments.external_maps.ExternalMaps, ``python -m experiments.evaluate``):
    # ``methods`` are then the file's keys, read from it instead of computed (not registered methods).
    external: Any = None

    def identity(self) -> dict:
        """The settings that determine the maps (a resumed run must match them). The protocols are
        not among them: stored maps are scored under any protocol (each records its own settings)."""
        keep = ("methods", "model", "weights", "data", "num_images", "start", "stride", "batch_size", "seed",
                "iprop", "settings", "hparams", "iprop_hparams", "save_attributions", "precision")
        return json.loads(json.dumps({**{k: getattr(self, k) for k in keep}, "resolved": self.resolved()},
                                     default=str))

    def resolved(self) -> dict:
        """Every hyperparameter in effect (library defaults, quick settings, overrides): results
        stored under an older library default must not be resumed into a run under a new one."""
        if self.external is not None:  # the file's content hash and how it is read
            resolved = {"methods": {m: {} for m in self.methods}, "external": self.external.identity()}
        else:
            resolved = {"methods": {m: {k: v for k, v in {**method_hparams(m), **_resolve_hparams(self, m)}.items()
                                        if k != "reference_images"} for m in self.methods}}
        if self.iprop:
            resolved["iprop"] = IPropConfig(**self.iprop_hparams).as_dict()
            resolved["iprop_control"] = IPropConfig(**_control_hparams(self)).as_dict()
        return json.loads(json.dumps(resolved, default=str))


# ----------------------------------------------------------------------------- validation
def parse_hparams(text: str, methods: tuple[str, ...]) -> dict:
    """``"la.max_iter=30,la.sampling_times=20"`` -> ``{"la": {"max_iter": 30, ...}}``.

    The method prefix may be omitted when exactly one method is run. Values are Python
    literals (``30``, ``0.5``, ``'pgd'``, ``None``); anything else is kept as a string.
    """
    import ast

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
        try:
            parsed = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            parsed = value
        result.setdefault(method, {})[name.strip()] = parsed
    return result


def method_variants(config: RunConfig) -> list[str]:
    """Names of the attribution variants run: each method; with --iprop also ``method+ctrl`` and
    ``method+iprop`` (after the methods: they post-process the methods' stored maps)."""
    names = list(config.methods)
    if config.iprop:
        names += [m + CONTROL_SUFFIX for m in config.methods] + [m + IPROP_SUFFIX for m in config.methods]
    return names


def _control_hparams(config: RunConfig) -> dict:
    return {**config.iprop_hparams, "gamma": 0.0}


def split_variant(config: RunConfig, variant: str) -> tuple[str, dict | None]:
    """``(method, IProp hyperparameters)`` of a variant; None for the method's own map."""
    if variant.endswith(IPROP_SUFFIX):
        return variant[: -len(IPROP_SUFFIX)], dict(config.iprop_hparams)
    if variant.endswith(CONTROL_SUFFIX):
        return variant[: -len(CONTROL_SUFFIX)], _control_hparams(config)
    return variant, None


def _duplicates(names) -> list[str]:
    return sorted({n for n in names if list(names).count(n) > 1})


def validate(config: RunConfig):
    """Checks every flag cheaply; returns the opened image source. Raises ConfigError."""
    if not config.methods:
        raise ConfigError("--method: give at least one method, e.g. --method=la")
    if config.precision not in PRECISIONS:
        raise ConfigError(f"--precision: must be one of {', '.join(PRECISIONS)}, got {config.precision!r}")
    if _duplicates(config.methods):
        raise ConfigError(f"--method: {', '.join(_duplicates(config.methods))} given more than once")
    if config.external is not None:
        _validate_external(config)
    for method in config.methods if config.external is None else ():
        if method not in available_methods():
            raise ConfigError(f"--method: unknown method {method!r}; available: {', '.join(available_methods())}")
    for method, values in config.hparams.items():
        if method not in config.methods:
            raise ConfigError(f"--hparams: method {method!r} is not among --method ({', '.join(config.methods)})")
        known = method_hparams(method)
        for name in values:
            if name not in known:
                raise ConfigError(f"--hparams: {method} has no hyperparameter {name!r}; it has: {', '.join(known)}")
    if config.model not in available_models():
        raise ConfigError(f"--model: unknown model {config.model!r}; available: {', '.join(available_models())}")
    if config.weights is not None and not os.path.isfile(config.weights):
        raise ConfigError(f"--weights: file not found: {config.weights}")
    if isinstance(config.protocols, str) or not config.protocols:
        raise ConfigError(f"--protocol: give a list of protocols, e.g. la,rise; got {config.protocols!r}")
    for protocol in config.protocols:
        if protocol not in PROTOCOLS:
            raise ConfigError(f"--protocol: unknown protocol {protocol!r}; available: {', '.join(PROTOCOLS)}")
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
        source = open_source(config.data, tfds_data_dir=config.tfds_data_dir)
    except (ValueError, OSError) as err:
        raise ConfigError(f"--data: {err}") from None
    if config.start >= len(source):
        raise ConfigError(f"--start: {config.start} is past the end of {config.data} ({len(source)} images)")
    if config.iprop_hparams:
        try:
            IPropConfig(**config.iprop_hparams)
        except (TypeError, ValueError) as err:
            raise ConfigError(f"--iprop_hparams: {err}") from None
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


def _check_identity(out: pathlib.Path, config: RunConfig, data: dict | None = None) -> str:
    """Compares the run's identity (settings, and ``data``: the images' fingerprint) with
    ``out/run.json``, which is written for a new run; returns the identity's digest."""
    return store.check_run(out, {**config.identity(), **(data or {})})


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
        attribute = _attribution_fn(probe_config, method, reference_images)
        try:
            attribute(probe, images, labels, keys)
        except _ModelCalled:
            continue
        except (TypeError, ValueError) as err:
            message = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            flag = "--hparams" if config.hparams.get(method) else "--method"
            raise ConfigError(f"{flag}: {method} ({_hparams_text(config, method)}): {message}") from None


def _hparams_text(config: RunConfig, method: str) -> str:
    hparams = _resolve_hparams(config, method)
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
    needing = [m for m in config.methods if config.external is None and get_method(m).needs_reference_set]
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


# ----------------------------------------------------------------------------- computing
def _resolve_hparams(config: RunConfig, method: str) -> dict:
    hparams = get_method(method).settings_hparams(config.settings)
    hparams.update(config.hparams.get(method, {}))
    return hparams


def _attribution_fn(config: RunConfig, variant: str, reference_images: np.ndarray | None) -> Callable:
    method, iprop_hparams = split_variant(config, variant)
    if config.external is not None:  # read from the file (KEY) or IProp of the stored maps (KEY+iprop/+ctrl)
        def supplied(*args):
            raise RuntimeError(f"{variant}: the maps of {method} are read from {config.external.path}, not computed")
        return supplied
    spec = get_method(method)
    hparams = _resolve_hparams(config, method)
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


@jax.jit
def _predict(model, images):
    return jnp.argmax(model(images), axis=-1).astype(jnp.int32)


class _Sharder:
    """Pads a batch to a multiple of the device count and shards it along a ``data`` mesh."""

    def __init__(self, devices: int | None):
        local = jax.local_devices()[: devices or jax.local_device_count()]
        self.count = len(local)
        self.sharding = NamedSharding(Mesh(np.asarray(local), ("data",)), PartitionSpec("data"))

    def put(self, array: np.ndarray | jax.Array, size: int) -> tuple[jax.Array, int]:
        """Pads to ``size`` rounded up to the device count (one compiled shape for every batch)."""
        n = array.shape[0]
        padded = math.ceil(size / self.count) * self.count
        if padded != n:  # repeat the last image: methods are per image, so padding changes nothing
            array = jnp.concatenate([array, jnp.repeat(array[-1:], padded - n, axis=0)])
        return jax.device_put(array, self.sharding), n


def _batches(config: RunConfig, indices: np.ndarray) -> list[tuple[int, np.ndarray]]:
    return [(b, indices[b * config.batch_size:(b + 1) * config.batch_size])
            for b in range(math.ceil(len(indices) / config.batch_size))]


def report_interim(config: RunConfig, *, model=None) -> dict:
    """The reports of a run still in progress (e.g. while it runs in the background), on the images
    already finished for every variant under every protocol; computes nothing. The run must exist
    and have this configuration's identity. Returns the summary (``summary["interim"]``: how many
    of how many images)."""
    out = pathlib.Path(config.out)
    if store.read_run(out) is None:
        raise ConfigError(f"--out: {out} holds no run to report on yet")
    prepared = prepare(config, model=model)
    _check_identity(out, config, prepared.data)
    return report.write_reports(config, out, method_variants(config), len(prepared.indices), prepared.source,
                                interim=True)


def _scan_store(config: RunConfig, out: pathlib.Path, batches: list[store.BatchSpec], variants: list[str],
                protocols: dict, protocol_digests: dict[str, str], image_size: int) -> list[tuple[str, str]]:
    """Checks every batch file of the run (see :mod:`experiments.store`); moves the bad ones aside."""
    process, processes = jax.process_index(), jax.process_count()
    specs = {spec.number: spec for spec in batches}
    image_shape = (image_size, image_size, 3) if config.save_attributions else None
    moved = []
    for variant in variants:
        moved += store.scan(
            out, out / "batches" / variant,
            lambda b, path: store.check_maps_file(path, specs[b], image_shape=image_shape, dtype=config.precision),
            batches=len(batches), mine=lambda b: b % processes == process, strays=process == 0,
            unfinished=processes == 1)
        for p, proto in protocols.items():
            length = proto.num_steps(image_size, image_size, 3) + 1
            moved += store.scan(
                out, out / "scores" / p / variant,
                lambda b, path, p=p, length=length: store.check_scores_file(
                    path, specs[b], protocol=protocol_digests[p], curve_length=length),
                batches=len(batches), mine=lambda b: b % processes == process, strays=process == 0,
                unfinished=processes == 1)
    if moved:
        log.warning("moved %d file(s) aside to %s (reasons in its log.txt); the run's batches among them are "
                    "recomputed", len(moved), out / "quarantine")
    return moved


def run(config: RunConfig, *, progress: bool = True, model=None) -> dict:
    """Runs (or resumes) an experiment and writes its reports; returns the summary.

    Nothing is written before every check of :func:`prepare` has passed. ``model``: an already
    loaded classifier for ``config.model`` (the sweep shares one between cells)."""
    prepared = prepare(config, model=model)
    source, model, indices = prepared.source, prepared.model, prepared.indices
    protocols = {p: get_protocol(p) for p in config.protocols}

    out = pathlib.Path(config.out)
    with multihost.process_zero_first("run identity"):  # process 0 writes a new run.json, the others check it
        multihost.require_visible(out / "run.json", "--out")
        run_digest = _check_identity(out, config, prepared.data)
        protocol_digests = {p: store.check_protocol(out, p, proto.to_dict()) for p, proto in protocols.items()}
    total = len(indices)
    variants = method_variants(config)
    specs = [store.BatchSpec(b, idx, [source.ids[int(i)] for i in idx],
                             prepared.hashes[b * config.batch_size:b * config.batch_size + len(idx)], run_digest)
             for b, idx in _batches(config, indices)]
    _scan_store(config, out, specs, variants, protocols, protocol_digests, model.input_size)
    process, processes = jax.process_index(), jax.process_count()
    batches = [spec for spec in specs if spec.number % processes == process]

    sharder = _Sharder(config.devices)
    shape_size = min(config.batch_size, total)  # every batch is padded to this: one compiled shape
    log.info("%d images, %d batches of %d, %d device(s), methods: %s, protocols: %s",
             total, len(batches), config.batch_size, sharder.count, ", ".join(variants), ", ".join(protocols))

    # Batch-major: every variant of a batch before the next batch, so an interrupted (or --interim
    # reported) run holds complete, paired results for its first images; IProp variants follow
    # their method within the batch (they read its stored maps).
    plan = []  # (batch, variant, maps stored, protocols to score)
    for spec in batches:
        for variant in variants:
            missing = [p for p in protocols if not scores_path(out, p, variant, spec.number).exists()]
            have_maps = maps_path(out, variant, spec.number).exists()
            if missing or not have_maps:
                plan.append((spec, variant, have_maps, missing))
    mine = sum(len(spec) for spec in batches)
    for variant in variants:
        to_compute = sum(len(spec) for spec, v, have, _ in plan if v == variant and not have)
        to_score = sum(len(spec) for spec, v, have, _ in plan if v == variant and have)
        if not (to_compute or to_score):
            log.info("%s: all %d images already done", variant, mine)
            continue
        log.info("%s: maps of %d image(s) to compute (%d already stored)%s", variant, to_compute, mine - to_compute,
                 f", stored maps of {to_score} image(s) to score" if to_score else "")
    attributes: dict[str, Callable] = {}
    running = {variant: _RunningMean(out, variant, config.protocols[0]) for variant in variants}
    todo = sum(len(spec) for spec, *_ in plan)
    tracker = _RunProgress(total=mine * len(variants), done=mine * len(variants) - todo, batches=len(specs),
                           desc=variants[0] if len(variants) == 1 else "maps", enabled=progress)
    loaded = None  # (batch number, its images on the devices, its labels)
    for spec, variant, have_maps, missing in plan:
        b, n = spec.number, len(spec)
        tracker.start_batch(variant, b, n, running[variant])
        if loaded is None or loaded[0] != b:
            batch = source.load(spec.indices)
            loaded = (b, sharder.put(jnp.asarray(batch.images), shape_size)[0], batch.labels)
        images, labels = loaded[1], loaded[2]
        stored = _read_stored_maps(out, variant, b) if have_maps else None
        computing = stored is None or "attribution" not in stored
        tracker.set_stages(["attribution", *protocols] if computing else missing)
        if not computing:
            with precision_scope(config.precision):  # float64 maps stay float64
                maps, _ = sharder.put(jnp.asarray(stored["attribution"]), shape_size)
            predicted, _ = sharder.put(jnp.asarray(stored["predicted"], jnp.int32), shape_size)
        else:
            if stored is not None:
                log.warning("%s batch %d: maps not stored (--save_attributions=false): recomputing them to "
                            "score %s", variant, b, ", ".join(missing))
            if variant not in attributes:
                attributes[variant] = _attribution_fn(config, variant, prepared.reference_images)
            with tracker.stage("attribution"):
                maps, predicted, seconds = _compute_maps(config, model, out, variant, spec, images, sharder,
                                                         shape_size, attributes[variant],
                                                         split_variant(config, variant)[1])
            if stored is None:
                record = {"index": spec.indices, "id": np.asarray(spec.ids, dtype=np.str_),
                          "hash": np.asarray(spec.hashes, dtype=np.str_), "label": labels.astype(np.int64),
                          "predicted": np.asarray(predicted[:n], np.int64), "seconds": np.full(n, seconds),
                          "run": np.asarray(run_digest)}
                if config.save_attributions:
                    record["attribution"] = np.asarray(maps[:n], config.precision)  # float64 keeps every bit
                store.write_npz(maps_path(out, variant, b), record)
            missing = list(protocols)  # new maps: scores of older maps (if any) do not hold for them
        for p in missing:
            with tracker.stage(p):  # the bar moves per scored chunk (numerics identical without it)
                game = evaluate(model, images, maps, protocol=protocols[p], labels=predicted,
                                precision=config.precision, progress=tracker.chunk if progress else None)
            store.write_npz(scores_path(out, p, variant, b), {
                "index": spec.indices, "id": np.asarray(spec.ids, dtype=np.str_),
                "hash": np.asarray(spec.hashes, dtype=np.str_),
                "insertion": game.insertion_aucs[:n], "deletion": game.deletion_aucs[:n],
                "insertion_curve": game.insertion_curves[:n], "deletion_curve": game.deletion_curves[:n],
                "run": np.asarray(run_digest), "protocol": np.asarray(protocol_digests[p])})
            store.record_protocol(out, p, game.protocol)
            if p == config.protocols[0]:
                running[variant].add(game.insertion_aucs[:n], game.deletion_aucs[:n])
        tracker.end_batch()
    tracker.close()

    if processes > 1:  # process 0 merges every process's batch files, then all processes end together
        log.info("process %d of %d: its %d of the %d batches (number %% %d == %d) are written; waiting for the "
                 "other processes", process, processes, len(batches), len(specs), processes, process)
        multihost.barrier("batches written")
        with multihost.process_zero_first("reports written"):
            if process != 0:
                return {}
            multihost.wait_until_visible([path for spec in specs for v in variants for path in
                                          (maps_path(out, v, spec.number),
                                           *(scores_path(out, p, v, spec.number) for p in protocols))])
            return report.write_reports(config, out, variants, total, source)
    return report.write_reports(config, out, variants, total, source)


def _read_stored_maps(out: pathlib.Path, variant: str, batch: int) -> dict[str, np.ndarray] | None:
    """The stored maps file of a batch; None (after moving it aside) if it cannot be read in full."""
    path = maps_path(out, variant, batch)
    try:
        with np.load(path, allow_pickle=False) as stored:
            return {k: stored[k] for k in stored.files}
    except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile) as err:
        store.quarantine(out, path, f"unreadable ({type(err).__name__}: {err})")
        return None


def _compute_maps(config, model, out, variant, spec, images, sharder, shape_size, attribute, iprop_hparams):
    """``(maps, predicted, seconds per image)`` of one batch (padded, sharded)."""
    keys, _ = sharder.put(image_keys(config.seed, spec.indices), shape_size)
    if config.external is not None and config.external.has_labels:  # the classes the supplied maps explain
        predicted, _ = sharder.put(jnp.asarray(config.external.labels_of(spec.ids)), shape_size)
    else:
        with precision_scope(config.precision):  # the clean-image prediction in the run's precision too
            predicted = _predict(cast_floats(model), images)
    started = time.perf_counter()
    if config.external is not None and variant in config.external.keys:  # made elsewhere: read from the file
        with precision_scope(config.precision):  # (a float64 run keeps float64 maps)
            maps, _ = sharder.put(jnp.asarray(config.external.read(variant, spec.ids, config.precision)), shape_size)
        return maps, predicted, 0.0
    base_maps = _stored_base_maps(config, out, variant, spec.number)
    if base_maps is not None:
        with precision_scope(config.precision):  # (a float64 run's stored maps stay float64)
            base_maps, _ = sharder.put(jnp.asarray(base_maps), shape_size)
        values = iprop(images, base_maps, precision=config.precision, **iprop_hparams)
        maps = jax.block_until_ready(jnp.broadcast_to(values[..., None], images.shape))
    else:
        maps = jax.block_until_ready(attribute(model, images, predicted, keys))
    return maps, predicted, (time.perf_counter() - started) / len(spec)


def _stored_base_maps(config: RunConfig, out: pathlib.Path, variant: str, batch: int) -> np.ndarray | None:
    """For ``METHOD+iprop`` and ``METHOD+ctrl``: the method's maps of this batch if this run already
    stored them.

    IProp is a post-processing step, so these variants reuse them instead of running the
    method a second time (same key, same maps).
    """
    method, iprop_hparams = split_variant(config, variant)
    if iprop_hparams is None or not config.save_attributions:
        return None
    if not maps_path(out, method, batch).exists():
        return None
    stored = _read_stored_maps(out, method, batch)  # (checked when the run started)
    return None if stored is None else stored.get("attribution")


class _RunningMean:
    """Running mean of per-image AUCs under the first protocol, seeded with the batches finished earlier."""

    def __init__(self, out: pathlib.Path, variant: str, protocol: str):
        previous = load_records(out, variant, protocol)
        self.ins = list(previous["insertion"]) if previous else []
        self.dele = list(previous["deletion"]) if previous else []

    def add(self, ins, dele):
        self.ins += list(ins)
        self.dele += list(dele)

    @property
    def insertion(self) -> float:
        return float(np.mean(self.ins)) if self.ins else float("nan")

    @property
    def deletion(self) -> float:
        return float(np.mean(self.dele)) if self.dele else float("nan")


def _progress(*, total: int, initial: int, desc: str, enabled: bool):
    """The tqdm bar of a run (see :class:`_RunProgress`): fractional counts of maps, an image under a
    variant (a batch advances per stage and per scored chunk); ETA from the mean rate since the start
    (``smoothing=0``), exact at batch ends."""
    from tqdm.auto import tqdm
    return tqdm(total=total, initial=initial, desc=desc, unit="img", disable=not enabled, smoothing=0,
                bar_format="{desc}: {percentage:3.0f}%|{bar}| {n:.1f}/{total_fmt} img "
                           "[{elapsed}<{remaining}, {rate_fmt}{postfix}]")


def _duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = int(round(seconds))
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


class _RunProgress:
    """Progress of a run: a tqdm bar (``progress=True``) or one INFO line per (variant, batch).

    The bar counts maps (an image under a variant; with one variant, images). Within a batch each
    stage (the maps, then each protocol's insertion/deletion games) owns a share of the batch's
    images, proportional to the seconds per image the stage took in the variant's previous batch
    (equal shares in its first batch, or when the stages differ). The maps are one call per batch:
    their share is added when it returns, while the bar's clock ticks and its postfix names the
    variant and stage; the games advance it per scored chunk (the ``progress`` callback of
    :func:`la_iprop.metrics.evaluate`). At each batch end the count is exact again. Without the bar
    (``--progress=false``) each batch logs its stage seconds, images/s and the run's ETA.
    """

    def __init__(self, *, total: int, done: int, batches: int, desc: str, enabled: bool):
        self.batches, self.enabled = batches, enabled
        self.bar = _progress(total=total, initial=done, desc=desc, enabled=enabled)
        self.total, self.done, self.position = total, done, float(done)   # maps: exact / fractional
        self.started = time.perf_counter()
        self.session_maps = 0
        self.per_image: dict[str, dict[str, float]] = {}   # variant -> seconds per image of each stage
        self.lock = threading.Lock()
        self.variant, self.running, self.number, self.n = "", None, 0, 0
        self.shares: dict[str, float] = {}
        self.stage_done: dict[str, float] = {}
        self.timings: dict[str, float] = {}
        self.current: str | None = None

    # ------------------------------------------------------------------ batches and stages
    def start_batch(self, variant: str, number: int, n: int, running: "_RunningMean") -> None:
        self.variant, self.running, self.number, self.n = variant, running, number, n
        self.timings, self.current, self.shares, self.stage_done = {}, None, {}, {}
        self.batch_started = time.perf_counter()
        self._postfix("loading")

    def set_stages(self, stages) -> None:
        stages = list(stages)
        previous = self.per_image.get(self.variant, {})
        seconds = [previous.get(s) for s in stages]
        if stages and None not in seconds and sum(seconds) > 0:
            self.shares = {s: t / sum(seconds) for s, t in zip(stages, seconds, strict=True)}
        else:
            self.shares = {s: 1.0 / len(stages) for s in stages} if stages else {}
        self.stage_done = {s: 0.0 for s in stages}

    @contextlib.contextmanager
    def stage(self, name: str):
        if name not in self.shares:  # not planned: no share of the bar, its seconds are still logged
            self.shares[name], self.stage_done[name] = 0.0, 0.0
        self.current = name
        self._postfix("attribution" if name == "attribution" else f"metrics {name}")
        started = time.perf_counter()
        stop = threading.Event()
        ticker = threading.Thread(target=self._tick, args=(stop,), daemon=True) if self.enabled else None
        if ticker is not None:
            ticker.start()
        try:
            yield
        finally:
            stop.set()
            if ticker is not None:
                ticker.join()
            self.timings[name] = self.timings.get(name, 0.0) + time.perf_counter() - started
            self._advance(name, 1.0)   # the stage is done: all of its share
            self.current = None

    def chunk(self, count: int, total: int) -> None:
        """``evaluate``'s progress callback (host thread): ``count`` of ``total`` perturbed images scored."""
        current = self.current
        if current is not None and total > 0:
            self._advance(current, self.stage_done.get(current, 0.0) + count / total)

    def end_batch(self) -> None:
        now = time.perf_counter()
        seconds = now - self.batch_started
        with self.lock:
            self.done += self.n
            self.bar.update(self.done - self.position)   # exact again (no fractional drift)
            self.position = float(self.done)
        self.session_maps += self.n
        self.per_image[self.variant] = {s: t / self.n for s, t in self.timings.items()}
        self._postfix(None)
        if not self.enabled:
            rate = self.session_maps / max(now - self.started, 1e-9)
            eta = (self.total - self.done) / rate if rate > 0 else float("inf")
            stages = ", ".join(f"{'attribution' if s == 'attribution' else 'metrics ' + s} {t:.1f} s"
                               for s, t in self.timings.items())
            log.info("%s: batch %d/%d, %d image%s (%d/%d maps done): %s; %.1f s (%.3g images/s); ETA %s for the "
                     "run (%s: ins %.4f, del %.4f)", self.variant, self.number + 1, self.batches, self.n,
                     "" if self.n == 1 else "s", self.done, self.total, stages or "nothing to compute", seconds,
                     self.n / max(seconds, 1e-9), _duration(eta), self.variant, self.running.insertion,
                     self.running.deletion)

    def close(self) -> None:
        self.bar.close()

    # ------------------------------------------------------------------ display
    def _advance(self, stage: str, fraction: float) -> None:
        with self.lock:
            fraction = min(max(fraction, self.stage_done.get(stage, 0.0)), 1.0)
            step = (fraction - self.stage_done.get(stage, 0.0)) * self.shares.get(stage, 0.0) * self.n
            self.stage_done[stage] = fraction
            if step > 0:
                step = min(step, self.done + self.n - self.position)
                self.position += step
                self.bar.update(step)

    def _postfix(self, stage: str | None) -> None:
        if not self.enabled or self.running is None:
            return
        scores = f"ins={self.running.insertion:.4f}, dele={self.running.deletion:.4f}" if self.running.ins else ""
        where = f"{self.variant} · batch {self.number + 1}/{self.batches} · {stage}" if stage else self.variant
        with self.lock:
            self.bar.set_postfix_str(", ".join(part for part in (where, scores) if part))

    def _tick(self, stop: threading.Event) -> None:
        while not stop.wait(1.0):   # keeps the clock moving while a stage's single call runs
            self.bar.refresh()
