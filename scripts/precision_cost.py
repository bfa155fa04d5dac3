"""What full float32 costs against the backend's fast matmul/convolution mode, from gpu_benchmark.sh's output.

    python scripts/precision_cost.py results/benchmarks/gpu

``gpu_benchmark.sh`` writes each part's JSON once per mode, ``OUT/float32/NAME.json`` and
``OUT/float32_fast/NAME.json`` (``scripts/benchmark.py --precision``). This pairs the rows of the two
(LA: by batch; the metric: by protocol and chunk size), prints images/s in each mode and the slowdown
``fast / full``, and writes the table to ``OUT/precision_cost.json``. Why: ``precision="float32"``
sets HIGHEST on every dot/convolution (see docs/precision.md); this is the figure that says what
that fidelity costs on the machine at hand (on a CPU the two modes run the same program: ~1.0).
"""

from __future__ import annotations

import json
import os
import pathlib
import sys

from absl import app, flags

FULL, FAST = "float32", "float32_fast"
# component -> (the fields naming a row, the throughput field)
ROWS = {"la": ("rows", ("batch",), "images_per_second"),
        "metrics": ("results", ("protocol", "chunk_size"), "images_per_s")}


def _rows(data: dict) -> dict[tuple, float]:
    """``{(component, *row identity): images/s}`` of one benchmark.py JSON."""
    found = {}
    for component, (rows_key, identity, throughput) in ROWS.items():
        for row in (data.get(component) or {}).get(rows_key, []):
            found[(component, *(row[k] for k in identity))] = float(row[throughput])
    return found


def _device(environment: dict):
    """The device kind: ``environment["device"]`` is ``la_iprop.runs.environment.device()``'s record
    (older JSON: the kind itself)."""
    device = environment.get("device")
    return device.get("kind") if isinstance(device, dict) else device


def compare(out: str | os.PathLike) -> list[dict]:
    """One entry per row measured in both modes: images/s in each and ``slowdown = fast / full``."""
    out = pathlib.Path(out)
    if not (out / FULL).is_dir() or not (out / FAST).is_dir():
        raise FileNotFoundError(f"out: expected {out / FULL} and {out / FAST} (gpu_benchmark.sh's MODES output)")
    table = []
    for full_path in sorted((out / FULL).glob("*.json")):
        fast_path = out / FAST / full_path.name
        if not fast_path.is_file():
            continue
        full, fast = json.loads(full_path.read_text()), json.loads(fast_path.read_text())
        for path, data, mode in ((full_path, full, FULL), (fast_path, fast, FAST)):
            if data.get("precision") != mode:
                raise ValueError(f"{path}: precision {data.get('precision')!r}, expected {mode!r}")
        full_rows, fast_rows = _rows(full), _rows(fast)
        for key in sorted(full_rows.keys() & fast_rows.keys(), key=str):
            table.append({"part": full_path.stem, "component": key[0], "row": list(key[1:]),
                          "images_per_s_float32": full_rows[key], "images_per_s_float32_fast": fast_rows[key],
                          "slowdown": fast_rows[key] / full_rows[key],
                          "device": _device(full.get("environment", {}))})
    return table


def _parse(argv: list[str]) -> list[str]:
    """absl's parsing (no flags of its own); a bad flag, or anything but one OUT, is one line on stderr."""
    try:
        rest = flags.FLAGS(argv)
    except flags.Error as err:
        sys.exit(f"{os.path.basename(argv[0])}: error: {' '.join(str(err).split())}")
    if len(rest) != 2:
        sys.exit(f"{os.path.basename(argv[0])}: error: give one OUT, gpu_benchmark.sh's (holding float32/ and "
                 f"float32_fast/), got {len(rest) - 1} argument(s)")
    return rest


def main(argv: list[str]) -> int:
    """``argv``: the program and OUT, gpu_benchmark.sh's OUT (holding float32/ and float32_fast/)."""
    out = argv[1]
    table = compare(out)
    if not table:
        print(f"no row measured in both modes under {out}", file=sys.stderr)
        return 1
    print(f"{'part':36s} {'row':16s} {'float32 img/s':>14s} {'fast img/s':>12s} {'slowdown':>9s}")
    for entry in table:
        row = " ".join(str(v) for v in entry["row"])
        print(f"{entry['part']:36s} {row:16s} {entry['images_per_s_float32']:14.3f} "
              f"{entry['images_per_s_float32_fast']:12.3f} {entry['slowdown']:8.2f}x")
    target = pathlib.Path(out) / "precision_cost.json"
    tmp = target.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(table, indent=2))
    os.replace(tmp, target)
    print(f"device: {table[0]['device']}; table in {target}")
    return 0


if __name__ == "__main__":
    app.run(main, flags_parser=_parse)
