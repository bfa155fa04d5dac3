"""LA's own ablations as a study: which of LA's ingredients produce its advantage.

One run of the engine whose methods are named variants of ``la`` (``la@s5``, ``la@targeted``, ...,
:data:`la_iprop.runs.config.VARIANT_SEPARATOR`), each with its hyperparameter overrides on top
of the run's settings, so every variant is computed batch-major on the same images and an
interrupted run already holds paired results for its first images. Each question compares
its variants with the default LA (``la``) on the images both have:

- paired difference ``variant − la`` of insertion, deletion and ins − del (95% bootstrap CI),
  with a verdict: **better** (the CI excludes 0 in the better direction), **worse** (the other
  way) or **inconclusive** (it contains 0);
- the cost of each variant: seconds per image (median over images of the attribution time of
  their batch, this run's device) and model passes per image (:func:`la_iprop.attribution.la.la_cost`).

Direct comparisons (``pairs``) pair two variants with each other rather than with the default, for
a question whose variants differ from the default in more than one thing (``pgd_none − pgd_box``:
the same PGD walk without and with the local box, the paper's local-vs-global thesis).

:func:`write_report` builds ``LA_ABLATIONS.md`` and its figures from the run's ``results.csv``
and ``summary.json`` (copied next to the report), so the report is regenerated without the run.
"""

from __future__ import annotations

import csv
import io
import json
import pathlib
from typing import Any, Mapping, Sequence

import numpy as np

from la_iprop.attribution.la import la_cost
from la_iprop.metrics.comparison import Scores, compare, summarize
from la_iprop.runs.config import VARIANT_SEPARATOR, RunConfig
from la_iprop.runs.store import atomic_write
from la_iprop.studies.reproduction import read_scores

__all__ = ["DEFAULT", "study_config", "read_study", "question_tables", "pair_rows", "check_pairs",
           "write_report", "seed_spread", "write_interim_section"]

DEFAULT = "la"  # the default variant: LA at the run's settings, no override
VERDICT_WORDS = {"holds": "better", "does not hold": "worse", "inconclusive": "inconclusive"}
METRIC_TEXT = {"insertion": "insertion ↑", "deletion": "deletion ↓", "ins_minus_del": "ins − del ↑"}


def variant_name(label: str) -> str:
    return DEFAULT if label == "default" else f"{DEFAULT}{VARIANT_SEPARATOR}{label}"


def study_config(fields: Mapping[str, Any], variants: Mapping[str, Mapping[str, Any]], out: str) -> RunConfig:
    """The engine run of the study: ``fields`` (the run settings) with one method per variant
    (``label -> overrides``; the label ``default`` is plain ``la``)."""
    methods = tuple(sorted((variant_name(label) for label in variants), key=lambda m: m != DEFAULT))  # default first
    if DEFAULT not in methods:
        raise ValueError("variants: the study compares every variant with the default LA; add a 'default' entry")
    hparams = {variant_name(label): dict(overrides) for label, overrides in variants.items() if overrides}
    return RunConfig.from_mapping(fields, methods=methods, hparams=hparams, out=out)


def read_study(section: pathlib.Path) -> tuple[dict[str, dict[str, Scores]], dict[str, float], dict[str, dict]]:
    """``(scores {protocol: {variant: Scores}}, median seconds per image, resolved hyperparameters)``."""
    scores = read_scores(section / "results.csv")
    seconds: dict[str, list[float]] = {}
    with open(section / "results.csv", newline="") as f:
        for row in csv.DictReader(f):
            seconds.setdefault(row["method"], []).append(float(row["seconds"]))
    summary = json.loads((section / "summary.json").read_text())
    resolved = summary["resolved"]["methods"]
    return scores, {v: float(np.median(s)) for v, s in seconds.items()}, resolved


