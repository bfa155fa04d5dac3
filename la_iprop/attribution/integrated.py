"""Path-integral methods: Integrated Gradients (``ig``) and Expected Gradients (``eg``).

Both integrate ``grad_x p_y`` (softmax probability of the explained class ``y`` =
``labels``; the experiments pass the clean-image prediction) along straight lines from
a baseline ``b`` to the input ``x``:
``IG_b(x) = (x - b) * int_0^1 grad p_y(b + a (x - b)) da``, so that, by the gradient
theorem, ``sum(IG_b(x)) = p_y(x) - p_y(b)`` (completeness).
"""

from __future__ import annotations

import functools
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from la_iprop.attribution.base import prepare_inputs, register_method, split_per_image
from la_iprop.attribution.gradients import chunked_sum, probability_grad, resolve_chunk
from la_iprop.checks import check_choice, check_images, check_in_range, check_int_at_least
from la_iprop.precision import float_dtype, random_uniform

__all__ = ["ig", "eg", "quadrature", "RULES"]

RULES = ("riemann_trapezoid", "gauss_legendre", "riemann_left", "riemann_right", "riemann_middle")


def quadrature(rule: str, steps: int) -> tuple[np.ndarray, np.ndarray]:
    """Nodes ``a_k`` in [0, 1] and weights ``w_k`` with ``int_0^1 f ~ sum_k w_k f(a_k)``.

    - ``riemann_trapezoid``: ``a_k = k/(n-1)``, ``w = 1/(n-1)`` halved at both ends
      (needs ``n >= 2``; weights sum to 1. Captum's variant uses ``1/n`` and so sums to
      ``(n-1)/n``, a 1/n bias in completeness that we do not copy).
    - ``gauss_legendre``: Legendre nodes mapped from [-1, 1] to [0, 1] (Captum's
      default rule; exact for polynomials of degree ``2n-1``).
    - ``riemann_left`` / ``right`` / ``middle``: ``w = 1/n`` at ``k/n``, ``(k+1)/n``,
      ``(k+1/2)/n``.
    """
    check_choice("rule", rule, RULES)
    check_int_at_least("steps", steps, 2 if rule == "riemann_trapezoid" else 1)
    if rule == "riemann_trapezoid":
        alphas = np.linspace(0.0, 1.0, steps)
        weights = np.full(steps, 1.0 / (steps - 1))
        weights[[0, -1]] /= 2
    elif rule == "gauss_legendre":
        nodes, weights = np.polynomial.legendre.leggauss(steps)
        alphas, weights = (nodes + 1) / 2, weights / 2
    else:
        offset = {"riemann_left": 0.0, "riemann_right": 1.0, "riemann_middle": 0.5}[rule]
        alphas = (np.arange(steps) + offset) / steps
        weights = np.full(steps, 1.0 / steps)
    return alphas.astype(np.float64), weights.astype(np.float64)  # cast to the working float type at use


# ----------------------------------------------------------------------------- ig
@functools.partial(jax.jit, static_argnames=("steps", "rule", "baseline", "step_chunk"))
def _ig_core(logit_fn, images, labels, *, steps, rule, baseline, step_chunk):
    alphas, weights = (jnp.asarray(a, float_dtype()) for a in quadrature(rule, steps))

    def one(image, label):
        start = jnp.full_like(image, baseline)
        delta = image - start

        def weighted_grads(idx):
            grads = jax.vmap(lambda a: probability_grad(logit_fn, start + a * delta, label))(alphas[idx])
            return grads * weights[idx][:, None, None, None]

        return delta * chunked_sum(weighted_grads, steps, step_chunk)

    return jax.vmap(one)(images, labels)


@register_method("ig", description="Integrated Gradients, black baseline, 50 steps, trapezoid rule",
                 quick={"steps": 8})
