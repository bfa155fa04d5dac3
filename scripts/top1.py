"""Top-1 accuracy of a registered classifier on a labelled image source, optionally beside the
PyTorch reference of the EfficientNet-Lite family on the very same images.

    nice -n 10 python scripts/top1.py --model=efficientnet_lite1 --torch
    python scripts/top1.py --model=resnet50 --data=folder:/data/imagenet/val --num_images=5000

Images are read exactly as runs read them: ``open_source(DATA, size=model.input_size)`` (shorter
side resized to the model's input size, bilinear, then centre-cropped; la1000's 224x224 images
are upsampled to 240 for Lite1 and 260 for Lite2). ``--torch`` runs ``efficientnet-lite-pytorch``
(``EfficientNet.from_name``, static "SAME" padding for that input size) with the same
checkpoint on the same preprocessed arrays and also reports how many predictions differ.
"""

from __future__ import annotations

import math
import os
import sys

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # PyTorch's spinning threads crawl on a shared CPU

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402

from la_iprop.data import open_source  # noqa: E402
from la_iprop.models import available_models, load_model  # noqa: E402
from la_iprop.precision import precision_scope  # noqa: E402
from la_iprop.runs.store import write_json  # noqa: E402

DEFAULT_DATA = "la1000:" + os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir,
                                                          os.pardir, "shared", "data", "la1000"))


def _torch_reference(name: str, weights: str | None, input_size: int, threads: int):
    """``efficientnet-lite-pytorch`` with the model's checkpoint; a function NHWC [0,1] -> logits."""
    import torch
    from efficientnet_lite_pytorch import EfficientNet

    from la_iprop.models.efficientnet_lite import LITE_VARIANTS, lite_preprocess
    from la_iprop.models.zoo import embedded_lite_checkpoint

    if name not in LITE_VARIANTS:
        raise SystemExit(f"--torch: only the EfficientNet-Lite models have a PyTorch reference here, not {name!r}")
    path = weights or embedded_lite_checkpoint(name)
    if path is None or not str(path).endswith(".pth"):
        raise SystemExit(f"--torch needs the PyTorch checkpoint (.pth) of {name}, got {path!r}")
    torch.set_num_threads(threads)
    net = EfficientNet.from_name(name.replace("_", "-"), image_size=input_size)
    net.load_state_dict(torch.load(path, weights_only=True))
    net.eval()

    def logits(images: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return net(torch.from_numpy(np.asarray(lite_preprocess(images))).permute(0, 3, 1, 2)).numpy()
    return logits


FLAGS = flags.FLAGS


def define_flags() -> None:
    flags.DEFINE_enum("model", "efficientnet_lite0", available_models(), "Registered model name.")
    flags.DEFINE_string("weights", None, "Checkpoint (default: the model's embedded/cached one).")
    flags.DEFINE_string("data", DEFAULT_DATA, "Labelled image source (default: la1000).")
    flags.DEFINE_integer("num_images", None, "First N images (default: all).", lower_bound=1)
    flags.DEFINE_integer("batch_size", 50, "Images per forward.", lower_bound=1)
    flags.DEFINE_bool("torch", False, "Also the PyTorch reference (EfficientNet-Lite).")
    flags.DEFINE_integer("threads", 2, "torch.set_num_threads for --torch.", lower_bound=1)
    flags.DEFINE_string("json", None, "Write the figures to this JSON file.")


def _parse(argv: list[str]) -> list[str]:
    """absl's parsing; a bad flag or a stray argument is one line on stderr, exit status 1."""
    try:
        rest = FLAGS(argv)
    except flags.Error as err:
        sys.exit(f"{os.path.basename(argv[0])}: error: {' '.join(str(err).split())}")
    if len(rest) > 1:
        sys.exit(f"{os.path.basename(argv[0])}: error: unexpected argument(s) {' '.join(rest[1:])} (flags only)")
    return rest


def main(argv) -> int:
    del argv
    args = FLAGS
    model = load_model(args.model, args.weights)
    source = open_source(args.data, size=model.input_size)
    total = min(args.num_images or len(source), len(source))
    reference = _torch_reference(args.model, args.weights, model.input_size, args.threads) if args.torch else None
    forward = jax.jit(lambda m, x: m(x))

    ours, theirs, labels, max_diff = [], [], [], 0.0
    for b in range(math.ceil(total / args.batch_size)):
        batch = source.load(range(b * args.batch_size, min((b + 1) * args.batch_size, total)))
        if (batch.labels < 0).any():
            raise SystemExit(f"{args.data}: images without labels (e.g. {batch.ids[int(np.argmin(batch.labels))]})")
        n = len(batch.labels)
        padded = np.concatenate([batch.images, np.repeat(batch.images[-1:], args.batch_size - n, 0)])
        with precision_scope("float32"):  # full float32 dots/convolutions on a GPU/TPU too
            logits = np.asarray(forward(model, padded))[:n]   # one compiled shape for every batch
        ours.append(logits.argmax(-1))
        labels.append(batch.labels)
        if reference is not None:
            their_logits = reference(batch.images)
            theirs.append(their_logits.argmax(-1))
            max_diff = max(max_diff, float(np.abs(logits - their_logits).max()))
        print(f"\r{min((b + 1) * args.batch_size, total)}/{total}", end="", file=sys.stderr, flush=True)
    print(file=sys.stderr)

    labels, ours = np.concatenate(labels), np.concatenate(ours)
    result = {"model": args.model, "input_size": model.input_size, "data": source.spec, "images": int(total),
              "top1": float((ours == labels).mean())}
    line = f"{args.model} at {model.input_size}x{model.input_size} on {source.spec} ({total} images): " \
           f"top-1 ours {result['top1']:.3f}"
    if reference is not None:
        theirs = np.concatenate(theirs)
        result.update(top1_torch=float((theirs == labels).mean()), predictions_differ=int((theirs != ours).sum()),
                      max_abs_logit_diff=max_diff)
        line += f", PyTorch {result['top1_torch']:.3f}; predictions differ on {result['predictions_differ']} " \
                f"images; max |logit difference| {max_diff:.2g}"
    print(line)
    if args.json:
        write_json(args.json, result)
    return 0


if __name__ == "__main__":
    define_flags()
    app.run(main, flags_parser=_parse)
