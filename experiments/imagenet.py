"""Attribution + insertion/deletion on ImageNet-style images: flags, then one run of the engine.

    python -m experiments.imagenet --method=la
    python -m experiments.imagenet --method=la,ig,sm --data=la1000:../shared/data/la1000 --num_images=100
    python -m experiments.imagenet --method=la --settings=paper --iprop
    python -m experiments.imagenet --method=la --protocol=la,rise   # the same maps scored under both protocols

The default runs the quick settings of each method on the embedded EfficientNet-Lite0 and the
sample photos bundled with scikit-image/matplotlib. Rerunning the same command resumes an
interrupted run (the default --out is derived from the flags); rerunning it with a protocol
added scores the stored maps under it without computing any map.
"""

from __future__ import annotations

import logging

from absl import app, flags

from experiments import flags as shared

FLAGS = flags.FLAGS
parse_flags = shared.parse_flags


def define_flags() -> None:
    flags.DEFINE_list("method", ["la"], "Attribution method(s), comma separated (see --list).")
    shared.define_run_flags()
    flags.DEFINE_string("out", None, "Output directory (default: runs/<derived from the flags>).")
    flags.DEFINE_bool("list", False, "List the registered methods and models, then exit.")
    shared.define_multihost_flags()


def default_out(fields: dict) -> str:
    """``runs/<methods>_<model>_<data>_<settings>_seed<seed>[_<precision>][_iprop][_<range>]``, shortened with a
    hash when it would not fit a file name (:func:`la_iprop.runs.outdir.short_name`)."""
    from la_iprop.runs.outdir import data_slug, short_name

    parts = ["-".join(fields["methods"]), fields["model"], data_slug(fields["data"]), fields["settings"],
             f"seed{fields['seed']}"]
    if fields["precision"] != "float32":
        parts.append(fields["precision"])
    if fields["iprop"]:
        parts.append("iprop" if fields["iprop_preset"] == "la" else f"iprop-{fields['iprop_preset']}")
    if fields["corruption"]:
        parts.append(fields["corruption"].replace(":", "-") + (f"-s{fields['corruption_seed']}"
                                                               if fields["corruption_seed"] else ""))
    start, stride, count = fields["start"], fields["stride"], fields["num_images"]
    if count is not None or start or stride != 1:
        stop = start + count * stride if count else "end"
        parts.append(f"{start}-{stop}" + (f"-by{stride}" if stride != 1 else ""))
    return "runs/" + short_name("_".join(parts))  # many methods or a long --data path: still one name


@shared.one_line_errors  # an OSError (full disk, read-only, name too long...): one line
def main(argv):
    del argv
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    shared.initialize_multihost()
    from la_iprop.attribution import available_methods
    from la_iprop.models import available_models
    from la_iprop.runs import ConfigError, RunConfig, run

    if FLAGS.list:
        print("methods:", ", ".join(available_methods()))
        print("models:", ", ".join(available_models()))
        return 0
    try:
        methods = tuple(FLAGS.method)
        fields = {"methods": methods, **shared.run_fields_from_flags(methods)}
        config = RunConfig(**fields, out=FLAGS.out or default_out(fields))
        summary = run(config, progress=FLAGS.progress)
    except ConfigError as err:
        shared.refuse(err)
    shared.print_summary(summary, config.out)
    return 0


if __name__ == "__main__":
    define_flags()
    app.run(main, flags_parser=parse_flags)
