"""The LA paper's comparison (every method, with and without IProp, protocols la and rise): flags, one call.

    python -m experiments.reproduce --config=configs/cpu_quick_64.py
    python -m experiments.reproduce --config=configs/cpu_quick_64.py --config.num_images=128 --name=cpu_quick_128
    python -m experiments.reproduce --data=la1000:../shared/data/la1000 --num_images=100 --name=cpu_quick
    python -m experiments.reproduce --report_only          # regenerate results/REPRODUCTION.md

Runs (or resumes) the study's engine runs in ``runs/reproduce_<name>`` (and LA's seed runs), copies
its tables and figures to ``results/reproduction/<name>/`` and regenerates ``results/REPRODUCTION.md``
(:mod:`la_iprop.studies.reproduction`). A flag given on the command line overrides the config file.
"""

from __future__ import annotations

import logging
import pathlib
import shlex
import sys

from absl import app, flags
from ml_collections import config_flags

from experiments import flags as shared

FLAGS = flags.FLAGS
parse_flags = shared.parse_flags
STUDY_FLAGS = ("name", "la_seeds")


def define_flags() -> None:
    config_flags.DEFINE_config_file("config", None, "A study config file (configs/*.py); flags given override it.")
    flags.DEFINE_string("name", None, "Name of this run's section, e.g. cpu_quick_64 (a config file names it).")
    flags.DEFINE_list("method", None, "Methods (default: every registered method).")
    flags.DEFINE_integer("la_seeds", 3, "LA is also run with seeds seed+1 .. seed+la_seeds-1 (its target draws).")
    shared.define_run_flags(("model", "weights", "data", "tfds_data_dir", "num_images", "start", "stride",
                             "batch_size", "seed", "protocol", "settings", "hparams", "iprop", "iprop_hparams",
                             "iprop_preset", "corruption", "corruption_seed", "precision", "progress"),
                            protocol=["la", "rise"], iprop=True)
    flags.DEFINE_string("runs_dir", "runs", "Where the runs themselves are stored (resumable).")
    flags.DEFINE_string("results_dir", "results", "Where the report and its figures are written.")
    flags.DEFINE_bool("report_only", False, "Only regenerate REPRODUCTION.md from results/reproduction/*.")
    flags.DEFINE_bool("interim", False, "Compute nothing: report the run as it stands (the images finished for every "
                      "method and protocol) as an interim section, e.g. while it runs in the background.")
    shared.define_multihost_flags()


def study_fields() -> dict:
    """The study: the config file's fields, each overridden by a flag given on the command line
    (without a config file, every flag's value)."""
    from la_iprop.attribution import available_methods

    base = FLAGS.config.to_dict() if FLAGS.config is not None else {}
    if FLAGS.method is not None or "methods" not in base:
        base["methods"] = tuple(FLAGS.method or available_methods())
    methods = tuple(base["methods"])
    flag_fields = {**shared.run_fields_from_flags(methods), "name": FLAGS.name, "la_seeds": FLAGS.la_seeds}
    renamed = {"protocols": "protocol"}
    for field, value in flag_fields.items():
        if shared.explicit(renamed.get(field, field)) or field not in base:
            base[field] = value
    return base


@shared.one_line_errors  # an OSError (full disk, read-only, name too long...): one line
def main(argv):
    del argv
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    from la_iprop.studies.reproduction import write_report

    results_dir = pathlib.Path(FLAGS.results_dir)
    if FLAGS.report_only:
        print(write_report(results_dir))
        return 0
    if not FLAGS.interim:  # (an interim report only reads the run: one process)
        shared.initialize_multihost()
    from la_iprop.runs import ConfigError, RunConfig
    from la_iprop.studies.reproduction import run_reproduction

    fields = study_fields()
    name, la_seeds = (fields.pop(k) for k in STUDY_FLAGS)
    if not name:
        shared.refuse("--name: give this run's section a name, e.g. --name=cpu_quick (or --config=configs/...)")
    command = "python -m experiments.reproduce " + " ".join(
        shlex.quote(a) for a in sys.argv[1:] if a not in ("--interim", "--interim=true"))
    try:
        config = RunConfig.from_mapping(fields, out=str(pathlib.Path(FLAGS.runs_dir) / f"reproduce_{name}"))
        report = run_reproduction(config, name=name, la_seeds=la_seeds, results_dir=results_dir, command=command,
                                  interim=FLAGS.interim, progress=FLAGS.progress)
    except (ConfigError, RuntimeError) as err:  # RuntimeError: e.g. --interim before any image is finished
        shared.refuse(err)
    if report is None:
        import jax
        print(f"process {jax.process_index()} of {jax.process_count()}: its batches are written; process 0 writes "
              f"the results")
    else:
        print(report)
    return 0


if __name__ == "__main__":
    define_flags()
    app.run(main, flags_parser=parse_flags)
