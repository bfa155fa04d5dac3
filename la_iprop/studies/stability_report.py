"""The stability report: pure functions over the per-image figures of :mod:`la_iprop.studies.stability`.

Per method: medians and extremes of the map agreements (float32 vs float64, batch vs alone, one-ulp
nudge), the mean |Δ| of insertion/deletion with bootstrap CIs, the seed-to-seed spread, the cost of
float64; then whether the LA-vs-baseline differences of a reproduction run exceed that noise.
"""

from __future__ import annotations

import csv
import json
import pathlib

import numpy as np

from la_iprop.runs.environment import processor, versions
from la_iprop.runs.store import atomic_write
from la_iprop.studies.stability import CHAOS_RELATIVE_L1, COMPARISONS, METHOD_ORDER, REPRODUCTION

__all__ = ["write_report", "reproduction_against_noise"]


def _summary(result: dict) -> dict:
    from la_iprop.metrics.statistics import bootstrap_mean_ci, paired_difference_ci

    out = {"n": len(result["images"])}
    for comparison in COMPARISONS:
        p, r = np.asarray(result[comparison]["pearson"]), np.asarray(result[comparison]["relative_l1"])
        out[comparison] = {"pearson_median": float(np.median(p)), "pearson_min": float(p.min()),
                           "relative_l1_median": float(np.median(r)), "relative_l1_max": float(r.max()),
                           "identical": int(sum(result[comparison]["identical"]))}
    metric = result["metric"]
    for game in ("insertion", "deletion"):
        a, b = np.asarray(metric["float32"][game]), np.asarray(metric["float64"][game])
        out[f"abs_delta_{game}"] = bootstrap_mean_ci(np.abs(a - b)).to_dict()
        out[f"abs_delta_{game}_max"] = float(np.abs(a - b).max())
        out[f"delta_{game}"] = paired_difference_ci(a, b).to_dict()
        out[f"{game}_float32"] = bootstrap_mean_ci(a).to_dict()
        out[f"{game}_float64"] = bootstrap_mean_ci(b).to_dict()
    f32 = np.asarray(metric["float32"]["insertion"]) - np.asarray(metric["float32"]["deletion"])
    f64 = np.asarray(metric["float64"]["insertion"]) - np.asarray(metric["float64"]["deletion"])
    out["abs_delta_ins_minus_del"] = bootstrap_mean_ci(np.abs(f32 - f64)).to_dict()
    if "float32_next_seed" in metric:
        seed = metric["float32_next_seed"]
        for game in ("insertion", "deletion"):
            a, b = np.asarray(metric["float32"][game]), np.asarray(seed[game])
            out[f"seed_abs_delta_{game}"] = bootstrap_mean_ci(np.abs(a - b)).to_dict()
            out[f"seed_delta_{game}"] = paired_difference_ci(a, b).to_dict()
        out["seed_pearson_median"] = float(np.median(result["next_seed_pearson"]))
        other = np.asarray(seed["insertion"]) - np.asarray(seed["deletion"])
        out["seed_abs_delta_ins_minus_del"] = bootstrap_mean_ci(np.abs(f32 - other)).to_dict()
    warm32, warm64 = result["seconds_per_image"]["float32"][-1], result["seconds_per_image"]["float64"][-1]
    out["seconds_per_image_float32"], out["seconds_per_image_float64"] = warm32, warm64
    out["float64_cost_ratio"] = warm64 / warm32 if warm32 > 0 else float("nan")
    return out


def _reproduction_rows(path: pathlib.Path) -> dict[str, dict[int, float]]:
    """Per-image ins − del (protocol la) of every plain method in the reproduction run."""
    rows: dict[str, dict[int, float]] = {}
    if not path.exists():
        return rows
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            # the noise is measured under protocol la; a run scored under several protocols has a row per protocol
            if "+" not in row["method"] and row.get("protocol", "la") == "la":
                rows.setdefault(row["method"], {})[int(row["index"])] = float(row["ins_minus_del"])
    return rows


