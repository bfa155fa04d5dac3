"""Side by side with PyTorch (CPU): Lite0 forward / input VJP, LA and insertion+deletion vs the official loops.

Everything is timed in ONE process, alternating ours and theirs call by call (medians over
the repeats, after a warm-up call of everything that compiles, and of the Lite0 calls), on the same real la1000 images and settings, so
the ratios hold on a shared or throttled machine; absolute seconds do not transfer.

- ``lite0``: EfficientNet-Lite0 forward, and forward + a 2-cotangent input VJP
  (``grad p_a`` and ``grad p_b``, no weight gradients on either side) at several batches.
  Theirs: ``efficientnet_lite_pytorch`` with the embedded checkpoint.
- ``la``: our :func:`~la_iprop.attribution.la.local_attribution` vs a PyTorch
  transcription of the official LA loop as it runs there: per targeted run and step one
  forward, ``backward()`` of ``sum p_target`` (graph retained) and of ``sum p_label``; per
  untargeted step one forward and one backward; the parameters keep ``requires_grad``, so
  every backward also computes weight gradients. Same target classes on both sides.
- ``metric``: our :func:`~la_iprop.metrics.evaluate` (protocol ``la``) vs the official
  evaluation loop: NumPy ``argsort`` ranking of all ``3*H*W`` entries, and per step one
  forward of the whole batch (probabilities, no autograd) followed by in-place copies of
  the next ``3*H`` substrate entries per image; deletion then insertion, black substrate.
  Also our metric's efficiency: ``forwards x t_forward(chunk) / chunk`` over its time per
  image (1.0 = nothing beyond the classifier's forward passes).

Requires torch and efficientnet-lite-pytorch (test extras); skipped with a message otherwise.

The machine's load is recorded around every timed round (a round: each side's call once): the
1/5/15-minute load averages and the CPU share of every process outside the benchmark's own process
tree in a 0.5 s window before and after the round, and over the round itself
(``bench_common.machine_load``, ``RoundMonitor``). A round is *not idle* when the 1-minute load
average before or after it exceeds the benchmark's own expected load + 0.3 (its own: the CPUs it
keeps busy while timing, i.e. every core this process may use, or ``--threads`` where larger), or
when other processes used more than 5% of the machine (all cores together) before, during or after
it. Each part's JSON holds ``load`` (``idle``, ``not_idle_rounds``, each round's readings and
``reasons``), each printed line ends with ``[NOT IDLE ...]`` when any of its rounds was not idle,
and the summary printed last says whether the figures may go into the README's or docs' tables:
a figure with a round that was not idle must not.

PyTorch's OpenMP threads spin-wait by default; on a 2-core machine where another process
holds a core, that made a 2-thread Lite0 forward up to ~100x slower (measured: 1.6 s instead
of 12 ms at 64x64). Unless ``OMP_WAIT_POLICY`` is already set, this module sets it to
``PASSIVE`` before torch is imported (it only ever helps PyTorch here); the value used is
recorded in the results. Export ``OMP_WAIT_POLICY=ACTIVE`` to time PyTorch's default.
"""

from __future__ import annotations

import json
import os
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags
from bench_common import (
    IDLE_RULE,
    RoundMonitor,
    available_cpus,
    define_int_list,
    define_shared,
    not_idle_note,
    refuse,
    side_by_side,
)

from la_iprop.attribution.attack import probability_gradients
from la_iprop.attribution.la import avoid_label, local_attribution
from la_iprop.metrics import evaluate, get_protocol
from la_iprop.models import load_model

# Read by the OpenMP runtime when torch is first imported (see the module docstring).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

ROOT = pathlib.Path(__file__).resolve().parents[1]
LA1000 = pathlib.Path(os.environ.get("LA_IPROP_SHARED", ROOT.parent / "shared")) / "data" / "la1000"


