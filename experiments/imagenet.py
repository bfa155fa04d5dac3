"""Attribution + insertion/deletion on ImageNet-style images.

    python -m experiments.imagenet --method=la
    python -m experiments.imagenet --method=la,ig,sm --data=la1000:../shared/data/la1000 --num_images=100
    python -m experiments.imagenet --method=la --settings=paper --iprop
    python -m experiments.imagenet --method=la --protocol=la,rise   # the same maps scored under both protocols

The default runs the quick settings of each method on the embedded EfficientNet-Lite0
and the sample photos bundled with scikit-image/matplotlib. Rerunning the same command
resumes an interrupted run (the default --out is derived from the flags); rerunning it with
a protocol added scores the stored maps under it without computing any map.
"""

from __future__ import annotations

import logging
import re
import sys

from absl import app, flags

from experiments import multihost

FLAGS = flags.FLAGS
flags.DEFINE_list("method", ["la"], "Attribution method(s), comma separated (see --list).")
flags.DEFINE_string("model", "efficientnet_lite0", "Registered model name.")
flags.DEFINE_string("weights", None, "Checkpoint (.pth or converted .msgpack) for --model; default: embedded/cache.")
flags.DEFINE_string("data", "samples", "samples | folder:PATH | la1000:PATH | tfds:NAME[:SPLIT]")
flags.DEFINE_string("tfds_data_dir", None, "data_dir for tfds: sources.")
flags.DEFINE_integer("num_images", None, "Number of images (default: all of the source).")
flags.DEFINE_integer("start", 0, "Index of the first image.")
flags.DEFINE_integer("stride", 1, "Every stride-th image from --start (e.g. to spread a short run over a data set).")
flags.DEFINE_integer("batch_size", 8, "Images per batch (sharded over the devices).")
flags.DEFINE_integer("seed", 0, "PRNG seed; each image's key is derived from it and the image index.")
flags.DEFINE_list("protocol", ["la"], "Insertion/deletion protocol(s), comma separated: la, rise. The maps are "
                  "computed once and scored under each; not part of the run's identity (add one to a finished run).")
flags.DEFINE_enum("settings", "quick", ["quick", "paper"],
                  "quick: cheap settings that finish in minutes on a CPU; paper: each method's paper defaults.")
flags.DEFINE_string("hparams", "", "Overrides, e.g. 'la.max_iter=30,la.sampling_times=20'.")
flags.DEFINE_bool("iprop", False, "Also run every method followed by IProp (reported as METHOD+iprop) and by "
                  "its gamma = 0 control (METHOD+ctrl: the same reward rule, no propagation).")
flags.DEFINE_string("iprop_hparams", "", "IProp overrides, e.g. 'gamma=0.9,k=8'.")
flags.DEFINE_string("out", None, "Output directory (default: runs/<derived from the flags>).")
flags.DEFINE_integer("devices", None, "Local devices to shard batches over (default: all).")
flags.DEFINE_enum("precision", "float32", ["float32", "float64"],
                  "float64: model, images, maps and metric in float64 (bit-reproducible across batch sizes, thread "
                  "counts and CPUs; slower). Part of the run's identity: a float32 run never resumes a float64 one.")
flags.DEFINE_bool("save_attributions", True, "Keep the attribution maps in the batch .npz files.")
flags.DEFINE_bool("progress", True, "Show a progress bar.")
flags.DEFINE_bool("list", False, "List the registered methods and models, then exit.")
multihost.define_flags()  # --coordinator_address, --num_processes, --process_id, --distributed, ...
flags.adopt_module_key_flags(multihost)  # (listed by --help)


def default_out(method, model, data, settings, seed, iprop, num_images, start, precision="float32", stride=1) -> str:
    slug = re.sub(r"[^A-Za-z0-9._-]+", "-", data.split(":", 1)[-1].rstrip("/").split("/")[-1] or data)
    parts = ["-".join(method), model, slug, settings, f"seed{seed}"]
    if precision != "float32":
        parts.append(precision)
    if iprop:
        parts.append("iprop")
    if num_images is not None or start or stride != 1:
        if stride == 1:
            parts.append(f"{start}-{start + num_images if num_images else 'end'}")
        else:
            parts.append(f"{start}-{start + num_images * stride if num_images else 'end'}-by{stride}")
    return "runs/" + "_".join(parts)


def main(argv):
    del argv
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    import jax

    multihost.initialize_from_flags()

    from experiments.runner import ConfigError, RunConfig, parse_hparams, run
    from la_iprop.attribution import available_methods
    from la_iprop.models import available_models

    if FLAGS.list:
        print("methods:", ", ".join(available_methods()))
        print("models:", ", ".join(available_models()))
        return 0
    methods = tuple(FLAGS.method)
    try:
        iprop_hparams = parse_hparams(FLAGS.iprop_hparams, ("iprop",)).get("iprop", {})
        config = RunConfig(
            methods=methods, model=FLAGS.model, weights=FLAGS.weights, data=FLAGS.data,
            tfds_data_dir=FLAGS.tfds_data_dir, num_images=FLAGS.num_images, start=FLAGS.start, stride=FLAGS.stride,
            batch_size=FLAGS.batch_size, seed=FLAGS.seed, protocols=tuple(FLAGS.protocol), iprop=FLAGS.iprop,
            settings=FLAGS.settings, hparams=parse_hparams(FLAGS.hparams, methods), iprop_hparams=iprop_hparams,
            out=FLAGS.out or default_out(methods, FLAGS.model, FLAGS.data, FLAGS.settings, FLAGS.seed,
                                         FLAGS.iprop, FLAGS.num_images, FLAGS.start, FLAGS.precision,
                                         FLAGS.stride),
            devices=FLAGS.devices, save_attributions=FLAGS.save_attributions, precision=FLAGS.precision)
        summary = run(config, progress=FLAGS.progress)
    except ConfigError as err:
        sys.exit(f"error: {err}")
    if summary:
        from experiments.report import markdown_table
        for protocol, rows in summary["results"].items():
            print(markdown_table(rows, f"protocol {protocol}"))
        print(f"results written to {config.out}")
    elif jax.process_count() > 1:  # a process other than 0 of a multi-process run
        print(f"process {jax.process_index()} of {jax.process_count()}: its batches are written; process 0 merged "
              f"every process's batches into the reports in {config.out}")
    return 0


def parse_flags(argv: list[str]) -> list[str]:
    """absl's parsing, with a bad or unknown flag reported as one line (before anything is written)."""
    try:
        return FLAGS(argv)
    except flags.Error as err:
        sys.exit(f"error: {err}")


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
