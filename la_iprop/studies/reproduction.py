"""The LA paper's comparison as a study: every method, with and without IProp, under protocols la and rise.

A reproduction is one run of the engine (every method, ``iprop=True``) plus LA alone with the
seeds ``seed + 1 .. seed + la_seeds - 1`` (its target draws), so the report shows LA's
seed-to-seed spread beside the CIs. :func:`run_reproduction` runs or resumes them, copies the
tables, summary and figures to ``<results_dir>/reproduction/<name>/`` and regenerates
``<results_dir>/REPRODUCTION.md`` from every section stored there (:func:`write_report`), so a CPU
run and a GPU run appear side by side, each with its exact command and device. Every number in
the report is read from those runs' per-image scores; the claims are paired comparisons with
bootstrap CIs (:mod:`la_iprop.metrics.comparison`).
"""

from __future__ import annotations

import csv
import dataclasses
import json
import pathlib

import numpy as np

from la_iprop.iprop import IPROP_SUFFIX
from la_iprop.metrics.comparison import METRICS, Comparison, Scores, compare, exceeds_noise, summarize
from la_iprop.metrics.statistics import VERDICTS, MeanCI
from la_iprop.runs import multihost
from la_iprop.runs.config import CONTROL_SUFFIX, RunConfig
from la_iprop.runs.engine import report_interim, run
from la_iprop.runs.store import atomic_write, copy_file

__all__ = ["read_scores", "la_claims", "iprop_claims", "load_noise", "write_report", "run_reproduction",
           "seed_configs"]

ADVERSARIAL = ("agi", "big", "mfaba", "attexplore")
LA = "la"
METRIC_NAMES = {"insertion": "insertion", "deletion": "deletion", "ins_minus_del": "ins − del", "dir": "dir"}
VARIANT_ORDER = {"": 0, "ctrl": 1, "iprop": 2}


# ----------------------------------------------------------------------------- reading runs
def read_scores(csv_path: pathlib.Path, default_protocol: str = "la") -> dict[str, dict[str, Scores]]:
    """Per-image AUCs of a run's ``results.csv``: ``{protocol: {variant: Scores}}`` (runs written before
    several protocols were supported have no ``protocol`` column: all their rows are ``default_protocol``)."""
    columns: dict[tuple[str, str], dict[str, list]] = {}
    with open(csv_path, newline="") as f:
        for row in csv.DictReader(f):
            key = (row.get("protocol") or default_protocol, row["method"])
            entry = columns.setdefault(key, {"index": [], "insertion": [], "deletion": []})
            for name in entry:
                entry[name].append(float(row[name]) if name != "index" else int(row[name]))
    out: dict[str, dict[str, Scores]] = {}
    for (protocol, variant), entry in columns.items():
        out.setdefault(protocol, {})[variant] = Scores(**{k: np.asarray(v) for k, v in entry.items()})
    return out


def _ordered(variants) -> list[str]:
    return sorted(variants, key=lambda v: (v.split("+")[0], VARIANT_ORDER.get(v.partition("+")[2], 3)))


def _plain(variants) -> list[str]:
    return [v for v in _ordered(variants) if "+" not in v]


# ----------------------------------------------------------------------------- claims
def _tally(comparisons: dict[str, Comparison], metric: str) -> dict[str, list[str]]:
    out = {v: [] for v in VERDICTS}
    for name, comparison in comparisons.items():
        out[comparison.verdicts[metric]].append(name)
    return out


def _overall(tally: dict[str, list[str]]) -> str:
    """A claim over several baselines holds only if it holds against every one of them."""
    if tally["does not hold"]:
        return "does not hold"
    return "holds" if not tally["inconclusive"] else "inconclusive"


def _tally_text(tally: dict[str, list[str]], total: int) -> str:
    parts = [f"holds against {len(tally['holds'])} of {total}"]
    for name in ("inconclusive", "does not hold"):
        if tally[name]:
            parts.append(f"{name} against {', '.join(tally[name])}")
    return "; ".join(parts)


