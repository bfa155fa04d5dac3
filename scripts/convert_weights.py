"""Converts a PyTorch checkpoint (.pth) of a registered model to a Flax checkpoint (.msgpack).

    python scripts/convert_weights.py resnet50 ~/.cache/torch/hub/checkpoints/resnet50-0676ba61.pth
    python scripts/convert_weights.py maxvit_t maxvit_t-bc5ab103.pth --out=weights/maxvit_t.msgpack

The state dict is read without torch, converted with the model's converter (every
missing, unexpected or mis-shaped tensor is reported) and the Flax variables are
written atomically (temporary file, then rename). ``load_model(name, weights=OUT)``
(or ``--weights=OUT`` in the CLI) loads the result without conversion.

The checkpoint is read by the hardened reader (``la_iprop.models.checkpoint``): a
malformed or malicious file, or weights holding NaN/Inf, end the script with a
one-line error and exit status 1, and nothing is written. ``--allow_nonfinite``
converts non-finite weights anyway (research on broken models).
"""

from __future__ import annotations

import os
import sys

from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from la_iprop.models import CheckpointError, available_models, load_model  # noqa: E402
from la_iprop.models.zoo import FLAX_CHECKPOINT_SUFFIX, save_flax_checkpoint  # noqa: E402

PROG = os.path.basename(__file__)


def define_flags(flag_values: flags.FlagValues = flags.FLAGS) -> None:
    flags.DEFINE_string("out", None, f"Output path (default: the checkpoint's path with {FLAX_CHECKPOINT_SUFFIX}).",
                        flag_values=flag_values)
    flags.DEFINE_bool("allow_nonfinite", False, "Convert weights holding NaN or Inf instead of refusing them.",
                      flag_values=flag_values)


def _usage_error(text: str) -> int:
    print(f"{PROG}: error: {' '.join(str(text).split())} (usage: {PROG} MODEL CHECKPOINT [--out=PATH] "
          f"[--allow_nonfinite])", file=sys.stderr)
    return 2


def convert(positional: list[str], values: flags.FlagValues) -> int:
    """MODEL CHECKPOINT (``positional``) converted with the flags in ``values``."""
    if len(positional) != 2:
        return _usage_error(f"give MODEL and CHECKPOINT, got {len(positional)} argument(s)")
    model, checkpoint = positional
    if model not in available_models():
        return _usage_error(f"MODEL: {model!r} is not a registered model (one of {', '.join(available_models())})")
    if checkpoint.endswith(FLAX_CHECKPOINT_SUFFIX):
        return _usage_error(f"{checkpoint} is already a Flax checkpoint")
    out = values["out"].value or os.path.splitext(checkpoint)[0] + FLAX_CHECKPOINT_SUFFIX
    try:
        model_fn = load_model(model, weights=checkpoint, allow_nonfinite=values["allow_nonfinite"].value)
    except (CheckpointError, FileNotFoundError) as err:  # ConversionError is a CheckpointError
        print(f"{PROG}: error: {' '.join(str(err).split())}", file=sys.stderr)
        return 1
    save_flax_checkpoint(model_fn, out)
    print(f"{model}: {checkpoint} -> {out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """The command line after the program name (default: ``sys.argv[1:]``), e.g.
    ``main(["resnet50", "r.pth", "--out", "r.msgpack"])``, parsed with this script's flags in a
    ``FlagValues`` of its own: it runs beside other programs' absl flags (e.g. in the tests)."""
    values = flags.FlagValues()
    define_flags(values)
    try:
        positional = values([PROG, *(sys.argv[1:] if argv is None else argv)])[1:]
    except flags.Error as err:
        return _usage_error(str(err))
    return convert(positional, values)


def _parse(argv: list[str]) -> list[str]:
    try:
        return flags.FLAGS(argv)
    except flags.Error as err:
        sys.exit(_usage_error(str(err)))


if __name__ == "__main__":
    define_flags()
    app.run(lambda argv: convert(argv[1:], flags.FLAGS), flags_parser=_parse)
