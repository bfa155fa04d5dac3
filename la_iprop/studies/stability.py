"""Numerical stability of every method: float32 vs float64, batch vs alone, one-ulp nudges, seeds.

    python -m experiments.stability --data=la1000:../shared/data/la1000 --num_images=16 --metric_every=8

For each registered method (``--settings``, default ``quick``), on the same images, each map
explaining the class its run predicted on the (clean or nudged) image:

- float32 maps (batches of ``--batch_size``) vs float64 maps: Pearson and relative L1
  (float64 is the reference);
- float32 in a batch vs the same image alone (batch of one, same per-image key);
- float32 vs float32 with every input element nudged by one float32 ulp (towards 0.5);
- |Δ insertion| and |Δ deletion| between the float32 and the float64 maps, both scored by
  the same float32 metric (protocol ``la``; ``--metric_every=N`` samples its curve at every N-th
  point, N times cheaper: the CPU run uses 8), so the difference is the maps' alone;
- methods that draw from the key: insertion/deletion with seed ``--seed`` vs ``--seed + 1``;
- seconds per image of the float32 and float64 maps (the last, warm batch: the cost of float64).

Every measurement is a run of the engine (:func:`stability_runs`: ``float32``, ``float64`` with
``metric_precision="float32"``, ``alone`` with batches of one, ``nudged`` with ``nudge_ulps=1``,
``next_seed``), so the engine's store is the study's only cache, with its identity (every resolved
hyperparameter), resume and checks; :func:`measure_method` reads a method's figures from the
stored maps and scores. The report (``results/stability.md``) and its JSON are regenerated from
them; they also test whether the method differences of ``results/REPRODUCTION.md`` exceed the
float32 noise measured here.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import pathlib

import numpy as np

from la_iprop.data import nudge_toward_half

__all__ = ["StabilityConfig", "nudge_one_ulp", "stability_runs", "measure_method", "run_stability", "RANDOM_METHODS",
           "METHOD_ORDER", "COMPARISONS", "REPRODUCTION", "CHAOS_RELATIVE_L1", "RUN_NAMES"]

log = logging.getLogger("la_iprop.stability")

RANDOM_METHODS = ("agi", "attexplore", "eg", "la", "sg")
# The report's order: cheap first.
METHOD_ORDER = ("sm", "fig", "deeplift", "ig", "sg", "eg", "gig", "mfaba", "big", "attexplore", "agi", "la")
COMPARISONS = ("f32_vs_f64", "batch_vs_alone", "ulp_nudge")
# The engine runs of the study, and the run each comparison sets against the float32 maps.
RUN_NAMES = ("float32", "float64", "alone", "nudged", "next_seed")
_AGAINST = {"f32_vs_f64": "float64", "batch_vs_alone": "alone", "ulp_nudge": "nudged"}
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
        """The settings the report records, with every resolved hyperparameter of ``methods`` (the runs
        themselves are checked by the engine's identity)."""
        from la_iprop.attribution import method_hparams
        from la_iprop.runs.config import RunConfig, resolve_hparams

        resolved = {m: {**method_hparams(m), **resolve_hparams(RunConfig(methods=(m,), settings=self.settings), m)}
                    for m in methods}
        return json.loads(json.dumps({**dataclasses.asdict(self), "resolved": resolved}, default=str))


def nudge_one_ulp(images: np.ndarray) -> np.ndarray:
    """Every float32 element moved by one ulp towards 0.5 (so it stays in [0, 1]): the ``nudged`` run's input."""
    return nudge_toward_half(images, 1)


def protocol_name(config: StabilityConfig) -> str:
    return "la" if config.metric_every == 1 else f"la_every{config.metric_every}"


def stability_runs(config: StabilityConfig, methods: tuple[str, ...], runs_dir: pathlib.Path) -> dict:
    """``{name: RunConfig}``: the engine runs of the study, each in ``runs_dir/<name>``."""
    from la_iprop.runs.config import RunConfig

    base = RunConfig(methods=tuple(methods), model=config.model, weights=config.weights, data=config.data,
                     num_images=config.num_images, start=config.start, stride=1, batch_size=config.batch_size,
                     seed=config.seed, settings=config.settings, precision="float32",
                     protocols=(protocol_name(config),), out=str(runs_dir / "float32"))
    runs = {"float32": base,
            "float64": dataclasses.replace(base, precision="float64", metric_precision="float32",
                                           out=str(runs_dir / "float64")),
            "alone": dataclasses.replace(base, batch_size=1, out=str(runs_dir / "alone")),
            "nudged": dataclasses.replace(base, nudge_ulps=1, out=str(runs_dir / "nudged"))}
    seeded = tuple(m for m in methods if m in RANDOM_METHODS)
    if seeded:
        runs["next_seed"] = dataclasses.replace(base, methods=seeded, seed=config.seed + 1,
                                                out=str(runs_dir / "next_seed"))
    return runs


def _batch_seconds(records: dict, batch_size: int) -> list[float]:
    """Seconds per image of each batch, in order (every image of a batch records its batch's figure)."""
    return [float(v) for v in records["seconds"][::batch_size]]


def measure_method(name: str, runs: dict, config: StabilityConfig) -> dict | None:
    """Every figure of one method (per image) from the stored runs, as a JSON-ready dict; None while a
    run has not finished every image of the method."""
    from la_iprop.metrics.statistics import pearson, relative_l1
    from la_iprop.runs.config import resolve_hparams
    from la_iprop.runs.store import load_records, read_run, run_batches

    protocol = protocol_name(config)
    records = {}
    for run_name, run in runs.items():
        if name not in run.methods:
            continue
        stored = read_run(run.out)
        found = load_records(run.out, name, protocol, attributions=True) if stored else None
        if found is None or len(found["index"]) != sum(len(spec) for spec in run_batches(stored)):
            return None
        records[run_name] = found
    f32 = records["float32"]
    result = {"method": name, "hparams": {k: v for k, v in resolve_hparams(runs["float32"], name).items()
                                          if k != "reference_images"},
              "images": [int(i) for i in f32["index"]], "labels": [int(v) for v in f32["predicted"]],
              "seconds_per_image": {p: _batch_seconds(records[p], runs[p].batch_size) for p in ("float32", "float64")}}
    for comparison, against in _AGAINST.items():
        a, b = f32["attribution"], records[against]["attribution"]
        result[comparison] = {"pearson": [pearson(x, y) for x, y in zip(a, b, strict=True)],
                              "relative_l1": [relative_l1(x, y) for x, y in zip(a, b, strict=True)],
                              "identical": [bool(np.array_equal(x, y)) for x, y in zip(a, b, strict=True)]}
    # every map explains its run's prediction: count where a run predicted another class than float32
    result["other_class"] = {r: int((records[r]["predicted"] != f32["predicted"]).sum()) for r in records}

    def scores(r):
        return {"insertion": r["insertion"].tolist(), "deletion": r["deletion"].tolist()}

    result["metric"] = {"float32": scores(f32), "float64": scores(records["float64"])}
    if "next_seed" in records:
        result["metric"]["float32_next_seed"] = scores(records["next_seed"])
        result["next_seed_pearson"] = [pearson(x, y) for x, y in
                                       zip(f32["attribution"], records["next_seed"]["attribution"], strict=True)]
    return result


def run_stability(config: StabilityConfig, methods: tuple[str, ...], runs_dir: pathlib.Path, *,
                  progress: bool = False, compute: bool = True) -> tuple[dict, dict]:
    """Runs (or resumes) the study's engine runs, then reads every method's figures from their stores;
    returns ``(settings, {method: figures})`` (methods not finished by every run are left out).
    ``compute=False``: reads what is stored (a report while the runs go on)."""
    from la_iprop.models import load_model
    from la_iprop.runs.engine import run

    runs = stability_runs(config, methods, runs_dir)
    if compute:
        model = load_model(config.model, config.weights)
        for name, run_config in runs.items():
            log.info("stability: run %s (%s)", name, run_config.out)
            run(run_config, progress=progress, model=model, reports=False)
    results = {}
    for name in methods:
        figures = measure_method(name, runs, config)
        if figures is not None:
            results[name] = figures
    return config.identity(METHOD_ORDER), results
