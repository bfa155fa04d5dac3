"""DeepLIFT with the rescale rule (``deeplift``; Shrikumar et al. 2017), zero baseline.

DeepLIFT back-propagates *multipliers* instead of gradients: through a linear op the
multiplier is its weight (as for the gradient), through an elementwise nonlinearity
``f`` it is ``(f(z) - f(z0)) / (z - z0)``, where ``z0`` is the same unit's value on the
reference input ``x0``. Then ``attr = (x - x0) * m`` and, for any network made of linear
ops and elementwise nonlinearities, the chain rule of multipliers gives
summation-to-delta exactly: ``sum(attr) = out(x) - out(x0)``.

In JAX this is a gradient with the activation's VJP replaced: the model runs on the
paired batch ``[x, x0]`` and :class:`RescaleActivation` (a ``jax.custom_vjp``) returns
``cotangent * (f(z) - f(z0)) / (z - z0)`` for both halves, falling back to ``f'(z)``
where ``|z - z0|`` is tiny. The model's ``activation`` field is swapped with
``ModelFn.with_module(activation=RescaleActivation(f))`` (no hooks).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable

import jax
import jax.numpy as jnp

from la_iprop.attribution.base import prepare_inputs, register_method
from la_iprop.checks import check_in_range
from la_iprop.models.zoo import ModelFn

__all__ = ["deeplift", "RescaleActivation", "deeplift_model"]

# Below this |z - z0| the multiplier is the derivative (the secant is 0/0 at equality).
_DELTA_EPS = 1e-10


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _rescale(base: Callable, z: jax.Array) -> jax.Array:
    return base(z)


def _rescale_fwd(base, z):
    if z.shape[0] % 2:
        raise ValueError(f"a DeepLIFT activation needs a paired batch [inputs; references] of even size, "
                         f"got an activation of shape {z.shape}")
    out = base(z)
    half = z.shape[0] // 2
    dz = z[:half] - z[half:]
    df = out[:half] - out[half:]
    slope = jax.jvp(base, (z[:half],), (jnp.ones_like(z[:half]),))[1]  # f'(z): elementwise base
    secant = jnp.abs(dz) > _DELTA_EPS
    multiplier = jnp.where(secant, df / jnp.where(secant, dz, 1.0), slope)
    return out, multiplier


def _rescale_bwd(base, multiplier, cotangent):
    half = cotangent.shape[0] // 2
    return (jnp.concatenate([cotangent[:half] * multiplier, cotangent[half:] * multiplier]),)


_rescale.defvjp(_rescale_fwd, _rescale_bwd)


@dataclasses.dataclass(frozen=True)
class RescaleActivation:
    """DeepLIFT (rescale rule) version of an elementwise activation ``base``.

    Call it on a paired batch ``concat([inputs, references])``: the forward is ``base``;
    the VJP multiplies the cotangent by ``(f(z) - f(z0)) / (z - z0)`` (``f'(z)`` where
    ``z ~ z0``). Frozen dataclass, so it is hashable by value and a module holding it
    stays a valid static jit argument.
    """
    base: Callable

    def __call__(self, z: jax.Array) -> jax.Array:
        return _rescale(self.base, z)


def deeplift_model(logit_fn) -> Callable:
    """The ``ModelFn`` with its ``activation`` replaced by :class:`RescaleActivation`."""
    module = getattr(logit_fn, "module", None)
    if not isinstance(logit_fn, ModelFn) or not hasattr(module, "activation"):
        raise TypeError("deeplift needs logit_fn to be a la_iprop.models.ModelFn whose Flax module has an "
                        f"'activation' field (to swap for the rescale rule), got {type(logit_fn).__name__}"
                        + (f" with module {type(module).__name__}" if module is not None else ""))
    base = module.activation
    if isinstance(base, RescaleActivation):
        return logit_fn
    return logit_fn.with_module(activation=RescaleActivation(base))


@functools.partial(jax.jit, static_argnames=("baseline",))
def _deeplift_core(dl_model, images, labels, *, baseline):
    def one(image, label):
        reference = jnp.full_like(image, baseline)

        def logit(x):
            return dl_model(jnp.stack([x, reference]))[0, label]

        return (image - reference) * jax.grad(logit)(image)

    return jax.vmap(one)(images, labels)


@register_method("deeplift", description="DeepLIFT, rescale rule, black (zero) baseline, on the class logit",
                 quick={})
def deeplift(logit_fn, images, labels=None, *, key=None, baseline: float = 0.0) -> jax.Array:
    """DeepLIFT rescale-rule attributions of the logit ``z_y`` w.r.t. a constant reference.

    ``y`` = ``labels`` (the class explained). The explained output is the class
    **logit**: every op up to it is linear or an elementwise activation, so
    ``sum(attr) = z_y(x) - z_y(x0)`` holds exactly (up to float error). The softmax is
    not elementwise and has no rescale rule that keeps this property, so it is left
    out (the official LA code runs Captum's DeepLift on the softmax output, whose
    softmax rule breaks summation-to-delta). ``baseline`` is the reference pixel value in
    [0, 1] space (0: black, the official zero baseline, applied before the model's
    normalisation like the other methods' baselines).

    ``logit_fn`` must be a :class:`~la_iprop.models.ModelFn` whose module has an
    ``activation`` field and no other nonlinearity (summation-to-delta would otherwise
    only hold approximately). Model evaluations per image: 2 (input and reference in one
    paired pass). ``key`` is unused.
    """
    check_in_range("baseline", baseline, 0.0, 1.0, high_inclusive=True)
    dl_model = deeplift_model(logit_fn)
    _, images, labels, _ = prepare_inputs(logit_fn, images, labels, key=key)  # labels=None: plain model's prediction
    return _deeplift_core(dl_model, images, labels, baseline=float(baseline))
