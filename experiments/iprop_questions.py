"""IProp's open questions (la_iprop.studies.iprop_questions): flags, then one call per part.

    python -m experiments.iprop_questions --config=configs/iprop_questions.py [--interim | --report_only]

Runs (or resumes) the study's engine runs in ``runs/iprop_questions_<name>_<part>``, copies their
per-image scores to ``results/iprop_questions/<name>/<part>/`` and regenerates
``results/IPROP_QUESTIONS.md``.
"""

from __future__ import annotations

import logging
import pathlib

from absl import app, flags

from experiments import flags as shared

FLAGS = flags.FLAGS
parse_flags = shared.parse_flags


def define_flags() -> None:
    shared.define_study_flags(config="configs/iprop_questions.py", reports_from="results/iprop_questions/<name>/")
    flags.DEFINE_list("parts", None, "Run only these parts (structure, ood); default: the config's parts.")


@shared.one_line_errors  # an OSError (full disk, read-only, name too long...): one line
def main(argv):
    del argv
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    from la_iprop.models import load_model
    from la_iprop.runs import ConfigError
    from la_iprop.studies.iprop_questions import part_configs, run_parts, write_command
    from la_iprop.studies.iprop_questions_report import write_report

    study = FLAGS.config.to_dict()
    results_dir = pathlib.Path(FLAGS.results_dir)
    section_dir = results_dir / "iprop_questions" / study["name"]
    command = shared.study_command("experiments.iprop_questions", drop=("interim", "report_only", "parts", "progress"),
                                   config="configs/iprop_questions.py")
    if not FLAGS.report_only:
        try:
            configs = part_configs(study, pathlib.Path(FLAGS.runs_dir), FLAGS.parts or study["parts"])
            model = load_model(study["model"], study.get("weights"))  # one classifier for every part
            states = run_parts(configs, section_dir, interim=FLAGS.interim, progress=FLAGS.progress, model=model)
        except (ConfigError, ValueError, RuntimeError) as err:
            shared.refuse(err)
        logging.info("parts: %s", ", ".join(f"{part} {state}" for part, state in states.items()))
        write_command(section_dir, command)
    print(write_report(results_dir, study, command))
    return 0


if __name__ == "__main__":
    define_flags()
    app.run(main, flags_parser=parse_flags)
