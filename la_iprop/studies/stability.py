"""Numerical stability of every method: float32 vs float64, batch vs alone, one-ulp nudges, seeds.

    python -m experiments.stability --data=la1000:../shared/data/la1000 --num_images=16 --metric_every=8

For each registered method (``--settings``, default ``quick``), on the same images, explaining
the class predicted on the clean image in float32:

- float32 maps (batches of ``--batch_size``) vs float64 maps: Pearson and relative L1
  (float64 is the reference);
- float32 in a batch vs the same image alone (batch of one, same per-image key);
- float32 vs float32 with every input element nudged by one float32 ulp (towards 0.5);
- |Δ insertion| and |Δ deletion| between the float32 and the float64 maps, both scored by
  the same float32 metric (protocol ``la``; ``--metric_every=N`` samples its curve at every N-th
  point, N times cheaper: the CPU run uses 8), so the difference is the maps' alone;
- methods that draw from the key: insertion/deletion with seed ``--seed`` vs ``--seed + 1``;
- seconds per image of the float32 and float64 maps (warm batches: the cost of float64).

Each method's figures are cached in ``--work_dir/<method>.json`` as soon as they are done, so an
interrupted run resumes where it stopped. The report (``results/stability.md``) and its JSON
are regenerated from the cache; they also test whether the method differences of
``results/REPRODUCTION.md`` exceed the float32 noise measured here.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import pathlib
import time

import numpy as np

__all__ = ["StabilityConfig", "nudge_one_ulp", "measure_method", "run_stability", "RANDOM_METHODS", "METHOD_ORDER",
           "COMPARISONS", "REPRODUCTION", "CHAOS_RELATIVE_L1"]

log = logging.getLogger("la_iprop.stability")

RANDOM_METHODS = ("agi", "attexplore", "eg", "la", "sg")
# Cheap first, so a partial run already covers most methods.
METHOD_ORDER = ("sm", "fig", "deeplift", "ig", "sg", "eg", "gig", "mfaba", "big", "attexplore", "agi", "la")
COMPARISONS = ("f32_vs_f64", "batch_vs_alone", "ulp_nudge")
CHAOS_RELATIVE_L1 = 0.01  # a float32 map further than this from its float64 map (some image) counts as chaotic
# The reproduction run whose LA-vs-baseline differences are checked against the noise measured here.
REPRODUCTION = "cpu_quick_64"


@dataclasses.dataclass(frozen=True)
class StabilityConfig:
    model: str = "efficientnet_lite0"
    weights: str | None = None
    data: str = "samples"
    num_images: int = 16
    start: int = 0
    batch_size: int = 8
    seed: int = 0
    settings: str = "quick"
    metric_every: int = 1                # protocol la's curve sampled at every N-th point

    def identity(self, methods: tuple[str, ...] = ()) -> dict:
        """The settings, with every resolved hyperparameter of ``methods``: a changed library default
        is a different run, never a reuse of stale maps."""
        from la_iprop.attribution import method_hparams
        from la_iprop.runs.config import RunConfig, resolve_hparams

        resolved = {m: {**method_hparams(m), **resolve_hparams(RunConfig(methods=(m,), settings=self.settings), m)}
                    for m in methods}
        return json.loads(json.dumps({**dataclasses.asdict(self), "resolved": resolved}, default=str))


def nudge_one_ulp(images: np.ndarray) -> np.ndarray:
    """Every float32 element moved by one ulp towards 0.5 (so it stays in [0, 1])."""
    images = np.asarray(images, np.float32)
    return np.where(images < 0.5, np.nextafter(images, np.float32(1)), np.nextafter(images, np.float32(0)))


def _method_call(name: str, config: StabilityConfig, reference: np.ndarray):
    from la_iprop.attribution import get_method
    from la_iprop.runs.config import RunConfig, resolve_hparams

    spec = get_method(name)
    hparams = resolve_hparams(RunConfig(methods=(name,), settings=config.settings), name)
    if spec.needs_reference_set:
        hparams["reference_images"] = reference
    return spec.fn, hparams


def _in_batches(fn, images: np.ndarray, size: int) -> tuple[np.ndarray, list[float]]:
    """``fn(slice)`` over consecutive batches of ``size``; the maps and each batch's seconds per image."""
    import jax

    maps, seconds = [], []
    for begin in range(0, len(images), size):
        started = time.perf_counter()
        out = jax.block_until_ready(fn(slice(begin, begin + size)))
        seconds.append((time.perf_counter() - started) / out.shape[0])
        maps.append(np.asarray(out))
    return np.concatenate(maps), seconds


