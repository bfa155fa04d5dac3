"""The IProp tuning report (Markdown + JSON) from the records of :mod:`la_iprop.studies.iprop_tuning`."""

from __future__ import annotations

import json
import pathlib
from typing import Any, Mapping

import numpy as np

from la_iprop.metrics.statistics import VERDICTS
from la_iprop.runs.store import atomic_write, write_json
from la_iprop.studies.iprop_tuning import CRITERIA

CRITERION_NAMES = {"ins_minus_del": "ins − del", "dir": "dir"}

__all__ = ["write_report", "against_no_propagation"]

PROTOCOL_TEXT = {  # how the report describes the protocol it tuned and tested with
    "la": "official LA/MFABA evaluation: softmax probability of the clean top-1 class, all H·W·3 elements ranked, "
          "3·224 per step, black substrate; AUC of the mean curve",
    "rise": "RISE/IProp evaluation: softmax probability of the clean top-1 class, pixels ranked by the channel-summed "
            "map, 224 per step, insertion from a blurred image, deletion to the mean colour; AUC of the mean curve",
}


def _fmt(x: float) -> str:
    return f"{x:.4f}"


def _ci(record: Mapping[str, Any]) -> str:
    return f"{record['mean']:+.4f} [{record['low']:+.4f}, {record['high']:+.4f}]"


def _setting_text(config: Mapping[str, Any] | None) -> str:
    if config is None:
        return "raw map"
    return (f"k={config['k']} R={config['radius']} γ={config['gamma']:g} σ_c={config['sigma_c']:g} "
            f"{config['color_space']} {config['reward']}")


def _split_text(split: Mapping[str, Any]) -> str:
    start, stride, count = split["start"], split["stride"], split["num_images"]
    return f"{count} images from {start}" + (f" in steps of {stride}" if stride > 1 else "")


def against_no_propagation(tuning: Mapping[str, Any]) -> str:
    """Whether the chosen setting beats the raw maps and the gamma = 0 controls on the tuning split (scores are
    signed so that higher is better; the line shows them unsigned)."""
    best = max(r["score"] for r in tuning["settings"].values())
    raw = tuning["raw"]["score"]
    rule, control = max(tuning["controls"].items(), key=lambda item: item[1]["score"])
    sign, name = CRITERIA[tuning["criterion"]], CRITERION_NAMES[tuning["criterion"]]
    verdict = ("propagation improves the criterion on the tuning split" if best > max(raw, control["score"]) else
               "**no propagated setting of the search beats " + ("the raw maps" if raw >= control["score"] else
                                                                  f"the γ = 0 control ({rule})")
               + " on the tuning split**: the chosen setting is the best propagation, not an improvement")
    return (f"Mean {name} on the tuning split: chosen setting {sign * best:.4f}, raw maps {sign * raw:.4f}, best γ = 0 "
            f"control ({rule}, no propagation) {sign * control['score']:.4f}: {verdict}.")


def _heldout_lines(heldout: Mapping[str, dict]) -> list[str]:
    lines = [
        "## Held-out split: method vs method + control vs method + IProp",
        "",
        "`+ctrl` is the γ = 0 control (the chosen reward rule, no propagation). Gains are mean per-image "
        "differences with paired 95% bootstrap CIs (same images); a verdict says whether the row's variant is "
        "better (ins − del higher, dir lower) than the one it is compared with.",
        "",
        "| method | variant | n | insertion ↑ | deletion ↓ | ins − del ↑ | dir ↓ | Δ ins − del vs raw | "
        "Δ dir vs raw | Δ ins − del vs ctrl | Δ dir vs ctrl |",
        "|---|---|---:|---:|---:|---:|---:|---|---|---|---|",
    ]
    verdicts = []
    for method in heldout:
        rows = heldout[method]
        for variant in ("raw", "ctrl", "iprop"):
            r = rows[variant]
            label = {"raw": method, "ctrl": f"{method}+ctrl", "iprop": f"{method}+iprop"}[variant]
            cells = []
            for against in ("vs_raw", "vs_ctrl"):
                for metric in ("ins_minus_del", "dir"):
                    d = r.get(against, {}).get(metric)
                    cells.append("—" if d is None else f"{_ci(d)} {d['verdict']}")
            lines.append(f"| {method} | {label} | {r['num_images']} | {_fmt(r['insertion'])} | "
                         f"{_fmt(r['deletion'])} | {_fmt(r['ins_minus_del'])} | {_fmt(r['dir'])} | "
                         + " | ".join(cells) + " |")
        gain = rows["iprop"]
        verdicts.append(
            f"- **{method}** ({gain['num_images']} images): IProp improves dir over the raw map: "
            f"{gain['vs_raw']['dir']['verdict']} ({_ci(gain['vs_raw']['dir'])}); ins − del over "
            f"the raw map: {gain['vs_raw']['ins_minus_del']['verdict']}; over the γ = 0 control "
            f"(propagation itself), dir: {gain['vs_ctrl']['dir']['verdict']}, ins − del: "
            f"{gain['vs_ctrl']['ins_minus_del']['verdict']}.")
    held = [rows["iprop"]["vs_raw"]["dir"]["verdict"] for rows in heldout.values()]
    lines += ["", "Verdicts on the held-out split:", "", *verdicts, "",
              f"IProp's dir claim (dir lower with IProp than without) holds for {held.count(VERDICTS[0])} of "
              f"{len(heldout)} methods here, does not hold for {held.count(VERDICTS[1])}, inconclusive for "
              f"{held.count(VERDICTS[2])}.", ""]
    return lines


