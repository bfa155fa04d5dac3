"""IProp's open questions as a study on the run engine: does the graph's structure matter, which
similarity carries the gain, and does the gain survive out-of-distribution images.

Each part is one or more engine runs on the same held-out images, batch-major and resumable (the
engine's store is the only cache); IProp's settings are named IProp variants of the run
(``METHOD+iprop@LABEL``, :attr:`la_iprop.runs.config.RunConfig.iprop_variants`), each the full
preset with one thing changed, so every comparison is paired on the same maps and images:

- ``structure``: the methods' maps, IProp on the paper's KNN graph (``@knn``: the preset) and the
  structure controls (e.g. ``@random_window``: a random graph of the same out-degree, gamma and
  reward; ``@spatial``: the colour term off). Each control is compared with ``@knn``
  (``control − knn``), and ``@knn`` with the raw map (IProp's own effect).
- ``ood_<corruption>``: one run per ImageNet-C corruption (``RunConfig.corruption``) with the
  methods raw and ``@<preset>``: IProp's gain (``iprop − raw``) and LA's advantage (``la − method``)
  on corrupted images.

Question 1 (IProp tuned under its own kind of protocol) is the tuning study's
(:mod:`la_iprop.studies.iprop_tuning`); :mod:`la_iprop.studies.iprop_questions_report` reads its JSON
and the reproduction's section beside this study's sections.

Every comparison is :func:`la_iprop.metrics.comparison.compare` (paired 95% bootstrap CI of the mean
per-image difference, verdict "holds" when the first is better and the CI excludes 0).
"""

from __future__ import annotations

import pathlib
from typing import Any, Mapping

from la_iprop.iprop import IPROP_SUFFIX, preset_hparams
from la_iprop.metrics.comparison import Comparison, Scores, compare, summarize
from la_iprop.runs import multihost
from la_iprop.runs.config import VARIANT_SEPARATOR, ConfigError, RunConfig
from la_iprop.runs.engine import report_interim, run
from la_iprop.runs.store import atomic_write, copy_file, read_run

__all__ = ["KNN", "PART_NAMES", "iprop_variant", "corruption_part", "part_configs", "run_parts", "write_command",
           "structure_rows", "ood_rows", "tally"]

KNN = "knn"               # the label of IProp on the paper's graph (the preset) in the structure part
PART_NAMES = ("structure", "ood")
SECTION_FILES = ("results.csv", "summary.json")
# The run fields a study config passes to every part's run.
RUN_FIELDS = ("model", "weights", "data", "num_images", "start", "stride", "batch_size", "settings", "seed",
              "precision", "protocols")


def iprop_variant(method: str, label: str) -> str:
    """``METHOD+iprop@LABEL``."""
    return f"{method}{IPROP_SUFFIX}{VARIANT_SEPARATOR}{label}"


def corruption_part(spec: str) -> str:
    """The section name of a corruption's part, e.g. ``ood_gaussian_noise_3``."""
    return "ood_" + spec.replace(":", "_")


def part_configs(study: Mapping[str, Any], runs_dir: pathlib.Path, parts=PART_NAMES) -> dict[str, RunConfig]:
    """``{section name: engine run}`` of the study's ``parts`` (``structure``, ``ood``), in run order."""
    unknown = sorted(set(parts) - set(PART_NAMES))
    if unknown:
        raise ConfigError(f"parts: unknown part(s) {unknown}; parts: {list(PART_NAMES)}")
    preset = study["iprop_preset"]
    base = preset_hparams(preset)
    fields = {k: study[k] for k in RUN_FIELDS if k in study}
    name = study["name"]
    configs = {}
    if "structure" in parts:
        controls = dict(study["controls"])
        if KNN in controls:
            raise ConfigError(f"controls: {KNN!r} is the label of the preset's KNN graph; name the control otherwise")
        variants = {KNN: base, **{label: {**base, **dict(change)} for label, change in controls.items()}}
        configs["structure"] = RunConfig.from_mapping(
            fields, methods=tuple(study["structure_methods"]), iprop_variants=variants,
            out=str(runs_dir / f"iprop_questions_{name}_structure"))
    if "ood" in parts:
        for spec in study["corruptions"]:
            part = corruption_part(spec)
            configs[part] = RunConfig.from_mapping(
                fields, methods=tuple(study["ood_methods"]), iprop_variants={preset: base}, corruption=spec,
                corruption_seed=study.get("corruption_seed", 0), out=str(runs_dir / f"iprop_questions_{name}_{part}"))
    return configs