def reproduction_against_noise(summaries: dict[str, dict], path: pathlib.Path) -> list[dict]:
    """For LA vs every other method in the reproduction run: the paired difference in ins − del (95% CI)
    and the noise of that difference measured here: for each of the two methods its mean |Δ(ins − del)|
    between float32 and float64 maps (rounding), plus, for a method that draws from the key, its mean
    |Δ(ins − del)| between seeds. "exceeds the noise" needs the CI to exclude 0 and its nearer end to lie
    beyond the summed noise."""
    from la_iprop.metrics.comparison import exceeds_noise
    from la_iprop.metrics.statistics import paired_difference_ci

    rows = _reproduction_rows(path)
    if "la" not in rows:
        return []
    out = []
    for other in sorted(m for m in rows if m != "la"):
        common = sorted(set(rows["la"]) & set(rows[other]))
        ci = paired_difference_ci([rows["la"][i] for i in common], [rows[other][i] for i in common])
        noise = None
        if "la" in summaries and other in summaries:
            noise = sum(summaries[m]["abs_delta_ins_minus_del"]["mean"]
                        + summaries[m].get("seed_abs_delta_ins_minus_del", {"mean": 0.0})["mean"] for m in ("la", other))
        if not ci.excludes_zero():
            status = "inconclusive (CI contains 0)"
        elif noise is None:
            status = "noise not measured"
        else:
            status = "exceeds the noise" if exceeds_noise(ci, noise) else "within the noise"
        out.append({"comparison": f"la − {other}", "n": ci.n, "difference": ci.to_dict(), "noise": noise,
                    "status": status})
    return out


def _fmt_ci(ci: dict, digits: int = 4) -> str:
    return f"{ci['mean']:.{digits}f} [{ci['low']:.{digits}f}, {ci['high']:.{digits}f}]"


def write_report(results_dir: pathlib.Path, command: str, reproduction: str = REPRODUCTION,
                 measured: tuple[dict, dict] | None = None) -> dict:
    """``stability.md`` and ``.json`` from ``measured`` = ``(settings, {method: figures})``
    (:func:`la_iprop.studies.stability.run_stability`), or, when None, from the previous
    ``stability.json``, keeping its command; ``reproduction`` names the section of
    ``results/reproduction/`` whose LA-vs-baseline differences are checked against the noise."""
    if measured is not None:
        identity, measured_results = measured
        results = {m: measured_results[m] for m in METHOD_ORDER if m in measured_results}
    else:  # the per-image figures the last report stored: the report is rebuilt from them
        previous = json.loads((results_dir / "stability.json").read_text())
        identity, results = previous["settings"], previous["per_image"]
        command = previous["command"]  # the command that measured them, whatever flags rebuild the report
    summaries = {m: _summary(r) for m, r in results.items()}
    against = reproduction_against_noise(summaries, results_dir / "reproduction" / reproduction / "results.csv")
    payload = {"command": command, "settings": identity, "machine": _machine(),
               "summaries": summaries, "reproduction_vs_noise": against, "per_image": results}
    results_dir.mkdir(parents=True, exist_ok=True)
    atomic_write(results_dir / "stability.json", lambda f: json.dump(payload, f, indent=1))
    atomic_write(results_dir / "stability.md", lambda f: f.write(_markdown(payload)))
    return payload


def _explained(results: dict) -> str:
    """Which class the maps explain (figures measured before the engine runs have no ``other_class``)."""
    if not any("other_class" in r for r in results.values()):
        return ("every map explains the class predicted on the clean image in float32 (these figures were measured "
                "before the study ran on the engine, by its earlier per-method loop; rerunning the command measures "
                "them again as engine runs).")
    other = {m: {run: n for run, n in r.get("other_class", {}).items() if n} for m, r in results.items()}
    other = {m: runs for m, runs in other.items() if runs}
    text = ("every map explains the class its run predicted (in float64 for the float64 maps, on the nudged image "
            "for the nudged ones); ")
    if not other:
        return text + "every run predicted the float32 run's class for every image."
    return text + "images where a run predicted another class than float32: " + "; ".join(
        f"{m} " + ", ".join(f"{run} {n}" for run, n in runs.items()) for m, runs in other.items()) + "."