def write_interim_section(config: RunConfig, section: pathlib.Path) -> dict:
    """The section of a run still in progress, read from its store: the per-image scores of every
    variant with finished batches under every protocol (each variant is compared with the default on
    the images both have, so a variant that has finished fewer batches is compared on fewer images)."""
    from la_iprop.runs.environment import device
    from la_iprop.runs.store import load_records

    rows, counts = [], {}
    for variant in config.methods:
        records = {p: load_records(config.out, variant, p) for p in config.protocols}
        if any(r is None for r in records.values()):
            continue
        shared = set.intersection(*(set(r["index"].tolist()) for r in records.values()))
        counts[variant] = len(shared)
        for protocol, r in records.items():
            for i, index in enumerate(r["index"].tolist()):
                if index in shared:
                    rows.append([protocol, variant, index, r["insertion"][i], r["deletion"][i], r["seconds"][i]])
    if DEFAULT not in counts:
        raise RuntimeError(f"no batch of the default variant {DEFAULT!r} is finished in {config.out} yet")
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["protocol", "method", "index", "insertion", "deletion", "seconds"])
    writer.writerows(rows)
    atomic_write(section / "results.csv", lambda f: f.write(buffer.getvalue()))
    fields = {k: getattr(config, k) for k in ("model", "data", "start", "stride", "settings", "seed")}
    summary = {"flags": fields, "precision": config.precision, "protocols": list(config.protocols),
               "resolved": config.resolved(), "device": device(),
               "interim": {"images": counts[DEFAULT], "of": config.num_images, "finished": counts}}
    atomic_write(section / "summary.json", lambda f: json.dump(summary, f, indent=2, default=str))
    return summary


def model_passes(hparams: Mapping[str, Any]) -> int:
    """Forward + input-only backward passes per image of LA with ``hparams``."""
    cost = la_cost(**{k: v for k, v in hparams.items() if k not in ("run_chunk", "target_classes",
                                                                      "return_iterates")})
    return int(cost.forwards + cost.backwards)


def question_tables(scores: dict[str, dict[str, Scores]], questions: Mapping[str, Sequence[str]],
                    seconds: Mapping[str, float], resolved: Mapping[str, dict]) -> dict[str, list[dict]]:
    """Per question, a row per variant (and protocol): means with CIs, the paired difference to the
    default with its verdict, and the cost. Variants not in the scores yet are left out."""
    out: dict[str, list[dict]] = {}
    for question, labels in questions.items():
        rows = []
        for label in labels:
            variant = variant_name(label)
            for protocol, by_variant in scores.items():
                if variant not in by_variant or DEFAULT not in by_variant:
                    continue
                row = {"variant": variant, "label": label, "protocol": protocol,
                       "means": summarize(by_variant[variant]), "seconds": seconds.get(variant),
                       "passes": model_passes(resolved[variant]) if variant in resolved else None}
                if variant != DEFAULT:
                    row["vs_default"] = compare(by_variant[variant], by_variant[DEFAULT])
                rows.append(row)
        out[question] = rows
    return out


def check_pairs(pairs: Sequence[Sequence[str]], variants: Mapping[str, Any]) -> list[tuple[str, str]]:
    """``pairs`` as ``(a, b)`` labels of two different variants; a one-line ValueError otherwise."""
    checked = []
    for pair in pairs:
        if isinstance(pair, str) or len(pair) != 2:
            raise ValueError(f"pairs: {pair!r} is not a pair; expected (label, label) of two variants")
        a, b = pair
        for label in (a, b):
            if label not in variants:
                raise ValueError(f"pairs: {label!r} is not a variant; expected one of {', '.join(sorted(variants))}")
        if a == b:
            raise ValueError(f"pairs: ({a!r}, {b!r}) pairs a variant with itself; expected two different variants")
        checked.append((a, b))
    return checked


def pair_rows(scores: dict[str, dict[str, Scores]], pairs: Sequence[tuple[str, str]]) -> list[dict]:
    """Per pair ``(a, b)`` and protocol, the paired comparison ``a − b`` on the images both have
    (pairs whose variants have no scores yet are left out)."""
    rows = []
    for a, b in pairs:
        for protocol, by_variant in scores.items():
            if variant_name(a) in by_variant and variant_name(b) in by_variant:
                rows.append({"a": a, "b": b, "protocol": protocol,
                             "comparison": compare(by_variant[variant_name(a)], by_variant[variant_name(b)])})
    return rows


