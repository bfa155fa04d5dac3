"""Numerical stability of every method (la_iprop.studies.stability): flags, then one call.

    python -m experiments.stability --data=la1000:../shared/data/la1000 --num_images=16 --metric_every=8
    python -m experiments.stability --report_only      # rebuild results/stability.md from its JSON

Runs (or resumes) the study's engine runs in --runs_dir (float32, float64, alone, nudged, next_seed),
reads each method's figures (float32 vs float64, batch vs alone, one-ulp nudges, seeds) from their
stores, then writes results/stability.md and .json; the report also checks the LA-vs-baseline
differences of a reproduction run (--reproduction) against the measured noise.
"""

from __future__ import annotations

import logging
import pathlib

from absl import app, flags

from experiments import flags as shared

FLAGS = flags.FLAGS
parse_flags = shared.parse_flags


def define_flags() -> None:
    """Defined only when run as a script (importing this module defines no flags)."""
    flags.DEFINE_list("method", None, "Methods (default: every registered method).")
    # the batched runs use --batch_size; the seed-to-seed comparison uses --seed and --seed + 1
    shared.define_run_flags(("model", "weights", "data", "num_images", "start", "batch_size", "seed", "settings"),
                            num_images=16, helps={"num_images": "Number of images, from --start."})
    shared.define_study_flags(config_file=False, runs_dir="runs/stability", reports_from="results/stability.json",
                              progress=False)
    flags.DEFINE_string("reproduction", "cpu_quick_64", "The section of results/reproduction/ whose LA-vs-baseline "
                        "differences are checked against the noise measured here.")
    flags.DEFINE_integer("metric_every", 1, "Score protocol la's curve at every N-th point only (N times cheaper; "
                         "exactly the la curve sampled there).")


@shared.one_line_errors  # an OSError (full disk, read-only, name too long...): one line
def main(argv):
    del argv
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    from la_iprop.attribution import available_methods
    from la_iprop.runs import ConfigError
    from la_iprop.studies.stability import METHOD_ORDER, StabilityConfig, run_stability
    from la_iprop.studies.stability_report import write_report

    methods = tuple(FLAGS.method or [m for m in METHOD_ORDER if m in available_methods()])
    unknown = sorted(set(methods) - set(available_methods()))
    if unknown:
        shared.refuse(f"--method: unknown {unknown}; available: {', '.join(available_methods())}")
    results_dir = pathlib.Path(FLAGS.results_dir)
    config = StabilityConfig(model=FLAGS.model, weights=FLAGS.weights, data=FLAGS.data, num_images=FLAGS.num_images,
                             start=FLAGS.start, batch_size=FLAGS.batch_size, seed=FLAGS.seed, settings=FLAGS.settings,
                             metric_every=FLAGS.metric_every)
    if config.metric_every < 1:
        shared.refuse(f"--metric_every: must be >= 1, got {config.metric_every}")
    measured = None
    if not FLAGS.report_only:
        try:
            measured = run_stability(config, methods, pathlib.Path(FLAGS.runs_dir), progress=FLAGS.progress,
                                     compute=not FLAGS.interim)
        except (ConfigError, ValueError, RuntimeError) as err:
            shared.refuse(err)
    command = "python -m experiments.stability " + " ".join(
        f"--{k}={v}" for k, v in (("data", FLAGS.data), ("num_images", FLAGS.num_images), ("start", FLAGS.start),
                                   ("batch_size", FLAGS.batch_size), ("settings", FLAGS.settings),
                                   ("metric_every", FLAGS.metric_every)))
    write_report(results_dir, command, FLAGS.reproduction, measured)
    print((results_dir / "stability.md").read_text())
    return 0


if __name__ == "__main__":
    define_flags()
    app.run(main, flags_parser=parse_flags)
