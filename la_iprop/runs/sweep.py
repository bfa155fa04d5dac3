"""A sweep: methods x models x hyperparameters, each cell an ordinary run of the engine.

The specification (a JSON object, ``python -m experiments.sweep --config=sweep.json``)::

    {"methods": ["la", "ig"], "models": ["efficientnet_lite0"],
     "grid": {"la": {"max_iter": [10, 30], "sampling_times": [6, 20]}},
     "data": "la1000:PATH", "num_images": 50, "batch_size": 8,
     "settings": "quick", "protocols": ["la", "rise"], "iprop": false, "seed": 0}

Each cell is a resumable run in ``<out>/<cell>``; every cell passes every check of a run before
any cell runs. The combined table, a row per cell, protocol and method, is ``<out>/sweep.md``
and ``sweep.csv``. ``"protocol"`` (one name or a list) is accepted for ``"protocols"``.
"""

from __future__ import annotations

import csv
import io
import itertools
import json
import logging
import pathlib

from la_iprop.models import load_model
from la_iprop.runs import multihost
from la_iprop.runs.config import RunConfig, method_variants, validate
from la_iprop.runs.engine import run
from la_iprop.runs.prepare import prepare
from la_iprop.runs.report import summarize_variant
from la_iprop.runs.store import ConfigError, atomic_write, load_records

__all__ = ["cells", "run_sweep"]


_RUN_KEYS = ("data", "tfds_data_dir", "num_images", "start", "stride", "batch_size", "seed", "protocols", "iprop",
             "settings", "iprop_hparams", "weights", "devices", "save_attributions", "precision")


def cells(spec: dict) -> list[tuple[str, dict]]:
    """``(cell name, RunConfig kwargs)`` for every point of the grid."""
    unknown = set(spec) - {"methods", "models", "grid", "protocol", *_RUN_KEYS}
    if unknown:
        raise ConfigError(f"--config: unknown keys {sorted(unknown)}")
    if "protocol" in spec:
        if "protocols" in spec:
            raise ConfigError("--config: give 'protocols' or 'protocol', not both")
        spec = {k: v for k, v in spec.items() if k != "protocol"} | {"protocols": spec["protocol"]}
    if isinstance(spec.get("protocols"), str):
        spec = {**spec, "protocols": [spec["protocols"]]}
    if "protocols" in spec:
        spec = {**spec, "protocols": tuple(spec["protocols"])}
    if not spec.get("methods"):
        raise ConfigError("--config: 'methods' must list at least one method")
    grid = spec.get("grid", {})
    base = {k: spec[k] for k in _RUN_KEYS if k in spec}
    out = []
    for model in spec.get("models", ["efficientnet_lite0"]):
        for method in spec["methods"]:
            axes = grid.get(method, {})
            names = sorted(axes)
            for values in itertools.product(*(axes[n] if isinstance(axes[n], list) else [axes[n]] for n in names)):
                hparams = dict(zip(names, values, strict=True))
                label = "_".join(f"{n}{v}" for n, v in hparams.items())
                cell = "_".join(filter(None, [model, method, label]))
                out.append((cell, dict(base, methods=(method,), model=model, hparams={method: hparams} if hparams else {})))
    return out


def run_sweep(spec: dict, out: str | pathlib.Path, *, progress: bool = True) -> list[dict]:
    out = pathlib.Path(out)
    grid = cells(spec)
    configs = [(name, RunConfig(out=str(out / name), **kwargs)) for name, kwargs in grid]
    models: dict[tuple, object] = {}  # one classifier per (model, weights), shared by its cells
    for name, config in configs:  # every cell passes every check of a run before any cell runs
        try:
            validate(config)
            key = (config.model, config.weights)
            if key not in models:
                try:
                    models[key] = load_model(config.model, config.weights)
                except (ValueError, FileNotFoundError) as err:
                    raise ConfigError(f"--model/--weights: {err}") from None
            prepare(config, model=models[key])
        except ConfigError as err:
            raise ConfigError(f"cell {name}: {err}") from None
    rows = []
    for name, config in configs:
        logging.getLogger("la_iprop").info("sweep cell %s", name)
        run(config, progress=progress, model=models[(config.model, config.weights)])
        if not multihost.is_process_zero():  # process 0 merged the cell; it alone writes the sweep's table
            continue
        for protocol in config.protocols:
            for variant in method_variants(config):
                row = {"cell": name, "model": config.model, "protocol": protocol, "method": variant,
                       "hparams": json.dumps(config.hparams.get(config.methods[0], {}), sort_keys=True)}
                row.update(summarize_variant(load_records(config.out, variant, protocol)))
                rows.append(row)
    if not rows:  # a process other than 0
        return []
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(rows[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write(out / "sweep.csv", lambda f: f.write(buffer.getvalue()))
    lines = ["| cell | model | protocol | method | hparams | images | insertion ↑ | deletion ↓ | ins − del ↑ | dir ↓ |",
             "|---|---|---|---|---|---:|---:|---:|---:|---:|"]
    lines += [f"| {r['cell']} | {r['model']} | {r['protocol']} | {r['method']} | `{r['hparams']}` | {r['num_images']} | "
              f"{r['insertion']:.4f} | {r['deletion']:.4f} | {r['ins_minus_del']:.4f} | {r['dir']:.4f} |" for r in rows]
    atomic_write(out / "sweep.md", lambda f: f.write("\n".join(lines) + "\n"))
    return rows
