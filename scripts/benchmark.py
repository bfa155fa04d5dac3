"""One benchmark entry point; each component is a subcommand in ``scripts/bench_<name>.py``.

    python scripts/benchmark.py la --batch 1 8
    python scripts/benchmark.py all --quick --json out.json

Each subcommand module defines ``add_arguments(parser)`` and ``run(args) -> dict``;
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

COMPONENTS = ["la", "metrics", "iprop", "models", "methods"]


def _available():
    found = {}
    for name in COMPONENTS:
        try:
            found[name] = importlib.import_module(f"bench_{name}")
        except ModuleNotFoundError as err:
            if err.name != f"bench_{name}":
                raise
    return found


def main(argv=None) -> int:
    modules = _available()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", help="write the results here as JSON")
    sub = parser.add_subparsers(dest="component", required=True)
    everything = sub.add_parser("all", help="every component")
    everything.add_argument("--quick", action="store_true", help="small sizes; a few minutes on a 2-core CPU")
    for name, module in modules.items():
        p = sub.add_parser(name, help=(module.__doc__ or "").strip().splitlines()[0])
        p.add_argument("--quick", action="store_true", help="small sizes; a few minutes on a 2-core CPU")
        module.add_arguments(p)
    args = parser.parse_args(argv)

    results = {"environment": environment()}
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
