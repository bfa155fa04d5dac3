"""Classifier throughput: forward and input-gradient images/s for each registered model.

    python scripts/benchmark.py models --batch=8
    python scripts/benchmark.py models --random_weights          # no checkpoints needed

The input gradient is d logit_y / d images for one class per image (what attribution
methods compute), differentiated with respect to the images only. Each function is
jit-compiled once (compile time reported separately) and timed over ``--repeats`` calls;
wall-clock and process CPU time are both reported (on a shared machine the CPU-time
figure is the steadier one).

``--random_weights`` initialises every model with Flax's random initialisers instead of
loading weights: speed does not depend on the weight values, so this measures models
whose checkpoints are not at hand. It exists for benchmarking only; ``load_model``
never falls back to random weights. Without it, models whose weights are not found are
reported as skipped.
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
from absl import flags
from bench_common import block, define_shared, one_batch

from la_iprop.models import available_models, load_model
from la_iprop.models.zoo import ModelFn, imagenet_normalize

QUICK_MODELS = ["efficientnet_lite0", "resnet50"]


# The flags this subcommand reads (scripts/benchmark.py refuses the other subcommands' flags with it).
FLAG_NAMES = ("models", "batch", "repeats", "random_weights")


def define_flags() -> None:
    flags.DEFINE_list("models", None, "models: models to time, comma separated (default: all registered; --quick: "
                      f"{','.join(QUICK_MODELS)}).")
    flags.register_validator("models", lambda names: names is None or set(names) <= set(available_models()),
                             f"--models: each one of {', '.join(available_models())}")
    define_shared("batch", "repeats", "random_weights")


def random_model_fn(name: str, key: jax.Array) -> ModelFn:
    """A registered architecture with random weights, for timing only."""
    from la_iprop.models.efficientnet_lite import LITE_VARIANTS, EfficientNetLite, lite_preprocess

    size = 224
    if name in LITE_VARIANTS:  # Lite0/1/2: the same port, scaled (and a larger input for Lite1/2)
        variant = LITE_VARIANTS[name]
        module, preprocess = EfficientNetLite(width=variant.width, depth=variant.depth), lite_preprocess
        size = variant.input_size
    elif name == "resnet50":
        from la_iprop.models.resnet import ResNet50
        module, preprocess = ResNet50(), imagenet_normalize
    elif name == "vgg16":
        from la_iprop.models.vgg import VGG16
        module, preprocess = VGG16(), imagenet_normalize
    elif name == "inception_v3":
        from la_iprop.models.inception import InceptionV3, inception_preprocess
        module, preprocess = InceptionV3(), inception_preprocess
    elif name == "maxvit_t":
        from la_iprop.models.maxvit import MaxVitT
        module, preprocess = MaxVitT(), imagenet_normalize
    else:
        raise ValueError(f"no random initialisation for model {name!r}")
    variables = jax.jit(module.init)(key, jnp.zeros((1, size, size, 3), jnp.float32))
    return ModelFn(variables=variables, module=module, preprocess=preprocess, name=name, input_size=size)


@jax.jit
def _forward(model_fn, images):
    return model_fn(images)


@jax.jit
def _input_gradient(model_fn, images, labels):
    def total(x):
        return jnp.take_along_axis(model_fn(x), labels[:, None], axis=1).sum()
    return jax.grad(total)(images)


def _time(fn, repeats: int) -> dict:
    """Compile (first call) then the median wall and mean CPU seconds of ``repeats`` calls."""
    start = time.perf_counter()
    block(fn())
    compile_s = time.perf_counter() - start
    walls, cpus = [], []
    for _ in range(repeats):
        wall, cpu = time.perf_counter(), time.process_time()
        block(fn())
        walls.append(time.perf_counter() - wall)
        cpus.append(time.process_time() - cpu)
    walls.sort()
    return {"first_call_s": compile_s, "wall_s": walls[len(walls) // 2], "cpu_s": sum(cpus) / len(cpus)}


def run(args) -> dict:
    quick = getattr(args, "quick", False)
    models = args.models or (QUICK_MODELS if quick else available_models())
    batch = one_batch(args, 2 if quick else 8)
    repeats = args.repeats or (1 if quick else 3)
    key = jax.random.PRNGKey(0)
    results = {"batch": batch, "repeats": repeats, "random_weights": bool(args.random_weights), "models": {}}
    for name in models:
        if args.random_weights:
            model_fn = random_model_fn(name, key)
        else:
            try:
                model_fn = load_model(name)
            except FileNotFoundError as err:
                results["models"][name] = {"skipped": str(err)}
                print(f"{name}: skipped (no weights; --random_weights times it anyway)", flush=True)
                continue
        size = model_fn.input_size
        images = jax.random.uniform(jax.random.fold_in(key, 1), (batch, size, size, 3), jnp.float32)
        labels = jax.random.randint(jax.random.fold_in(key, 2), (batch,), 0, model_fn.num_classes)
        forward = _time(lambda: _forward(model_fn, images), repeats)  # noqa: B023 - called immediately
        gradient = _time(lambda: _input_gradient(model_fn, images, labels), repeats)  # noqa: B023
        entry = {}
        for kind, timing in (("forward", forward), ("gradient", gradient)):
            entry[f"{kind}_images_per_s"] = batch / timing["wall_s"]
            entry[f"{kind}_images_per_cpu_s"] = batch / timing["cpu_s"]
            entry[f"{kind}_ms"] = 1e3 * timing["wall_s"]
            entry[f"{kind}_first_call_s"] = timing["first_call_s"]
        results["models"][name] = entry
        print(f"{name}: forward {entry['forward_images_per_s']:.2f} img/s, "
              f"input gradient {entry['gradient_images_per_s']:.2f} img/s (batch {batch})", flush=True)
    return results