def seed_spread(section: pathlib.Path) -> dict[str, list[float]]:
    """Mean ins − del of LA per seed, per protocol, from a reproduction section (its ``results.csv``
    holds seed 0, ``la_seed<k>.csv`` the others); empty when the section is not there."""
    files = [section / "results.csv", *sorted(section.glob("la_seed*.csv"))] if section.exists() else []
    out: dict[str, list[float]] = {}
    for file in files:
        for protocol, by_variant in read_scores(file).items():
            if "la" in by_variant:
                s = by_variant["la"]
                out.setdefault(protocol, []).append(float(np.mean(s.insertion - s.deletion)))
    return out


def _ci(ci, digits: int = 4) -> str:
    return f"{ci.mean:.{digits}f} [{ci.low:.{digits}f}, {ci.high:.{digits}f}]"


def _table(rows: list[dict]) -> list[str]:
    lines = ["| variant | protocol | n | insertion ↑ | deletion ↓ | ins − del ↑ [95% CI] "
             "| Δ(ins − del) vs la [95% CI] | verdict | Δ insertion | Δ deletion | s / image | passes / image |",
             "|---|---|---:|---:|---:|---|---|---|---|---|---:|---:|"]
    for row in sorted(rows, key=lambda r: (r["protocol"], r["label"] != "default")):
        m, c = row["means"], row.get("vs_default")
        diff = c.differences if c else None
        verdict = (VERDICT_WORDS[c.verdicts["ins_minus_del"]] if c else "(default)")
        lines.append(
            f"| `{row['variant']}` | {row['protocol']} | {m['insertion'].n} | {m['insertion'].mean:.4f} | "
            f"{m['deletion'].mean:.4f} | {_ci(m['ins_minus_del'])} | {_ci(diff['ins_minus_del']) if c else '—'} | "
            f"{verdict} | {_ci(diff['insertion']) + ' ' + VERDICT_WORDS[c.verdicts['insertion']] if c else '—'} | "
            f"{_ci(diff['deletion']) + ' ' + VERDICT_WORDS[c.verdicts['deletion']] if c else '—'} | "
            f"{row['seconds']:.2f} | {row['passes'] if row['passes'] is not None else '?'} |")
    return lines


def _pair_table(rows: list[dict]) -> list[str]:
    lines = ["| a − b | protocol | n | Δ(ins − del) [95% CI] | verdict (a vs b) | Δ insertion | Δ deletion |",
             "|---|---|---:|---|---|---|---|"]
    for row in sorted(rows, key=lambda r: r["protocol"]):
        c = row["comparison"]
        cells = [f"{_ci(c.differences[m])} {VERDICT_WORDS[c.verdicts[m]]}" for m in ("insertion", "deletion")]
        lines.append(f"| `{row['a']}` − `{row['b']}` | {row['protocol']} | {c.n} | "
                     f"{_ci(c.differences['ins_minus_del'])} | {VERDICT_WORDS[c.verdicts['ins_minus_del']]} | "
                     f"{cells[0]} | {cells[1]} |")
    return lines


def _pair_paragraph(rows: list[dict]) -> str:
    parts = [f"`{r['a']}` against `{r['b']}` under `{r['protocol']}`: "
             f"{VERDICT_WORDS[r['comparison'].verdicts['ins_minus_del']]} "
             f"(Δ ins − del {_ci(r['comparison'].differences['ins_minus_del'])}, n = {r['comparison'].n})"
             for r in sorted(rows, key=lambda r: (r["a"], r["protocol"]))]
    return "**Direct comparisons**: " + ("; ".join(parts) if parts else "no pair finished yet") + "."