def measure_method(name: str, model, images: np.ndarray, labels: np.ndarray, indices: np.ndarray,
                   reference: np.ndarray, config: StabilityConfig) -> dict:
    """Every figure of one method (per image), as a JSON-ready dict."""
    from la_iprop.metrics import evaluate, get_protocol
    from la_iprop.metrics.statistics import pearson, relative_l1
    from la_iprop.runs.config import image_keys

    fn, hparams = _method_call(name, config, reference)
    keys = image_keys(config.seed, indices)
    size = config.batch_size

    def run(x, precision, key_array=keys):
        return lambda s: fn(model, x[s], labels[s], key=key_array[s], precision=precision, **hparams)

    def stage(what, fn, *args):   # one log line per stage (each takes minutes on a CPU)
        started = time.perf_counter()
        out = fn(*args)
        seconds = time.perf_counter() - started
        log.info("%s: %s, %d images in %.1f s (%.3g images/s)", name, what, len(images), seconds,
                 len(images) / max(seconds, 1e-9))
        return out

    f32, f32_seconds = stage("float32 maps", _in_batches, run(images, "float32"), images, size)
    f64, f64_seconds = stage("float64 maps", _in_batches, run(images, "float64"), images, size)
    alone, _ = stage("float32 maps one image at a time", _in_batches, run(images, "float32"), images, 1)
    nudged, _ = stage("float32 maps of the nudged images", _in_batches, run(nudge_one_ulp(images), "float32"),
                      images, size)
    pairs = {"f32_vs_f64": (f32, f64), "batch_vs_alone": (f32, alone), "ulp_nudge": (f32, nudged)}
    result = {"method": name, "hparams": {k: v for k, v in hparams.items() if k != "reference_images"},
              "images": [int(i) for i in indices], "labels": [int(v) for v in labels],
              "seconds_per_image": {"float32": f32_seconds, "float64": f64_seconds}}
    for comparison, (a, b) in pairs.items():
        result[comparison] = {"pearson": [pearson(x, y) for x, y in zip(a, b, strict=True)],
                              "relative_l1": [relative_l1(x, y) for x, y in zip(a, b, strict=True)],
                              "identical": [bool(np.array_equal(x, y)) for x, y in zip(a, b, strict=True)]}

    protocol = get_protocol("la")
    protocol = get_protocol("la", step=protocol.step * config.metric_every, name=f"la_every{config.metric_every}") \
        if config.metric_every > 1 else protocol

    def scores(maps):
        game = evaluate(model, images, maps, protocol=protocol, labels=labels, precision="float32")
        return {"insertion": game.insertion_aucs.tolist(), "deletion": game.deletion_aucs.tolist()}

    result["metric"] = {"float32": stage(f"metric {protocol.name} of the float32 maps", scores, f32),
                        "float64": stage(f"metric {protocol.name} of the float64 maps", scores, f64)}
    if name in RANDOM_METHODS:
        other, _ = stage("float32 maps with the next seed", _in_batches,
                         run(images, "float32", image_keys(config.seed + 1, indices)), images, size)
        result["metric"]["float32_next_seed"] = stage(f"metric {protocol.name} of the next seed's maps", scores, other)
        result["next_seed_pearson"] = [pearson(x, y) for x, y in zip(f32, other, strict=True)]
    return result


def run_stability(config: StabilityConfig, methods: tuple[str, ...], work_dir: pathlib.Path) -> None:
    """Measures every method not cached yet in ``work_dir`` (one JSON per method, written atomically)."""
    import jax

    from la_iprop.data import open_source
    from la_iprop.models import load_model, predict
    from la_iprop.runs.config import REFERENCE_SET_SIZE
    from la_iprop.runs.store import atomic_write

    work_dir.mkdir(parents=True, exist_ok=True)
    identity_path = work_dir / "identity.json"
    identity = config.identity(METHOD_ORDER)
    if identity_path.exists() and json.loads(identity_path.read_text()) != identity:
        raise ValueError(f"{work_dir} holds a run with other settings or other resolved hyperparameters "
                         f"({identity_path}); use another --work_dir")
    atomic_write(identity_path, lambda f: json.dump(identity, f, indent=2))
    todo = [m for m in methods if not (work_dir / f"{m}.json").exists()]
    if not todo:
        return
    model = load_model(config.model, config.weights)
    source = open_source(config.data, size=model.input_size)
    total = min(config.num_images, len(source) - config.start)
    indices = np.arange(config.start, config.start + total)
    batch = source.load(indices)
    images = np.asarray(batch.images, np.float32)
    labels = np.asarray(jax.jit(predict)(model, images), np.int32)
    reference = source.load(range(min(REFERENCE_SET_SIZE, len(source)))).images
    for name in todo:
        log.info("%s: measuring on %d images", name, total)
        started = time.perf_counter()
        result = measure_method(name, model, images, labels, indices, reference, config)
        result["wall_seconds"] = time.perf_counter() - started
        atomic_write(work_dir / f"{name}.json", lambda f, result=result: json.dump(result, f))
        log.info("%s: done in %.0f s", name, result["wall_seconds"])