def write_report(path: pathlib.Path, *, command: str, study: Mapping[str, Any], tuning: Mapping[str, Any],
                 heldout: Mapping[str, dict] | None, environment: Mapping[str, Any], report_top: int = 15) -> str:
    """Writes ``path`` (Markdown) and ``path.with_suffix(".json")``; returns the Markdown. ``heldout`` None:
    the search alone (``--tune_only``), the held-out test marked pending."""
    criterion = tuning["criterion"]
    results, chosen = tuning["settings"], tuning["chosen"]
    methods = list(study["methods"])
    better = "higher" if criterion == "ins_minus_del" else "lower"
    name = CRITERION_NAMES[criterion]
    ranked = sorted(results.values(), key=lambda r: r["score"], reverse=True)
    protocol = study["protocol"]
    lines = [
        f"# IProp tuning under protocol `{protocol}`",
        "",
        f"Regenerate with (from the repository root): `{command}`",
        "",
        f"Model `{study['model']}`, data `{study['data']}`, method settings `{study['settings']}`, seed "
        f"{study['seed']}, precision `{study['precision']}`. Protocol `{protocol}` ({PROTOCOL_TEXT[protocol]}). "
        f"IProp maps are per pixel, broadcast to the 3 channels. Tuning split: {_split_text(study['tune'])}; "
        f"held-out split: {_split_text(study['heldout'])}. Search `{study['search']}` over "
        f"{json.dumps({k: list(v) for k, v in study['grid'].items()})} (other settings at the library defaults): "
        f"{len(results)} settings evaluated, scored with protocol `{study['tune_protocol']}` on the tuning split. "
        f"Criterion: mean over methods ({', '.join(methods)}) of {name} ({better} is better), from the AUCs of "
        "the mean curves.",
        "",
        f"Environment: jax {environment.get('jax')}, device {environment.get('device', {}).get('kind')} "
        f"({environment.get('device', {}).get('backend')}), processor {environment.get('processor')}.",
        "",
        f"## Chosen setting (best mean {name} on the tuning split)",
        "",
        "| k | radius | γ | σ_c | colour space | reward | σ_s | tol | max_iter |",
        "|---|---|---|---|---|---|---|---|---|",
        f"| {chosen['k']} | {chosen['radius']} | {chosen['gamma']:g} | {chosen['sigma_c']:g} | "
        f"{chosen['color_space']} | {chosen['reward']} | {chosen['sigma_s']:g} | {chosen['tol']:g} | "
        f"{chosen['max_iter']} |",
        "",
        against_no_propagation(tuning),
        "",
    ]
    if heldout is None:
        lines += ["## Held-out split: pending", "",
                  f"The chosen setting has not been tested on the held-out images yet: rerun `{command}` without "
                  "`--tune_only` (the search's runs are stored, so only the held-out run is computed).", ""]
    else:
        lines += _heldout_lines(heldout)
    lines += ["## Tuning split: raw maps and γ = 0 controls", "",
              "| variant | " + " | ".join(f"{m} {name}" for m in methods) + " | score |",
              "|---|" + "---|" * (len(methods) + 1)]
    for label, record in [("raw map", tuning["raw"]), *((f"γ = 0, {rule}", rec)
                                                        for rule, rec in tuning["controls"].items())]:
        lines.append(f"| {label} | " + " | ".join(_fmt(record["per_method"][m][criterion]) for m in methods)
                     + f" | {_fmt(record['score'])} |")
    top = ranked[:report_top]
    lines += ["", f"## Tuning split: the {len(top)} best settings (score: signed so that higher is better)", "",
              "| setting | " + " | ".join(f"{m} {name}" for m in methods) + " | score |",
              "|---|" + "---|" * (len(methods) + 1)]
    for record in top:
        lines.append(f"| {_setting_text(record['config'])} | "
                     + " | ".join(_fmt(record["per_method"][m][criterion]) for m in methods)
                     + f" | {_fmt(record['score'])} |")
    lines += ["", "## Tuning split: best score per value of each axis (over the settings evaluated)", "",
              "| axis | value | best score | settings |", "|---|---|---|---|"]
    for axis, values in study["grid"].items():
        for value in values:
            matching = [r["score"] for r in results.values() if r["config"][axis] == value]
            if matching:
                lines.append(f"| {axis} | {value} | {_fmt(max(matching))} | {len(matching)} |")
    text = "\n".join(lines) + "\n"
    atomic_write(path, lambda f: f.write(text))
    write_json(path.with_suffix(".json"), {"command": command, "study": study, "tuning": tuning,
                                           "heldout": heldout, "environment": environment,
                                           "mean_score_top": float(np.mean([r["score"] for r in top]))})
    return text
