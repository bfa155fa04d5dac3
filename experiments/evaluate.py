"""Insertion/deletion (and IProp) of attribution maps made by any tool: Captum, PyTorch, numpy.

    python -m experiments.evaluate --maps=captum_maps.npz --data=la1000:../shared/data/la1000
    python -m experiments.evaluate --maps=captum_maps.npz --data=la1000:../shared/data/la1000 --protocol=la,rise --iprop
    python -m experiments.evaluate --maps=gradcam.npz --model=resnet50 --weights=resnet50-0676ba61.pth

The file is an ``.npz`` with ``ids`` (the data source's image ids), one array of maps per method
(any key, ``[N,3,H,W]``, ``[N,H,W,3]`` or per pixel ``[N,H,W]``/``[N,1,H,W]``/``[N,H,W,1]``, in the
order of ``ids``, at the model's input size) and optionally ``labels`` (the explained classes;
default: the model's prediction on the clean image). Format and checks:
:mod:`experiments.external_maps`. The outputs are those of ``experiments.imagenet`` (results.csv,
summary.json, results.md, heatmaps.png, curves.png, and the run store: the maps copied into
batches/KEY/, their scores in scores/PROTOCOL/KEY/); ``--iprop`` adds KEY+iprop and its gamma = 0
control KEY+ctrl. Rerunning the same command resumes (the default --out is derived from the
flags); the file's sha256 is part of the run's identity, so another file is refused for an --out.
"""

from __future__ import annotations

import logging
import pathlib
import re
import sys

from absl import app, flags

from experiments import multihost

FLAGS = flags.FLAGS
flags.DEFINE_string("maps", None, ".npz of maps made elsewhere: ids, one array per method, optional labels.")
flags.DEFINE_list("layout", [], "Only for shapes two layouts fit: nchw | nhwc | hw, for every key or as KEY=LAYOUT.")
flags.DEFINE_string("model", "efficientnet_lite0", "Registered model name (the model the maps explain).")
flags.DEFINE_string("weights", None, "Checkpoint (.pth or converted .msgpack) for --model; default: embedded/cache.")
flags.DEFINE_string("data", "samples", "samples | folder:PATH | la1000:PATH | tfds:NAME[:SPLIT] (where ids are from)")
flags.DEFINE_string("tfds_data_dir", None, "data_dir for tfds: sources.")
flags.DEFINE_integer("batch_size", 8, "Images per batch (sharded over the devices).")
flags.DEFINE_list("protocol", ["la"], "Insertion/deletion protocol(s), comma separated: la, rise.")
flags.DEFINE_bool("iprop", False, "Also propagate every map with IProp (KEY+iprop) and its gamma = 0 control (KEY+ctrl).")
flags.DEFINE_string("iprop_hparams", "", "IProp overrides, e.g. 'gamma=0.9,k=8'.")
flags.DEFINE_string("out", None, "Output directory (default: runs/evaluate_<file>_<model>_<data>...).")
flags.DEFINE_integer("devices", None, "Local devices to shard batches over (default: all).")
flags.DEFINE_enum("precision", "float32", ["float32", "float64"], "float64: model, images, maps and metric in float64.")
flags.DEFINE_bool("progress", True, "Show a progress bar.")
multihost.define_flags()  # --coordinator_address, --num_processes, --process_id, --distributed, ...
flags.adopt_module_key_flags(multihost)  # (listed by --help)


def default_out(maps: str, model: str, data: str, iprop: bool, precision: str = "float32") -> str:
    slug = re.sub(r"[^A-Za-z0-9._-]+", "-", data.split(":", 1)[-1].rstrip("/").split("/")[-1] or data)
    parts = ["evaluate", re.sub(r"[^A-Za-z0-9._-]+", "-", pathlib.Path(maps).stem), model, slug]
    if precision != "float32":
        parts.append(precision)
    if iprop:
        parts.append("iprop")
    return "runs/" + "_".join(parts)


def main(argv):
    del argv
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    multihost.initialize_from_flags()

    from experiments.external_maps import run_maps
    from experiments.runner import ConfigError, parse_hparams

    out = FLAGS.out or default_out(FLAGS.maps or "", FLAGS.model, FLAGS.data, FLAGS.iprop, FLAGS.precision)
    try:
        if not FLAGS.maps:
            raise ConfigError("--maps: give the .npz of maps to evaluate, e.g. --maps=captum_maps.npz")
        summary = run_maps(
            FLAGS.maps, layouts=FLAGS.layout, progress=FLAGS.progress, model=FLAGS.model, weights=FLAGS.weights,
            data=FLAGS.data, tfds_data_dir=FLAGS.tfds_data_dir, batch_size=FLAGS.batch_size,
            protocols=tuple(FLAGS.protocol), iprop=FLAGS.iprop,
            iprop_hparams=parse_hparams(FLAGS.iprop_hparams, ("iprop",)).get("iprop", {}), out=out,
            devices=FLAGS.devices, precision=FLAGS.precision)
    except ConfigError as err:
        _refuse(err)
    if summary:
        from experiments.report import markdown_table
        for protocol, rows in summary["results"].items():
            print(markdown_table(rows, f"protocol {protocol}"))
        print(f"results written to {out}")
    return 0


def _refuse(err: Exception) -> None:
    """A refused flag or file: one line on stderr, exit status 1 as experiments.imagenet (nothing was written)."""
    sys.exit(f"error: {err}")


def parse_flags(argv: list[str]) -> list[str]:
    """absl's parsing, with a bad or unknown flag reported as one line (before anything is written)."""
    try:
        return FLAGS(argv)
    except flags.Error as err:
        _refuse(err)


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
