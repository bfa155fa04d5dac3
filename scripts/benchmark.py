"""One benchmark entry point; each component is a subcommand in ``scripts/bench_<name>.py``.

    python scripts/benchmark.py la --batch=1,8
    python scripts/benchmark.py all --quick --json=out.json
    python scripts/benchmark.py vs-torch          # side by side with PyTorch / the official loops
    python scripts/benchmark.py profile           # Lite0's time per XLA op, named by layer

The first argument that is not a flag names the subcommand (its flags may come before or after it).
Flags are absl flags: a list is comma separated (``--batch=1,8``), a boolean ``--quick`` or
``--noquick``. ``--json``, ``--precision`` and ``--quick`` apply to every subcommand (``all``
takes only these); the others belong to the subcommands named at the start of their help. Each
subcommand module (``-`` in a subcommand is ``_`` in its module name) defines its flags in
``define_flags()`` (those several subcommands share, e.g. ``--batch`` and ``--repeats``, once in
``bench_common``), names those it reads in ``FLAG_NAMES`` (a flag of another subcommand is refused)
and has ``run(FLAGS) -> dict``; results are printed and written as JSON (``--json``).
"""

from __future__ import annotations

import importlib
import json
import os
import sys

from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_common import environment, refuse  # noqa: E402

from la_iprop.precision import PRECISIONS  # noqa: E402

FLAGS = flags.FLAGS
COMPONENTS = ["la", "metrics", "iprop", "models", "methods", "vs-torch", "bf16", "profile"]


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


MODULES = _available()


def define_flags() -> None:
    flags.DEFINE_string("json", None, "Write the results here as JSON.")
    flags.DEFINE_enum("precision", "float32", list(PRECISIONS),
                      "Run every kernel in this precision (float64: x64 scoped to the run; float32_fast: the "
                      "backend's fast matmul/convolution mode, TF32 or bfloat16 on accelerators; see "
                      "docs/precision.md).")
    flags.DEFINE_bool("quick", False, "Small sizes; a few minutes on a 2-core CPU.")
    for module in MODULES.values():
        module.define_flags()
    for name in _subcommand_flags():  # listed by --help with the three above (--helpfull: by module)
        FLAGS.register_flag_by_module(sys.argv[0], FLAGS[name])


def _subcommand_flags() -> list[str]:
    return sorted({name for module in MODULES.values() for name in module.FLAG_NAMES})


def _parse(argv: list[str]) -> list[str]:
    """absl's parsing; a bad flag is one line on stderr, exit status 1."""
    try:
        return FLAGS(argv)
    except flags.Error as err:
        refuse(" ".join(str(err).split()))


def _check(positional: list[str]) -> str:
    """The subcommand, with no flag of another one set."""
    choices = ["all", *MODULES]
    if len(positional) != 1 or positional[0] not in choices:
        got = " ".join(positional) or "nothing"
        refuse(f"give one subcommand, one of {', '.join(choices)} (got {got}); flags: --help")
    component = positional[0]
    own = set(MODULES[component].FLAG_NAMES) if component != "all" else set()
    foreign = [name for name in _subcommand_flags() if name not in own and FLAGS[name].present]
    if foreign:
        takes = ", ".join(f"--{name}" for name in sorted(own)) or "only --json, --precision and --quick"
        refuse(f"{', '.join('--' + n for n in foreign)}: not a flag of {component} (it takes {takes})")
    return component


def main(argv: list[str]) -> int:
    component = _check(argv[1:])
    from la_iprop.precision import precision_scope

    results = {"environment": environment(), "precision": FLAGS.precision}
    with precision_scope(FLAGS.precision):  # the library's entry points inherit it
        if component == "all":  # every subcommand's flags at their defaults (only --quick set)
            for name, module in MODULES.items():
                results[name] = module.run(FLAGS)
        else:
            results[component] = MODULES[component].run(FLAGS)
    text = json.dumps(results, indent=2, default=float)
    print(text)
    if FLAGS.json:
        tmp = FLAGS.json + ".tmp"
        with open(tmp, "w") as f:
            f.write(text)
        os.replace(tmp, FLAGS.json)
    return 0


if __name__ == "__main__":
    define_flags()
    app.run(main, flags_parser=_parse)