def _paragraph(question: str, rows: list[dict], total: int) -> str:
    """What the evidence supports for one question, from the verdicts (nothing typed by hand)."""
    parts = []
    for protocol in sorted({r["protocol"] for r in rows}):
        verdicts: dict[str, list[str]] = {}
        for row in rows:
            if row["protocol"] == protocol and "vs_default" in row:
                word = VERDICT_WORDS[row["vs_default"].verdicts["ins_minus_del"]]
                verdicts.setdefault(word, []).append(f"`{row['label']}`")
        if verdicts:
            parts.append(f"under `{protocol}`, ins − del against the default: "
                         + "; ".join(f"{word}: {', '.join(names)}" for word, names in sorted(verdicts.items())))
    n = min((r["means"]["insertion"].n for r in rows), default=0)
    status = "" if n >= total else f" (interim: {n} of {total} images)"
    return f"**{question}**{status}: " + ("; ".join(parts) if parts else "no variant finished yet") + "."


def _figures(section: pathlib.Path, tables: dict[str, list[dict]], spatial_question: str | None) -> list[str]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    protocols = sorted({r["protocol"] for rows in tables.values() for r in rows})
    if spatial_question and tables.get(spatial_question):
        fig, axes = plt.subplots(1, len(protocols), figsize=(4.5 * len(protocols), 3.4), squeeze=False)
        for ax, protocol in zip(axes[0], protocols, strict=True):
            rows = [r for r in tables[spatial_question] if r["protocol"] == protocol]
            pairs = sorted(((r["spatial_range"], r["means"]["ins_minus_del"]) for r in rows
                            if r.get("spatial_range") is not None), key=lambda p: p[0])
            if not pairs:
                continue
            s = np.array([p[0] for p in pairs], float)
            ci = [p[1] for p in pairs]
            ax.plot(s, [c.mean for c in ci], "o-")
            ax.fill_between(s, [c.low for c in ci], [c.high for c in ci], alpha=0.25)
            ax.set(xlabel="spatial range s (eps = x0 / s)", ylabel="ins − del (95% CI)", title=f"protocol {protocol}")
        fig.tight_layout()
        fig.savefig(section / "spatial_range.png", dpi=90)
        plt.close(fig)
        written.append("spatial_range.png")
    # Quality against cost: the paired gain over the default (per-image difficulty cancels, so the CIs are
    # those of the comparison) against model passes per image (the cost that does not depend on the load).
    fig, axes = plt.subplots(1, len(protocols), figsize=(4.5 * len(protocols), 3.6), squeeze=False)
    for ax, protocol in zip(axes[0], protocols, strict=True):
        seen = {}
        for rows in tables.values():
            for r in rows:
                if r["protocol"] == protocol and r["passes"] is not None:
                    seen[r["variant"]] = r
        for variant, r in seen.items():
            c = r.get("vs_default")
            ci = c.differences["ins_minus_del"] if c else None
            mean, err = (ci.mean, [[ci.mean - ci.low], [ci.high - ci.mean]]) if ci else (0.0, None)
            ax.errorbar(r["passes"], mean, yerr=err, fmt="o" if c else "s", ms=4)
            ax.annotate(variant.split(VARIANT_SEPARATOR)[-1], (r["passes"], mean), fontsize=7,
                        xytext=(3, 3), textcoords="offset points")
        ax.axhline(0.0, color="grey", lw=0.8)
        ax.set(xscale="log", xlabel="model passes per image", ylabel="Δ ins − del vs la (paired 95% CI)",
               title=f"protocol {protocol}")
    fig.tight_layout()
    fig.savefig(section / "quality_vs_cost.png", dpi=90)
    plt.close(fig)
    written.append("quality_vs_cost.png")
    return written


