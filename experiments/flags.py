"""The command-line flags shared by the CLIs, defined once, and their mapping onto a run.

Each CLI defines the groups it needs (:func:`define_run_flags`, :func:`define_multihost_flags`)
and calls :func:`run_fields_from_flags` to turn them into the fields of a :class:`la_iprop.runs.RunConfig`:
the same configuration a study's config file builds (``configs/*.py``); a study's CLI defines
:func:`define_study_flags` and records :func:`study_command`. A refused flag is one line on stderr and
exit status 1 (:func:`parse_flags`, :func:`refuse`), before anything is written. An error of the
operating system while a CLI runs (a full disk, a read-only file system, a name too long, no
permission, a file where a folder should be, a move across file systems) is one line too, naming the
path (:func:`one_line_errors`, which every CLI's ``main`` is wrapped in; the line is
:func:`la_iprop.runs.files.os_error_line`).
"""

from __future__ import annotations

import functools
import shlex
import sys
from typing import Any, Callable

from absl import flags

FLAGS = flags.FLAGS

# name -> (definer, default, help); defaults are those of experiments.imagenet. A CLI may pass other defaults.
_RUN_FLAGS: dict[str, tuple] = {
    "model": (flags.DEFINE_string, "efficientnet_lite0", "Registered model name."),
    "weights": (flags.DEFINE_string, None, "Checkpoint (.pth or converted .msgpack) for --model; default: embedded."),
    "data": (flags.DEFINE_string, "samples", "samples | folder:PATH | la1000:PATH | tfds:NAME[:SPLIT]"),
    "tfds_data_dir": (flags.DEFINE_string, None, "data_dir for tfds: sources."),
    "num_images": (flags.DEFINE_integer, None, "Number of images (default: all of the source)."),
    "start": (flags.DEFINE_integer, 0, "Index of the first image."),
    "stride": (flags.DEFINE_integer, 1, "Every stride-th image from --start (spreads a short run over a data set)."),
    "batch_size": (flags.DEFINE_integer, 8, "Images per batch (sharded over the devices)."),
    "seed": (flags.DEFINE_integer, 0, "PRNG seed; each image's key is derived from it and the image index."),
    "protocol": (flags.DEFINE_list, ["la"], "Insertion/deletion protocol(s), comma separated: la, rise. The maps are "
                 "computed once and scored under each; not part of the run's identity (add one to a finished run)."),
    "settings": (flags.DEFINE_string, "quick", "quick: cheap settings that finish in minutes on a CPU; paper: each "
                 "method's paper defaults."),
    "hparams": (flags.DEFINE_string, "", "Overrides, e.g. 'la.max_iter=30,la.sampling_times=20'."),
    "iprop": (flags.DEFINE_bool, False, "Also run every method followed by IProp (METHOD+iprop) and by its gamma = 0 "
              "control (METHOD+ctrl: the same reward rule, no propagation)."),
    "iprop_hparams": (flags.DEFINE_string, "", "IProp overrides on top of --iprop_preset, e.g. 'gamma=0.9,k=8'."),
    "iprop_preset": (flags.DEFINE_string, "la", "The IProp settings METHOD+iprop starts from: la (tuned under "
                     "protocol la; the default) or rise (tuned under protocol rise, criterion dir); "
                     "la_iprop.iprop.PRESETS."),
    "corruption": (flags.DEFINE_string, None, "An ImageNet-C corruption of every image, NAME:SEVERITY (e.g. "
                   "gaussian_noise:3; needs pip install 'la_iprop[corruptions]'). Part of the run's identity."),
    "corruption_seed": (flags.DEFINE_integer, 0, "Seed of the corruptions' randomness (with each image's id)."),
    "devices": (flags.DEFINE_integer, None, "Local devices to shard batches over (default: all)."),
    "precision": (flags.DEFINE_string, "float32", "float32 | float64 | float32_fast. float64: model, images, maps "
                  "and metric in float64 (bit-reproducible across batch sizes, thread counts and CPUs). float32_fast: "
                  "the accelerator's fast matmul mode (TF32/bf16 passes; see docs/reproducibility.md). Part of the "
                  "run's identity."),
    "save_attributions": (flags.DEFINE_bool, True, "Keep the attribution maps in the batch .npz files."),
    "progress": (flags.DEFINE_bool, True, "Show a progress bar (false: one log line per batch)."),
}


def define_run_flags(names: tuple[str, ...] | None = None, *, helps: dict[str, str] | None = None,
                     **defaults: Any) -> None:
    """Defines the run flags ``names`` (default: all) with the shared help texts; ``defaults`` overrides
    a flag's default value for this CLI, ``helps`` its help text."""
    for name in names or tuple(_RUN_FLAGS):
        definer, default, text = _RUN_FLAGS[name]
        definer(name, defaults.get(name, default), (helps or {}).get(name, text))


def define_study_flags(*, config: str | None = None, config_file: bool = True, runs_dir: str = "runs",
                       reports_from: str | None = None, progress: bool = True) -> None:
    """The flags of a study's CLI: ``--config`` (with ``config_file``; ``config`` its default file),
    ``--runs_dir``, ``--results_dir``, ``--progress``, and where the report can be rebuilt from stored
    records (``reports_from``, e.g. ``results/la_ablations/<name>/``) ``--report_only`` and ``--interim``."""
    from ml_collections import config_flags

    if config_file:
        config_flags.DEFINE_config_file("config", config, "The study's config file.")
    flags.DEFINE_string("runs_dir", runs_dir, "Where the study's engine runs are stored (resumable).")
    flags.DEFINE_string("results_dir", "results", "Where the report and its figures are written.")
    flags.DEFINE_bool("progress", progress, "Show a progress bar per engine run (false: one log line per batch).")
    if reports_from is not None:
        flags.DEFINE_bool("report_only", False, f"Only regenerate the report from {reports_from}.")
        flags.DEFINE_bool("interim", False, "Compute nothing: report what the runs have finished so far.")