PARTS = ("lite0", "la", "metric")
# The flags this subcommand reads (scripts/benchmark.py refuses the other subcommands' flags with it).
FLAG_NAMES = ("threads", "parts", "lite0_batch", "la_batch", "metric_images", "metric_chunk", "spatial_range",
              "max_iter", "sampling_times", "run_chunk", "repeats", "size")


def define_flags() -> None:
    flags.DEFINE_integer("threads", 2, "vs-torch: torch.set_num_threads.", lower_bound=1)
    flags.DEFINE_list("parts", list(PARTS), f"vs-torch: the parts to time, comma separated ({', '.join(PARTS)}).")
    flags.register_validator("parts", lambda parts: set(parts) <= set(PARTS),
                             f"--parts: each part one of {', '.join(PARTS)}")
    define_int_list("lite0_batch", None, "vs-torch: Lite0 batch sizes, comma separated (default 1,8,48; --quick: 1,2).")
    define_int_list("la_batch", None, "vs-torch: LA batch sizes, comma separated (default 1,8; --quick: 1).")
    flags.DEFINE_integer("metric_images", None, "vs-torch: maps evaluated at once (default 8; --quick: 2).")
    flags.DEFINE_integer("metric_chunk", None, "vs-torch: our metric's chunk_size (default: its default).")
    define_shared("spatial_range", "max_iter", "sampling_times", "run_chunk", "repeats", "size")


# ----------------------------------------------------------------------------- helpers
def _images(n: int, size: int) -> np.ndarray:
    from PIL import Image
    out = []
    for i in range(n):
        image = np.asarray(Image.open(LA1000 / "images" / f"{i}.png").convert("RGB"), np.float32) / 255.0
        out.append(image[:size, :size])
    return np.stack(out)


class _Preprocessed:
    """Lite0's input transform in front of the PyTorch network, so both sides take [0, 1] NCHW images."""

    def __init__(self, net):
        self.net = net

    def __call__(self, x):
        return self.net((x * 255.0 - 127.0) / 128.0)

    def parameters(self):
        return self.net.parameters()

    def zero_grad(self):
        self.net.zero_grad()


def _torch_lite0(torch):
    from efficientnet_lite_pytorch import EfficientNet

    from la_iprop.models.zoo import EMBEDDED_LITE0_CHECKPOINT
    net = EfficientNet.from_name("efficientnet-lite0")
    net.load_state_dict(torch.load(EMBEDDED_LITE0_CHECKPOINT(), weights_only=True))
    return _Preprocessed(net.eval())


def _nchw(torch, images: np.ndarray):
    return torch.from_numpy(np.ascontiguousarray(np.transpose(images, (0, 3, 1, 2))))


# ----------------------------------------------------------------------------- the official loops
def official_la(torch, model, x0, targets, *, spatial_range: float, max_iter: int):
    """LA as the official loop computes it (our transcription): ``x0`` NCHW batch, ``targets``
    [K-1] classes shared by the batch (already moved off the predicted class per image)."""
    softmax = torch.nn.functional.softmax
    with torch.no_grad():
        label = model(x0).argmax(-1)
    eps = x0 / spatial_range
    total = torch.zeros_like(x0)
    rows = torch.arange(x0.shape[0])

    def walk(target):
        acc = torch.zeros_like(x0)
        x = x0.clone()
        for _ in range(max_iter):
            x = x.detach().requires_grad_(True)
            probs = softmax(model(x), dim=-1)
            if target is not None:
                model.zero_grad()
                probs[rows, target[rows]].sum().backward(retain_graph=True)   # weight grads too
                move = x.grad.detach().clone()
                x.grad.zero_()
            model.zero_grad()
            probs[rows, label].sum().backward()
            g_label = x.grad.detach().clone()
            if target is None:
                move = -g_label
            with torch.no_grad():
                x = torch.clamp(x0 + eps * move.sign(), 0.0, 1.0)
                acc -= g_label * (x - x0)
        return acc

    for target in targets:
        total += walk(target)
    total += walk(None)
    return total