def _markdown(payload: dict) -> str:
    s, settings = payload["summaries"], payload["settings"]
    n = settings["num_images"]
    missing = [m for m in METHOD_ORDER if m not in s]
    lines = [
        "# Numerical stability of the attribution methods", "",
        f"Regenerate: `{payload['command']}` (resumable; the engine runs are in `runs/stability/`).", "",
        f"Model `{settings['model']}`, data `{settings['data']}` images {settings['start']}–"
        f"{settings['start'] + n - 1} ({n} images), `{settings['settings']}` settings, batches of "
        f"{settings['batch_size']}, seed {settings['seed']}; {_explained(payload['per_image'])} Machine: "
        f"{payload['machine']['processor']}, {payload['machine']['backend']}, "
        f"jax {payload['machine']['jax']}. Intervals are 95% bootstrap CIs over the images (2000 resamples, seeded).",
        "",
    ]
    if missing:
        lines += [f"**Not measured yet:** {', '.join(missing)} (rerun the command to complete the run).", ""]
    lines += [
        "## How far float32 maps move", "",
        "Pearson (median / min over images) and relative L1 (median / max) between two maps of the same image; "
        "`same` counts images whose maps are bit-identical.", "",
        "| method | f32 vs f64: Pearson | rel. L1 | in a batch vs alone (f32): Pearson | rel. L1 | same | "
        "input + 1 ulp (f32): Pearson | rel. L1 |",
        "|---|---|---|---|---|---:|---|---|",
    ]
    for m, r in s.items():
        a, b, c = r["f32_vs_f64"], r["batch_vs_alone"], r["ulp_nudge"]
        lines.append(f"| {m} | {a['pearson_median']:.6f} / {a['pearson_min']:.4f} | "
                     f"{a['relative_l1_median']:.2e} / {a['relative_l1_max']:.2e} | "
                     f"{b['pearson_median']:.6f} / {b['pearson_min']:.4f} | "
                     f"{b['relative_l1_median']:.2e} / {b['relative_l1_max']:.2e} | {b['identical']}/{r['n']} | "
                     f"{c['pearson_median']:.6f} / {c['pearson_min']:.4f} | "
                     f"{c['relative_l1_median']:.2e} / {c['relative_l1_max']:.2e} |")
    lines += [
        "", "## What it does to insertion / deletion (protocol `la`)", "",
        *([f"Scored with protocol `la`'s curve sampled at every {settings['metric_every']}th point "
           f"({224 // settings['metric_every'] + 1} of its 225 points, {settings['metric_every']}× cheaper: exactly "
           "the `la` curve at those points, its AUC by the trapezoid rule on them).", ""]
          if settings.get("metric_every", 1) > 1 else []),
        "Both maps of an image scored by the same float32 metric, so the difference is the map's alone. "
        "Mean |Δ| over images with its CI, and the largest |Δ|; `seed` rows compare seed 0 with seed 1 (float32) "
        "for the methods that draw from the key.", "",
        "| method | insertion (f32) | |Δ ins| f32 vs f64 | max | |Δ del| f32 vs f64 | max | |Δ(ins − del)| | "
        "|Δ ins| seed | |Δ del| seed | f64 / f32 time |",
        "|---|---|---|---:|---|---:|---|---|---|---:|",
    ]
    for m, r in s.items():
        seed_ins = _fmt_ci(r["seed_abs_delta_insertion"]) if "seed_abs_delta_insertion" in r else "—"
        seed_del = _fmt_ci(r["seed_abs_delta_deletion"]) if "seed_abs_delta_deletion" in r else "—"
        lines.append(f"| {m} | {_fmt_ci(r['insertion_float32'])} | {_fmt_ci(r['abs_delta_insertion'])} | "
                     f"{r['abs_delta_insertion_max']:.4f} | {_fmt_ci(r['abs_delta_deletion'])} | "
                     f"{r['abs_delta_deletion_max']:.4f} | {_fmt_ci(r['abs_delta_ins_minus_del'])} | {seed_ins} | "
                     f"{seed_del} | {r['float64_cost_ratio']:.2f} |")
    lines += ["", "Seconds per image (warm batch, this shared CPU): " + ", ".join(
        f"{m} {r['seconds_per_image_float32']:.2f} → {r['seconds_per_image_float64']:.2f}" for m, r in s.items()) + ".",
        "", "## Do the method differences of REPRODUCTION.md exceed this noise?", ""]
    if payload["reproduction_vs_noise"]:
        lines += ["LA minus each method in ins − del on the reproduction run's images (`results/reproduction/"
                  "cpu_quick_12`, paired 95% CI), against the noise of that difference measured above: for both "
                  "methods the mean |Δ(ins − del)| between float32 and float64 maps, plus the mean |Δ(ins − del)| "
                  "between seeds for a method that draws from the key. A difference \"exceeds the noise\" when its CI "
                  "excludes 0 and its nearer end lies beyond that sum.", "",
                  "| comparison | images | difference [95% CI] | noise | verdict |", "|---|---:|---|---:|---|"]
        for row in payload["reproduction_vs_noise"]:
            noise = f"{row['noise']:.4f}" if row["noise"] is not None else "—"
            lines.append(f"| {row['comparison']} | {row['n']} | {_fmt_ci(row['difference'])} | {noise} | "
                         f"{row['status']} |")
    else:
        lines.append("The reproduction run's per-image results were not found.")
    lines += ["", "## Findings", "", *_findings(payload), ""]
    return "\n".join(lines)


