"""LA's ablations (la_iprop.studies.la_ablations): flags, then one call.

    python -m experiments.la_ablations --config=configs/la_ablations.py [--interim | --report_only]

Runs (or resumes) the study's engine run in ``runs/la_ablations_<name>``, copies its per-image
scores to ``results/la_ablations/<name>/`` and regenerates ``results/LA_ABLATIONS.md``.
"""

from __future__ import annotations

import logging
import pathlib

from absl import app, flags

from experiments import flags as shared

FLAGS = flags.FLAGS
parse_flags = shared.parse_flags
STUDY_KEYS = ("name", "reproduction", "variants", "questions", "question_order", "pairs")


def define_flags() -> None:
    shared.define_study_flags(config="configs/la_ablations.py", reports_from="results/la_ablations/<name>/")


@shared.one_line_errors  # an OSError (full disk, read-only, name too long...): one line
def main(argv):
    del argv
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    from la_iprop.runs import ConfigError
    from la_iprop.runs.engine import run
    from la_iprop.runs.store import atomic_write, copy_file
    from la_iprop.studies.la_ablations import check_pairs, study_config, write_interim_section, write_report

    study = FLAGS.config.to_dict()
    name, reproduction, variants, questions, order, pairs = (study.pop(k) for k in STUDY_KEYS)
    questions = {q: questions[q] for q in order}
    try:
        pairs = check_pairs(pairs, variants)
    except ValueError as err:
        shared.refuse(err)
    results_dir = pathlib.Path(FLAGS.results_dir)
    section = results_dir / "la_ablations" / name
    if not FLAGS.report_only:
        try:
            config = study_config(study, variants, str(pathlib.Path(FLAGS.runs_dir) / f"la_ablations_{name}"))
            if FLAGS.interim:  # computes nothing: the variants' finished batches, read from the run's store
                write_interim_section(config, section)
            else:
                run(config, progress=FLAGS.progress)
                for file in ("results.csv", "summary.json"):
                    copy_file(pathlib.Path(config.out) / file, section / file)
        except (ConfigError, ValueError, RuntimeError) as err:
            shared.refuse(err)
        command = shared.study_command("experiments.la_ablations", drop=("interim",))
        atomic_write(section / "command.txt", lambda f: f.write(command + "\n"))
    print(write_report(results_dir, name, questions, reproduction, pairs))
    return 0


if __name__ == "__main__":
    define_flags()
    app.run(main, flags_parser=parse_flags)
