"""Reports of a run: per-image CSV, summary JSON, Markdown tables and PNG figures, one table per protocol.

Everything is read from the run's batch files (:mod:`la_iprop.runs.store`), so a resumed run
reports exactly what an uninterrupted one does.
"""

from __future__ import annotations

import csv
import dataclasses
import functools
import io
import json
import pathlib
import zipfile

import numpy as np

from la_iprop.data import class_name
from la_iprop.metrics import auc
from la_iprop.runs.environment import device, versions
from la_iprop.runs.store import atomic_write, load_records, maps_path, protocol_record, quarantine

__all__ = ["write_reports", "summarize_variant", "CSV_COLUMNS", "markdown_table"]

CSV_COLUMNS = ["protocol", "method", "index", "image_id", "true_label", "true_name", "predicted", "predicted_name",
               "insertion", "deletion", "ins_minus_del", "dir", "seconds"]
TIMING_COLUMNS = ("seconds",)  # the only columns that differ between identical runs
FIGURE_IMAGES = 6
FIGURE_DPI = 90
# 1.4 in at FIGURE_DPI: 126 px per map, enough to see its structure; the grid of a full reproduction
# (37 columns) is 1.3 MB as a palette PNG, where 2.2 in as RGBA made 13 MB (committed runs).
HEATMAP_CELL_INCHES = 1.4


def summarize_variant(records: dict[str, np.ndarray]) -> dict:
    """Mean figures of one method: AUCs of the mean curves (= mean of per-image AUCs)."""
    ins = float(auc(records["insertion_curve"].mean(0)))
    dele = float(auc(records["deletion_curve"].mean(0)))
    return {"num_images": int(len(records["index"])), "insertion": ins, "deletion": dele,
            "ins_minus_del": ins - dele, "dir": dele / ins if ins else float("inf"),
            "seconds_per_image": float(records["seconds"].mean())}


def _csv_rows(protocol: str, variant: str, records: dict[str, np.ndarray]):
    for i in range(len(records["index"])):
        ins, dele = float(records["insertion"][i]), float(records["deletion"][i])
        true, pred = int(records["label"][i]), int(records["predicted"][i])
        yield [protocol, variant, int(records["index"][i]), str(records["id"][i]), true if true >= 0 else "",
               class_name(true), pred, class_name(pred), f"{ins:.6f}", f"{dele:.6f}", f"{ins - dele:.6f}",
               f"{dele / ins:.6f}" if ins else "inf", f"{float(records['seconds'][i]):.4f}"]


def markdown_table(summary: dict[str, dict], title: str = "") -> str:
    lines = [f"## {title}", ""] if title else []
    lines += ["| method | images | insertion ↑ | deletion ↓ | ins − del ↑ | dir ↓ | s / image |",
              "|---|---:|---:|---:|---:|---:|---:|"]
    for name, row in summary.items():
        lines.append(f"| {name} | {row['num_images']} | {row['insertion']:.4f} | {row['deletion']:.4f} | "
                     f"{row['ins_minus_del']:.4f} | {row['dir']:.4f} | {row['seconds_per_image']:.3f} |")
    return "\n".join(lines) + "\n"


def _protocol_note(protocol: str, record: dict | None) -> str:
    if not record:
        return f"Protocol `{protocol}`."
    return (f"Protocol `{protocol}`: score `{record.get('score')}`, ranking `{record.get('ranking')}`, step "
            f"{record.get('step')}, insertion substrate `{record.get('insertion_substrate')}`, deletion substrate "
            f"`{record.get('deletion_substrate')}`.")