def la_claims(scores: dict[str, Scores], seeds: dict[int, Scores], noise: dict[str, float] | None = None) -> list[str]:
    """The LA paper's claims on one protocol: LA beats each baseline (paired CIs), over every seed."""
    if LA not in scores:
        return []
    baselines = {m: compare(scores[LA], scores[m]) for m in _plain(scores) if m != LA}
    if not baselines:
        return []
    per_seed = {seed: {m: compare(la, scores[m]) for m in baselines} for seed, la in seeds.items()}
    claims = [("insertion", "LA has the highest insertion AUC of all methods (LA paper, Table 1)", baselines),
              ("deletion", "LA has the lowest deletion AUC of all methods (LA paper, Table 1)", baselines),
              ("ins_minus_del", "LA has the best insertion − deletion of all methods", baselines),
              ("insertion", "LA beats the other adversarial-exploration methods (AGI, BIG, MFABA, AttEXplore) on "
               "insertion", {m: c for m, c in baselines.items() if m in ADVERSARIAL})]
    lines = []
    for metric, text, group in claims:
        if not group:
            continue
        tally = _tally(group, metric)
        line = f"- {text}: **{_overall(tally)}** ({_tally_text(tally, len(group))}; {group[next(iter(group))].n} images)"
        if metric == "ins_minus_del" and noise and LA in noise:
            beyond = [m for m, c in group.items() if m in noise and exceeds_noise(c.differences[metric],
                                                                                 noise[LA] + noise[m])]
            line += (f"; beyond the measured float32/seed noise against {len(beyond)} of {len(group)} "
                     f"({', '.join(beyond) or 'none'})")
        if len(seeds) > 1:
            robust = [m for m in group if all(per_seed[s][m].verdicts[metric] == "holds" for s in seeds)]
            line += f"; across all {len(seeds)} LA seeds it holds against {len(robust)} of {len(group)}"
        lines.append(line + ".")
    return lines


def iprop_claims(scores: dict[str, Scores]) -> tuple[list[str], list[str]]:
    """IProp's claims on one protocol: METHOD+iprop vs METHOD and vs METHOD+ctrl, on ins − del and dir.

    Returns the table rows and the claim lines.
    """
    methods = [m for m in _plain(scores) if m + IPROP_SUFFIX in scores]
    if not methods:
        return [], []
    rows, lines = [], []
    results = {}
    for versus, suffix in (("the raw map", ""), ("the γ = 0 control", CONTROL_SUFFIX)):
        group = {m: compare(scores[m + IPROP_SUFFIX], scores[m + suffix]) for m in methods if m + suffix in scores}
        results[suffix] = group
        for metric, what in (("ins_minus_del", "raises insertion − deletion"), ("dir", "lowers dir")):
            if not group:
                continue
            tally = _tally(group, metric)
            lines.append(f"- Against {versus}, IProp {what} for {len(tally['holds'])} of {len(group)} methods "
                         f"with a CI excluding 0 ({', '.join(tally['holds']) or 'none'}); "
                         f"the opposite is CI-backed for {len(tally['does not hold'])} "
                         f"({', '.join(tally['does not hold']) or 'none'}); inconclusive for "
                         f"{len(tally['inconclusive'])}. Point estimates favour IProp for "
                         f"{sum(_favours(c, metric) for c in group.values())} of {len(group)}.")
    for m in methods:
        cells = []
        for suffix in ("", CONTROL_SUFFIX):
            comparison = results[suffix].get(m)
            for metric in ("ins_minus_del", "dir"):
                cells.append(_diff_cell(comparison, metric) if comparison else "–")
        rows.append(f"| {m} | {results[''][m].n} | " + " | ".join(cells) + " |")
    return rows, lines


def _favours(comparison: Comparison, metric: str) -> bool:
    return comparison.differences[metric].mean * METRICS[metric] > 0


def _diff_cell(comparison: Comparison, metric: str) -> str:
    mark = {"holds": " ✓", "does not hold": " ✗", "inconclusive": ""}[comparison.verdicts[metric]]
    return comparison.differences[metric].format(4) + mark


def _ci_cell(ci: MeanCI) -> str:
    return f"{ci.mean:.4f} [{ci.low:.4f}, {ci.high:.4f}]"


# ----------------------------------------------------------------------------- the report
def load_noise(results_dir: pathlib.Path) -> dict[str, float]:
    """Per method, the noise of its ins − del measured by ``experiments.stability`` (protocol la): mean
    |Δ| between float32 and float64 maps, plus the seed-to-seed mean |Δ| for methods that draw from the key."""
    path = results_dir / "stability.json"
    if not path.exists():
        return {}
    summaries = json.loads(path.read_text()).get("summaries", {})
    return {m: s["abs_delta_ins_minus_del"]["mean"] + s.get("seed_abs_delta_ins_minus_del", {"mean": 0.0})["mean"]
            for m, s in summaries.items()}


