"""Local Attribution: parity with the official code, the algorithm's properties, batch independence, errors."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import chw_to_hwc, in_float64, la1000_images

from la_iprop.attribution import available_methods, get_method, method_hparams
from la_iprop.attribution.la import avoid_label, local_attribution
from la_iprop.precision import float_dtype

NUM_CLASSES = 10
SIZE = 6


def _toy_logits(seed: int = 0):
    """A small nonlinear classifier on [N, 6, 6, 3] images: 3x3 conv, tanh, linear head."""
    rng = np.random.default_rng(seed)
    kernel = jnp.asarray(rng.normal(size=(3, 3, 3, 4)), jnp.float32)
    head = jnp.asarray(rng.normal(size=(SIZE * SIZE * 4, NUM_CLASSES)) / 3, jnp.float32)

    def logit_fn(images):  # weights follow the input dtype, so the toy also runs in float64
        h = jax.lax.conv_general_dilated(images, kernel.astype(images.dtype), (1, 1), "SAME",
                                         dimension_numbers=("NHWC", "HWIO", "NHWC"))
        return jnp.tanh(h).reshape(images.shape[0], -1) @ head.astype(images.dtype)

    return logit_fn


TOY = _toy_logits()


def _toy_images(batch: int, seed: int = 1) -> np.ndarray:
    """float32 values, in the working float type (float64 inside :func:`in_float64` tests)."""
    images = np.random.default_rng(seed).uniform(0.05, 1.0, size=(batch, SIZE, SIZE, 3)).astype(np.float32)
    return images.astype(float_dtype())


def _agreement(ours: np.ndarray, theirs: np.ndarray) -> tuple[float, float]:
    pearson = float(np.corrcoef(ours.ravel(), theirs.ravel())[0, 1])
    rel_l1 = float(np.abs(ours - theirs).sum() / np.abs(theirs).sum())
    return pearson, rel_l1


# --- parity with the official code (EfficientNet-Lite0) -------------------------------------------------------

# The official update jumps to a corner of the box chosen by sign(grad) at the previous corner. In float32 this
# map is chaotic: rounding differences flip the sign of near-zero gradient elements, each flip moves the next
# iterate, and the number of differing elements grows ~10x per step until about half of them differ after 4-8
# steps (measured: the official loop in PyTorch with 1 vs 2 threads already diverges). So how our float32 map
# matches the stored float32 output depends on how rounding falls on the CPU (measured on the 6 stored images,
# ours vs official: Pearson 0.79-0.96 here, lower elsewhere; PyTorch 1 thread vs official: 0.90-0.99), and no
# float32 map is asserted against it. What is CPU-independent: our float64 map (the exact walk, equal to the
# official loop run in float64 to 1e-15, test below) against the stored float32 output, i.e. how far the
# official float32 run itself strayed. Measured on positions 0 and 2: Pearson 0.958 / 0.932, relative L1
# 0.30 / 0.27 (0.81-0.96 over all six).
REFERENCE_PEARSON = 0.75
REFERENCE_REL_L1 = 0.6


@pytest.mark.slow
def test_official_float32_reference_is_the_exact_walk_up_to_float32_chaos(lite0, la_reference):
    positions = [0, 2]  # all 6 were measured; 2 keep CI within budget
    images, _ = la1000_images(la_reference["image_index"][positions])
    k = int(la_reference["sampling_times"])
    ours = np.asarray(local_attribution(
        lite0, images, None, spatial_range=float(la_reference["spatial_range"]),
        max_iter=int(la_reference["max_iter"]), sampling_times=k,
        target_classes=la_reference["selected_classes"][positions, :k - 1], precision="float64"))
    expected = chw_to_hwc(la_reference["attribution_chw"][positions])
    for i, pos in enumerate(positions):
        pearson, rel_l1 = _agreement(ours[i], expected[i])
        assert pearson >= REFERENCE_PEARSON and rel_l1 <= REFERENCE_REL_L1, (pos, pearson, rel_l1)


def _official_loop_torch(images_nhwc, targets, *, spatial_range, max_iter, dtype):
    """The official LA loop at batch size 1, written independently for PyTorch as a test oracle."""
    import torch
    from efficientnet_lite_pytorch import EfficientNet

    from la_iprop.models.zoo import EMBEDDED_LITE0_CHECKPOINT

    net = EfficientNet.from_name("efficientnet-lite0")
    net.load_state_dict(torch.load(EMBEDDED_LITE0_CHECKPOINT(), weights_only=True))
    net = net.eval().to(dtype)

    def prob(x):
        return torch.softmax(net((x * 255 - 127) / 128), dim=-1)

    x0 = torch.from_numpy(images_nhwc).permute(0, 3, 1, 2).contiguous().to(dtype)
    label = int(prob(x0).argmax())
    eps = x0 / spatial_range
    total = torch.zeros_like(x0)
    for target in [int(t) for t in targets] + [None]:
        if target == label:
            target = target + 1 if target < 999 else target - 1
        x = x0.clone()
        for _ in range(max_iter):
            x = x.detach().requires_grad_(True)
            p = prob(x)[0]
            g_label = torch.autograd.grad(p[label], x, retain_graph=target is not None)[0]
            if target is None:
                x = torch.clamp(x0 - eps * g_label.sign(), 0, 1)
            else:
                g_target = torch.autograd.grad(p[target], x)[0]
                x = torch.clamp(x0 + eps * g_target.sign(), 0, 1)
            total += -g_label * (x - x0)
    return label, total.permute(0, 2, 3, 1).detach().numpy()


@pytest.mark.slow
def test_matches_official_loop_exactly_in_float64(lite0, la_reference):
    pytest.importorskip("efficientnet_lite_pytorch")
    torch = pytest.importorskip("torch")
    pos = 4
    images, _ = la1000_images(la_reference["image_index"][[pos]])
    targets = la_reference["selected_classes"][pos, :5].copy()
    targets[1] = la_reference["predicted"][pos]  # exercises the replace-if-equal-to-label rule
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # intra-op threads crawl when the CPU is shared
    try:
        label, theirs = _official_loop_torch(images, targets, spatial_range=10.0, max_iter=10, dtype=torch.float64)
    finally:
        torch.set_num_threads(threads)
    # Through the public API: labels=None explains our float64 prediction, the replace rule is applied inside.
    ours = np.asarray(local_attribution(lite0, images, None, spatial_range=10.0, max_iter=10, sampling_times=6,
                                        target_classes=targets, precision="float64"))
    assert ours.dtype == np.float64 and not jax.config.jax_enable_x64
    # Measured: relative L1 3e-15 (the same walk; only the order of float64 sums differs).
    assert np.abs(ours[0] - theirs[0]).sum() <= 1e-10 * np.abs(theirs[0]).sum()


# --- the algorithm on a toy classifier --------------------------------------------------------------------------

def _prob_grad(x, c):
    return jax.grad(lambda v: jax.nn.softmax(TOY(v[None])[0])[c])(x)


def _naive_la(x0, label, targets, *, spatial_range, max_iter, update, step_size):
    """LA written plainly (Python loops, one gradient per class) as an independent check."""
    eps = x0 / spatial_range
    lower, upper = jnp.clip(x0 - eps, 0, 1), jnp.clip(x0 + eps, 0, 1)
    total = jnp.zeros_like(x0)
    for move_class, direction in [(t, 1.0) for t in targets] + [(label, -1.0)]:
        x = x0
        for _ in range(max_iter):
            g_move, g_label = _prob_grad(x, move_class), _prob_grad(x, label)
            base = x0 if update == "restart" else x
            x_next = jnp.clip(base + direction * step_size * eps * jnp.sign(g_move), lower, upper)
            total = total - g_label * (x_next - base)
            x = x_next
    return total


@in_float64
@pytest.mark.parametrize("update,step_size", [("restart", 1.0), ("pgd", 0.3)])
@pytest.mark.slow
def test_matches_plain_loops_on_toy_model(update, step_size):
    images = _toy_images(2)
    labels = np.array([3, 9])
    targets = np.array([[1, 3, 7], [9, 0, 2]])  # includes the label: replaced by 4, and by 8 for the last class
    ours = local_attribution(TOY, images, labels, spatial_range=4.0, max_iter=3, sampling_times=4,
                             update=update, step_size=step_size, target_classes=targets)
    for i in range(2):
        replaced = [int(c) for c in avoid_label(jnp.asarray(targets[i]), labels[i], NUM_CLASSES)]
        expected = _naive_la(jnp.asarray(images[i]), int(labels[i]), replaced, spatial_range=4.0, max_iter=3,
                             update=update, step_size=step_size)
        np.testing.assert_allclose(ours[i], expected, rtol=1e-10, atol=1e-13)
    assert replaced == [9 - 1, 0, 2] and [int(c) for c in avoid_label(jnp.asarray(targets[0]), 3, 10)] == [1, 4, 7]


def test_one_untargeted_step_is_eps_times_abs_gradient():
    """K=1, T=1: the only move is x0 - eps*sign(g_y); it is clipped only going up (at 1), so
    A = eps * |g_y| where g_y > 0 and min(eps, 1 - x0) * |g_y| where g_y < 0."""
    images = _toy_images(1)
    images[0, :3] = np.minimum(images[0, :3] + 0.3, 0.995)  # some elements within eps of 1
    ours = local_attribution(TOY, images, jnp.array([5]), spatial_range=7.0, max_iter=1, sampling_times=1)
    grad = np.asarray(_prob_grad(jnp.asarray(images[0]), 5))
    eps = images[0] / 7.0
    expected = np.abs(grad) * np.where(grad > 0, eps, np.minimum(eps, 1.0 - images[0]))
    assert np.any((grad < 0) & (1.0 - images[0] < eps))  # the clipped case occurs
    np.testing.assert_allclose(ours[0], expected, rtol=1e-5, atol=1e-9)


def test_labels_none_explains_prediction():
    images = _toy_images(3)
    predicted = jnp.argmax(TOY(jnp.asarray(images)), -1)
    kwargs = dict(key=jax.random.PRNGKey(0), max_iter=2, sampling_times=3)
    np.testing.assert_array_equal(local_attribution(TOY, images, None, **kwargs),
                                  local_attribution(TOY, images, predicted, **kwargs))


@pytest.mark.parametrize("update", ["restart", "pgd"])
@pytest.mark.slow
def test_zero_pixels_get_zero_attribution(update):
    images = _toy_images(2)
    images[0, 1, 2, :] = 0.0   # a black pixel
    images[1, 4, 0, 1] = 0.0   # one zero channel
    images[1, 0, :, :] = 0.0   # a black row
    out = np.asarray(local_attribution(TOY, images, None, key=jax.random.PRNGKey(1), max_iter=3, sampling_times=4,
                                       update=update))
    assert np.all(out[images == 0.0] == 0.0)
    assert np.all(out[images > 0.0] != 0.0)  # and the rest is explored: the test could fail


@pytest.mark.parametrize("update", ["restart", "pgd"])
def test_iterates_stay_in_box_and_unit_interval(update):
    images = _toy_images(2)
    images[0, 0, 0] = 0.98  # the upper face is clipped at 1 here
    s, t, k = 5.0, 4, 3
    _, iterates = local_attribution(TOY, images, None, key=jax.random.PRNGKey(2), spatial_range=s, max_iter=t,
                                    sampling_times=k, update=update, return_iterates=True)
    iterates = np.asarray(iterates)
    assert iterates.shape == (2, k, t, SIZE, SIZE, 3)
    x0 = images[:, None, None]
    lower, upper = np.clip(x0 - x0 / s, 0, 1), np.clip(x0 + x0 / s, 0, 1)
    assert np.all(iterates >= lower) and np.all(iterates <= upper)
    assert np.all((iterates >= 0) & (iterates <= 1))
    at_face = np.isclose(iterates, lower, rtol=0, atol=1e-7) | np.isclose(iterates, upper, rtol=0, atol=1e-7)
    if update == "restart":  # every restart step jumps to a face of the box
        assert np.all(at_face | (iterates == x0))
    else:  # small PGD steps (2/T = half the radius): the first iterate is strictly inside the box ...
        inside = (x0 + 0.5 * x0 / s < 1.0)[:, :, 0]  # ... except where the step reaches 1
        assert not np.any(at_face[:, :, 0] & inside) and np.any(at_face[:, :, 0])
        assert np.abs(iterates[:, :, -1] - x0).max() > np.abs(iterates[:, :, 0] - x0).max()


@in_float64
@pytest.mark.slow
def test_batch_independence():
    images = _toy_images(4, seed=3)
    targets = np.array([[1, 2, 3], [4, 5, 6], [7, 8, 9], [0, 2, 4]])
    kwargs = dict(max_iter=4, sampling_times=4)
    batched = np.asarray(local_attribution(TOY, images, None, target_classes=targets, **kwargs))
    for i in range(4):
        single = local_attribution(TOY, images[i:i + 1], None, target_classes=targets[i], **kwargs)
        np.testing.assert_allclose(batched[i], single[0], rtol=1e-10, atol=1e-13)
    # drawn targets: image i's map depends on (key, i) only, not on the other images
    key = jax.random.PRNGKey(4)
    a = local_attribution(TOY, images, None, key=key, **kwargs)
    b = local_attribution(TOY, np.concatenate([images[:2], _toy_images(2, seed=9)]), None, key=key, **kwargs)
    np.testing.assert_allclose(a[:2], b[:2], rtol=1e-10, atol=1e-13)


@in_float64
@pytest.mark.slow
def test_chunked_equals_unchunked():
    images = _toy_images(2)
    kwargs = dict(key=jax.random.PRNGKey(5), max_iter=3, sampling_times=5)
    full, full_path = local_attribution(TOY, images, None, return_iterates=True, **kwargs)
    for chunk in (1, 2, 5, 8):  # 2 leaves a remainder of one run
        out, path = local_attribution(TOY, images, None, run_chunk=chunk, return_iterates=True, **kwargs)
        np.testing.assert_allclose(out, full, rtol=1e-10, atol=1e-13)
        np.testing.assert_allclose(path, full_path, rtol=1e-12, atol=1e-13)


def test_key_determinism_and_target_broadcast():
    images = _toy_images(2)
    kwargs = dict(max_iter=2, sampling_times=4)
    a = local_attribution(TOY, images, None, key=jax.random.PRNGKey(6), **kwargs)
    b = local_attribution(TOY, images, None, key=jax.random.PRNGKey(6), **kwargs)
    c = local_attribution(TOY, images, None, key=jax.random.PRNGKey(7), **kwargs)
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, c)
    np.testing.assert_array_equal(local_attribution(TOY, images, None, key=jax.random.key(6), **kwargs), a)
    targets = np.array([2, 5, 8])
    np.testing.assert_array_equal(local_attribution(TOY, images, None, target_classes=targets, **kwargs),
                                  local_attribution(TOY, images, None, target_classes=np.tile(targets, (2, 1)),
                                                    **kwargs))


def test_registered_with_quick_settings():
    assert "la" in available_methods()
    spec = get_method("la")
    assert spec.fn is local_attribution and spec.quick["max_iter"] < method_hparams("la")["max_iter"]
    assert method_hparams("la")["spatial_range"] == 10


@pytest.mark.parametrize("kwargs,match", [
    (dict(images=np.zeros((SIZE, SIZE, 3), np.float32)), "rank 4"),
    (dict(images=np.zeros((1, SIZE, SIZE, 4), np.float32)), "3 channels"),
    (dict(images=np.full((1, SIZE, SIZE, 3), 1.5, np.float32)), r"\[0, 1\]"),
    (dict(spatial_range=0), "spatial_range"),
    (dict(spatial_range=-2.0), "spatial_range"),
    (dict(sampling_times=0), "sampling_times"),
    (dict(max_iter=0), "max_iter"),
    (dict(update="adam"), "update"),
    (dict(step_size=-0.1), "step_size"),
    (dict(run_chunk=0), "run_chunk"),
    (dict(target_classes=np.array([1, 2])), "target_classes"),
    (dict(target_classes=np.array([[1, 2, 3]] * 3)), "target_classes"),
    (dict(target_classes=np.array([1, 2, NUM_CLASSES])), "target_classes"),
    (dict(target_classes=np.array([1.0, 2.0, 3.0])), "target_classes"),
    (dict(key=None), "key"),
    (dict(sampling_times=NUM_CLASSES + 2), "sampling_times"),
])
def test_bad_inputs_give_clear_errors(kwargs, match):
    args = dict(images=_toy_images(2), key=jax.random.PRNGKey(0), max_iter=1, sampling_times=4)
    args.update(kwargs)
    images = args.pop("images")
    with pytest.raises((ValueError, TypeError), match=match):
        local_attribution(TOY, images, None, **args)


def test_labels_out_of_range_for_a_plain_callable():
    with pytest.raises(ValueError, match="labels"):
        local_attribution(TOY, _toy_images(2), np.array([0, NUM_CLASSES]), key=jax.random.PRNGKey(0), max_iter=1)
