"""``IPROP_QUESTIONS.md``: IProp's open questions answered from stored per-image scores.

Read, never computed: the study's sections (``results/iprop_questions/<name>/<part>/results.csv``,
written by :func:`la_iprop.studies.iprop_questions.run_parts`), the reproduction's section on the
same images (IProp with the ``la`` preset under protocol ``rise``) and the rise tuning study's JSON
(IProp with the settings tuned under ``rise``). Every paragraph is built from the verdicts; a part
still running is reported on the images it has finished, and says so.
"""

from __future__ import annotations

import json
import pathlib
from typing import Any, Mapping

from la_iprop.iprop import IPROP_SUFFIX
from la_iprop.metrics.comparison import compare
from la_iprop.metrics.statistics import MeanCI
from la_iprop.runs.store import atomic_write
from la_iprop.studies.iprop_questions import KNN, corruption_part, iprop_variant, ood_rows, structure_rows, tally
from la_iprop.studies.iprop_tuning_report import against_no_propagation
from la_iprop.studies.la_ablations import VERDICT_WORDS
from la_iprop.studies.reproduction import read_scores

__all__ = ["write_report", "IPROP_DIR_CLAIM"]

# The IProp paper: dir improves for 72 of its 81 method-model pairs.
IPROP_DIR_CLAIM = (72, 81)
HEADER_METRICS = ("ins_minus_del", "dir")


def _means(m: Mapping[str, MeanCI]) -> str:
    return (f"{m['insertion'].n} | {m['insertion'].mean:.4f} | {m['deletion'].mean:.4f} | "
            f"{m['ins_minus_del'].mean:.4f} | {m['dir'].mean:.4f}")


def _difference(row: Mapping[str, Any], metric: str) -> str:
    comparison = row.get("comparison")
    if comparison is None:
        return "—"
    return f"{comparison.differences[metric].format()} {VERDICT_WORDS[comparison.verdicts[metric]]}"


def _table(rows: list[dict], against_text: str) -> list[str]:
    lines = [f"| method | variant | n | insertion ↑ | deletion ↓ | ins − del ↑ | dir ↓ | Δ ins − del {against_text} "
             f"[95% CI] | Δ dir {against_text} [95% CI] |", "|---|---|---:|---:|---:|---:|---:|---|---|"]
    for row in rows:
        against = f" (vs `{row['against']}`)" if "against" in row else ""
        lines.append(f"| {row['method']} | `{row['variant']}`{against} | {_means(row['means'])} | "
                     f"{_difference(row, 'ins_minus_del')} | {_difference(row, 'dir')} |")
    return lines


def _counts_text(counts: Mapping[str, int]) -> str:
    return (f"better for {counts['holds']}, worse for {counts['does not hold']}, inconclusive for "
            f"{counts['inconclusive']}")


def _section(section: pathlib.Path) -> tuple[dict | None, dict | None]:
    if not (section / "results.csv").exists():
        return None, None
    return read_scores(section / "results.csv"), json.loads((section / "summary.json").read_text())


def _status(summary: Mapping[str, Any]) -> str:
    interim = summary.get("interim")
    if interim:
        return f"**interim**: {interim['images']} of {interim['of']} images finished by every variant"
    return f"{summary['flags']['num_images']} images"


