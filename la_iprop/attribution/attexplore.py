"""AttEXplore (``attexplore``; Zhu et al., "AttEXplore: Attribution for Explanation with model
parameters eXploration", ICLR 2024; official code ``LMBTough/ATTEXPLORE``), in the version and
settings of the LA repository's ``saliency/core/attexplore.py``.

Notation: ``x0`` the image, ``y`` the explained class (``labels``), ``eps`` = ``epsilon``,
``T`` = ``max_iter``, ``a = eps / T``, ``N`` = ``num_samples``, ``L(v) = -log softmax(q(v))_y``
with ``q`` the softmax outputs (``attack_loss="probability_ce"``, the official loss: its model
ends in a softmax and ``cross_entropy`` is applied on top) or the logits (``"ce"``).

A transfer-attack walk (SSA + DI + TI + MI) that *descends* ``L`` (so it raises the explained
class: the official step is ``x - a * sign(g)``), from ``x_0 = x0`` with ``g_{-1} = 0``:

1. ``N`` frequency-domain augmentations of ``x_t`` (spectrum simulation, SSA):
   ``v_n = IDCT(DCT(x_t + sigma * e_n) * m_n)``, ``e_n ~ N(0, I)``, ``m_n ~ U(1 - rho, 1 + rho)``
   per element, with the orthonormal 2-D DCT-II over height and width (:func:`dct_2d`);
2. ``u_t = (1/N) sum_n grad_v L(DI_n(v_n))``: the gradient with respect to the augmented image
   (not through the augmentation), where ``DI_n`` is input diversity: with probability
   ``diversity_prob`` the image is resized to a random ``r`` in ``[S, int(S * resize_rate))``,
   zero-padded at a random offset to ``int(S * resize_rate)`` and resized back to ``S``
   (bilinear, as PyTorch's ``align_corners=False``), else left as is;
3. TI: ``u_t`` smoothed per channel by a ``ti_kernel`` x ``ti_kernel`` Gaussian (``nsig = 3``,
   zero padding); MI: ``g_t = momentum * g_{t-1} + u_t / mean|u_t|``;
4. ``x_{t+1} = Proj_B(x_t - a * sign(g_t))``, ``B = [x0 - eps, x0 + eps] ∩ [0, 1]``;
5. ``A = -sum_t g_t * (x_{t+1} - x_t)`` (the official rule, shared with MFABA: displacement
   times the accumulated gradient at the start of each step).

Deviations, all deliberate: ``y`` is the class passed in ``labels`` (the experiments pass the
clean prediction; the LA repository passes its dataset labels); randomness comes from ``key``
per image, step and sample (the
official code draws one resize/pad/coin per batch and per sample); DI always resizes back to
the input size (the official code does so for MaxViT and in the attack loop of the LA
repository, so the model always sees its native size); the composition of the two bilinear
resizes is one linear map per axis, applied as a matrix; the official loop also evaluates
``N`` gradients at the end point and discards them, which we skip. A zero ``u_t`` is left
unnormalised instead of dividing by zero. Model evaluations per image: ``T * N``.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from la_iprop.attribution.attack import cross_entropy, linf_box, sign_step, walk_path
from la_iprop.attribution.base import prepare_inputs, register_method, split_per_image
from la_iprop.attribution.gradients import chunked_sum
from la_iprop.checks import check_choice, check_in_range, check_int_at_least, check_nonnegative, check_positive
from la_iprop.precision import random_normal, random_uniform

__all__ = ["attexplore", "dct_matrix", "dct_2d", "idct_2d", "spectrum_augment", "diversity_matrix",
           "gaussian_smoothing_matrix"]

ATTACK_LOSSES = ("probability_ce", "ce")
_HIGHEST = lax.Precision.HIGHEST  # the transforms must not run in reduced precision (e.g. TF32 on GPU)


# ----------------------------------------------------------------------------- DCT
def dct_matrix(n: int) -> np.ndarray:
    """Orthonormal DCT-II matrix ``C[k, i] = s_k cos(pi (2i + 1) k / (2n))``, ``s_0 = sqrt(1/n)``,
    ``s_k = sqrt(2/n)``; ``C @ C.T = I``, so the inverse (DCT-III) is ``C.T``. Built in float64."""
    k = np.arange(n)[:, None]
    i = np.arange(n)[None, :]
    matrix = np.cos(np.pi * (2 * i + 1) * k / (2 * n)) * np.sqrt(2.0 / n)
    matrix[0] /= np.sqrt(2.0)
    return matrix


def dct_2d(x: jax.Array) -> jax.Array:
    """Orthonormal 2-D DCT-II over the height and width of ``[..., H, W, C]``: ``C_H x C_W^T`` per channel.

    Equals scipy's ``dctn(x, type=2, norm="ortho", axes=(-3, -2))``. The official code uses the
    unnormalised DCT; for AttEXplore's element-wise spectrum mask the two give the same image.
    """
    c_h = jnp.asarray(dct_matrix(x.shape[-3]), x.dtype)
    c_w = jnp.asarray(dct_matrix(x.shape[-2]), x.dtype)
    return jnp.einsum("kh,...hwc,lw->...klc", c_h, x, c_w, precision=_HIGHEST)


def idct_2d(coefficients: jax.Array) -> jax.Array:
    """Inverse of :func:`dct_2d` (orthonormal 2-D DCT-III): ``C_H^T X C_W`` per channel."""
    c_h = jnp.asarray(dct_matrix(coefficients.shape[-3]), coefficients.dtype)
    c_w = jnp.asarray(dct_matrix(coefficients.shape[-2]), coefficients.dtype)
    return jnp.einsum("kh,...klc,lw->...hwc", c_h, coefficients, c_w, precision=_HIGHEST)


def spectrum_augment(key: jax.Array, x: jax.Array, sigma: float, rho: float) -> jax.Array:
    """SSA: ``IDCT(DCT(x + sigma * e) * m)``, ``e ~ N(0, I)``, ``m ~ U(1 - rho, 1 + rho)`` per element (ONE image)."""
    k_noise, k_mask = jax.random.split(key)
    noisy = x + sigma * random_normal(k_noise, x.shape, x.dtype)
    mask = random_uniform(k_mask, x.shape, x.dtype, 1.0 - rho, 1.0 + rho)
    return idct_2d(dct_2d(noisy) * mask)


# ----------------------------------------------------------------------------- DI and TI as matrices
def _bilinear_rows(source: jax.Array, in_size: int) -> jax.Array:
    """Rows ``[len(source), in_size]`` sampling at ``source`` with PyTorch's bilinear rule
    (negative positions clamp to 0, the upper neighbour clamps to the last index)."""
    source = jnp.maximum(source, 0.0)
    low = jnp.minimum(jnp.floor(source).astype(jnp.int32), in_size - 1)
    high = jnp.minimum(low + 1, in_size - 1)
    frac = (source - low)[:, None]
    return (1.0 - frac) * jax.nn.one_hot(low, in_size) + frac * jax.nn.one_hot(high, in_size)


def _resize_rows(out_size: int, in_size: int, rows: jax.Array) -> jax.Array:
    """Source positions of output rows for a resize ``in_size -> out_size`` (``align_corners=False``)."""
    return (rows + 0.5) * (in_size / out_size) - 0.5


def diversity_matrix(u_size: jax.Array, u_offset: jax.Array, size: int, resize_rate: float) -> jax.Array:
    """The DI transform along one axis as a ``[size, size]`` matrix.

    Resize ``size -> r`` with ``r = size + floor(u_size * (canvas - size))`` (an integer in
    ``[size, canvas)``, ``canvas = int(size * resize_rate)``), place it at offset
    ``floor(u_offset * (canvas - r))`` in a zero canvas, resize ``canvas -> size``. ``u_size``
    and ``u_offset`` are uniform draws in [0, 1). Identity when ``canvas <= size``.
    """
    canvas = int(size * resize_rate)
    if canvas <= size:
        return jnp.eye(size)
    rnd = size + jnp.floor(u_size * (canvas - size)).astype(jnp.int32)
    offset = jnp.floor(u_offset * (canvas - rnd)).astype(jnp.int32)
    within = jnp.arange(canvas) - offset
    valid = ((within >= 0) & (within < rnd))[:, None]
    source = (within + 0.5) * (size / rnd) - 0.5
    up = jnp.where(valid, _bilinear_rows(source, size), 0.0)                     # [canvas, size]
    down = _bilinear_rows(_resize_rows(size, canvas, jnp.arange(size)), canvas)  # [size, canvas]
    return jnp.matmul(down, up, precision=_HIGHEST)


def gaussian_smoothing_matrix(size: int, kernel: int, nsig: float = 3.0) -> np.ndarray:
    """TI smoothing along one axis as a ``[size, size]`` banded matrix (zero padding).

    The 1-D kernel is the normal pdf at ``linspace(-nsig, nsig, kernel)``, normalised; its
    outer product is the official ``gkern(kernel, nsig)``, so smoothing rows then columns
    equals the official depthwise 2-D convolution.
    """
    weights = np.exp(-0.5 * np.linspace(-nsig, nsig, kernel) ** 2)
    weights /= weights.sum()
    radius = kernel // 2
    offsets = np.arange(size)[None, :] - np.arange(size)[:, None] + radius
    inside = (offsets >= 0) & (offsets < kernel)
    return np.where(inside, weights[np.clip(offsets, 0, kernel - 1)], 0.0)


def _apply_axes(m_h, x, m_w):
    return jnp.einsum("ah,hwc,bw->abc", m_h, x, m_w, precision=_HIGHEST)


# ----------------------------------------------------------------------------- the method
def _sample_gradient(logit_fn, x, label, key, *, sigma, rho, diversity_prob, resize_rate, on_probabilities):
    k_ssa, k_di = jax.random.split(key)
    augmented = spectrum_augment(k_ssa, x, sigma, rho)
    height, width = x.shape[0], x.shape[1]

    if diversity_prob > 0:  # one draw for the coin, the resize and the two offsets (few PRNG calls compile faster)
        coin, u_size, u_off_h, u_off_w = random_uniform(k_di, (4,), x.dtype)
        apply = coin < diversity_prob
        m_h = jnp.where(apply, diversity_matrix(u_size, u_off_h, height, resize_rate), jnp.eye(height))
        m_w = jnp.where(apply, diversity_matrix(u_size, u_off_w, width, resize_rate), jnp.eye(width))

    def loss(v):
        if diversity_prob > 0:
            v = _apply_axes(m_h, v, m_w)
        return cross_entropy(logit_fn(v[None])[0], label, on_probabilities=on_probabilities)

    return jax.grad(loss)(augmented)


def _explain_one(logit_fn, x0, label, key, *, epsilon, max_iter, num_samples, sigma, rho, diversity_prob,
                 resize_rate, ti_kernel, momentum, attack_loss, sample_chunk, keep_path):
    lower, upper = linf_box(x0, epsilon)
    alpha = epsilon / max_iter
    sample = functools.partial(_sample_gradient, logit_fn, label=label, sigma=sigma, rho=rho,
                               diversity_prob=diversity_prob, resize_rate=resize_rate,
                               on_probabilities=attack_loss == "probability_ce")
    smooth_h = jnp.asarray(gaussian_smoothing_matrix(x0.shape[0], ti_kernel), x0.dtype)
    smooth_w = jnp.asarray(gaussian_smoothing_matrix(x0.shape[1], ti_kernel), x0.dtype)

    def step(x, g_prev, t):
        step_key = jax.random.fold_in(key, t)

        def grads(idx):  # fold_in(n): sample n's draw does not depend on the chunking
            return jax.vmap(lambda n: sample(x=x, key=jax.random.fold_in(step_key, n)))(idx)

        mean_grad = chunked_sum(grads, num_samples, sample_chunk) / num_samples
        if ti_kernel > 1:
            mean_grad = _apply_axes(smooth_h, mean_grad, smooth_w)
        scale = jnp.mean(jnp.abs(mean_grad))
        g = momentum * g_prev + mean_grad / jnp.where(scale > 0, scale, 1.0)
        x_next = sign_step(x, g, alpha, lower, upper, -1.0)
        return x_next, g, -g, x_next - x, False

    walk = walk_path(step, x0, max_iter, state=jnp.zeros_like(x0), keep_path=keep_path)
    return walk.total, walk.path


@functools.partial(jax.jit, static_argnames=("epsilon", "max_iter", "num_samples", "sigma", "rho", "diversity_prob",
                                             "resize_rate", "ti_kernel", "momentum", "attack_loss", "sample_chunk",
                                             "keep_path"))
def _attexplore_batch(logit_fn, images, labels, keys, **static):
    return jax.vmap(functools.partial(_explain_one, logit_fn, **static))(images, labels, keys)


@register_method("attexplore", description="AttEXplore (Zhu et al., ICLR 2024): sign walk (eps 16/255, 10 steps) "
                 "driven by 20 DCT-augmented gradients per step (SSA+DI+TI+MI)",
                 quick={"max_iter": 3, "num_samples": 4})
def attexplore(logit_fn: Callable, images: Any, labels: Any = None, *, key: Any, epsilon: float = 16 / 255,
               max_iter: int = 10, num_samples: int = 20, sigma: float = 16 / 255, rho: float = 0.5,
               diversity_prob: float = 0.5, resize_rate: float = 1.15, ti_kernel: int = 7, momentum: float = 1.0,
               attack_loss: str = "probability_ce", sample_chunk: int = 10, return_iterates: bool = False):
    """AttEXplore maps, shape of ``images`` (NHWC, [0, 1]); see the module docstring for the rule.

    Args:
      logit_fn: ``images -> logits``.
      images: ``[B, H, W, 3]`` float in [0, 1].
      labels: ``[B]`` classes to explain; None: the predicted class.
      key: ``jax.random`` key (image ``i`` uses ``fold_in(key, i)``, or pass one key per image);
        step ``t`` and sample ``n`` use ``fold_in(fold_in(key_i, t), n)``.
      epsilon: box radius in [0, 1] pixel units (official ``16/255``); step ``epsilon / max_iter``.
      max_iter: ``T``, steps.
      num_samples: ``N``, augmented gradients per step.
      sigma: std of the Gaussian noise added before the DCT (official ``16/255``).
      rho: spectrum mask half-width, ``m ~ U(1 - rho, 1 + rho)``; in [0, 1].
      diversity_prob: probability of the DI resize-and-pad (0 disables DI); ``resize_rate``: its canvas factor.
      ti_kernel: odd size of the TI Gaussian kernel (1 disables TI).
      momentum: MI decay of the accumulated gradient (0: no momentum).
      attack_loss: ``"probability_ce"`` (official) or ``"ce"``.
      sample_chunk: samples per model call (per image); bounds memory, does not change the result.
      return_iterates: also return the iterates ``x_1..x_T`` ``[B, T, H, W, 3]``.
    """
    check_positive("epsilon", epsilon)
    check_int_at_least("max_iter", max_iter, 1)
    check_int_at_least("num_samples", num_samples, 1)
    check_nonnegative("sigma", sigma)
    check_in_range("rho", rho, 0.0, 1.0, high_inclusive=True)
    check_in_range("diversity_prob", diversity_prob, 0.0, 1.0, high_inclusive=True)
    check_positive("resize_rate", resize_rate)
    if resize_rate < 1.0:
        raise ValueError(f"resize_rate must be >= 1 (the canvas is at least the image), got {resize_rate!r}")
    check_int_at_least("ti_kernel", ti_kernel, 1)
    if ti_kernel % 2 == 0:
        raise ValueError(f"ti_kernel must be odd (a centred kernel), got {ti_kernel!r}")
    check_nonnegative("momentum", momentum)
    check_choice("attack_loss", attack_loss, ATTACK_LOSSES)
    check_int_at_least("sample_chunk", sample_chunk, 1)
    logit_fn, images, labels, key = prepare_inputs(logit_fn, images, labels, key=key, need_key=True)
    keys = split_per_image(key, images.shape[0])
    attributions, iterates = _attexplore_batch(
        logit_fn, images, labels, keys, epsilon=float(epsilon), max_iter=int(max_iter), num_samples=int(num_samples),
        sigma=float(sigma), rho=float(rho), diversity_prob=float(diversity_prob), resize_rate=float(resize_rate),
        ti_kernel=int(ti_kernel), momentum=float(momentum), attack_loss=attack_loss, sample_chunk=int(sample_chunk),
        keep_path=bool(return_iterates))
    return (attributions, iterates) if return_iterates else attributions