def _protocol_section(protocol: str, scores: dict[str, Scores], seeds: dict[int, Scores],
                      noise: dict[str, float]) -> list[str]:
    lines = [f"### Protocol `{protocol}`", "",
             "Means over images with 95% bootstrap CIs (2000 resamples, seeded); dir = mean deletion / mean "
             "insertion.", "",
             "| method | images | insertion ↑ | deletion ↓ | ins − del ↑ | dir ↓ |", "|---|---:|---:|---:|---:|---:|"]
    for variant in _ordered(scores):
        summary = summarize(scores[variant])
        lines.append(f"| {variant} | {len(scores[variant])} | " + " | ".join(_ci_cell(summary[m]) for m in METRICS)
                     + " |")
    if LA in scores and len(seeds) > 1:
        spread = [float((s.insertion - s.deletion).mean()) for s in seeds.values()]
        lines += ["", f"LA over {len(seeds)} seeds (target draws): mean ins − del per seed "
                  + ", ".join(f"{v:.4f}" for v in spread) + f" (range {max(spread) - min(spread):.4f}); "
                  "the table above is seed " + str(min(seeds)) + "."]
    if LA in scores and len(_plain(scores)) > 1:
        with_noise = protocol == "la" and LA in noise
        lines += ["", "LA − baseline on the same images (paired 95% CI; ✓ LA better, CI excludes 0; ✗ LA worse, "
                  "CI excludes 0; no mark: inconclusive)"
                  + (". *Beyond noise*: the CI of Δ(ins − del) clears the two methods' summed float32-rounding "
                     "and seed noise measured in `results/stability.md` (protocol `la`)" if with_noise else "")
                  + ":", "",
                  "| baseline | images | Δ insertion | Δ deletion | Δ(ins − del) | Δ dir |"
                  + (" beyond noise |" if with_noise else "")
                  + (" seeds where Δ(ins − del) holds |" if len(seeds) > 1 else ""),
                  "|---|---:|---:|---:|---:|---:|" + ("---|" if with_noise else "") + ("---:|" if len(seeds) > 1 else "")]
        for m in _plain(scores):
            if m == LA:
                continue
            comparison = compare(scores[LA], scores[m])
            row = f"| {m} | {comparison.n} | " + " | ".join(_diff_cell(comparison, k) for k in METRICS) + " |"
            if with_noise:
                level = noise[LA] + noise[m] if m in noise else None
                row += (" not measured |" if level is None else
                        f" {'yes' if exceeds_noise(comparison.differences['ins_minus_del'], level) else 'no'} "
                        f"(noise {level:.3f}) |")
            if len(seeds) > 1:
                held = sum(compare(s, scores[m]).verdicts["ins_minus_del"] == "holds" for s in seeds.values())
                row += f" {held} of {len(seeds)} |"
            lines.append(row)
    iprop_rows, iprop_lines = iprop_claims(scores)
    if iprop_rows:
        lines += ["", "METHOD+iprop − METHOD and − METHOD+ctrl on the same images (✓ IProp better with a CI "
                  "excluding 0, ✗ worse):", "",
                  "| method | images | Δ(ins − del) vs raw | Δ dir vs raw | Δ(ins − del) vs ctrl | Δ dir vs ctrl |",
                  "|---|---:|---:|---:|---:|---:|", *iprop_rows]
    claims = la_claims(scores, seeds, noise if protocol == "la" else None) + iprop_lines
    if claims:
        lines += ["", "What the evidence supports under this protocol:", "", *claims]
    return lines + [""]


def _section(name: str, section_dir: pathlib.Path, noise: dict[str, float]) -> str:
    summary = json.loads((section_dir / "summary.json").read_text())
    command = (section_dir / "command.txt").read_text().strip()
    flags_ = summary["flags"]
    protocols = flags_.get("protocols") or [flags_.get("protocol", "la")]
    scores = read_scores(section_dir / "results.csv", default_protocol=protocols[0])
    seed_files = sorted(section_dir.glob("la_seed*.csv"))
    images = max(len(s) for by_variant in scores.values() for s in by_variant.values())
    lines = [f"## Run `{name}`", "",
             f"- device: {summary['device']['backend']} ({summary['device']['kind']}), "
             f"{summary['device']['local_devices']} device(s); jax {summary['versions'].get('jax')}"
             + (f"; wall time {summary['wall_seconds'] / 60:.1f} min" if "wall_seconds" in summary else ""),
             f"- model `{flags_['model']}`, data `{flags_['data']}`, {images} images (start {flags_['start']}"
             + (f", stride {flags_['stride']}" if flags_.get("stride", 1) != 1 else "")
             + f"), settings `{flags_['settings']}`, seed {flags_['seed']}, protocols "
             + ", ".join(f"`{p}`" for p in protocols)
             + (f", LA seeds {flags_['seed']} and " + ", ".join(f.stem.removeprefix("la_seed") for f in seed_files)
                if seed_files else ""),
             f"- hyperparameter overrides: `{json.dumps(flags_['hparams'])}`; IProp overrides: "
             f"`{json.dumps(flags_['iprop_hparams'])}`",
             *([f"- IProp settings in effect: `{json.dumps(summary['resolved']['iprop'])}`"]
               if "iprop" in summary.get("resolved", {}) else []),
             f"- command: `{command}`",
             *([f"- **interim**: {summary['interim']['images']} of {summary['interim']['of']} images are finished "
                "for every method and protocol; the run continues in the background (the same command resumes it) "
                "and this section is replaced when it ends. Every comparison below is paired on those images."]
               if "interim" in summary else []),
             ""]
    for protocol, by_variant in scores.items():
        seeds = {int(flags_["seed"]): by_variant[LA]} if LA in by_variant else {}
        for f in seed_files:
            extra = read_scores(f, default_protocol=protocols[0]).get(protocol, {})
            if LA in extra:
                seeds[int(f.stem.removeprefix("la_seed"))] = extra[LA]
        lines += _protocol_section(protocol, by_variant, seeds, noise)
    for figure in sorted(section_dir.glob("*.png")):
        lines += [f"![{figure.stem}](reproduction/{name}/{figure.name})", ""]
    return "\n".join(lines)


