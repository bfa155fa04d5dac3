"""Insertion and deletion games (Petsiuk et al. 2018), vectorised, with an explicit protocol.

For one image ``x``, attribution map ``a`` and explained class ``y``, the attribution
units (elements or pixels) are ranked by descending score, and for ``k = 0 .. steps``
the first ``min(k * step, units)`` units are changed:

    deletion:  x_k = where(rank < k*step, deletion_substrate, x)     (start: x)
    insertion: x_k = where(rank < k*step, x, insertion_substrate)    (start: substrate)

The curve is ``c_k = score_y(x_k)`` (softmax probability or logit), and its AUC is the
normalised trapezoid rule ``(sum(c) - c[0]/2 - c[-1]/2) / (len(c) - 1)``.

Ties in the ranking are broken by ascending flat index of the map in HWC order (a
stable descending sort), so for a per-pixel map broadcast to 3 channels the channels
of one pixel are always changed together, in R, G, B order.

Vectorisation: ranks are computed once per image (a vmapped argsort). The
``B * 2 * (steps + 1)`` perturbed images (image x game x step) are enumerated by one
flat index; ``lax.map`` walks over chunks of ``chunk_size`` indices, a vmapped builder
forms each chunk's images from ``rank < threshold`` masks, and the classifier scores the
chunk in one forward pass. Memory is bounded by ``chunk_size`` perturbed images plus the
inputs and their ranks, whatever the batch; every forward sees exactly ``chunk_size``
images (the last chunk is padded with repeats), so a score does not depend on what else
is in the batch.

Progress: ``evaluate(..., progress=fn)`` compiles a host callback (``jax.debug.callback``) into
the ``lax.map`` body that reports each scored chunk: ``fn(count, total)``, ``count`` the perturbed
images of the chunk (padding excluded, so the counts sum to ``total = B * 2 * (steps + 1)``). The
callback only reads the chunk's scores (a data dependency, so it fires after they are computed);
it computes nothing, and the scores are bit-identical with and without it. Without ``progress``
(the default) no callback is compiled: the program is the one without the feature. (JAX does not
write programs with host callbacks to its persistent compilation cache, so with ``progress`` the
games compile once per process.)
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import logging
import threading
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from la_iprop.attribution.base import as_pytree_fn, check_logits, model_label
from la_iprop.checks import (
    check_choice,
    check_finite,
    check_images,
    check_int_at_least,
    check_labels,
    check_like,
    check_positive,
)
from la_iprop.precision import cast_floats, with_precision

__all__ = ["Protocol", "PROTOCOLS", "GameResult", "get_protocol", "evaluate", "auc", "ranks",
           "gaussian_kernel1d", "gaussian_blur", "substrate_mean_color", "IMAGENET_MEAN"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)

SCORES = ("probability", "logit")
RANKINGS = ("element", "pixel")
SUBSTRATES = ("zeros", "mean", "blur")
BLUR_KERNELS = ("rise", "sampled")
BLUR_PADDINGS = ("mean", "zeros", "edge", "reflect")
TIE_BREAK = "stable descending sort: equal scores in ascending flat HWC index order"


# ----------------------------------------------------------------------------- protocol
@dataclasses.dataclass(frozen=True)
class Protocol:
    """Every choice of an insertion/deletion evaluation; recorded next to the results.

    Attributes:
      name: a label for the record ("la", "rise", or "<preset>(custom)" after overrides).
      score: "probability" (softmax of the logits) or "logit", of the explained class.
      ranking: "element" ranks all H*W*3 map entries; "pixel" ranks pixels by the map
        summed over channels and changes the 3 channels of a pixel together.
      step: ranking units (elements or pixels) changed per step.
      steps: number of steps (curve length ``steps + 1``); None: ``ceil(units / step)``,
        i.e. just enough to change every unit.
      insertion_substrate / deletion_substrate: what a changed unit shows in the
        insertion start / deletion end: "zeros" (black in [0, 1] space), "mean" (the
        mean colour, i.e. zero in the classifier's normalised space, see
        :func:`substrate_mean_color`) or "blur" (the image blurred by a Gaussian).
      blur_size, blur_sigma: Gaussian blur window (odd) and standard deviation in pixels.
      blur_kernel: "rise" (RISE's ``gkern``: a unit impulse in the window smoothed by
        ``scipy.ndimage.gaussian_filter``, i.e. the Gaussian truncated at 4 sigma and
        folded back at the window edges by reflection) or "sampled" (the Gaussian sampled
        on the window, normalised to sum 1).
      blur_padding: border handling of the blur: "mean" (pad with the mean colour, which is
        RISE's zero padding in normalised space), "zeros" (black), "edge" (repeat the
        border pixel) or "reflect" (mirror without repeating the border pixel).
      mean_color: the RGB mean colour in [0, 1]; None: derived from the classifier at
        evaluation time (recorded in the result).
    """
    name: str = "custom"
    score: str = "probability"
    ranking: str = "element"
    step: int = 672
    steps: int | None = None
    insertion_substrate: str = "zeros"
    deletion_substrate: str = "zeros"
    blur_size: int = 11
    blur_sigma: float = 5.0
    blur_kernel: str = "rise"
    blur_padding: str = "mean"
    mean_color: tuple[float, float, float] | None = None

    def __post_init__(self):
        check_choice("protocol.score", self.score, SCORES)
        check_choice("protocol.ranking", self.ranking, RANKINGS)
        check_int_at_least("protocol.step", self.step, 1)
        if self.steps is not None:
            check_int_at_least("protocol.steps", self.steps, 1)
        check_choice("protocol.insertion_substrate", self.insertion_substrate, SUBSTRATES)
        check_choice("protocol.deletion_substrate", self.deletion_substrate, SUBSTRATES)
        check_int_at_least("protocol.blur_size", self.blur_size, 1)
        if self.blur_size % 2 != 1:
            raise ValueError(f"protocol.blur_size must be odd (a centred window), got {self.blur_size}")
        check_positive("protocol.blur_sigma", self.blur_sigma)
        check_choice("protocol.blur_kernel", self.blur_kernel, BLUR_KERNELS)
        check_choice("protocol.blur_padding", self.blur_padding, BLUR_PADDINGS)
        if self.mean_color is not None:
            color = tuple(float(c) for c in self.mean_color)
            if len(color) != 3 or not all(0.0 <= c <= 1.0 for c in color):
                raise ValueError(f"protocol.mean_color must be 3 values in [0, 1] (RGB), got {self.mean_color!r}")
            object.__setattr__(self, "mean_color", color)

    @property
    def uses_blur(self) -> bool:
        return "blur" in (self.insertion_substrate, self.deletion_substrate)

    @property
    def uses_mean_color(self) -> bool:
        return "mean" in (self.insertion_substrate, self.deletion_substrate) or (
            self.uses_blur and self.blur_padding == "mean")

    def num_units(self, height: int, width: int, channels: int = 3) -> int:
        return height * width * (channels if self.ranking == "element" else 1)

    def num_steps(self, height: int, width: int, channels: int = 3) -> int:
        if self.steps is not None:
            return self.steps
        return -(-self.num_units(height, width, channels) // self.step)

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["mean_color"] = None if self.mean_color is None else list(self.mean_color)
        return out


PROTOCOLS: dict[str, Protocol] = {
    # The official LA/MFABA evaluation: 3*224 elements per step over all H*W*3 entries,
    # 224 steps at 224x224, black substrate for both games, probability of the class.
    "la": Protocol(name="la", score="probability", ranking="element", step=3 * 224,
                   insertion_substrate="zeros", deletion_substrate="zeros"),
    # RISE (Petsiuk et al. 2018): pixels by channel-summed map, 224 per step; insertion
    # starts from a Gaussian blur (11, sigma 5), deletion ends at the mean colour.
    "rise": Protocol(name="rise", score="probability", ranking="pixel", step=224,
                     insertion_substrate="blur", deletion_substrate="mean",
                     blur_size=11, blur_sigma=5.0, blur_kernel="rise", blur_padding="mean"),
}


def get_protocol(protocol: str | Protocol = "la", **overrides) -> Protocol:
    """A preset by name (or a Protocol as is), with fields replaced by ``overrides``."""
    if isinstance(protocol, Protocol):
        base = protocol
    elif isinstance(protocol, str):
        if protocol not in PROTOCOLS:
            raise ValueError(f"unknown protocol {protocol!r}; presets: {', '.join(sorted(PROTOCOLS))} "
                             "(or pass a Protocol)")
        base = PROTOCOLS[protocol]
    else:
        raise TypeError(f"protocol must be a preset name or a Protocol, got {type(protocol).__name__}")
    if not overrides:
        return base
    fields = {f.name for f in dataclasses.fields(Protocol)}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise TypeError(f"unknown protocol fields {unknown}; fields: {sorted(fields)}")
    changed = dataclasses.replace(base, **overrides)
    if changed != base and "name" not in overrides:
        changed = dataclasses.replace(changed, name=f"{base.name}(custom)")
    return changed


# ----------------------------------------------------------------------------- pieces
def auc(curves: Any) -> Any:
    """Normalised trapezoid AUC along the last axis: ``(sum(c) - c[0]/2 - c[-1]/2) / (n - 1)``."""
    c = curves
    return (c.sum(-1) - c[..., 0] / 2 - c[..., -1] / 2) / (c.shape[-1] - 1)


def ranks(attribution: jax.Array, ranking: str = "element") -> jax.Array:
    """Rank of each unit of ONE map (HWC) in descending order of score; 0 = changed first.

    "element": int32 [H, W, C]; "pixel": int32 [H, W, 1], ranked by the channel sum.
    Ties keep ascending flat (HWC) index order.
    """
    check_choice("ranking", ranking, RANKINGS)
    scores = attribution if ranking == "element" else attribution.sum(-1, keepdims=True)
    flat = scores.reshape(-1)
    order = jnp.argsort(flat, descending=True, stable=True)
    rank = jnp.zeros(flat.shape, jnp.int32).at[order].set(jnp.arange(flat.size, dtype=jnp.int32))
    return rank.reshape(scores.shape)


def gaussian_kernel1d(size: int, sigma: float, kind: str = "rise") -> np.ndarray:
    """1-D blur weights of length ``size`` summing to 1 (the 2-D kernel is their outer product).

    "sampled": ``exp(-t^2 / (2 sigma^2))`` for ``t = -size//2 .. size//2``, normalised.
    "rise": what RISE's ``gkern`` builds with ``scipy.ndimage.gaussian_filter`` on a unit
    impulse at the window centre: the Gaussian truncated at ``int(4 sigma + 0.5)`` and
    folded back into the window by half-sample-symmetric reflection at its edges. That
    filter is separable and so is the impulse, hence the 2-D kernel is an outer product.
    """
    check_int_at_least("size", size, 1)
    check_positive("sigma", sigma)
    check_choice("kind", kind, BLUR_KERNELS)
    centre = size // 2
    if kind == "sampled":
        t = np.arange(size) - centre
        w = np.exp(-0.5 * (t / sigma) ** 2)
        return w / w.sum()
    radius = int(4.0 * sigma + 0.5)
    offsets = np.arange(-radius, radius + 1)
    w = np.exp(-0.5 * (offsets / sigma) ** 2)
    w /= w.sum()
    # out[n] = sum_j w[j] * impulse[reflect(n + j)]; reflection has period 2 * size.
    src = np.mod(np.arange(size)[:, None] + offsets[None, :], 2 * size)
    src = np.where(src >= size, 2 * size - 1 - src, src)
    return (w[None, :] * (src == centre)).sum(1)


def gaussian_blur(image: jax.Array, *, size: int = 11, sigma: float = 5.0, kind: str = "rise",
                  padding: str = "mean", mean_color: Sequence[float] = IMAGENET_MEAN) -> jax.Array:
    """Separable Gaussian blur of ONE HWC image (two passes of ``size`` shifted, weighted copies).

    ``padding`` "mean"/"zeros" pads with a constant colour: since the kernel sums to 1 this
    is ``blur(x - c) + c`` with zero padding, exactly what RISE's ``conv2d(padding=size//2)``
    does in normalised space when ``c`` is the normalisation mean.
    """
    check_choice("padding", padding, BLUR_PADDINGS)
    k = gaussian_kernel1d(size, sigma, kind)
    r = size // 2
    if padding in ("mean", "zeros"):
        c = jnp.asarray(mean_color if padding == "mean" else (0.0, 0.0, 0.0), image.dtype)
        return _blur_padded(jnp.pad(image - c, ((r, r), (r, r), (0, 0))), k) + c
    return _blur_padded(jnp.pad(image, ((r, r), (r, r), (0, 0)), mode=padding), k)


def _blur_padded(padded: jax.Array, k: np.ndarray) -> jax.Array:
    size = len(k)
    h, w = padded.shape[0] - size + 1, padded.shape[1] - size + 1
    rows = sum(float(k[t]) * padded[t:t + h] for t in range(size))   # unrolled over the 11 taps
    return sum(float(k[t]) * rows[:, t:t + w] for t in range(size))


def substrate_mean_color(logit_fn: Callable) -> tuple[tuple[float, float, float], str]:
    """The RGB colour in [0, 1] the classifier sees as zero (the "mean" substrate) and its source.

    In order: ``logit_fn.normalization_mean`` if the model exposes it; else, when
    ``logit_fn.preprocess`` is affine per channel (``(x - m) / s``, ``(x*255 - 127) / 128``
    ...), its zero ``-p(0) / (p(1) - p(0))`` (127/255 for EfficientNet-Lite, the mean for
    ImageNet mean/std models); else the ImageNet mean.
    """
    exposed = getattr(logit_fn, "normalization_mean", None)
    if exposed is not None:
        return tuple(float(c) for c in np.asarray(exposed).reshape(3)), "model normalization_mean"
    preprocess = getattr(logit_fn, "preprocess", None)
    if callable(preprocess):
        probe = np.asarray([0.0, 0.25, 0.5, 1.0], np.float32)[:, None, None, None] * np.ones((1, 2, 2, 3), np.float32)
        try:
            out = np.asarray(preprocess(jnp.asarray(probe)), np.float64)
        except Exception:  # noqa: BLE001 - a preprocess that needs other shapes: not affine-probeable
            out = None
        if out is not None and out.shape == probe.shape:
            values = out[:, 0, 0, :]
            p0, p1 = values[0], values[-1]
            slope = p1 - p0
            predicted = p0 + np.asarray([0.0, 0.25, 0.5, 1.0])[:, None] * slope
            scale = np.max(np.abs(values)) + 1e-12
            if np.all(np.abs(slope) > 1e-9 * scale) and np.allclose(values, predicted, atol=1e-5 * scale):
                zero = -p0 / slope
                if np.all((zero >= 0.0) & (zero <= 1.0)):
                    return tuple(float(c) for c in zero), "zero of the model's affine preprocessing"
    return IMAGENET_MEAN, "ImageNet mean (default)"


# ----------------------------------------------------------------------------- result
@dataclasses.dataclass(frozen=True)
class GameResult:
    """Curves and AUCs of both games for a batch of images.

    ``insertion_auc`` / ``deletion_auc`` are the AUC of the mean curve over images, which
    equals the mean of the per-image AUCs (the AUC is linear in the curve).
    """
    insertion_curves: np.ndarray   # [B, steps + 1]
    deletion_curves: np.ndarray    # [B, steps + 1]
    labels: np.ndarray             # [B] the explained classes
    labels_source: str             # "predicted" (clean-image top-1) or "given"
    fractions: np.ndarray          # [steps + 1] fraction of units changed at each point
    protocol: Mapping[str, Any]    # Protocol.to_dict() with the resolved mean colour

    @property
    def insertion_aucs(self) -> np.ndarray:
        return auc(self.insertion_curves)

    @property
    def deletion_aucs(self) -> np.ndarray:
        return auc(self.deletion_curves)

    @property
    def insertion_auc(self) -> float:
        return float(auc(self.insertion_curves.mean(0)))

    @property
    def deletion_auc(self) -> float:
        return float(auc(self.deletion_curves.mean(0)))

    @property
    def ins_minus_del(self) -> float:
        """``insertion_auc - deletion_auc``; higher is better."""
        return self.insertion_auc - self.deletion_auc

    @property
    def dir(self) -> float:
        """``deletion_auc / insertion_auc`` (our deletion-insertion ratio); lower is better."""
        return self.deletion_auc / self.insertion_auc if self.insertion_auc != 0 else float("inf")

    @staticmethod
    def concatenate(results: Sequence["GameResult"]) -> "GameResult":
        """One result from several batches evaluated under the same protocol."""
        if not results:
            raise ValueError("results must hold at least one GameResult")
        first = results[0]
        for r in results[1:]:
            if dict(r.protocol) != dict(first.protocol) or r.fractions.shape != first.fractions.shape:
                raise ValueError("results must share one protocol and curve length to be concatenated")
        sources = {r.labels_source for r in results}
        return GameResult(np.concatenate([r.insertion_curves for r in results]),
                          np.concatenate([r.deletion_curves for r in results]),
                          np.concatenate([r.labels for r in results]),
                          sources.pop() if len(sources) == 1 else "mixed",
                          first.fractions, first.protocol)

    def to_dict(self, curves: bool = False) -> dict[str, Any]:
        """JSON-ready figures with the protocol recorded next to them."""
        out = {"protocol": dict(self.protocol), "num_images": int(self.labels.shape[0]),
               "labels_source": self.labels_source, "labels": self.labels.tolist(),
               "insertion_auc": self.insertion_auc, "deletion_auc": self.deletion_auc,
               "ins_minus_del": self.ins_minus_del, "dir": self.dir,
               "insertion_aucs": self.insertion_aucs.tolist(), "deletion_aucs": self.deletion_aucs.tolist()}
        if curves:
            out["fractions"] = self.fractions.tolist()
            out["insertion_curve_mean"] = self.insertion_curves.mean(0).tolist()
            out["deletion_curve_mean"] = self.deletion_curves.mean(0).tolist()
            out["insertion_curves"] = self.insertion_curves.tolist()
            out["deletion_curves"] = self.deletion_curves.tolist()
        return out


# ----------------------------------------------------------------------------- evaluation
@with_precision
def evaluate(logit_fn: Callable, images: Any, attributions: Any, *, protocol: str | Protocol = "la",
             labels: Any = None, chunk_size: int | None = None,
             progress: Callable[[int, int], Any] | None = None) -> GameResult:
    """Insertion and deletion curves of ``attributions`` (same shape as ``images``).

    Args:
      logit_fn: ``logits = logit_fn(images)`` on NHWC [0, 1] images.
      images: float [B, H, W, 3] in [0, 1].
      attributions: real [B, H, W, 3], finite; higher = more important.
      protocol: a preset name ("la", "rise") or a :class:`Protocol`.
      labels: the classes to score, [B] ints; None: the top-1 class on the clean image
        (the protocol of the LA and RISE papers).
      chunk_size: perturbed images per forward pass (bounds memory); None: 8 on CPU
        (fastest per image there), 64 on accelerators.
      progress: None (default), or ``fn(count, total)`` called on the host after each chunk is
        scored: ``count`` perturbed images just scored (their counts sum to ``total``, the
        ``B * 2 * (steps + 1)`` images of the call). It only reports (the scores are identical
        without it); an exception it raises is logged once and ignored.
      precision: "float32" (default; full float32 dots/convolutions on every backend), "float64"
        (the model, images, maps and scores in float64 with JAX's x64 mode scoped to the call) or
        "float32_fast" (the accelerator's TF32/bfloat16 mode); see :mod:`la_iprop.precision`.
    """
    proto = get_protocol(protocol)
    model = logit_fn   # before wrapping: its attributes tell the mean colour
    logit_fn = cast_floats(as_pytree_fn(logit_fn))
    images = check_images(images)
    given = attributions
    attributions = check_like(attributions, images, "attributions")
    if not (jnp.issubdtype(attributions.dtype, jnp.floating) or jnp.issubdtype(attributions.dtype, jnp.integer)):
        raise ValueError(f"attributions must be real numbers, got dtype {attributions.dtype}")
    check_finite(given if isinstance(given, np.ndarray) else attributions, "attributions",
                 "finite scores (higher = more important)")
    attributions = attributions.astype(images.dtype)
    check_finite(attributions, "attributions", f"scores that fit in {images.dtype} (the working float type)")
    num_classes = check_logits(logit_fn, images, model=model)   # [batch, num_classes] floating logits
    batch, height, width, channels = images.shape
    labels_source = "predicted" if labels is None else "given"
    if labels is not None:
        labels = check_labels(labels, batch, num_classes)
    if chunk_size is None:
        chunk_size = 8 if jax.default_backend() == "cpu" else 64
    check_int_at_least("chunk_size", chunk_size, 1)

    record = proto.to_dict()
    if proto.uses_mean_color:
        if proto.mean_color is None:
            color, source = substrate_mean_color(model)
            proto = dataclasses.replace(proto, mean_color=color)
        else:
            source = "protocol"
        record["mean_color"], record["mean_color_source"] = list(proto.mean_color), source
    else:
        proto = dataclasses.replace(proto, mean_color=None)   # unused: keep it out of the jit cache key
        record["mean_color"] = None
    record["tie_break"] = TIE_BREAK

    steps = proto.num_steps(height, width, channels)
    units = proto.num_units(height, width, channels)
    total = batch * 2 * (steps + 1)
    if progress is not None and not callable(progress):
        raise TypeError(f"progress must be None or a callable fn(count, total), got {type(progress).__name__}")
    with _progress_sink(progress, total, min(chunk_size, total)) as sink:
        curves, used = _play(logit_fn, images, attributions, labels, sink, protocol=proto,
                             chunk_size=min(chunk_size, total))
        curves = np.asarray(curves)   # waits for every chunk (and its callback) inside the sink's scope
    curves = np.asarray(curves, np.float64)
    if not np.isfinite(curves).all():
        rows = np.flatnonzero(~np.isfinite(curves).reshape(batch, -1).all(axis=1))
        raise ValueError(f"{model_label(model)} returned NaN or infinite logits in the insertion/deletion games of "
                         f"images {rows[:5].tolist()} (their curves are not finite); expected finite logits")
    fractions = np.minimum(np.arange(steps + 1) * proto.step, units) / units
    return GameResult(insertion_curves=curves[:, 0], deletion_curves=curves[:, 1],
                      labels=np.asarray(used), labels_source=labels_source, fractions=fractions, protocol=record)


# ----------------------------------------------------------------------------- progress
# The host callback compiled into _play is this module-level function (one compiled program for
# every call); the traced sink id routes each report to the ``progress`` of its evaluate call.
_SINKS: dict[int, tuple[Callable, int, int]] = {}
_SINK_IDS = itertools.count(1)
_SINK_LOCK = threading.Lock()
log = logging.getLogger(__name__)


class _progress_sink:
    """Registers ``progress`` for one evaluate call; yields its id (a traced int32) or None."""

    def __init__(self, progress: Callable | None, total: int, chunk: int):
        self.entry = None if progress is None else (progress, total, chunk)
        self.id = None

    def __enter__(self):
        if self.entry is None:
            return None
        with _SINK_LOCK:
            self.id = next(_SINK_IDS) % 2**31
            _SINKS[self.id] = self.entry
        return np.int32(self.id)

    def __exit__(self, *exc):
        if self.id is not None:
            with _SINK_LOCK:
                _SINKS.pop(self.id, None)
        return False


def _report_chunk(sink_id, first, _scores) -> None:
    with _SINK_LOCK:
        entry = _SINKS.get(int(sink_id))
    if entry is None:
        return
    progress, total, chunk = entry
    try:
        progress(int(min(chunk, total - int(first))), total)
    except Exception as err:  # noqa: BLE001 - a progress display must never stop an evaluation
        with _SINK_LOCK:
            if _SINKS.pop(int(sink_id), None) is not None:
                log.warning("insertion/deletion progress callback failed (%s: %s); not called again",
                            type(err).__name__, err)


def _chunked(fn: Callable, n: int, chunk: int) -> jax.Array:
    """``fn`` applied to the indices ``0 .. n-1`` in chunks of exactly ``chunk`` (last padded)."""
    n_chunks = -(-n // chunk)
    idx = jnp.minimum(jnp.arange(n_chunks * chunk, dtype=jnp.int32), n - 1).reshape(n_chunks, chunk)
    out = jax.lax.map(fn, idx)
    return out.reshape((n_chunks * chunk,) + out.shape[2:])[:n]


@functools.partial(jax.jit, static_argnames=("protocol", "chunk_size"))
def _play(logit_fn, images, attributions, labels, sink=None, *, protocol: Protocol, chunk_size: int):
    batch, height, width, channels = images.shape
    if labels is None:
        labels = _chunked(lambda i: jnp.argmax(logit_fn(images[i]), -1).astype(jnp.int32), batch, chunk_size)
    rank = jax.vmap(functools.partial(ranks, ranking=protocol.ranking))(attributions)
    points = protocol.num_steps(height, width, channels) + 1
    mean_color = jnp.asarray(protocol.mean_color if protocol.mean_color is not None else IMAGENET_MEAN,
                             images.dtype)
    if protocol.uses_blur:
        blur = functools.partial(gaussian_blur, size=protocol.blur_size, sigma=protocol.blur_sigma,
                                 kind=protocol.blur_kernel, padding=protocol.blur_padding,
                                 mean_color=mean_color)
        blurred = jax.vmap(blur)(images)   # once per image, not once per step

    def substrate(kind: str, b, x):
        if kind == "zeros":
            return jnp.zeros_like(x)
        if kind == "mean":
            return jnp.broadcast_to(mean_color, x.shape)
        return blurred[b]

    def perturbed(n):
        # flat index n -> (image b, game g: 0 insertion / 1 deletion, step k)
        b, g, k = n // (2 * points), (n // points) % 2, n % points
        x = images[b]
        changed = rank[b] < k * protocol.step
        start = jnp.where(g == 0, substrate(protocol.insertion_substrate, b, x), x)
        finish = jnp.where(g == 0, x, substrate(protocol.deletion_substrate, b, x))
        return jnp.where(changed, finish, start), b

    def score_chunk(ns):
        batch_images, b = jax.vmap(perturbed)(ns)
        logits = logit_fn(batch_images).astype(images.dtype)
        if protocol.score == "probability":
            logits = jax.nn.softmax(logits, axis=-1)
        scores = jnp.take_along_axis(logits, labels[b][:, None], axis=1)[:, 0]
        if sink is not None:  # reports the chunk once its scores exist; reads them, changes nothing
            jax.debug.callback(_report_chunk, sink, ns[0], scores)
        return scores

    scores = _chunked(score_chunk, batch * 2 * points, chunk_size)
    return scores.reshape(batch, 2, points), labels

