"""The run engine: methods x images -> attributions, insertion/deletion scores, reports.

Attributions once, metrics many: the maps of each (variant, batch) are computed once and
written atomically to ``<out>/batches/<variant>/batch_<b>.npz``; they are scored under every
requested protocol into ``<out>/scores/<protocol>/<variant>/batch_<b>.npz`` (layout and
checks: :mod:`la_iprop.runs.store`). Finished files are skipped, so a run killed at any point
and restarted ends with exactly the records of an uninterrupted run, and the same ``out``
with a protocol added scores the stored maps without computing any.

The run is batch-major: every variant of a batch before the next batch, so an interrupted run
holds complete, paired results for its first images. Batches are sharded over the local
devices (a 1-D ``data`` mesh); with ``jax.distributed`` initialised, each process takes every
``process_count``-th batch and process 0 merges all batch files into the reports.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import pathlib
import time
import zipfile
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from la_iprop.attribution.base import NonFiniteAttributionError
from la_iprop.data import nudge_toward_half
from la_iprop.iprop import IPROP_SUFFIX, IPropConfig, iprop
from la_iprop.metrics import evaluate
from la_iprop.models import predict
from la_iprop.precision import cast_floats, precision_dtype, precision_scope
from la_iprop.runs import multihost, report, store
from la_iprop.runs.config import (
    VARIANT_SEPARATOR,
    ConfigError,
    RunConfig,
    attribution_fn,
    image_keys,
    method_variants,
    resolve_protocol,
    split_variant,
)
from la_iprop.runs.prepare import prepare
from la_iprop.runs.progress import RunningMean, RunProgress
from la_iprop.runs.store import maps_path, scores_path

__all__ = ["run", "report_interim", "check_identity"]

log = logging.getLogger("la_iprop")
_predict = jax.jit(predict)  # the clean-image class of every image of a batch


def check_identity(out: pathlib.Path, config: RunConfig, data: dict | None = None) -> str:
    """Compares the run's identity (settings, and ``data``: the images' fingerprint) with
    ``out/run.json``, which is written for a new run; returns the identity's digest."""
    return store.check_run(out, {**config.identity(), **(data or {})})


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
    check_identity(out, config, prepared.data)
    return report.write_reports(config, out, method_variants(config), len(prepared.indices), prepared.source,
                                interim=True)


