"""Attribution methods: images/s at a batch size, and model evaluations per image.

Generic over the registry (``available_methods()``): each method runs with its
defaults, or with its registered ``quick`` settings under ``--quick``; ``--set=NAME.PARAM=VALUE``
overrides one hyperparameter (repeatable). Methods that need a reference set
(``needs_reference_set``) get ``--references`` images of the data source.

Model evaluations per image are *counted*, not declared: the benchmark runs the method
once more (on one image) with a classifier whose preprocessing reports, through a host
callback, how many images pass through it. An evaluation is one image through the
forward pass (and its backward pass when the method differentiates), so the counts
compare cost across methods: e.g. IG with 50 steps makes 50, DeepLIFT 2 (input and
reference). ``gradient_equivalents_per_image`` divides a method's time by that of one
batched input gradient of ``p_y`` at the same batch size, timed in the same run: a
cost figure that depends less on the load of a shared machine.
"""

from __future__ import annotations

import ast
import functools
import os
import pathlib
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags
from bench_common import define_shared, one_batch, refuse, time_call

from la_iprop.attribution import available_methods, get_method
from la_iprop.models import load_model

_LA1000 = pathlib.Path(__file__).resolve().parents[1].parent / "shared" / "data" / "la1000"


# The flags this subcommand reads (scripts/benchmark.py refuses the other subcommands' flags with it).
FLAG_NAMES = ("methods", "model", "batch", "data", "references", "repeats", "set", "no_count")


def define_flags() -> None:
    flags.DEFINE_list("methods", None, "methods: methods to time, comma separated (default: every registered).")
    define_shared("model", "batch", "repeats")
    flags.DEFINE_string("data", None, "methods: image source spec (default: la1000 from ../shared when present, "
                        "else 'samples').")
    flags.DEFINE_integer("references", 16, "methods: reference-set size for methods that need one.", lower_bound=0)
    flags.DEFINE_multi_string("set", [], "methods: NAME.PARAM=VALUE, override a hyperparameter of one method "
                              "(repeatable).")
    flags.DEFINE_bool("no_count", False, "methods: skip counting model evaluations.")


# ----------------------------------------------------------------------------- evaluation counter
_COUNT = {"images": 0}
_LOCK = threading.Lock()


def _tally(probe):
    with _LOCK:
        _COUNT["images"] += int(np.size(probe))
    return np.zeros(np.shape(probe), np.float32)


def _counting_preprocess(images, *, inner):
    # One value per image goes to the host, which counts it; the (zero) answer is added
    # to the images so the callback cannot be dropped, and gradients do not see it.
    probe = jax.lax.stop_gradient(images[..., 0, 0, 0])
    seen = jax.pure_callback(_tally, jax.ShapeDtypeStruct(probe.shape, jnp.float32), probe,
                             vmap_method="broadcast_all")
    return inner(images + jax.lax.stop_gradient(seen)[..., None, None, None])


def counting_model(model):
    """``model`` (a ModelFn) with an evaluation counter in its preprocessing."""
    return model.replace(preprocess=functools.partial(_counting_preprocess, inner=model.preprocess))


def count_evaluations(fn, model, images, labels, **kwargs) -> int:
    counted = counting_model(model)
    with _LOCK:
        _COUNT["images"] = 0
    jax.block_until_ready(fn(counted, images, labels, **kwargs))
    with _LOCK:
        return _COUNT["images"]


# ----------------------------------------------------------------------------- helpers
def _parse_overrides(items: list[str]) -> dict[str, dict]:
    out: dict[str, dict] = {}
    for item in items:
        name_param, sep, value = item.partition("=")
        name, dot, param = name_param.partition(".")
        if not (sep and dot and name and param):
            raise ValueError(f"--set expects NAME.PARAM=VALUE, got {item!r}")
        try:
            value = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            pass  # a plain string such as a rule name
        out.setdefault(name, {})[param] = value
    return out


def _load_images(spec: str | None, count: int, size: int) -> tuple[np.ndarray, str]:
    from la_iprop.data import open_source
    if spec is None:
        spec = f"la1000:{_LA1000}" if _LA1000.is_dir() else "samples"
    source = open_source(spec, size=size)
    indices = [i % len(source) for i in range(count)]
    return source.load(indices).images.astype(np.float32), spec


@jax.jit
def _predict(model, images):
    return jnp.argmax(model(images), axis=-1).astype(jnp.int32)


@jax.jit
def _gradient(model, images, labels):
    return jax.vmap(jax.grad(lambda im, y: jax.nn.softmax(model(im[None])[0])[y]))(images, labels)


def run(args) -> dict:
    names = args.methods or available_methods()
    try:
        overrides = _parse_overrides(args["set"].value)
    except ValueError as err:
        refuse(str(err))
    batch = one_batch(args, 8)
    repeats = args.repeats or 1
    model = load_model(args.model)
    size = getattr(model, "input_size", 224)
    pool, spec = _load_images(args.data, batch + args.references, size)
    images = jnp.asarray(pool[:batch])
    references = jnp.asarray(pool[batch:])
    labels = _predict(model, images)
    key = jax.random.PRNGKey(0)
    # One batched input gradient: the unit of cost ("gradient-equivalents" below).
    grad_seconds = time_call(lambda: _gradient(model, images, labels), repeats=3)
    print(f"methods reference: one gradient of p_y at batch {batch}: "
          f"{1e3 * grad_seconds / batch:.1f} ms/image", flush=True)
    rows = []
    for name in names:
        method = get_method(name)
        hparams = dict(method.quick) if args.quick else {}
        hparams.update(overrides.get(name, {}))
        kwargs = dict(hparams, key=key)
        if method.needs_reference_set:
            kwargs["reference_images"] = references
        call = functools.partial(method.fn, model, images, labels, **kwargs)
        start = time.perf_counter()
        jax.block_until_ready(call())
        first = time.perf_counter() - start
        seconds = time_call(call, repeats=repeats, warmup=0)
        evaluations = None
        if not args.no_count:
            evaluations = count_evaluations(method.fn, model, images[:1], labels[:1], **kwargs)
        row = {"method": name, "settings": "quick" if args.quick else "defaults", "hparams": hparams,
               "batch": batch, "seconds": seconds, "compile_and_first_call_s": first,
               "images_per_s": batch / seconds, "model_evaluations_per_image": evaluations,
               "gradient_equivalents_per_image": seconds / grad_seconds}
        rows.append(row)
        print(f"methods {name:10s} batch={batch}: {row['images_per_s']:8.3f} images/s "
              f"({seconds / batch:7.3f} s/image, {seconds / grad_seconds:6.1f} gradient-equivalents), "
              f"model evaluations/image: {evaluations}, "
              f"first call {first:.1f} s, hparams {hparams}", flush=True)
    return {"model": args.model, "data": spec, "backend": jax.default_backend(),
            "cpu_count": os.cpu_count(), "gradient_ms_per_image": 1e3 * grad_seconds / batch,
            "results": rows}
