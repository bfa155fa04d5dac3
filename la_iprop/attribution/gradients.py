"""Plain gradient methods: saliency map (``sm``), SmoothGrad (``sg``), Fast IG (``fig``).

Every method explains the class passed in ``labels`` (the experiments pass the
prediction on the clean image; None means that prediction). Unless a docstring says
otherwise the differentiated quantity is the softmax probability of that class,
``p_y(x) = softmax(logit_fn(x))_y``, as in the official LA code (its baselines run on
``Sequential(normalise, model, Softmax)``).

Also home of two helpers the path methods share: :func:`probability_grad` and
:func:`chunked_sum` (sum of per-sample terms evaluated ``chunk`` samples at a time, so
memory stays bounded however many samples a method takes).
"""

from __future__ import annotations

import functools
from typing import Callable

import jax
import jax.numpy as jnp
from jax import lax

from la_iprop.attribution.base import class_probability, prepare_inputs, register_method, split_per_image
from la_iprop.checks import check_int_at_least, check_nonnegative
from la_iprop.precision import random_normal

__all__ = ["sm", "sg", "fig", "probability_grad", "log_probability_grad", "chunked_sum", "resolve_chunk"]


def probability_grad(logit_fn: Callable, image: jax.Array, label: jax.Array) -> jax.Array:
    """``grad_x p_y(x)`` for ONE image (HWC)."""
    return jax.grad(class_probability, argnums=1)(logit_fn, image, label)


def _log_probability(logit_fn: Callable, image: jax.Array, label: jax.Array) -> jax.Array:
    return jax.nn.log_softmax(logit_fn(image[None])[0])[label]


def log_probability_grad(logit_fn: Callable, image: jax.Array, label: jax.Array) -> jax.Array:
    """``grad_x log p_y(x)`` (= minus the cross-entropy gradient) for ONE image."""
    return jax.grad(_log_probability, argnums=1)(logit_fn, image, label)


def resolve_chunk(name: str, chunk: int | None) -> int:
    """A method's samples-per-model-call setting; None picks one for the backend.

    On XLA:CPU one path point / noise sample per image per call is fastest (Lite0, 8
    images, 8 IG steps on a 2-core CPU: chunk 1 10.4 s, chunk 4 11.3 s, chunk 8 12.2 s;
    bigger model batches lose cache locality); accelerators want wide calls, so 10 there.
    """
    if chunk is None:
        return 1 if jax.default_backend() == "cpu" else 10
    check_int_at_least(name, chunk, 1)
    return chunk


def chunked_sum(fn: Callable[[jax.Array], jax.Array], num: int, chunk: int) -> jax.Array:
    """``sum_{i < num} fn(i)``, evaluating ``chunk`` indices per call.

    ``fn`` maps an int32 index vector ``[c]`` to per-index terms ``[c, ...]`` (it is
    usually a ``vmap``, so the model sees ``c`` inputs at once). Full chunks run in a
    ``lax.scan`` (a single one as a plain call); a last partial chunk (``num % chunk`` indices) runs once after it,
    so exactly ``num`` terms are evaluated.
    """
    chunk = min(chunk, num)
    full, rest = divmod(num, chunk)
    shape = jax.eval_shape(fn, jnp.zeros((chunk,), jnp.int32))
    if full == 1:  # one full chunk: a plain call, no one-iteration scan around the model
        total = jnp.sum(fn(jnp.arange(chunk, dtype=jnp.int32)), axis=0)
    else:
        def body(acc, start):
            return acc + jnp.sum(fn(start + jnp.arange(chunk, dtype=jnp.int32)), axis=0), None

        total, _ = lax.scan(body, jnp.zeros(shape.shape[1:], shape.dtype), jnp.arange(full, dtype=jnp.int32) * chunk)
    if rest:
        total = total + jnp.sum(fn(full * chunk + jnp.arange(rest, dtype=jnp.int32)), axis=0)
    return total


# ----------------------------------------------------------------------------- sm
@jax.jit
def _sm_core(logit_fn, images, labels):
    return jnp.abs(jax.vmap(probability_grad, (None, 0, 0))(logit_fn, images, labels))