def study_command(module: str, *, drop: tuple[str, ...] = (), config: str | None = None) -> str:
    """The command a study's report records: ``python -m MODULE`` with this command line's arguments but
    the flags named in ``drop`` (in any form: ``--x``, ``--x=v``, ``--nox``), and ``--config=CONFIG``
    first when the command line gives no ``--config``."""
    dropped = {f"--{name}" for name in drop} | {f"--no{name}" for name in drop}
    args = [a for a in sys.argv[1:] if a.split("=", 1)[0] not in dropped]
    if config is not None and not any(a.split("=", 1)[0] == "--config" for a in args):
        args.insert(0, f"--config={config}")
    return " ".join([f"python -m {module}", *map(shlex.quote, args)])


def define_multihost_flags() -> None:
    """The multi-process flags (docs/multihost.md): every process runs the same command with its own
    --process_id."""
    if "coordinator_address" in FLAGS:  # already defined by another CLI module in this process
        return
    flags.DEFINE_string("coordinator_address", None, "jax.distributed: host:port of process 0 (multi-process runs; "
                        "with all three of these flags, nothing is detected and each process uses all its local "
                        "devices).")
    flags.DEFINE_integer("num_processes", None, "jax.distributed: the number of processes.", lower_bound=1)
    flags.DEFINE_integer("process_id", None, "jax.distributed: this process's id, 0 .. num_processes - 1.",
                         lower_bound=0)
    flags.DEFINE_bool("distributed", False, "Initialise jax.distributed with the settings not given by the three "
                      "flags above detected from the cluster (Cloud TPU pods, SLURM, Open MPI).")
    flags.DEFINE_integer("heartbeat_timeout", 100, "jax.distributed: seconds without a heartbeat after which a "
                         "process counts as dead and every other process stops with an error.", lower_bound=1)
    flags.DEFINE_integer("initialization_timeout", 300, "jax.distributed: seconds a process waits for all the "
                         "others to join at start-up.", lower_bound=1)


def initialize_multihost() -> bool:
    """``jax.distributed`` from the multi-process flags, before anything touches a device; a setting
    it refuses ends the program with one line and exit status 1."""
    from la_iprop.runs import multihost

    try:
        return multihost.initialize(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id,
                                    detect=FLAGS.distributed, heartbeat_timeout=FLAGS.heartbeat_timeout,
                                    initialization_timeout=FLAGS.initialization_timeout)
    except ValueError as err:
        sys.exit(f"error: --coordinator_address/--num_processes/--process_id: {err}")


def explicit(name: str) -> bool:
    """Whether the flag was given on the command line (a study's config file supplies the others)."""
    return name in FLAGS and FLAGS[name].present


def run_fields_from_flags(methods: tuple[str, ...], names: tuple[str, ...] | None = None) -> dict:
    """The :class:`~la_iprop.runs.RunConfig` fields of the run flags ``names`` (default: all defined)."""
    from la_iprop.runs.config import parse_hparams

    names = [n for n in (names or tuple(_RUN_FLAGS)) if n in FLAGS and n != "progress"]
    fields: dict[str, Any] = {}
    for name in names:
        value = FLAGS[name].value
        if name == "protocol":
            fields["protocols"] = tuple(value)
        elif name == "hparams":
            fields["hparams"] = parse_hparams(value, methods)
        elif name == "iprop_hparams":
            fields["iprop_hparams"] = parse_hparams(value, ("iprop",)).get("iprop", {})
        else:
            fields[name] = value
    return fields


def refuse(err: BaseException | str) -> None:
    """A refused flag, config or file: one line on stderr, exit status 1."""
    text = " ".join(str(err).split("\n")).strip() or type(err).__name__
    sys.exit(f"error: {text}")


def one_line_errors(main: Callable) -> Callable:
    """A CLI's ``main`` whose OSErrors (from any write of the run, report or study) end as one line on
    stderr naming the path, and exit status 1; a refused flag (``ConfigError``) is refused inside ``main``."""
    from la_iprop.runs.files import os_error_line

    @functools.wraps(main)
    def wrapped(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except OSError as err:
            refuse(os_error_line(err))
    return wrapped


def parse_flags(argv: list[str]) -> list[str]:
    """absl's parsing, with a bad or unknown flag reported as one line (before anything is written)."""
    try:
        return FLAGS(argv)
    except flags.Error as err:
        refuse(err)


def print_summary(summary: dict, out: str) -> None:
    """The tables of a finished run, or what a process other than 0 of a multi-process run did."""
    import jax

    from la_iprop.runs.report import markdown_table

    if summary:
        for protocol, rows in summary["results"].items():
            print(markdown_table(rows, f"protocol {protocol}"))
        print(f"results written to {out}")
    elif jax.process_count() > 1:
        print(f"process {jax.process_index()} of {jax.process_count()}: its batches are written; process 0 merged "
              f"every process's batches into the reports in {out}")
