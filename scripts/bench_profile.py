"""Where Lite0's time goes on this backend: each XLA op of the jitted forward (the metric's work) and
of the input gradient (LA's and the gradient methods' work), named by the model layer it computes.

    python scripts/benchmark.py profile --batch=8

A ``jax.profiler`` trace of ``--repeats`` calls; each op of the trace (an XLA fusion) is matched to
the compiled program's instruction of that name, whose ``op_name`` metadata names the layer (e.g.
``conv_stem/conv/conv_general_dilated``). Per call it reports the wall time (median of untraced
calls), the XLA cost-analysis FLOPs and the GFLOP/s they imply, and the ``--top`` ops by time with
their share of the op time. Op times are summed over the threads that ran them, so the shares are
the figure to read; on a shared machine the times grow with the load, the shares much less.
"""

from __future__ import annotations

import collections
import glob
import gzip
import json
import re
import tempfile

import jax
import numpy as np
from absl import flags
from bench_common import block, define_shared, time_call

from la_iprop.models import load_model
from la_iprop.precision import float_dtype

FLAG_NAMES = ("batch", "repeats", "top")

# An instruction of the compiled HLO text and the op_name of its metadata (the traced JAX operation).
_INSTRUCTION = re.compile(r'^\s*(?:ROOT )?%?([\w.\-]+) = .*?metadata=\{op_name="([^"]+)"', re.M)


def define_flags() -> None:
    flags.DEFINE_integer("top", 12, "profile: how many ops to list per program, most time first.", lower_bound=1)
    define_shared("batch", "repeats")


def layer_names(hlo_text: str) -> dict[str, str]:
    """Instruction name -> the layer path of its op_name: ``jit(...)/`` and the model's own name
    (``EfficientNetLite``, ``jvp(...)``) dropped, ``backward:`` where the op is in the transpose."""
    names = {}
    for instruction, op_name in _INSTRUCTION.findall(hlo_text):
        parts = op_name.split("/")
        if parts[0].startswith("jit("):
            parts = parts[1:]
        backward = "backward: " if parts and parts[0].startswith("transpose(") else ""
        names[instruction] = backward + "/".join(parts[1:] or parts)
    return names


def op_times(trace_events: list[dict], names: dict[str, str]) -> collections.Counter:
    """Microseconds per op of the program (events whose name is one of its instructions)."""
    times = collections.Counter()
    for event in trace_events:
        if event.get("ph") == "X" and event.get("name") in names:
            times[event["name"]] += float(event.get("dur", 0.0))
    return times


def _profile(fn, args, repeats: int, top: int) -> dict:
    compiled = fn.lower(*args).compile()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    flops = float(cost.get("flops", 0.0))
    names = layer_names(compiled.as_text())
    # Timed and traced: this compiled program itself, so the trace's op names are its instructions'
    # (and the program is compiled once, not again by the jit cache).
    wall = time_call(lambda: compiled(*args), repeats=repeats)
    with tempfile.TemporaryDirectory() as trace_dir:
        jax.profiler.start_trace(trace_dir)
        for _ in range(repeats):
            block(compiled(*args))
        jax.profiler.stop_trace()
        files = sorted(glob.glob(f"{trace_dir}/**/*.trace.json.gz", recursive=True))
        if not files:
            raise RuntimeError(f"jax.profiler wrote no trace.json.gz under {trace_dir}")
        with gzip.open(files[-1]) as f:
            events = json.load(f)["traceEvents"]
    times = op_times(events, names)
    total = sum(times.values())
    ops = [{"op": op, "layer": names[op], "ms_per_call": t / repeats / 1e3, "share": t / total}
           for op, t in times.most_common(top)]
    return {"wall_s": wall, "gflop": flops / 1e9, "gflop_per_s": flops / 1e9 / wall,
            "op_ms_per_call": total / repeats / 1e3, "ops": ops}


def run(args) -> dict:
    batches = args.batch or [2 if args.quick else 8]
    repeats = args.repeats or (1 if args.quick else 3)
    model = load_model("efficientnet_lite0")
    forward = jax.jit(lambda x: model(x))
    gradient = jax.jit(jax.grad(lambda x: model(x)[:, 0].sum()))
    rows = []
    for batch in batches:
        size = model.input_size
        images = jax.numpy.asarray(np.random.default_rng(0).uniform(0, 1, (batch, size, size, 3)), float_dtype())
        for name, fn in (("forward", forward), ("input_gradient", gradient)):
            row = {"program": name, "batch": batch, **_profile(fn, (images,), repeats, args.top)}
            rows.append(row)
            print(f"profile {name}, batch {batch}: {row['wall_s'] * 1e3:.1f} ms per call, {row['gflop']:.2f} GFLOP, "
                  f"{row['gflop_per_s']:.1f} GFLOP/s")
            for op in row["ops"]:
                print(f"  {op['share']:6.1%}  {op['ms_per_call']:8.2f} ms  {op['layer']}  ({op['op']})")
    return {"rows": rows}