HEADER = [
    "# Reproduction of the LA paper's comparison (with IProp)",
    "",
    "Generated by `python -m experiments.reproduce --report_only` from the runs stored under "
    "`results/reproduction/` (each section gives the command that made its run); every number below is read "
    "from those runs' per-image scores. Two protocols: `la`, the official LA/MFABA evaluation (softmax "
    "probability of the clean-image prediction, all H·W·3 elements ranked, 3·224 elements per step, black "
    "substrate), and `rise`, the RISE/IProp one (pixels ranked by the channel-summed map, 224 per step, "
    "insertion from a blurred image, deletion to the mean colour). `METHOD+iprop` is the method's map "
    "post-processed by IProp, and `METHOD+ctrl` its γ = 0 control: the same per-pixel reward without "
    "propagation, which separates the gain of propagation from that of aggregating channels.",
    "",
    "Every claim is a paired comparison on the same images: the mean per-image difference with its 95% "
    "bootstrap CI, and a verdict — **holds** (the CI excludes 0 in the claimed direction), **does not hold** "
    "(it excludes 0 the other way) or **inconclusive** (it contains 0). A claim over several baselines holds "
    "only when it holds against each. Several compared methods are chaotic in float32 (see "
    "`results/stability.md`): differences smaller than that noise are not evidence even when a CI excludes 0.",
    "",
    "The LA paper reports its comparison on torchvision Inception-v3, ResNet-50, VGG16 and MaxViT-T with "
    "their V1 ImageNet weights; those checkpoints cannot be downloaded here, so these runs use the embedded "
    "EfficientNet-Lite0. The claims are checked as directions (is LA better, by how much, on how many images), "
    "not number for number; the paper's headline average of 38.21% over four models is not comparable to a "
    "single-model run.",
    "",
]


def write_report(results_dir: pathlib.Path) -> pathlib.Path:
    noise = load_noise(results_dir)
    sections = [_section(summary.parent.name, summary.parent, noise)
                for summary in sorted((results_dir / "reproduction").glob("*/summary.json"))]
    path = results_dir / "REPRODUCTION.md"
    atomic_write(path, lambda f: f.write("\n".join(HEADER + sections) + "\n"))
    return path


def seed_configs(config: RunConfig, la_seeds: int) -> list[RunConfig]:
    """LA alone with the seeds ``seed + 1 .. seed + la_seeds - 1`` (when LA is among the methods)."""
    if "la" not in config.methods:
        return []
    return [dataclasses.replace(config, methods=("la",), iprop=False, seed=config.seed + offset,
                                hparams={k: v for k, v in config.hparams.items() if k == "la"},
                                out=f"{config.out}_la_seed{config.seed + offset}")
            for offset in range(1, la_seeds)]


def run_reproduction(config: RunConfig, *, name: str, la_seeds: int, results_dir: pathlib.Path, command: str,
                     interim: bool = False, progress: bool = True) -> pathlib.Path | None:
    """Runs (or resumes) the reproduction ``config`` and its LA seed runs, copies its section to
    ``results_dir/reproduction/name`` and regenerates the report; returns its path (None on a process
    other than 0 of a multi-process run). ``interim``: compute nothing, report the images finished so far."""
    seed_runs = {}
    if interim:
        report_interim(config)
    else:
        run(config, progress=progress)
        for seed_config in seed_configs(config, la_seeds):
            run(seed_config, progress=progress)
            seed_runs[seed_config.seed] = pathlib.Path(seed_config.out)
    if not multihost.is_process_zero():  # process 0 merged the runs; it alone writes the results
        return None
    section = results_dir / "reproduction" / name
    for stale in section.glob("la_seed*.csv"):  # an interim section has none; a finished one rewrites them
        stale.unlink()
    for seed, out in seed_runs.items():
        copy_file(out / "results.csv", section / f"la_seed{seed}.csv")
    for file in ("summary.json", "results.md", "results.csv", "heatmaps.png", "curves.png"):
        copy_file(pathlib.Path(config.out) / file, section / file)
    atomic_write(section / "command.txt", lambda f: f.write(command + "\n"))
    return write_report(results_dir)
