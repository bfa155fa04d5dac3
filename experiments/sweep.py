"""A grid of methods x models x hyperparameters through the run engine (la_iprop.runs.sweep).

    python -m experiments.sweep --config=sweep.json --out=runs/sweep1

``sweep.json``::

    {"methods": ["la", "ig"], "models": ["efficientnet_lite0"],
     "grid": {"la": {"max_iter": [10, 30], "sampling_times": [6, 20]}},
     "data": "la1000:../shared/data/la1000", "num_images": 50, "batch_size": 8,
     "settings": "quick", "protocols": ["la", "rise"], "iprop": false, "seed": 0}

Each cell is an ordinary resumable run in ``<out>/<cell>``; rerunning the command skips
finished cells and batches (and, with a protocol added, scores the stored maps). The
combined table, a row per cell, protocol and method, is ``<out>/sweep.md`` and ``sweep.csv``.
``"protocol"`` (one name or a list) is accepted for ``"protocols"``.
"""

from __future__ import annotations

import json
import logging
import pathlib

from absl import app, flags

from experiments import flags as shared

FLAGS = flags.FLAGS
parse_flags = shared.parse_flags


def define_flags() -> None:
    flags.DEFINE_string("config", None, "Sweep specification (JSON).")
    flags.DEFINE_string("out", None, "Output directory of the sweep.")
    flags.DEFINE_bool("progress", True, "Show progress bars.")
    flags.DEFINE_string("precision", None, "Precision of every cell (overrides the specification's 'precision'; "
                        "default: the specification's, else float32).")
    shared.define_multihost_flags()


@shared.one_line_errors  # an OSError (full disk, read-only, name too long...): one line
def main(argv):
    del argv
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    shared.initialize_multihost()
    from la_iprop.runs import ConfigError
    from la_iprop.runs.sweep import run_sweep

    if not FLAGS.config or not FLAGS.out:
        shared.refuse("--config and --out are required")
    try:
        spec = json.loads(pathlib.Path(FLAGS.config).read_text())
    except (OSError, ValueError, RecursionError) as err:  # RecursionError: JSON nested too deeply
        shared.refuse(f"--config: cannot read {FLAGS.config}: {err}")
    try:
        if FLAGS.precision and isinstance(spec, dict):  # (another JSON type is refused by run_sweep)
            spec = {**spec, "precision": FLAGS.precision}
        rows = run_sweep(spec, FLAGS.out, progress=FLAGS.progress)
    except ConfigError as err:
        shared.refuse(err)
    if rows:  # (process 0)
        print((pathlib.Path(FLAGS.out) / "sweep.md").read_text())
    else:
        import jax
        print(f"process {jax.process_index()} of {jax.process_count()}: its batches of every cell are written; "
              f"process 0 wrote the sweep's table")
    return 0


if __name__ == "__main__":
    define_flags()
    app.run(main, flags_parser=parse_flags)