def _findings(payload: dict) -> list[str]:
    """One paragraph per finding, computed from the figures (nothing typed in by hand)."""
    s = payload["summaries"]
    if not s:
        return ["No method measured yet."]
    # Rounding alone moves a map by ~1e-6 relative (and the smooth gradient methods by at most a few 1e-3);
    # a float32 map that strays more than 1% from its float64 map on some image has been amplified.
    chaotic = [m for m, r in s.items() if r["f32_vs_f64"]["relative_l1_max"] > CHAOS_RELATIVE_L1]
    steady = [m for m in s if m not in chaotic]
    out = []
    if chaotic:
        worst = min(chaotic, key=lambda m: s[m]["f32_vs_f64"]["pearson_min"])
        out.append(
            f"**Chaotic in float32: {', '.join(chaotic)}.** Their float32 maps leave the float64 ones (relative L1 "
            f"above {CHAOS_RELATIVE_L1:g} on at least one image; worst {worst}: min Pearson "
            f"{s[worst]['f32_vs_f64']['pearson_min']:.3f}, "
            f"relative L1 up to {s[worst]['f32_vs_f64']['relative_l1_max']:.2f}), and the same float32 code moves "
            f"far when the image is computed alone instead of in a batch, or nudged by one ulp "
            + "(" + "; ".join(f"{m}: min Pearson {s[m]['batch_vs_alone']['pearson_min']:.3f} batch vs alone, "
                              f"{s[m]['ulp_nudge']['pearson_min']:.3f} nudged" for m in chaotic) + ").")
    if steady:
        out.append(
            f"**Stable in float32: {', '.join(steady)}.** Float32 and float64 maps agree to a Pearson of at least "
            f"{min(s[m]['f32_vs_f64']['pearson_min'] for m in steady):.6f} and a relative L1 of at most "
            f"{max(s[m]['f32_vs_f64']['relative_l1_max'] for m in steady):.1e}; batch and one-ulp changes move "
            "them by rounding only.")
    worst_metric = max(s, key=lambda m: s[m]["abs_delta_ins_minus_del"]["mean"])
    out.append(
        f"**Insertion/deletion move much less than the maps.** The largest mean |Δ(ins − del)| between float32 and "
        f"float64 maps is {worst_metric}'s {s[worst_metric]['abs_delta_ins_minus_del']['mean']:.4f} (CI "
        f"{_fmt_ci(s[worst_metric]['abs_delta_ins_minus_del'])}); per method the mean |Δ insertion| ranges "
        f"{min(r['abs_delta_insertion']['mean'] for r in s.values()):.1e}–"
        f"{max(r['abs_delta_insertion']['mean'] for r in s.values()):.1e} and |Δ deletion| "
        f"{min(r['abs_delta_deletion']['mean'] for r in s.values()):.1e}–"
        f"{max(r['abs_delta_deletion']['mean'] for r in s.values()):.1e}.")
    seeded = [m for m in s if "seed_abs_delta_insertion" in s[m]]
    if seeded:
        louder = [m for m in seeded if s[m]["seed_abs_delta_ins_minus_del"]["mean"] > s[m]["abs_delta_ins_minus_del"]["mean"]]
        out.append(
            "**Seed-to-seed spread of the methods that draw from the key** (mean |Δ insertion| / |Δ deletion| "
            "between seeds 0 and 1, float32): "
            + "; ".join(f"{m} {s[m]['seed_abs_delta_insertion']['mean']:.4f} / "
                        f"{s[m]['seed_abs_delta_deletion']['mean']:.4f}" for m in seeded)
            + f". The seed moves ins − del more than float32 rounding does for {len(louder)} of {len(seeded)}"
            + (f" ({', '.join(louder)})." if louder else "."))
    against = payload["reproduction_vs_noise"]
    if against:
        counts = {status: [r["comparison"] for r in against if r["status"] == status]
                  for status in sorted({r["status"] for r in against}, key=lambda st: st != "exceeds the noise")}
        exceeding = counts.get("exceeds the noise", [])
        out.append("**REPRODUCTION.md against the noise** (LA vs each method, ins − del, "
                   f"{against[0]['n']} images): " + "; ".join(f"{k}: {', '.join(v)}" for k, v in counts.items())
                   + f". {len(exceeding)} of {len(against)} of LA's advantages are differences that neither float32 "
                   "rounding, nor the seed, nor the sampling of images (the CI) explains; the others are not "
                   "established by that run.")
    cost = {m: r["float64_cost_ratio"] for m, r in s.items()}
    out.append("**Cost of float64 on this CPU** (warm batch, float64 / float32 seconds per image): "
               + ", ".join(f"{m} {v:.1f}×" for m, v in cost.items()) + ".")
    return out


def _machine() -> dict:
    import jax

    return {"jax": versions()["jax"], "backend": jax.default_backend(), "processor": processor(),
            "python": versions()["python"]}
