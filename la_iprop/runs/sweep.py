"""A sweep: methods x models x hyperparameters, each cell an ordinary run of the engine.

The specification (a JSON object, ``python -m experiments.sweep --config=sweep.json``)::

    {"methods": ["la", "ig"], "models": ["efficientnet_lite0"],
     "grid": {"la": {"max_iter": [10, 30], "sampling_times": [6, 20]}},
     "data": "la1000:PATH", "num_images": 50, "batch_size": 8,
     "settings": "quick", "protocols": ["la", "rise"], "iprop": false, "seed": 0}

Each cell is a resumable run in ``<out>/<cell>``; every cell passes every check of a run before
any cell runs. The combined table, a row per cell, protocol and method, is ``<out>/sweep.md``
and ``sweep.csv``. ``"protocol"`` (one name or a list) is accepted for ``"protocols"``.

The specification is checked as a whole before anything runs (:func:`cells`): a JSON object of known
keys; ``methods`` (and ``models``) non-empty lists of distinct names; ``grid`` an object of methods
listed in ``methods``, each an object of hyperparameter names to non-empty lists of distinct values
(an empty axis would run nothing and still write a table; a grid for a method not run would be ignored).
Cell folder names are made file-name safe and shortened (:func:`la_iprop.runs.outdir.file_name`).

The sweep's folder follows the rule of a run's (:mod:`la_iprop.runs.outdir`) with its own marker:
``<out>`` must be absent, empty, or hold ``sweep.json`` (written before the first cell runs, with the
specification), so a sweep never writes its tables into a folder that holds something else. A sweep
folder from before the marker (only sweep.md, sweep.csv and run folders) is recognised and gets one.
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
from la_iprop.runs.config import RunConfig, method_variants
from la_iprop.runs.engine import run
from la_iprop.runs.outdir import SWEEP_MARKER, check_out, file_name
from la_iprop.runs.prepare import prepare
from la_iprop.runs.report import summarize_variant
from la_iprop.runs.store import ConfigError, atomic_write, load_records, write_json
from la_iprop.runs.validation import validate

__all__ = ["cells", "run_sweep"]


_RUN_KEYS = ("data", "tfds_data_dir", "num_images", "start", "stride", "batch_size", "seed", "protocols", "iprop",
             "settings", "iprop_hparams", "weights", "devices", "save_attributions", "precision")
MARKER_KIND = "la_iprop sweep"


def _names(spec: dict, key: str) -> list[str]:
    value = spec[key]
    if not isinstance(value, list) or not value or not all(isinstance(v, str) and v for v in value):
        raise ConfigError(f"--config: '{key}' must be a non-empty list of names, got {json.dumps(value)[:80]}")
    if len(set(value)) != len(value):
        raise ConfigError(f"--config: '{key}' lists {sorted({v for v in value if value.count(v) > 1})} more than once")
    return value


def _grid(spec: dict, methods: list[str]) -> dict[str, dict[str, list]]:
    grid = spec.get("grid", {})
    if not isinstance(grid, dict):
        raise ConfigError(f"--config: 'grid' must be an object {{method: {{name: [values]}}}}, got "
                          f"{type(grid).__name__}")
    for method, axes in grid.items():
        if method not in methods:
            raise ConfigError(f"--config: grid.{method}: {method} is not among 'methods' ({', '.join(methods)}); "
                              "its grid would never run")
        if not isinstance(axes, dict):
            raise ConfigError(f"--config: grid.{method} must be an object {{name: [values]}}, got "
                              f"{type(axes).__name__}")
        for name, values in axes.items():
            if not isinstance(values, list):
                raise ConfigError(f"--config: grid.{method}.{name} must be a list of values, e.g. "
                                  f"[{json.dumps(values)}]")
            if not values:
                raise ConfigError(f"--config: grid.{method}.{name} is empty: the sweep would run no cell of {method}")
            texts = [json.dumps(v, sort_keys=True) for v in values]
            if len(set(texts)) != len(texts):
                raise ConfigError(f"--config: grid.{method}.{name} lists a value more than once")
    return grid


def cells(spec: dict) -> list[tuple[str, dict]]:
    """``(cell name, RunConfig kwargs)`` for every point of the grid; a specification of the wrong shape
    is a ConfigError naming the key (the run settings' types are checked per cell by ``validate``)."""
    if not isinstance(spec, dict):
        raise ConfigError(f"--config: a sweep specification is a JSON object, got {type(spec).__name__}")
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
        if not isinstance(spec["protocols"], list):
            raise ConfigError(f"--config: 'protocols' must be a name or a list of names, got {spec['protocols']!r}")
        spec = {**spec, "protocols": tuple(spec["protocols"])}
    if "methods" not in spec:
        raise ConfigError("--config: 'methods' must list at least one method")
    methods = _names(spec, "methods")
    models = _names(spec, "models") if "models" in spec else ["efficientnet_lite0"]
    grid = _grid(spec, methods)
    base = {k: spec[k] for k in _RUN_KEYS if k in spec}
    out, folders = [], {}
    for model in models:
        for method in methods:
            axes = grid.get(method, {})
            names = sorted(axes)
            for values in itertools.product(*(axes[n] for n in names)):
                hparams = dict(zip(names, values, strict=True))
                label = "_".join(f"{n}{v}" for n, v in hparams.items())
                cell = file_name("_".join(filter(None, [model, method, label])))
                if cell in folders:
                    raise ConfigError(f"--config: the cells {folders[cell]} and {hparams} of {model} {method} would "
                                      f"share the folder {cell}")
                folders[cell] = hparams
                out.append((cell, dict(base, methods=(method,), model=model,
                                       hparams={method: hparams} if hparams else {})))
    return out


def _legacy_sweep(out: pathlib.Path) -> bool:
    """A sweep's folder written before the marker: its tables (sweep.md, sweep.csv) and run folders only
    (each with its run.json), which a sweep rewrites or resumes anyway; its marker is added."""
    if not out.is_dir() or (out / SWEEP_MARKER).exists():
        return False
    entries = list(out.iterdir())
    tables = {e.name for e in entries if not e.is_dir()}
    return bool(tables) and tables <= {"sweep.md", "sweep.csv"} and \
        all((e / "run.json").is_file() for e in entries if e.is_dir())


def _check_sweep_out(out: pathlib.Path, spec: dict) -> None:
    """The sweep's folder: absent, empty, or a sweep's (its ``sweep.json``), never another folder."""
    data = spec.get("data") if isinstance(spec, dict) else None
    tfds_data_dir = spec.get("tfds_data_dir") if isinstance(spec, dict) else None
    if _legacy_sweep(out):  # (still refused inside the data, at /, at home)
        check_out(out, marker="sweep.md", what="sweep", data=data, tfds_data_dir=tfds_data_dir)
        return
    check_out(out, marker=SWEEP_MARKER, what="sweep", data=data, tfds_data_dir=tfds_data_dir)
    marker = out / SWEEP_MARKER
    if marker.exists():
        try:
            kind = json.loads(marker.read_text()).get("kind")
        except (OSError, ValueError, AttributeError):
            kind = None
        if kind != MARKER_KIND:
            raise ConfigError(f"--out: {marker} is not the marker of a sweep; use another --out")


def run_sweep(spec: dict, out: str | pathlib.Path, *, progress: bool = True) -> list[dict]:
    out = pathlib.Path(out)
    grid = cells(spec)
    _check_sweep_out(out, spec)
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
    if multihost.is_process_zero():  # every cell passed: the folder is the sweep's from now on
        write_json(out / SWEEP_MARKER, {"kind": MARKER_KIND, "spec": spec})
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
    lines = ["| cell | model | protocol | method | hparams | images | insertion ↑ | deletion ↓ | ins − del ↑ "
             "| dir ↓ |",
             "|---|---|---|---|---|---:|---:|---:|---:|---:|"]
    lines += [f"| {r['cell']} | {r['model']} | {r['protocol']} | {r['method']} | `{r['hparams']}` | "
              f"{r['num_images']} | "
              f"{r['insertion']:.4f} | {r['deletion']:.4f} | {r['ins_minus_del']:.4f} | {r['dir']:.4f} |" for r in rows]
    atomic_write(out / "sweep.md", lambda f: f.write("\n".join(lines) + "\n"))
    return rows
