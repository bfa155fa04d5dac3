"""Insertion/deletion (and IProp) of attribution maps made by any tool: Captum, PyTorch, numpy.

    python -m experiments.evaluate --maps=captum_maps.npz --data=la1000:../shared/data/la1000
    python -m experiments.evaluate --maps=captum_maps.npz --data=la1000:../shared/data/la1000 --protocol=la,rise --iprop
    python -m experiments.evaluate --maps=gradcam.npz --model=resnet50 --weights=resnet50-0676ba61.pth

The file is an ``.npz`` with ``ids`` (the data source's image ids), one array of maps per method
(any key, ``[N,3,H,W]``, ``[N,H,W,3]`` or per pixel ``[N,H,W]``/``[N,1,H,W]``/``[N,H,W,1]``, in the
order of ``ids``, at the model's input size) and optionally ``labels`` (the explained classes;
default: the model's prediction on the clean image). Format and checks:
:mod:`la_iprop.runs.external_maps`. The outputs are those of ``experiments.imagenet`` (results.csv,
summary.json, results.md, heatmaps.png, curves.png, and the run store: the maps copied into
batches/KEY/, their scores in scores/PROTOCOL/KEY/); ``--iprop`` adds KEY+iprop and its gamma = 0
control KEY+ctrl. Rerunning the same command resumes (the default --out is derived from the
flags); the file's sha256 is part of the run's identity, so another file is refused for an --out.
"""

from __future__ import annotations

import logging
import pathlib

from absl import app, flags

from experiments import flags as shared

FLAGS = flags.FLAGS
parse_flags = shared.parse_flags


def define_flags() -> None:
    flags.DEFINE_string("maps", None, ".npz of maps made elsewhere: ids, one array per method, optional labels.")
    flags.DEFINE_list("layout", [], "Only for shapes two layouts fit: nchw | nhwc | hw, for every key or as "
                      "KEY=LAYOUT.")
    shared.define_run_flags(("model", "weights", "data", "tfds_data_dir", "batch_size", "protocol", "iprop",
                             "iprop_hparams", "iprop_preset", "devices", "precision", "progress"))
    flags.DEFINE_string("out", None, "Output directory (default: runs/evaluate_<file>_<model>_<data>...).")
    shared.define_multihost_flags()


def default_out(maps: str, model: str, data: str, iprop: bool, precision: str = "float32") -> str:
    from la_iprop.runs.outdir import data_slug, name_part, short_name

    parts = ["evaluate", name_part(pathlib.Path(maps).stem), model, data_slug(data)]
    if precision != "float32":
        parts.append(precision)
    if iprop:
        parts.append("iprop")
    return "runs/" + short_name("_".join(parts))  # a long file name or --data path: still one name


@shared.one_line_errors  # an OSError (full disk, read-only, name too long...): one line
def main(argv):
    del argv
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    shared.initialize_multihost()
    from la_iprop.runs import ConfigError
    from la_iprop.runs.external_maps import run_maps

    out = FLAGS.out or default_out(FLAGS.maps or "", FLAGS.model, FLAGS.data, FLAGS.iprop, FLAGS.precision)
    try:
        if not FLAGS.maps:
            raise ConfigError("--maps: give the .npz of maps to evaluate, e.g. --maps=captum_maps.npz")
        summary = run_maps(FLAGS.maps, layouts=FLAGS.layout, progress=FLAGS.progress, out=out,
                           **shared.run_fields_from_flags(("iprop",)))
    except ConfigError as err:
        shared.refuse(err)
    shared.print_summary(summary, out)
    return 0


if __name__ == "__main__":
    define_flags()
    app.run(main, flags_parser=parse_flags)