@register_method("sm", description="Saliency map: |grad p_y(x)| (Captum Saliency(abs=True))", quick={})
def sm(logit_fn: Callable, images, labels=None, *, key=None) -> jax.Array:
    """Saliency map ``|grad_x p_y(x)|`` (Simonyan et al. 2014; Captum ``Saliency(abs=True)``).

    ``y`` = ``labels`` (the class explained; None: the prediction). One gradient per
    image; ``key`` is unused (deterministic).
    """
    logit_fn, images, labels, _ = prepare_inputs(logit_fn, images, labels, key=key)
    return _sm_core(logit_fn, images, labels)


# ----------------------------------------------------------------------------- sg
@functools.partial(jax.jit, static_argnames=("samples", "std", "sample_chunk"))
def _sg_core(logit_fn, images, labels, keys, *, samples, std, sample_chunk):
    def one(image, label, key):
        def grads(idx):
            def grad_at(i):
                # fold_in(i): sample i's noise does not depend on the chunking.
                noise = std * random_normal(jax.random.fold_in(key, i), image.shape, image.dtype)
                return probability_grad(logit_fn, image + noise, label)
            return jax.vmap(grad_at)(idx)
        return chunked_sum(grads, samples, sample_chunk) / samples
    return jax.vmap(one)(images, labels, keys)


@register_method("sg", description="SmoothGrad: mean grad p_y over Gaussian-noised copies (std 0.15, 50 samples)",
                 quick={"samples": 8})
def sg(logit_fn: Callable, images, labels=None, *, key, samples: int = 50, std: float = 0.15,
       sample_chunk: int | None = None) -> jax.Array:
    """SmoothGrad (Smilkov et al. 2017): ``(1/n) sum_i grad_x p_y(x + e_i)``, ``e_i ~ N(0, std^2 I)``.

    ``y`` = ``labels`` (the class explained). Signed mean gradient, as Captum's
    ``NoiseTunnel(Saliency)`` with ``abs=False`` in the official LA code; ``std`` is in
    [0, 1] pixel units and noisy inputs are not clipped (as there). Noise comes from
    ``key`` (one key per image by position, one per sample by index), so results do
    not depend on the batch or on ``sample_chunk`` (samples per model call, per image;
    None: see :func:`resolve_chunk`).
    ``std=0`` gives the plain signed gradient. Model evaluations per image: ``samples``.
    """
    check_int_at_least("samples", samples, 1)
    check_nonnegative("std", std)
    sample_chunk = resolve_chunk("sample_chunk", sample_chunk)
    logit_fn, images, labels, key = prepare_inputs(logit_fn, images, labels, key=key, need_key=True)
    keys = split_per_image(key, images.shape[0])
    return _sg_core(logit_fn, images, labels, keys, samples=samples, std=float(std), sample_chunk=sample_chunk)


# ----------------------------------------------------------------------------- fig
@jax.jit
def _fig_core(logit_fn, images, labels):
    return images * jax.vmap(log_probability_grad, (None, 0, 0))(logit_fn, images, labels)


@register_method("fig", description="Fast IG: x * grad log p_y(x) (negated cross-entropy gradient)", quick={})
def fig(logit_fn: Callable, images, labels=None, *, key=None) -> jax.Array:
    """Fast IG (Hesse et al. 2021): input x gradient, ``x * grad_x log p_y(x)``.

    ``y`` = ``labels`` (the class explained). The official LA code returns
    ``x * grad CE(model(x), y)`` (on its softmax outputs), where *smaller* means more
    important; we negate it so that larger = more important, and differentiate
    ``log p_y = -CE``. Per image this is ``x * grad p_y / p_y``: a positive rescaling of
    ``x * grad p_y``, so rankings (insertion/deletion) are those of input x gradient on
    the probability. One gradient per image; ``key`` is unused.
    """
    logit_fn, images, labels, _ = prepare_inputs(logit_fn, images, labels, key=key)
    return _fig_core(logit_fn, images, labels)