def _forest(path: pathlib.Path, panels: Mapping[str, list[tuple[str, MeanCI]]], xlabel: str) -> str | None:
    """One panel per title: a labelled point with its CI per row, a line at 0."""
    panels = {title: rows for title, rows in panels.items() if rows}
    if not panels:
        return None
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    height = max(2.5, 0.28 * max(len(rows) for rows in panels.values()) + 1.2)
    fig, axes = plt.subplots(1, len(panels), figsize=(4.8 * len(panels), height), squeeze=False)
    for ax, (title, rows) in zip(axes[0], panels.items(), strict=True):
        y = range(len(rows))
        ax.errorbar([ci.mean for _, ci in rows], list(y),
                    xerr=[[ci.mean - ci.low for _, ci in rows], [ci.high - ci.mean for _, ci in rows]], fmt="o", ms=4)
        ax.axvline(0.0, color="grey", lw=0.8)
        ax.set_yticks(list(y), [label for label, _ in rows], fontsize=7)
        ax.invert_yaxis()
        ax.set(xlabel=xlabel, title=title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path.name


# ----------------------------------------------------------------------------- question 1
def _preset_la_under_rise(results_dir: pathlib.Path, reproduction: str) -> tuple[list[str], list[str], dict]:
    """IProp with the ``la`` preset under ``rise``, from the reproduction's section (same images)."""
    path = results_dir / "reproduction" / reproduction / "results.csv"
    if not reproduction or not path.exists():
        return [], [], {}
    by_variant = read_scores(path).get("rise", {})
    rows, comparisons = [], []
    for method in sorted(v for v in by_variant if "+" not in v):
        if method + IPROP_SUFFIX not in by_variant:
            continue
        comparison = compare(by_variant[method + IPROP_SUFFIX], by_variant[method])
        comparisons.append(comparison)
        rows.append({"method": method, "variant": method + IPROP_SUFFIX, "against": method,
                     "means": None, "comparison": comparison})
    if not rows:
        return [], [], {}
    lines = ["| method | n | Δ ins − del (iprop − raw) [95% CI] | Δ dir (iprop − raw) [95% CI] |",
             "|---|---:|---|---|"]
    lines += [f"| {r['method']} | {r['comparison'].n} | {_difference(r, 'ins_minus_del')} | {_difference(r, 'dir')} |"
              for r in rows]
    counts = {metric: tally(comparisons, metric) for metric in HEADER_METRICS}
    panel = [(r["method"], r["comparison"].differences["dir"]) for r in rows]
    return lines, [f"`results/reproduction/{reproduction}/results.csv`"], {"counts": counts, "panel": panel,
                                                                           "n": rows[0]["comparison"].n}


def _rise_tuned(results_dir: pathlib.Path, tuning_report: str) -> tuple[list[str], dict]:
    path = results_dir / tuning_report
    if not tuning_report or not path.exists():
        return [], {}
    record = json.loads(path.read_text())
    heldout, chosen = record["heldout"], record["tuning"]["chosen"]
    lines = [f"Chosen on the tuning split (criterion `{record['tuning']['criterion']}`): k={chosen['k']}, "
             f"R={chosen['radius']}, γ={chosen['gamma']:g}, σ_c={chosen['sigma_c']:g}, {chosen['color_space']}, "
             f"reward {chosen['reward']} (`{record['command']}`, details in `results/{path.with_suffix('.md').name}`)."]
    against = against_no_propagation(record["tuning"]) if "raw" in record["tuning"] else ""
    if against:
        lines += ["", against]
    if heldout is None:  # the search alone so far (--tune_only)
        return lines + ["", "The held-out test of this setting is pending (the study's command without "
                        "`--tune_only` runs it)."], {"pending": True, "against": against}
    lines += ["", "| method | n | Δ ins − del (iprop − raw) [95% CI] | Δ dir (iprop − raw) [95% CI] |",
              "|---|---:|---|---|"]
    counts = {metric: {"holds": 0, "does not hold": 0, "inconclusive": 0} for metric in HEADER_METRICS}
    panel = []
    for method, rows in heldout.items():
        gain = rows["iprop"]["vs_raw"]
        cells = []
        for metric in HEADER_METRICS:
            d = gain[metric]
            counts[metric][d["verdict"]] += 1
            cells.append(f"{MeanCI(d['mean'], d['low'], d['high'], d['n']).format()} {VERDICT_WORDS[d['verdict']]}")
        panel.append((method, MeanCI(gain["dir"]["mean"], gain["dir"]["low"], gain["dir"]["high"], gain["dir"]["n"])))
        lines.append(f"| {method} | {rows['iprop']['num_images']} | " + " | ".join(cells) + " |")
    return lines, {"counts": counts, "panel": panel, "n": min(r["iprop"]["num_images"] for r in heldout.values()),
                   "methods": len(heldout)}


def _claim_text(counts: Mapping[str, int]) -> str:
    total = sum(counts.values())
    share = counts["holds"] / total if total else 0.0
    claimed = IPROP_DIR_CLAIM[0] / IPROP_DIR_CLAIM[1]
    word = "reproduces" if share >= claimed else "does not reproduce"
    return (f"dir {_counts_text(counts)} of {total} methods: the paper's claim (dir better for "
            f"{IPROP_DIR_CLAIM[0]} of {IPROP_DIR_CLAIM[1]} pairs, {claimed:.0%}) {word} here ({share:.0%})")


# ----------------------------------------------------------------------------- the report
def write_report(results_dir: pathlib.Path, study: Mapping[str, Any], command: str) -> pathlib.Path:
    """Writes ``results_dir/IPROP_QUESTIONS.md`` and its figures (in ``results_dir/iprop_questions/<name>/``)."""
    name = study["name"]
    base = results_dir / "iprop_questions" / name
    rel = f"iprop_questions/{name}"
    preset = study["iprop_preset"]
    findings: list[str] = []
    body: list[str] = []
    figures: list[str] = []

    # 1. IProp under rise
    body += ["", "## 1. IProp under its own kind of protocol (`rise`)", ""]
    la_lines, la_source, la_info = _preset_la_under_rise(results_dir, study.get("reproduction", ""))
    tuned_lines, tuned_info = _rise_tuned(results_dir, study.get("tuning_report", ""))
    if not la_lines:
        body += ["**(a) The `la` preset** under `rise`: no reproduction section on these images "
                 f"(`results/reproduction/{study.get('reproduction')}/results.csv`).", ""]
    else:
        body += [f"**(a) The `la` preset** (tuned under protocol `la`), scored under `rise` on {la_info['n']} images "
                 f"({la_source[0]}): METHOD+iprop − METHOD per image.", "", *la_lines, ""]
        findings.append(f"**IProp under `rise`, `la` preset** ({la_info['n']} images): {_claim_text(la_info['counts']['dir'])}"
                        f"; ins − del {_counts_text(la_info['counts']['ins_minus_del'])}.")
    if tuned_info.get("pending"):
        body += ["**(b) The settings tuned under `rise`**:", "", *tuned_lines, ""]
        findings.append("**IProp under `rise`, rise-tuned settings**: chosen on the tuning split. "
                        + (tuned_info["against"] + " " if tuned_info["against"] else "")
                        + "The held-out test is pending.")
    elif tuned_lines:
        body += ["**(b) The settings tuned under `rise`** (held-out images):", "", *tuned_lines, ""]
        findings.append(f"**IProp under `rise`, rise-tuned settings** ({tuned_info['n']} held-out images): "
                        f"{_claim_text(tuned_info['counts']['dir'])}; ins − del "
                        f"{_counts_text(tuned_info['counts']['ins_minus_del'])}.")
    else:
        body += ["**(b) The settings tuned under `rise`**: pending — the tuning study has not finished "
                 "(`python -m experiments.iprop_tuning --config=configs/iprop_tuning_rise.py`, resumable; its JSON "
                 f"`results/{study.get('tuning_report') or '?'}` is read here when it exists).", ""]
        findings.append("**IProp under `rise`, rise-tuned settings**: pending (the tuning study is still running).")
    figure = _forest(base / "rise_dir.png", {"la preset": la_info.get("panel", []),
                                             "rise-tuned": tuned_info.get("panel", [])},
                     "Δ dir, iprop − raw (95% CI; < 0: IProp better)")
    figures += [figure] if figure else []

    # 2. structure
    scores, summary = _section(base / "structure")
    labels = list(study["controls"])
    body += ["", "## 2. Does the graph's structure matter? Which similarity?", ""]
    if scores is None:
        body += ["Not begun yet."]
        findings.append("**Structure controls**: not begun yet.")
    else:
        body += [f"{_status(summary)}. Every control is IProp with the `{preset}` preset and one change: "
                 + "; ".join(f"`@{label}`: {json.dumps(dict(change))}" for label, change in study["controls"].items())
                 + f". `@{KNN}` (the paper's KNN graph) is compared with the raw map, every control with `@{KNN}` "
                 "(Δ = control − knn; better: higher ins − del, lower dir).", ""]
        rows = structure_rows(scores, study["structure_methods"], labels)
        panels = {}
        for protocol, protocol_rows in rows.items():
            body += [f"### Protocol `{protocol}`", "", *_table(protocol_rows, "vs the compared variant"), ""]
            parts = []
            for label in [KNN, *labels]:
                comparisons = [r["comparison"] for r in protocol_rows
                               if r["variant"].endswith(f"@{label}") and "comparison" in r]
                if comparisons:
                    against = "the raw map" if label == KNN else f"`@{KNN}`"
                    parts.append(f"`@{label}` vs {against}: ins − del {_counts_text(tally(comparisons, 'ins_minus_del'))}"
                                 f" of {len(comparisons)} methods")
            findings.append(f"**Structure controls, `{protocol}`** ({_status(summary)}): " + "; ".join(parts) + ".")
            panels[protocol] = [(f"{r['method']} @{r['variant'].rsplit('@', 1)[1]}",
                                 r["comparison"].differences["ins_minus_del"])
                                for r in protocol_rows if "comparison" in r]
        figure = _forest(base / "structure.png", panels, "Δ ins − del (95% CI; > 0: better)")
        figures += [figure] if figure else []

    # 3. out of distribution
    body += ["", "## 3. Out-of-distribution images (ImageNet-C corruptions)", ""]
    panels = {}
    for spec in study["corruptions"]:
        scores, summary = _section(base / corruption_part(spec))
        body += [f"### `{spec}`", ""]
        if scores is None:
            body += ["Not begun yet.", ""]
            findings.append(f"**Corruption `{spec}`**: not begun yet.")
            continue
        corruption = summary["flags"].get("corruption")
        body += [f"{_status(summary)}; every image corrupted by `{corruption}` after the resize and crop (seed "
                 f"{summary['flags'].get('corruption_seed')}, package `imagecorruptions`).", ""]
        parts = []
        for protocol, tables in ood_rows(scores, study["ood_methods"], preset).items():
            body += [f"IProp (`@{preset}`) vs the raw map, protocol `{protocol}`:", "",
                     *_table(tables["iprop"], "vs the raw map"), "",
                     f"LA vs each other method (raw maps), protocol `{protocol}`:", "",
                     *_table(tables["la"], "la − method"), ""]
            gains = [r["comparison"] for r in tables["iprop"] if "comparison" in r]
            la = [r["comparison"] for r in tables["la"]]
            parts.append(f"`{protocol}`: IProp ins − del {_counts_text(tally(gains, 'ins_minus_del'))}, dir "
                         f"{_counts_text(tally(gains, 'dir'))} of {len(gains)} methods; LA's ins − del advantage "
                         f"holds against {tally(la, 'ins_minus_del')['holds']} of {len(la)} methods "
                         f"(reversed for {tally(la, 'ins_minus_del')['does not hold']})")
            panels.setdefault(protocol, []).extend(
                (f"{spec} {r['method']}", r["comparison"].differences["ins_minus_del"])
                for r in tables["iprop"] if "comparison" in r)
        findings.append(f"**Corruption `{spec}`** ({_status(summary)}): " + "; ".join(parts) + ".")
    figure = _forest(base / "ood_iprop.png", panels, "Δ ins − del, iprop − raw (95% CI)")
    figures += [figure] if figure else []

    lines = [
        "# IProp's open questions, with paired CIs",
        "",
        f"Generated by `{command}` from the per-image scores in `results/{rel}/` (one engine run per part, "
        "every variant on the same images), the reproduction's section and the rise tuning study's JSON. Add "
        "`--report_only` to rebuild it without the runs, `--interim` while they run. A difference is the mean "
        "per-image difference with its paired 95% bootstrap CI; **better** / **worse** when the CI excludes 0, "
        "**inconclusive** when it contains 0. dir = deletion / insertion (lower is better), ins − del higher "
        "is better.",
        "",
        f"Settings: model `{study['model']}`, data `{study['data']}` (start {study.get('start', 0)}, stride "
        f"{study['stride']}, {study['num_images']} images, the same in every part), settings `{study['settings']}`, "
        f"seed {study['seed']}, precision `{study['precision']}`, protocols "
        + ", ".join(f"`{p}`" for p in study["protocols"]) + f"; IProp preset `{preset}`. "
        f"Variant names: `METHOD` is the raw map, `{iprop_variant('METHOD', KNN)}` (structure part) and "
        f"`{iprop_variant('METHOD', preset)}` (corruptions) are IProp with that preset.",
        "",
        "## Findings",
        "",
        *[f"- {f}" for f in findings],
        *body,
        "",
        "## Figures",
        "",
        *[f"![{f}]({rel}/{f})" for f in figures],
    ]
    path = results_dir / "IPROP_QUESTIONS.md"
    atomic_write(path, lambda f: f.write("\n".join(lines) + "\n"))
    return path