def write_reports(config, out: pathlib.Path, variants: list[str], expected_images: int, source, *,
                  interim: bool = False) -> dict:
    """Builds every report from the batch files (so a resumed run equals an uninterrupted one):
    ``results.csv`` (a ``protocol`` column), ``summary.json`` (results and protocol records keyed by
    protocol), ``results.md`` (a section per protocol), ``heatmaps.png`` and ``curves.png``.

    ``interim``: report a run still in progress on the images already finished for every variant
    under every protocol (so every comparison stays paired); ``summary["interim"]`` says how many
    of how many. Otherwise an unfinished variant is an error."""
    out = pathlib.Path(out)
    protocols = list(config.protocols)
    records = {p: {v: load_records(out, v, p) for v in variants} for p in protocols}
    if interim:
        records, finished = _finished_everywhere(records)
        if not finished:
            raise RuntimeError(f"no image of {out} is finished for every method and protocol yet")
    missing = [f"{v} ({p})" for p in protocols for v, r in records[p].items()
               if r is None or len(r["index"]) != (finished if interim else expected_images)]
    if missing:
        raise RuntimeError(f"incomplete results for {', '.join(missing)} in {out}: rerun the same command to resume")

    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    for protocol in protocols:
        for variant in variants:
            writer.writerows(_csv_rows(protocol, variant, records[protocol][variant]))
    atomic_write(out / "results.csv", lambda f: f.write(buffer.getvalue()))

    results = {p: {v: summarize_variant(records[p][v]) for v in variants} for p in protocols}
    protocol_records = {p: protocol_record(out, p) for p in protocols}
    summary = {
        "flags": _flags(config), "precision": config.precision, "resolved": config.resolved(),
        "protocols": protocols, "protocol": protocol_records, "versions": versions(),
        "device": device(),
        "results": results,
        "notes": {"results": "keyed by protocol, then method; the maps are computed once and scored under each "
                             "protocol",
                  "insertion/deletion": "AUC of the mean curve over images (equals the mean per-image AUC)",
                  "dir": "deletion / insertion (lower is better)",
                  "seconds": "attribution wall-clock time of the image's batch / batch size (not the scoring); the "
                             "first batch of each method includes compilation; METHOD+iprop and METHOD+ctrl (IProp's "
                             "gamma = 0 control) reuse METHOD's stored maps, so its seconds are IProp's alone"},
    }
    if interim:
        summary["interim"] = {"images": finished, "of": expected_images}
    external = getattr(config, "external", None)
    if external is not None:  # maps made elsewhere (python -m experiments.evaluate)
        summary["maps_file"] = external.describe()
        summary["notes"]["seconds"] = summary["maps_file"]["seconds"]
    atomic_write(out / "summary.json", lambda f: json.dump(summary, f, indent=2, default=str))
    setting_note = f"Model `{config.model}`, data `{config.data}`, settings `{config.settings}`, " \
                   f"seed {config.seed}, precision `{config.precision}`."
    if external is not None:
        described = summary["maps_file"]
        setting_note = (f"Maps from `{described['file']}` (sha256 `{described['sha256'][:16]}`), explained class: "
                        f"{described['explained_class']}; per-pixel maps: {described['per_pixel']}. Model "
                        f"`{config.model}`, data `{config.data}`, precision `{config.precision}`.")
    sections = [markdown_table(results[p], f"Insertion / deletion, protocol `{p}`") + "\n"
                + _protocol_note(p, protocol_records[p]) + "\n" for p in protocols]
    atomic_write(out / "results.md", lambda f: f.write("\n".join(sections) + "\n" + setting_note + "\n"))
    write_figures(out, variants, records, source, config.save_attributions)
    return summary


def _flags(config) -> dict:
    """The run's settings; maps made elsewhere are described by ``summary["maps_file"]`` instead."""
    flags = dataclasses.asdict(config)
    external = flags.pop("external", None)
    if external is not None:
        flags["maps_file"] = str(external.path)
    return flags


def _finished_everywhere(records: dict[str, dict[str, dict | None]]) -> tuple[dict, int]:
    """The records restricted to the images every variant has under every protocol, and their count."""
    present = [r["index"] for by_variant in records.values() for r in by_variant.values() if r is not None]
    if len(present) < sum(len(by_variant) for by_variant in records.values()):
        return records, 0
    common = functools.reduce(np.intersect1d, present)
    restricted = {p: {v: {k: a[np.isin(r["index"], common)] for k, a in r.items()} for v, r in by_variant.items()}
                  for p, by_variant in records.items()}
    return restricted, int(len(common))


def _first_maps(out: pathlib.Path, variant: str, indices: np.ndarray) -> np.ndarray | None:
    """The maps of the run's first images (from the first batch files only), if they are ``indices``."""
    count = len(indices)
    parts, stored_indices, have, b = [], [], 0, 0
    while have < count and maps_path(out, variant, b).exists():
        path = maps_path(out, variant, b)
        try:
            with np.load(path, allow_pickle=False) as stored:
                if "attribution" not in stored.files:
                    return None
                parts.append(stored["attribution"])
                stored_indices.append(stored["index"])
        except (OSError, ValueError, EOFError, zipfile.BadZipFile) as err:  # checked at the start, damaged since
            quarantine(out, path, f"unreadable ({type(err).__name__}: {err})")
            raise RuntimeError(f"{path} is damaged (moved aside): rerun the same command to recompute it") from None
        have += len(parts[-1])
        b += 1
    if not parts or not np.array_equal(np.concatenate(stored_indices)[:count], indices):
        return None  # (an interim report whose first batch is not finished everywhere)
    return np.concatenate(parts)[:count]