def _scan_store(config: RunConfig, out: pathlib.Path, batches: list[store.BatchSpec], variants: list[str],
                protocols: dict, protocol_digests: dict[str, str], image_size: int) -> list[tuple[str, str]]:
    """Checks every batch file of the run (see :mod:`la_iprop.runs.store`); moves the bad ones aside."""
    process, processes = jax.process_index(), jax.process_count()
    specs = {spec.number: spec for spec in batches}
    moved = []
    for variant in variants:
        image_shape = (image_size, image_size, 3) if _keeps_maps(config, variant) else None
        moved += store.scan(
            out, out / "batches" / variant,
            lambda b, path, image_shape=image_shape: store.check_maps_file(path, specs[b], image_shape=image_shape,
                                                                          dtype=precision_dtype(config.precision)),
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


@contextlib.contextmanager
def _named_images(variant: str, batch: int, spec: store.BatchSpec, what: str):
    """A method, IProp or the metric refusing its numbers (non-finite maps or scores, maps too large
    for IProp) ends the run with one line naming the variant and the images; what is stored stays."""
    try:
        yield
    except NonFiniteAttributionError as err:
        ids = [spec.ids[r] for r in err.rows if r < len(spec)]
        raise ConfigError(f"{variant}: non-finite {what} for image(s) {', '.join(ids[:5])}"
                          f"{' ...' if len(ids) > 5 else ''} (batch {batch}): {err}") from None
    except ValueError as err:
        text = " ".join(str(err).split())
        raise ConfigError(f"{variant}: {what} of batch {batch} (images {spec.ids[0]}..{spec.ids[-1]}): "
                          f"{text}") from None


def _keeps_maps(config: RunConfig, variant: str) -> bool:
    """Whether a variant's maps are stored: with ``save_attributions``, except a named IProp variant's
    (``METHOD+iprop@LABEL``), which is recomputed from the stored method maps when needed (a tuning
    search makes hundreds of them; their scores are what it keeps)."""
    return config.save_attributions and IPROP_SUFFIX + VARIANT_SEPARATOR not in variant


def _check_iprop_variants(out: pathlib.Path, config: RunConfig) -> None:
    """The maps of a named IProp variant (``METHOD+iprop@LABEL``) stored in ``out`` must have been made
    with its settings now: they are recorded in ``batches/<variant>/iprop.json`` when it is first run."""
    named = IPROP_SUFFIX + VARIANT_SEPARATOR
    for variant in method_variants(config):
        if named not in variant:
            continue
        settings = IPropConfig(**split_variant(config, variant)[1]).as_dict()
        path = out / "batches" / variant / "iprop.json"
        if not path.exists():
            store.write_json(path, settings)
            continue
        try:
            stored = json.loads(path.read_text())
        except (OSError, ValueError) as err:
            raise ConfigError(f"iprop_variants: cannot read {path} ({err}); move batches/{variant} aside") from None
        if stored != json.loads(json.dumps(settings, default=str)):
            changed = sorted(k for k in set(stored) | set(settings) if stored.get(k) != settings.get(k))
            raise ConfigError(f"iprop_variants: {variant} in {out} was computed with other IProp settings "
                              f"({', '.join(changed)}); give the new setting another label")


def run(config: RunConfig, *, progress: bool = True, model=None, reports: bool = True) -> dict:
    """Runs (or resumes) an experiment and writes its reports; returns the summary.

    Nothing is written before every check of :func:`prepare` has passed. ``model``: an already
    loaded classifier for ``config.model`` (the sweep shares one between cells). ``reports=False``:
    only the batch files (a study reads the records itself); returns ``{}``."""
    prepared = prepare(config, model=model)
    source, model, indices = prepared.source, prepared.model, prepared.indices
    protocols = {p: resolve_protocol(p) for p in config.protocols}

    out = pathlib.Path(config.out)
    with multihost.process_zero_first("run identity"):  # process 0 writes a new run.json, the others check it
        multihost.require_visible(out / "run.json", "--out")
        run_digest = check_identity(out, config, prepared.data)
        protocol_digests = {p: store.check_protocol(out, p, proto.to_dict()) for p, proto in protocols.items()}
        _check_iprop_variants(out, config)
    total = len(indices)
    variants = method_variants(config)
    checksums = store.run_checksums(out)  # False only for a run folder begun before batch checksums
    specs = [store.BatchSpec(b, idx, [source.ids[int(i)] for i in idx],
                             prepared.hashes[b * config.batch_size:b * config.batch_size + len(idx)], run_digest,
                             checksums=checksums)
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
    running = {variant: RunningMean(out, variant, config.protocols[0]) for variant in variants}
    todo = sum(len(spec) for spec, *_ in plan)
    tracker = RunProgress(total=mine * len(variants), done=mine * len(variants) - todo, batches=len(specs),
                           desc=variants[0] if len(variants) == 1 else "maps", enabled=progress)
    loaded = None  # (batch number, its images on the devices, its labels)
    for spec, variant, have_maps, missing in plan:
        b, n = spec.number, len(spec)
        tracker.start_batch(variant, b, n, running[variant])
        if loaded is None or loaded[0] != b:
            batch = _load_unchanged(source, spec, out)
            pixels = nudge_toward_half(batch.images, config.nudge_ulps) if config.nudge_ulps else batch.images
            loaded = (b, sharder.put(jnp.asarray(pixels), shape_size)[0], batch.labels)
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
                attributes[variant] = attribution_fn(config, variant, prepared.reference_images)
            with tracker.stage("attribution"), _named_images(variant, b, spec, "maps"):
                maps, predicted, seconds = _compute_maps(config, model, out, variant, spec, images, sharder,
                                                         shape_size, attributes[variant],
                                                         split_variant(config, variant)[1])
            if stored is None:
                record = {"index": spec.indices, "id": np.asarray(spec.ids, dtype=np.str_),
                          "hash": np.asarray(spec.hashes, dtype=np.str_), "label": labels.astype(np.int64),
                          "predicted": np.asarray(predicted[:n], np.int64), "seconds": np.full(n, seconds),
                          "run": np.asarray(run_digest)}
                if _keeps_maps(config, variant):
                    # float64 keeps every bit
                    record["attribution"] = np.asarray(maps[:n], precision_dtype(config.precision))
                store.write_npz(maps_path(out, variant, b), record)
            missing = list(protocols)  # new maps: scores of older maps (if any) do not hold for them
        for p in missing:
            # (the bar moves per scored chunk; numerics identical without it)
            with tracker.stage(p), _named_images(variant, b, spec, f"{p} scores"):
                game = evaluate(model, images, maps, protocol=protocols[p], labels=predicted,
                                precision=config.metric_precision or config.precision,
                                progress=tracker.chunk if progress else None)
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
            return report.write_reports(config, out, variants, total, source) if reports else {}
    return report.write_reports(config, out, variants, total, source) if reports else {}


def _load_unchanged(source, spec: store.BatchSpec, out: pathlib.Path):
    """The images of a batch, whose content must still be what run.json recorded when the run started
    (hashed again after loading): an image replaced during the run is refused by name, not scored on
    pixels the run's identity does not describe."""
    try:
        batch = source.load(spec.indices)
        changed = store.changed_images(source, spec.indices, spec.hashes)
    except (ValueError, OSError) as err:
        raise ConfigError(f"--data: batch {spec.number}: {str(err).splitlines()[0] if str(err) else err!r} (the "
                          f"image was readable when the run started); restore it and rerun") from None
    if changed:
        raise ConfigError(f"--data: {', '.join(changed[:3])}{' and more' if len(changed) > 3 else ''} changed during "
                          f"the run (not the content recorded in {out / 'run.json'} when it started); restore the "
                          "image(s) and rerun, or start another --out for the new ones")
    return batch


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
            supplied = config.external.read(variant, spec.ids, precision_dtype(config.precision))
            maps, _ = sharder.put(jnp.asarray(supplied), shape_size)
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