def write_report(results_dir: pathlib.Path, name: str, questions: Mapping[str, Sequence[str]],
                 reproduction: str | None = None, pairs: Sequence[tuple[str, str]] = ()) -> pathlib.Path:
    """``results_dir/LA_ABLATIONS.md`` (and figures in ``results_dir/la_ablations/<name>/``) from the
    section's stored ``results.csv`` and ``summary.json``; ``pairs`` adds direct comparisons."""
    section = results_dir / "la_ablations" / name
    scores, seconds, resolved = read_study(section)
    summary = json.loads((section / "summary.json").read_text())
    tables = question_tables(scores, questions, seconds, resolved)
    for rows in tables.values():
        for r in rows:
            r["spatial_range"] = resolved.get(r["variant"], {}).get("spatial_range")
    spatial = next((q for q in questions if "spatial" in q.lower()), None)
    figures = _figures(section, tables, spatial)
    interim = summary.get("interim")
    total = interim["of"] if interim else next(iter(next(iter(scores.values())).values())).index.size
    command = (section / "command.txt").read_text().strip() if (section / "command.txt").exists() else "?"
    device = summary.get("device", {})
    lines = [
        "# LA's ablations, re-run with paired CIs",
        "",
        f"Generated by `{command} --report_only` from `results/la_ablations/{name}/` (per-image scores of one run "
        "of the engine, every variant on the same images). Every variant changes one of LA's ingredients and is "
        "compared with the default LA (`la`, the run's settings) on the images both have: the mean per-image "
        "difference with its 95% bootstrap CI and a verdict — **better** / **worse** when the CI excludes 0, "
        "**inconclusive** when it contains 0.",
        "",
        f"Settings: model `{summary['flags']['model']}`, data `{summary['flags']['data']}` "
        f"(start {summary['flags']['start']}, stride {summary['flags']['stride']}), settings "
        f"`{summary['flags']['settings']}`, seed {summary['flags']['seed']}, precision `{summary['precision']}`, "
        f"protocols {', '.join('`' + p + '`' for p in summary['protocols'])}; device {device.get('kind')} "
        f"({device.get('backend')}). Seconds per image: the median attribution time on that device; passes: "
        "forward + input-only backward passes of the model per image (`la_cost`). The seconds are wall-clock "
        "time on a machine that may have run other jobs at the same time (a background study is niced): the "
        "passes are the cost figure that does not depend on the load.",
        "",
    ]
    if interim:
        finished = interim.get("finished", {})
        lines += [f"**Interim report** of a run in progress: the default `la` has {interim['images']} of "
                  f"{interim['of']} images; " + (", ".join(f"`{v}` {n}" for v, n in finished.items() if v != DEFAULT)
                                                  or "no other variant has finished a batch yet")
                  + " (variants not listed have none yet). Each variant is compared with the default on the "
                  "images both have; the run continues (rerun the command to resume).", ""]
    spread = seed_spread(results_dir / "reproduction" / reproduction) if reproduction else {}
    if spread:
        lines += ["LA's seed-to-seed spread at the default settings (mean ins − del of seeds "
                  f"0–{len(next(iter(spread.values()))) - 1}, `results/reproduction/{reproduction}`, "
                  "the same images): "
                  + "; ".join(f"`{p}` {min(v):.4f}–{max(v):.4f} (range {max(v) - min(v):.4f})"
                              for p, v in sorted(spread.items()))
                  + ". A difference to the default smaller than this range is within what the target draws alone "
                  "move.", ""]
    lines += ["## Findings", ""]
    lines += ["- " + _paragraph(q, rows, total) for q, rows in tables.items()]  # a list: one item per question
    direct = pair_rows(scores, pairs)
    if pairs:
        lines += ["- " + _pair_paragraph(direct)]
    for question, rows in tables.items():
        lines += ["", f"## {question}", ""] + (_table(rows) if rows else ["(no variant finished yet)"])
    if pairs:
        lines += ["", "## Direct comparisons", "",
                  "Two variants paired with each other (a − b on the images both have; the verdict says whether "
                  "a is better than b).", ""] + (_pair_table(direct) if direct else ["(no pair finished yet)"])
    captions = {"spatial_range.png": "Mean ins − del (95% CI) against the spatial range s",
                "quality_vs_cost.png": "Each variant's paired difference to the default in ins − del (95% CI) "
                                       "against its model passes per image"}
    lines += ["", "## Figures", ""]
    for f in figures:
        lines += [f"{captions[f]}:", "", f"![{f}](la_ablations/{name}/{f})", ""]
    path = results_dir / "LA_ABLATIONS.md"
    atomic_write(path, lambda f: f.write("\n".join(lines) + "\n"))
    return path
