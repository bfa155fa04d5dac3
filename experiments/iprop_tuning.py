"""IProp's settings chosen by measurement (la_iprop.studies.iprop_tuning): flags, then one call.

    python -m experiments.iprop_tuning --config=configs/iprop_tuning_rise.py
    python -m experiments.iprop_tuning --config=configs/iprop_tuning_la.py

Runs (or resumes) the study's two engine runs (tuning and held-out split) in
``runs/iprop_tuning_<name>_{tune,heldout}``: the methods' maps once, every IProp setting the search
scores as a named IProp variant of the tuning run; writes ``results/<report>`` and its JSON.
"""

from __future__ import annotations

import logging
import pathlib

from absl import app, flags

from experiments import flags as shared

FLAGS = flags.FLAGS
parse_flags = shared.parse_flags
RUN_KEYS = ("model", "weights", "data", "settings", "seed", "precision", "batch_size")


def define_flags() -> None:
    shared.define_study_flags(progress=False)  # --config: configs/iprop_tuning_*.py (required)
    flags.DEFINE_bool("tune_only", False, "Run the search only and write its report, the held-out test marked "
                      "pending (rerun without the flag to test the chosen setting on the held-out images).")


@shared.one_line_errors  # an OSError (full disk, read-only, name too long...): one line
def main(argv):
    del argv
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    from la_iprop.models import load_model
    from la_iprop.runs import ConfigError, RunConfig
    from la_iprop.runs.environment import environment
    from la_iprop.studies.iprop_tuning import Tuner, grid_from, held_out, tune
    from la_iprop.studies.iprop_tuning_report import write_report

    if FLAGS.config is None:
        shared.refuse("--config: give the study's config file, e.g. --config=configs/iprop_tuning_rise.py")
    study = FLAGS.config.to_dict()
    command = shared.study_command("experiments.iprop_tuning", drop=("tune_only", "progress"))
    runs = pathlib.Path(FLAGS.runs_dir)
    try:
        grid = grid_from(study.get("grid"))
        common = {k: study[k] for k in RUN_KEYS if k in study}
        model = load_model(study["model"], study.get("weights"))

        def split(name: str, methods, protocol: str) -> RunConfig:
            return RunConfig.from_mapping({**common, **study[name]}, methods=tuple(methods), protocols=(protocol,),
                                          out=str(runs / f"iprop_tuning_{study['name']}_{name}"))

        tuner = Tuner(split("tune", study["methods"], study["tune_protocol"]), model=model, progress=FLAGS.progress)
        tuning = tune(tuner, grid, study["search"], study["criterion"], study["max_passes"])
        heldout = None
        if not FLAGS.tune_only:
            held = Tuner(split("heldout", study.get("heldout_methods") or study["methods"], study["protocol"]),
                         model=model, progress=FLAGS.progress)
            heldout = held_out(held, tuning["chosen"])
    except (ConfigError, ValueError) as err:
        shared.refuse(err)
    record = {**study, "grid": {k: list(v) for k, v in grid.items()}}
    text = write_report(pathlib.Path(FLAGS.results_dir) / study["report"], command=command, study=record,
                        tuning=tuning, heldout=heldout, environment=environment())
    print(text)
    return 0


if __name__ == "__main__":
    define_flags()
    app.run(main, flags_parser=parse_flags)
