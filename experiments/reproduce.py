"""The LA paper's comparison: every registered method, with and without IProp, protocol 'la'.

    python -m experiments.reproduce --data=la1000:../shared/data/la1000 --num_images=100 --name=cpu_quick

runs (or resumes) one ordinary experiment run in ``runs/reproduce_<name>``, copies its
table, summary and figures to ``results/reproduction/<name>/`` and regenerates
``results/REPRODUCTION.md`` from every run stored there (so a CPU run and a GPU run at the
paper's settings appear side by side, each with its exact command and device). All
numbers in the report are read from those runs; nothing is typed in by hand.
"""

from __future__ import annotations

import json
import pathlib
import shlex
import shutil
import sys

from absl import app, flags

from experiments.runner import CONTROL_SUFFIX
from la_iprop.iprop import IPROP_SUFFIX

FLAGS = flags.FLAGS


def define_flags() -> None:
    """The command-line flags; defined only when run as a script, so that importing this module
    (tests, notebooks, other experiment scripts with flags of the same name) defines none."""
    flags.DEFINE_string("name", None, "Name of this run's section, e.g. cpu_quick or h100_paper.")
    flags.DEFINE_list("method", None, "Methods (default: every registered method).")
    flags.DEFINE_string("model", "efficientnet_lite0", "Registered model.")
    flags.DEFINE_string("weights", None, "Weights for --model.")
    flags.DEFINE_string("data", "samples", "Image source (see experiments.imagenet).")
    flags.DEFINE_integer("num_images", None, "Number of images.")
    flags.DEFINE_integer("start", 0, "First image index.")
    flags.DEFINE_integer("batch_size", 8, "Batch size.")
    flags.DEFINE_integer("seed", 0, "PRNG seed.")
    flags.DEFINE_enum("settings", "quick", ["quick", "paper"], "quick or paper settings for every method.")
    flags.DEFINE_string("hparams", "", "Overrides, METHOD.NAME=VALUE, comma separated.")
    flags.DEFINE_string("iprop_hparams", "", "IProp overrides.")
    flags.DEFINE_bool("iprop", True, "Also run every method + IProp and its gamma = 0 control (METHOD+ctrl).")
    flags.DEFINE_enum("precision", "float32", ["float32", "float64"], "float32 or float64 (bit-reproducible).")
    flags.DEFINE_string("runs_dir", "runs", "Where the run itself is stored (resumable).")
    flags.DEFINE_string("results_dir", "results", "Where the report and its figures are written.")
    flags.DEFINE_bool("report_only", False, "Only regenerate REPRODUCTION.md from results/reproduction/*.")
    flags.DEFINE_bool("progress", True, "Show progress bars.")


# What the papers claim, as checks we can evaluate on our own numbers.
CLAIMS = [
    ("LA has the highest insertion AUC of all methods (LA paper, Table 1, four ImageNet models)",
     lambda rows: _best(rows, "insertion", max) == "la"),
    ("LA has the lowest deletion AUC of all methods (LA paper, Table 1; in the paper LA is best or close to best)",
     lambda rows: _best(rows, "deletion", min) == "la"),
    ("LA has the best insertion − deletion of all methods",
     lambda rows: _best(rows, "ins_minus_del", max) == "la"),
    ("LA beats the other adversarial-exploration methods (AGI, BIG, MFABA, AttEXplore) on insertion",
     lambda rows: all(rows["la"]["insertion"] > rows[m]["insertion"] for m in ("agi", "big", "mfaba", "attexplore")
                      if m in rows)),
    ("IProp improves insertion − deletion for most methods (IProp paper)",
     lambda rows: _iprop_wins(rows) > 0.5),
    ("IProp's propagation itself (vs its γ = 0 control, the same per-pixel reward without propagation) "
     "improves insertion − deletion for most methods",
     lambda rows: _iprop_wins(rows, CONTROL_SUFFIX) > 0.5),
]


def _plain(rows: dict) -> dict:
    return {k: v for k, v in rows.items() if "+" not in k}


def _best(rows: dict, column: str, pick) -> str:
    plain = _plain(rows)
    return pick(plain, key=lambda k: plain[k][column])


def _iprop_gains(rows: dict, baseline: str = "") -> dict[str, bool]:
    """{method: does METHOD+iprop beat METHOD+baseline on ins − del} ('' : the raw map)."""
    return {m: rows[m + IPROP_SUFFIX]["ins_minus_del"] > rows[m + baseline]["ins_minus_del"]
            for m in _plain(rows) if m + IPROP_SUFFIX in rows and m + baseline in rows}


def _iprop_wins(rows: dict, baseline: str = "") -> float:
    gains = _iprop_gains(rows, baseline)
    if not gains:
        raise ValueError("no IProp variants in this run")
    return sum(gains.values()) / len(gains)