def official_insertion_deletion(torch, model, images, maps, *, step: int) -> dict:
    """The official evaluation loop (our transcription): scores [steps + 1, B] per game."""
    n, channels, height, width = images.shape
    units = channels * height * width
    with torch.no_grad():
        top = torch.softmax(model(images), -1).argmax(-1).numpy()
        order = np.flip(np.argsort(maps.reshape(n, units), axis=1), axis=-1)
        steps = -(-height * width // (step // channels))
        out = {}
        for game in ("del", "ins"):
            start = images.clone() if game == "del" else torch.zeros_like(images)
            finish = torch.zeros_like(images) if game == "del" else images.clone()
            flat_start, flat_finish = start.numpy().reshape(n, units), finish.numpy().reshape(n, units)
            scores = np.empty((steps + 1, n))
            for i in range(steps + 1):
                probs = torch.softmax(model(start), -1).numpy()
                scores[i] = probs[np.arange(n), top]
                if i < steps:
                    coords = order[:, step * i:step * (i + 1)]
                    for r in range(n):
                        flat_start[r, coords[r]] = flat_finish[r, coords[r]]
            out[game] = scores
    return out


# ----------------------------------------------------------------------------- parts
@jax.jit
def _forward(model, images):
    return model(images)


@jax.jit
def _forward_vjp(model, images, classes):
    return jax.vmap(lambda x, c: probability_gradients(model, x, c)[1])(images, classes)


def _lite0_row(torch, model, tmodel, images, repeats, monitor) -> dict:
    batch = images.shape[0]
    x = jnp.asarray(images)
    classes = jnp.tile(jnp.array([[3, 7]], jnp.int32), (batch, 1))
    xt = _nchw(torch, images)

    def torch_forward():
        with torch.no_grad():
            return tmodel(xt)

    def torch_vjp():
        a = xt.clone().requires_grad_(True)
        probs = torch.softmax(tmodel(a), -1)
        ga, = torch.autograd.grad(probs[:, 3].sum(), a, retain_graph=True)
        gb, = torch.autograd.grad(probs[:, 7].sum(), a)
        return ga, gb

    for p in tmodel.parameters():
        p.requires_grad_(False)           # input-only VJP on both sides
    t, load = side_by_side({"ours_forward": lambda: jax.block_until_ready(_forward(model, x)),
                             "torch_forward": torch_forward,
                             "ours_vjp": lambda: jax.block_until_ready(_forward_vjp(model, x, classes)),
                             "torch_vjp": torch_vjp}, repeats, monitor)
    for p in tmodel.parameters():
        p.requires_grad_(True)
    with torch.no_grad():
        logit_diff = float(np.abs(np.asarray(_forward(model, x)) - tmodel(xt).numpy()).max())
    row = {"batch": batch, **{f"{k}_ms": 1e3 * v for k, v in t.items()},
           "forward_speedup": t["torch_forward"] / t["ours_forward"],
           "vjp_speedup": t["torch_vjp"] / t["ours_vjp"], "max_abs_logit_diff": logit_diff, "load": load}
    print(f"lite0 batch={batch:3d}: forward ours {row['ours_forward_ms']:.0f} ms, torch "
          f"{row['torch_forward_ms']:.0f} ms (x{row['forward_speedup']:.2f}); forward+2-cotangent input VJP ours "
          f"{row['ours_vjp_ms']:.0f} ms, torch {row['torch_vjp_ms']:.0f} ms (x{row['vjp_speedup']:.2f})"
          f"{not_idle_note(load)}", flush=True)
    return row


def _lite0_part(torch, model, tmodel, size, batches, repeats, monitor) -> list[dict]:
    return [_lite0_row(torch, model, tmodel, np.concatenate([_images(min(b, 8), size)] * -(-b // 8))[:b], repeats,
                       monitor) for b in batches]


def _la_row(torch, model, tmodel, images, draw, settings, run_chunk, repeats, monitor) -> dict:
    batch, k = images.shape[0], settings["sampling_times"]
    x = jnp.asarray(images)
    labels = np.asarray(_forward(model, x)).argmax(-1)
    # One class list for the batch (as the official loop); moved off each image's label.
    targets = np.asarray(avoid_label(jnp.asarray(np.tile(draw[:-1], (batch, 1)), jnp.int32),
                                     jnp.asarray(labels)[:, None], 1000))
    xt = _nchw(torch, images)
    t_targets = [torch.from_numpy(targets[:, i].astype(np.int64)) for i in range(k - 1)]

    def ours():
        return jax.block_until_ready(local_attribution(
            model, x, None, target_classes=targets, spatial_range=settings["spatial_range"],
            max_iter=settings["max_iter"], sampling_times=k, run_chunk=run_chunk))

    def theirs():
        return official_la(torch, tmodel, xt, t_targets, spatial_range=settings["spatial_range"],
                           max_iter=settings["max_iter"])

    t, load = side_by_side({"ours": ours, "official": theirs}, repeats, monitor,
                            warm=("ours",))  # the loop compiles nothing
    a = np.asarray(ours()).reshape(batch, -1)
    b = np.transpose(theirs().numpy(), (0, 2, 3, 1)).reshape(batch, -1)
    corr = float(np.mean([np.corrcoef(a[i], b[i])[0, 1] for i in range(batch)]))
    row = {"batch": batch, "ours_s_per_image": t["ours"] / batch, "official_s_per_image": t["official"] / batch,
           "speedup": t["official"] / t["ours"], "map_correlation_ours_vs_official": corr, "load": load}
    print(f"la batch={batch}: ours {row['ours_s_per_image']:.2f} s/image, official loop "
          f"{row['official_s_per_image']:.2f} s/image (x{row['speedup']:.2f}); map correlation {corr:.4f}"
          f"{not_idle_note(load)}", flush=True)
    return row


def _la_part(torch, model, tmodel, size, batches, settings, run_chunk, repeats, monitor) -> list[dict]:
    draw = np.random.default_rng(3407).choice(1000, settings["sampling_times"], replace=False)
    return [_la_row(torch, model, tmodel, _images(b, size), draw, settings, run_chunk, repeats, monitor)
            for b in batches]


def _metric_part(torch, model, tmodel, size, n, chunk, repeats, monitor) -> dict:
    images = _images(n, size)
    maps = np.random.default_rng(0).normal(size=images.shape).astype(np.float32)
    protocol = get_protocol("la", step=3 * size)
    forwards = 2 * (protocol.num_steps(size, size) + 1)
    chunk = chunk or (8 if jax.default_backend() == "cpu" else 64)   # evaluate()'s default when None
    x, xt = jnp.asarray(images), _nchw(torch, images)
    maps_t = np.transpose(maps, (0, 3, 1, 2))
    batch = jnp.asarray(np.concatenate([images] * -(-chunk // n))[:chunk])

    def ours():
        return evaluate(model, x, maps, protocol=protocol, chunk_size=chunk)

    def theirs():
        return official_insertion_deletion(torch, tmodel, xt.clone(), maps_t, step=3 * size)

    with torch.no_grad():
        t, load = side_by_side({"ours": ours, "official": theirs,
                                 "ours_forward_chunk": lambda: jax.block_until_ready(_forward(model, batch))},
                                repeats, monitor, warm=("ours", "ours_forward_chunk"))
    ours_res, official = ours(), theirs()
    curve_diff = max(float(np.abs(ours_res.deletion_curves - official["del"].T).max()),
                     float(np.abs(ours_res.insertion_curves - official["ins"].T).max()))
    forward_per_image = t["ours_forward_chunk"] / chunk
    row = {"images": n, "chunk_size": chunk, "forwards_per_image": forwards,
           "ours_s_per_image": t["ours"] / n, "official_s_per_image": t["official"] / n,
           "speedup": t["official"] / t["ours"], "ours_forward_ms_per_image_at_chunk": 1e3 * forward_per_image,
           "efficiency_vs_bare_forwards": forwards * forward_per_image / (t["ours"] / n),
           "max_abs_curve_diff_vs_official": curve_diff, "load": load}
    print(f"metric ({n} maps, batch {n}): ours {row['ours_s_per_image']:.2f} s/image (chunk {chunk}), official loop "
          f"{row['official_s_per_image']:.2f} s/image (x{row['speedup']:.2f}); our efficiency vs bare forwards "
          f"{row['efficiency_vs_bare_forwards']:.2f} ({forwards} forwards at "
          f"{row['ours_forward_ms_per_image_at_chunk']:.1f} ms/image); max curve diff {curve_diff:.1e}"
          f"{not_idle_note(load)}", flush=True)
    return row


def _summary(monitor: RoundMonitor, own_load: float) -> dict:
    """The whole run's load verdict, printed last."""
    total = monitor.summary()
    verdict = {"idle": total["idle"], "not_idle_rounds": total["not_idle_rounds"], "rounds": len(monitor.rounds),
               "own_expected_load": own_load, "rule": IDLE_RULE}
    if total["idle"]:
        print(f"vs-torch: the machine was idle in all {len(monitor.rounds)} timed rounds (load recorded in the "
              f"JSON): these figures may go into the README's and docs' tables", flush=True)
    else:
        print(f"vs-torch: the machine was NOT IDLE in {total['not_idle_rounds']} of {len(monitor.rounds)} timed "
              f"rounds (lines marked [NOT IDLE]): a figure taken under load must not go into the README's or "
              f"docs' tables; rerun on an idle machine", flush=True)
    return verdict


def run(args) -> dict:
    if args.size is not None and len(args.size) != 1:
        refuse(f"--size: vs-torch takes one image side, got {','.join(map(str, args.size))}")
    try:
        import efficientnet_lite_pytorch  # noqa: F401
        import torch
    except ModuleNotFoundError as err:
        message = f"skipped: {err.name} is not installed (pip install -r requirements-test.txt)"
        print(f"vs-torch {message}", flush=True)
        return {"skipped": message}
    torch.set_num_threads(args.threads)
    quick = args.quick
    size = args.size[0] if args.size else (64 if quick else 224)
    repeats = args.repeats or (1 if quick else 3)
    settings = {"spatial_range": args.spatial_range, "max_iter": args.max_iter or (2 if quick else 10),
                "sampling_times": args.sampling_times or (2 if quick else 6)}
    # While a round runs, XLA:CPU keeps every core this process may use busy, PyTorch its threads.
    own_load = float(max(available_cpus(), args.threads))
    monitor = RoundMonitor(own_load)
    model, tmodel = load_model("efficientnet_lite0"), _torch_lite0(torch)
    out = {"torch": torch.__version__, "torch_threads": torch.get_num_threads(),
           "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"), "image_size": size,
           "repeats": repeats, "load_average_1min_start": os.getloadavg()[0]}
    if "lite0" in args.parts:
        out["lite0"] = _lite0_part(torch, model, tmodel, size, args.lite0_batch or ([1, 2] if quick else [1, 8, 48]),
                                   repeats, monitor)
    if "la" in args.parts:
        out["la"] = {**settings, "run_chunk": args.run_chunk,
                     "rows": _la_part(torch, model, tmodel, size, args.la_batch or ([1] if quick else [1, 8]),
                                      settings, args.run_chunk, repeats, monitor)}
    if "metric" in args.parts:
        out["metric"] = _metric_part(torch, model, tmodel, size, args.metric_images or (2 if quick else 8),
                                     args.metric_chunk, repeats, monitor)
    out["load_average_1min_end"] = os.getloadavg()[0]
    out["machine_idle"] = _summary(monitor, own_load)
    return json.loads(json.dumps(out, default=float))