def run_parts(configs: Mapping[str, RunConfig], section_dir: pathlib.Path, *, interim: bool = False,
              progress: bool = True, model=None) -> dict[str, str]:
    """Runs (or resumes) each part's run in order and copies its ``results.csv`` and ``summary.json``
    to ``section_dir/<part>/``; ``interim``: computes nothing, reports the images each run has finished
    for every variant under every protocol (a part not begun yet is skipped). Returns ``{part: state}``
    (``done``, ``interim``, ``not begun``)."""
    states = {}
    for part, config in configs.items():
        if interim:
            if read_run(config.out) is None:
                states[part] = "not begun"
                continue
            try:
                summary = report_interim(config, model=model)
            except RuntimeError as err:  # begun, but no image finished by every variant yet
                states[part] = f"not begun ({err})"
                continue
            states[part] = "interim" if "interim" in summary else "done"
        else:
            run(config, progress=progress, model=model)
            states[part] = "done"
        if multihost.is_process_zero():
            for file in SECTION_FILES:
                copy_file(pathlib.Path(config.out) / file, section_dir / part / file)
    return states


def write_command(section_dir: pathlib.Path, command: str) -> None:
    atomic_write(section_dir / "command.txt", lambda f: f.write(command + "\n"))


# ----------------------------------------------------------------------------- tables
def _row(scores: Mapping[str, Scores], variant: str, against: str | None) -> dict[str, Any] | None:
    if variant not in scores:
        return None
    row: dict[str, Any] = {"variant": variant, "means": summarize(scores[variant])}
    if against is not None and against in scores:
        row["against"] = against
        row["comparison"] = compare(scores[variant], scores[against])
    return row


def structure_rows(scores: Mapping[str, Mapping[str, Scores]], methods, labels) -> dict[str, list[dict]]:
    """Per protocol, per method: the raw map, ``@knn`` (compared with the raw map) and every control
    (compared with ``@knn``)."""
    out: dict[str, list[dict]] = {}
    for protocol, by_variant in scores.items():
        rows = []
        for method in methods:
            knn = iprop_variant(method, KNN)
            for variant, against in [(method, None), (knn, method),
                                     *((iprop_variant(method, label), knn) for label in labels)]:
                row = _row(by_variant, variant, against)
                if row is not None:
                    rows.append({**row, "method": method})
        out[protocol] = rows
    return out


def ood_rows(scores: Mapping[str, Mapping[str, Scores]], methods, preset: str) -> dict[str, dict[str, list]]:
    """Per protocol: ``iprop`` rows (each method raw and with IProp, IProp compared with the raw map)
    and ``la`` rows (LA compared with each other raw method)."""
    out: dict[str, dict[str, list]] = {}
    for protocol, by_variant in scores.items():
        iprop_rows = []
        for method in methods:
            for variant, against in [(method, None), (iprop_variant(method, preset), method)]:
                row = _row(by_variant, variant, against)
                if row is not None:
                    iprop_rows.append({**row, "method": method})
        la_rows = [{**row, "method": method} for method in methods if method != "la"
                   for row in [_row(by_variant, "la", method)] if row is not None and "comparison" in row]
        out[protocol] = {"iprop": iprop_rows, "la": la_rows}
    return out


def tally(comparisons: list[Comparison], metric: str) -> dict[str, int]:
    """How many comparisons hold / do not hold / are inconclusive on ``metric``."""
    counts = {"holds": 0, "does not hold": 0, "inconclusive": 0}
    for comparison in comparisons:
        counts[comparison.verdicts[metric]] += 1
    return counts
