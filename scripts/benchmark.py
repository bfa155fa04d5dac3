"""One benchmark entry point; each component is a subcommand in ``scripts/bench_<name>.py``.

    python scripts/benchmark.py la --batch 1 8
    python scripts/benchmark.py all --quick --json out.json
    python scripts/benchmark.py vs-torch          # side by side with PyTorch / the official loops

Each subcommand module (``-`` in a subcommand is ``_`` in its module name) defines ``add_arguments(parser)`` and ``run(args) -> dict``;
results are printed as a table and written as JSON (``--json``).
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_common import environment  # noqa: E402

from la_iprop.precision import PRECISIONS  # noqa: E402

COMPONENTS = ["la", "metrics", "iprop", "models", "methods", "vs-torch"]


def _available():
    found = {}
    for name in COMPONENTS:
        module = f"bench_{name.replace('-', '_')}"
        try:
            found[name] = importlib.import_module(module)
        except ModuleNotFoundError as err:
            if err.name != module:
                raise
    return found


def main(argv=None) -> int:
    modules = _available()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", help="write the results here as JSON")
    parser.add_argument("--precision", default="float32", choices=list(PRECISIONS),
                        help="run every kernel in this precision (float64: x64 scoped to the run; float32_fast: the "
                             "backend's fast matmul/convolution mode, TF32 or bfloat16 on accelerators; see "
                             "docs/precision.md)")
    sub = parser.add_subparsers(dest="component", required=True)
    everything = sub.add_parser("all", help="every component")
    everything.add_argument("--quick", action="store_true", help="small sizes; a few minutes on a 2-core CPU")
    for name, module in modules.items():
        p = sub.add_parser(name, help=(module.__doc__ or "").strip().splitlines()[0])
        p.add_argument("--quick", action="store_true", help="small sizes; a few minutes on a 2-core CPU")
        module.add_arguments(p)
    args = parser.parse_args(argv)

    from la_iprop.precision import precision_scope

    results = {"environment": environment(), "precision": args.precision}
    with precision_scope(args.precision):  # the library's entry points inherit it
        if args.component == "all":
            for name, module in modules.items():
                sub_args = sub.choices[name].parse_args(["--quick"] if args.quick else [])
                results[name] = module.run(sub_args)
        else:
            results[args.component] = modules[args.component].run(args)
    text = json.dumps(results, indent=2, default=float)
    print(text)
    if args.json:
        tmp = args.json + ".tmp"
        with open(tmp, "w") as f:
            f.write(text)
        os.replace(tmp, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