def _section(name: str, summary: dict, command: str) -> str:
    from experiments.report import markdown_table

    rows = summary["results"]
    flags_ = summary["flags"]
    lines = [f"## Run `{name}`", "",
             f"- device: {summary['device']['backend']} ({summary['device']['kind']}), "
             f"{summary['device']['local_devices']} device(s); jax {summary['versions'].get('jax')}",
             f"- model `{flags_['model']}`, data `{flags_['data']}`, images {flags_['start']}–"
             f"{flags_['start'] + next(iter(rows.values()))['num_images'] - 1}, settings `{flags_['settings']}`, "
             f"seed {flags_['seed']}, protocol `{flags_['protocol']}`",
             f"- hyperparameter overrides: `{json.dumps(flags_['hparams'])}`; IProp overrides: "
             f"`{json.dumps(flags_['iprop_hparams'])}`",
             *([f"- IProp settings in effect: `{json.dumps(summary['resolved']['iprop'])}`"]
               if "iprop" in summary.get("resolved", {}) else []),
             f"- command: `{command}`", ""]
    variant_order = {"": 0, "ctrl": 1, "iprop": 2}
    ordered = dict(sorted(rows.items(), key=lambda kv: (kv[0].split("+")[0],
                                                        variant_order.get(kv[0].partition("+")[2], 3))))
    lines.append(markdown_table(ordered))
    lines += ["", "Paper claims checked on this run:", ""]
    for claim, check in CLAIMS:
        try:
            verdict = "reproduces" if check(rows) else "does **not** reproduce"
        except (KeyError, ValueError):
            verdict = "not checkable (methods missing)"
        lines.append(f"- {claim}: {verdict}.")
    for baseline, versus in (("", "the raw map"), (CONTROL_SUFFIX, "the γ = 0 control")):
        gains = _iprop_gains(rows, baseline)
        if gains:
            wins = ", ".join(m for m, won in gains.items() if won) or "none"
            losses = ", ".join(m for m, won in gains.items() if not won) or "none"
            lines.append(f"- Against {versus}, IProp raises ins − del for: {wins}; lowers it for: {losses}.")
    best_ins = _best(rows, "insertion", max)
    best_del = _best(rows, "deletion", min)
    lines.append(f"- best insertion: `{best_ins}` ({rows[best_ins]['insertion']:.4f}); best deletion: `{best_del}` "
                 f"({rows[best_del]['deletion']:.4f}); LA: {rows['la']['insertion']:.4f} / {rows['la']['deletion']:.4f}."
                 if "la" in rows else "")
    lines += ["", f"![heatmaps](reproduction/{name}/heatmaps.png)", "",
              f"![mean curves](reproduction/{name}/curves.png)", ""]
    return "\n".join(lines)


def write_report(results_dir: pathlib.Path) -> pathlib.Path:
    from experiments.runner import atomic_write

    sections = []
    for run_dir in sorted((results_dir / "reproduction").glob("*/summary.json")):
        summary = json.loads(run_dir.read_text())
        command = (run_dir.parent / "command.txt").read_text().strip()
        sections.append(_section(run_dir.parent.name, summary, command))
    header = [
        "# Reproduction of the LA paper's comparison (with IProp)",
        "",
        "Generated by `experiments/reproduce.py` from the runs stored under `results/reproduction/`; every "
        "number below is read from those runs. Insertion/deletion use the `la` protocol (the official "
        "LA/MFABA evaluation: softmax probability of the clean-image prediction, all H·W·3 elements ranked, "
        "3·224 elements per step, black substrate, AUC of the mean curve). `METHOD+iprop` is the method's "
        "map post-processed by IProp (settings in each run's section; the library defaults are in "
        "`la_iprop/iprop/defaults.py`), and `METHOD+ctrl` its γ = 0 control: the same per-pixel reward "
        "without propagation, which separates the gain of propagation from that of aggregating channels "
        "(runs made before the control was added lack those rows).",
        "",
        "The LA paper reports its comparison on torchvision Inception-v3, ResNet-50, VGG16 and MaxViT-T with "
        "their V1 ImageNet weights; those checkpoints cannot be downloaded here, so these runs use the embedded "
        "EfficientNet-Lite0. The paper's claims are therefore checked qualitatively (rankings), not number for "
        "number. Its headline figure — an average 38.21% improvement in attribution effectiveness over the "
        "baselines — is an average over those four models and is not comparable to a single-model run.",
        "",
    ]
    path = results_dir / "REPRODUCTION.md"
    atomic_write(path, lambda f: f.write("\n".join(header + sections) + "\n"))
    return path


def main(argv):
    del argv
    import logging
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    from experiments.runner import ConfigError, RunConfig, parse_hparams, run
    from la_iprop.attribution import available_methods

    results_dir = pathlib.Path(FLAGS.results_dir)
    if FLAGS.report_only:
        print(write_report(results_dir))
        return 0
    if not FLAGS.name:
        sys.exit("error: --name: give this run's section a name, e.g. --name=cpu_quick")
    methods = tuple(FLAGS.method or available_methods())
    try:
        config = RunConfig(
            methods=methods, model=FLAGS.model, weights=FLAGS.weights, data=FLAGS.data, num_images=FLAGS.num_images,
            start=FLAGS.start, batch_size=FLAGS.batch_size, seed=FLAGS.seed, protocol="la", iprop=FLAGS.iprop,
            settings=FLAGS.settings, hparams=parse_hparams(FLAGS.hparams, methods),
            iprop_hparams=parse_hparams(FLAGS.iprop_hparams, ("iprop",)).get("iprop", {}),
            precision=FLAGS.precision, out=str(pathlib.Path(FLAGS.runs_dir) / f"reproduce_{FLAGS.name}"))
        run(config, progress=FLAGS.progress)
    except ConfigError as err:
        sys.exit(f"error: {err}")
    section = results_dir / "reproduction" / FLAGS.name
    section.mkdir(parents=True, exist_ok=True)
    for name in ("summary.json", "results.md", "results.csv", "heatmaps.png", "curves.png"):
        shutil.copyfile(pathlib.Path(config.out) / name, section / name)
    (section / "command.txt").write_text("python -m experiments.reproduce " + " ".join(
        shlex.quote(a) for a in sys.argv[1:]) + "\n")
    print(write_report(results_dir))
    return 0


if __name__ == "__main__":
    define_flags()
    app.run(main)