def write_figures(out: pathlib.Path, variants: list[str], records: dict[str, dict[str, dict]], source,
                  save_attributions: bool = True) -> None:
    """``heatmaps.png`` (image + one overlay per method) and ``curves.png`` (mean curves, a row per protocol).

    ``records``: ``{protocol: {variant: records}}``."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    protocols = list(records)
    first = records[protocols[0]][variants[0]]
    n = min(FIGURE_IMAGES, len(first["index"]))
    maps = {v: _first_maps(out, v, first["index"][:n]) for v in variants} if save_attributions else {}
    maps = {v: m for v, m in maps.items() if m is not None and len(m) == n}  # (named IProp variants keep none)
    shown = [v for v in variants if v in maps]
    if maps:
        images = source.load([int(i) for i in first["index"][:n]]).images
        fig, axes = plt.subplots(n, len(shown) + 1, figsize=(HEATMAP_CELL_INCHES * (len(shown) + 1),
                                                                HEATMAP_CELL_INCHES * n), squeeze=False)
        for row in range(n):
            axes[row, 0].imshow(images[row])
            axes[row, 0].set_title(f"{first['id'][row]}\n{class_name(int(first['predicted'][row]))}"[:40], fontsize=7)
            for col, variant in enumerate(shown, start=1):
                heat = maps[variant][row].sum(-1)
                axes[row, col].imshow(images[row].mean(-1), cmap="gray", vmin=0, vmax=1)
                axes[row, col].imshow(_normalise(heat), cmap="jet", alpha=0.5, vmin=0, vmax=1)
                if row == 0:
                    axes[row, col].set_title(variant, fontsize=8)
        for ax in axes.ravel():
            ax.axis("off")
        fig.tight_layout()
        atomic_write(out / "heatmaps.png", lambda f: _save_palette_png(fig, f), mode="wb")
        plt.close(fig)

    fig, axes = plt.subplots(len(protocols), 2, figsize=(10, 4 * len(protocols)), squeeze=False)
    for (ins_ax, del_ax), protocol in zip(axes, protocols, strict=True):
        for variant in variants:
            r = records[protocol][variant]
            x = np.linspace(0, 1, r["insertion_curve"].shape[1])
            ins_ax.plot(x, r["insertion_curve"].mean(0), label=f"{variant} ({auc(r['insertion_curve'].mean(0)):.3f})")
            del_ax.plot(x, r["deletion_curve"].mean(0), label=f"{variant} ({auc(r['deletion_curve'].mean(0)):.3f})")
        for ax, title in ((ins_ax, "insertion (higher is better)"), (del_ax, "deletion (lower is better)")):
            ax.set_title(f"{title}, protocol {protocol}")
            ax.set_xlabel("fraction of the image changed")
            ax.set_ylabel("score of the explained class")
            ax.legend(fontsize=7)
            ax.grid(alpha=0.3)
    fig.tight_layout()
    atomic_write(out / "curves.png", lambda f: fig.savefig(f, format="png", dpi=FIGURE_DPI), mode="wb")
    plt.close(fig)


def _save_palette_png(fig, file) -> None:
    """The figure as a 256-colour palette PNG: overlays of a jet colour map on grey photos compress about 3x
    better than as RGBA, with no visible loss at this size."""
    from PIL import Image

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=FIGURE_DPI)
    buffer.seek(0)
    with Image.open(buffer) as image:
        image.convert("RGB").quantize(256, method=Image.Quantize.MEDIANCUT).save(file, format="PNG", optimize=True)


def _normalise(heat: np.ndarray) -> np.ndarray:
    """Positive evidence scaled by its 99th percentile, for display only."""
    heat = np.maximum(heat, 0)
    scale = np.percentile(heat, 99) or heat.max() or 1.0
    return np.clip(heat / scale, 0, 1)
