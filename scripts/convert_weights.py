"""Converts a PyTorch checkpoint (.pth) of a registered model to a Flax checkpoint (.msgpack).

    python scripts/convert_weights.py resnet50 ~/.cache/torch/hub/checkpoints/resnet50-0676ba61.pth
    python scripts/convert_weights.py maxvit_t maxvit_t-bc5ab103.pth --out weights/maxvit_t.msgpack

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

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from la_iprop.models import CheckpointError, available_models, load_model  # noqa: E402
from la_iprop.models.zoo import FLAX_CHECKPOINT_SUFFIX, save_flax_checkpoint  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", choices=available_models(), help="registered model name")
    parser.add_argument("checkpoint", help="PyTorch checkpoint (.pth) holding the model's state dict")
    parser.add_argument("--out", help=f"output path (default: the checkpoint's path with {FLAX_CHECKPOINT_SUFFIX})")
    parser.add_argument("--allow_nonfinite", action="store_true",
                        help="convert weights holding NaN or Inf instead of refusing them")
    args = parser.parse_args(argv)
    if args.checkpoint.endswith(FLAX_CHECKPOINT_SUFFIX):
        parser.error(f"{args.checkpoint} is already a Flax checkpoint")
    out = args.out or os.path.splitext(args.checkpoint)[0] + FLAX_CHECKPOINT_SUFFIX
    try:
        model_fn = load_model(args.model, weights=args.checkpoint, allow_nonfinite=args.allow_nonfinite)
    except (CheckpointError, FileNotFoundError) as err:  # ConversionError is a CheckpointError
        print(f"{parser.prog}: error: {' '.join(str(err).split())}", file=sys.stderr)
        return 1
    save_flax_checkpoint(model_fn, out)
    print(f"{args.model}: {args.checkpoint} -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