def ig(logit_fn: Callable, images, labels=None, *, key=None, steps: int = 50, rule: str = "riemann_trapezoid",
       baseline: float = 0.0, step_chunk: int | None = None) -> jax.Array:
    """Integrated Gradients (Sundararajan et al. 2017) of ``p_y`` from a constant baseline.

    ``IG = (x - b) * sum_k w_k grad p_y(b + a_k (x - b))`` with the quadrature ``rule``
    (see :func:`quadrature`; default ``riemann_trapezoid`` with 50 steps, as the official
    LA code, which explains ``p_y`` through its softmax-ended model). ``y`` = ``labels``
    (the class explained). ``baseline`` is a constant pixel value in [0, 1] (0 = black).
    ``step_chunk`` path points per image go through the model at once (bounds memory;
    None: see :func:`~la_iprop.attribution.gradients.resolve_chunk`).
    Model evaluations per image: ``steps``. ``key`` is unused.
    """
    step_chunk = resolve_chunk("step_chunk", step_chunk)
    check_in_range("baseline", baseline, 0.0, 1.0, high_inclusive=True)
    quadrature(rule, steps)  # validates rule and steps before any tracing
    logit_fn, images, labels, _ = prepare_inputs(logit_fn, images, labels, key=key)
    return _ig_core(logit_fn, images, labels, steps=steps, rule=rule, baseline=float(baseline),
                    step_chunk=step_chunk)


# ----------------------------------------------------------------------------- eg
@functools.partial(jax.jit, static_argnames=("samples", "sample_chunk"))
def _eg_core(logit_fn, images, labels, keys, references, *, samples, sample_chunk):
    num_refs = references.shape[0]

    def one(image, label, key):
        def terms(idx):
            def term(i):
                # fold_in(i): sample i's draw does not depend on the chunking.
                k_ref, k_alpha = jax.random.split(jax.random.fold_in(key, i))
                ref = references[jax.random.randint(k_ref, (), 0, num_refs, jnp.int32)]
                alpha = random_uniform(k_alpha, (), image.dtype)
                return (image - ref) * probability_grad(logit_fn, ref + alpha * (image - ref), label)
            return jax.vmap(term)(idx)
        return chunked_sum(terms, samples, sample_chunk) / samples

    return jax.vmap(one)(images, labels, keys)


@register_method("eg", description="Expected Gradients: IG with baselines drawn from a reference set, random "
                 "interpolation points (1 sample, as the official LA code)", quick={"samples": 1},
                 needs_reference_set=True)
def eg(logit_fn: Callable, images, labels=None, *, key, reference_images=None, samples: int = 1,
       sample_chunk: int | None = None) -> jax.Array:
    """Expected Gradients (Erion et al. 2021): ``E_{r, a}[(x - r) * grad p_y(r + a (x - r))]``.

    ``r`` is drawn uniformly (with replacement) from ``reference_images`` [M, H, W, 3]
    (e.g. the dataset being explained: the official LA code draws from the whole
    evaluation set, which may include ``x`` itself) and ``a ~ U(0, 1)``; the
    expectation is a mean over ``samples`` draws (the official LA code uses 1). ``y`` =
    ``labels`` (the class explained). Draws come from ``key`` (one key per image by
    position, one per sample by index), so results do not depend on the batch or on
    ``sample_chunk`` (samples per model call per image; None: backend default).
    Model evaluations per image: ``samples``.
    """
    check_int_at_least("samples", samples, 1)
    sample_chunk = resolve_chunk("sample_chunk", sample_chunk)
    if reference_images is None:
        raise ValueError("eg needs reference_images=[M, H, W, 3] (the images baselines are drawn from)")
    if hasattr(reference_images, "shape") and len(reference_images.shape) == 4 and reference_images.shape[0] == 0:
        raise ValueError("reference_images is empty: Expected Gradients needs at least one reference image")
    references = check_images(reference_images, "reference_images")
    logit_fn, images, labels, key = prepare_inputs(logit_fn, images, labels, key=key, need_key=True)
    if references.shape[1:] != images.shape[1:]:
        raise ValueError(f"reference_images must have images' per-image shape {tuple(images.shape[1:])}, "
                         f"got {tuple(references.shape[1:])}")
    keys = split_per_image(key, images.shape[0])
    return _eg_core(logit_fn, images, labels, keys, references, samples=samples, sample_chunk=sample_chunk)
