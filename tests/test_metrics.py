"""Insertion/deletion: parity with the official LA evaluation, known answers, a loop reference."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.ndimage
from conftest import chw_to_hwc, la1000_images

from la_iprop.metrics import (
    IMAGENET_MEAN,
    PROTOCOLS,
    GameResult,
    Protocol,
    auc,
    evaluate,
    gaussian_blur,
    gaussian_kernel1d,
    get_protocol,
    ranks,
    substrate_mean_color,
)

SIZE = 16


# ----------------------------------------------------------------------------- tiny models
def region_model(images):
    """Looks only at the top-left 2x2 block: class 0 wins iff that block is bright."""
    m = images[:, :2, :2, :].mean((1, 2, 3))
    return jnp.stack([40.0 * m - 10.0, jnp.zeros_like(m), -jnp.ones_like(m)], -1)


def _tiny_cnn():
    k1, k2 = jax.random.split(jax.random.PRNGKey(0))
    w_conv = jax.random.normal(k1, (3, 3, 3, 8)) * 0.5
    w_out = jax.random.normal(k2, (8, 10))

    def logit_fn(images):
        h = jax.lax.conv_general_dilated(images - 0.5, w_conv, (2, 2), "SAME",
                                         dimension_numbers=("NHWC", "HWIO", "NHWC"))
        return jnp.tanh(h).mean((1, 2)) @ w_out * 3.0
    return logit_fn


tiny_cnn = _tiny_cnn()


def _random(seed, n, size=SIZE):
    rng = np.random.default_rng(seed)
    return (rng.uniform(0, 1, (n, size, size, 3)).astype(np.float32),
            rng.normal(size=(n, size, size, 3)).astype(np.float32))


def loop_reference(logit_fn, images, maps, protocol: Protocol, mean_color):
    """The game as a plain loop over images and steps (numpy ranking, scipy blur)."""
    n, h, w, c = images.shape
    units = protocol.num_units(h, w, c)
    steps = protocol.num_steps(h, w, c)
    labels = np.argmax(np.asarray(logit_fn(jnp.asarray(images))), -1)
    out = np.zeros((n, 2, steps + 1))
    for i in range(n):
        x = images[i]
        score_map = maps[i] if protocol.ranking == "element" else maps[i].sum(-1)
        order = np.argsort(-score_map.reshape(-1), kind="stable")

        def substrate(kind, x=x):
            if kind == "zeros":
                return np.zeros_like(x)
            if kind == "mean":
                return np.broadcast_to(np.asarray(mean_color, np.float32), x.shape).copy()
            kern = np.outer(*[gaussian_kernel1d(protocol.blur_size, protocol.blur_sigma, protocol.blur_kernel)] * 2)
            return np.stack([scipy.ndimage.convolve(x[..., ch], kern, mode="constant", cval=mean_color[ch])
                             for ch in range(3)], -1)

        for g, (start, finish) in enumerate([(substrate(protocol.insertion_substrate), x),
                                             (x, substrate(protocol.deletion_substrate))]):
            for k in range(steps + 1):
                img = start.copy().reshape(units, -1)
                chosen = order[:min(k * protocol.step, units)]
                img[chosen] = finish.reshape(units, -1)[chosen]
                logits = np.asarray(logit_fn(jnp.asarray(img.reshape(1, h, w, c))), np.float64)[0]
                p = np.exp(logits - logits.max())
                out[i, g, k] = (p / p.sum())[labels[i]] if protocol.score == "probability" else logits[labels[i]]
    return out


# ----------------------------------------------------------------------------- parity
@pytest.mark.slow
def test_la_protocol_matches_official_evaluation(lite0, metric_reference):
    ref = metric_reference
    images, _ = la1000_images(ref["image_index"])
    maps = chw_to_hwc(ref["saliency_chw"])
    result = evaluate(lite0, images, maps, protocol="la")

    assert abs(result.insertion_auc - float(ref["insertion_auc"])) < 0.002
    assert abs(result.deletion_auc - float(ref["deletion_auc"])) < 0.002
    np.testing.assert_array_equal(result.labels, ref["predicted"])
    assert result.labels_source == "predicted"
    # 224 steps of 3*224 elements at 224x224: 225 points, the last with everything changed
    assert result.insertion_curves.shape == result.deletion_curves.shape == (8, 225)
    assert result.fractions[0] == 0.0 and result.fractions[-1] == 1.0
    # endpoints: the clean image and the black substrate
    probs = jax.nn.softmax(lite0(jnp.concatenate([jnp.asarray(images), jnp.zeros_like(images)])))
    clean = np.asarray(probs[np.arange(8), ref["predicted"]])
    black = np.asarray(probs[8 + np.arange(8), ref["predicted"]])
    np.testing.assert_allclose(result.deletion_curves[:, 0], clean, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(result.insertion_curves[:, -1], clean, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(result.insertion_curves[:, 0], black, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(result.deletion_curves[:, -1], black, rtol=1e-4, atol=1e-6)
    # the AUC of the mean curve equals the mean of the per-image AUCs
    np.testing.assert_allclose(result.insertion_auc, result.insertion_aucs.mean(), rtol=1e-10)


def test_lite0_mean_color_is_zero_of_its_preprocessing(lite0):
    color, source = substrate_mean_color(lite0)
    np.testing.assert_allclose(color, [127 / 255] * 3, rtol=1e-6)
    assert "preprocessing" in source


# ----------------------------------------------------------------------------- known answers
def test_region_model_known_answer():
    rng = np.random.default_rng(1)
    images = rng.uniform(0.0, 1.0, (2, SIZE, SIZE, 3)).astype(np.float32)
    images[:, :2, :2, :] = rng.uniform(0.6, 1.0, (2, 2, 2, 3))
    good = rng.uniform(0.0, 1.0, images.shape).astype(np.float32)
    good[:, :2, :2, :] += 2.0                  # the block the model reads comes first
    protocol = get_protocol("la", step=12)     # one step = the 12 elements of the block; 64 steps
    p_gone = float(jax.nn.softmax(jnp.asarray([-10.0, 0.0, -1.0]))[0])

    res = evaluate(region_model, images, good, protocol=protocol, chunk_size=16)
    assert res.insertion_curves.shape == (2, 65)
    np.testing.assert_array_equal(res.labels, [0, 0])
    np.testing.assert_allclose(res.deletion_curves[:, 1:], p_gone, rtol=1e-4)
    np.testing.assert_allclose(res.insertion_curves[:, 0], p_gone, rtol=1e-4)
    assert np.all(res.insertion_curves[:, 1:] > 0.999) and np.all(res.deletion_curves[:, 0] > 0.999)
    assert res.deletion_auc < 0.01 and res.insertion_auc > 0.99
    assert res.ins_minus_del > 0.98 and res.dir < 0.01

    rev = evaluate(region_model, images, -good, protocol=protocol, chunk_size=16)
    assert rev.deletion_auc > 0.99 and rev.insertion_auc < 0.01
    np.testing.assert_allclose(rev.deletion_curves[:, -1], p_gone, rtol=1e-4)
    assert np.all(rev.deletion_curves[:, :-1] > 0.999)
    assert rev.dir > 100


@pytest.mark.parametrize("name", ["la", "rise"])
def test_matches_loop_reference(name):
    images, maps = _random(2, 2)
    maps[0, :4] = 5.0   # 192 tied elements (64 tied pixels) ranked first, across several step boundaries
    protocol = get_protocol(name, step=24 if name == "la" else 8, mean_color=(0.4, 0.5, 0.6))
    res = evaluate(tiny_cnn, images, maps, protocol=protocol, chunk_size=7)
    expected = loop_reference(tiny_cnn, images, maps, protocol, (0.4, 0.5, 0.6))
    assert res.insertion_curves.shape == (2, 33)
    np.testing.assert_allclose(res.insertion_curves, expected[:, 0], atol=2e-6)
    np.testing.assert_allclose(res.deletion_curves, expected[:, 1], atol=2e-6)


def test_logit_score_and_given_labels():
    images, maps = _random(3, 2)
    protocol = get_protocol("la", step=96, score="logit")
    res = evaluate(tiny_cnn, images, maps, protocol=protocol, labels=[3, 7])
    logits = np.asarray(tiny_cnn(jnp.asarray(images)))
    np.testing.assert_allclose(res.deletion_curves[:, 0], logits[[0, 1], [3, 7]], rtol=1e-5)
    assert res.labels_source == "given" and res.labels.tolist() == [3, 7]


def test_rise_endpoints_are_blur_and_mean_color():
    images, maps = _random(4, 2)
    res = evaluate(tiny_cnn, images, maps, protocol="rise")   # 256 pixels, 224 per step: 2 steps
    color = np.asarray(IMAGENET_MEAN, np.float32)                # a plain callable: ImageNet mean
    assert res.protocol["mean_color"] == pytest.approx(list(IMAGENET_MEAN))
    assert "ImageNet" in res.protocol["mean_color_source"]
    blurred = jax.vmap(lambda x: gaussian_blur(x, size=11, sigma=5.0, padding="mean", mean_color=color))(images)
    probe = jnp.concatenate([jnp.asarray(images), blurred, jnp.broadcast_to(color, images.shape)])
    p = np.asarray(jax.nn.softmax(tiny_cnn(probe)))
    lab = res.labels
    np.testing.assert_allclose(res.insertion_curves[:, -1], p[[0, 1], lab], rtol=1e-5)
    np.testing.assert_allclose(res.insertion_curves[:, 0], p[[2, 3], lab], rtol=1e-5)
    np.testing.assert_allclose(res.deletion_curves[:, -1], p[[4, 5], lab], rtol=1e-5)
    assert res.fractions.tolist() == [0.0, 224 / 256, 1.0]


# ----------------------------------------------------------------------------- vectorisation
def test_batch_and_chunk_independence():
    images, maps = _random(5, 3)
    protocol = get_protocol("rise", step=16)
    full = evaluate(tiny_cnn, images, maps, protocol=protocol, chunk_size=8)
    for chunk in (1, 5, 200):
        other = evaluate(tiny_cnn, images, maps, protocol=protocol, chunk_size=chunk)
        np.testing.assert_allclose(other.insertion_curves, full.insertion_curves, atol=1e-6)
        np.testing.assert_allclose(other.deletion_curves, full.deletion_curves, atol=1e-6)
    alone = evaluate(tiny_cnn, images[1:2], maps[1:2], protocol=protocol, chunk_size=8)
    np.testing.assert_allclose(alone.insertion_curves[0], full.insertion_curves[1], atol=1e-6)
    np.testing.assert_allclose(alone.deletion_curves[0], full.deletion_curves[1], atol=1e-6)
    merged = GameResult.concatenate([evaluate(tiny_cnn, images[:1], maps[:1], protocol=protocol), alone,
                                     evaluate(tiny_cnn, images[2:], maps[2:], protocol=protocol)])
    assert merged.insertion_auc == pytest.approx(full.insertion_auc, abs=1e-6)
    assert merged.deletion_auc == pytest.approx(full.deletion_auc, abs=1e-6)


# ----------------------------------------------------------------------------- pieces
def test_ranks_descending_with_stable_ties():
    a = jnp.asarray([[[1.0, 0.0, 0.0], [0.0, 2.0, 0.0]]])          # [1, 2, 3]
    assert ranks(a, "element").reshape(-1).tolist() == [1, 2, 3, 4, 0, 5]
    assert ranks(jnp.zeros((2, 2, 3)), "element").reshape(-1).tolist() == list(range(12))
    # pixel ranking uses the channel sum: (1,1,1) -> 3 beats (2.5,0,0) -> 2.5
    b = jnp.asarray([[[2.5, 0.0, 0.0], [1.0, 1.0, 1.0]]])
    assert ranks(b, "pixel").shape == (1, 2, 1)
    assert ranks(b, "pixel").reshape(-1).tolist() == [1, 0]
    assert ranks(b, "element").reshape(-1).tolist() == [0, 4, 5, 1, 2, 3]


def test_rise_kernel_matches_scipy_gkern():
    impulse = np.zeros((11, 11))
    impulse[5, 5] = 1.0
    gkern = scipy.ndimage.gaussian_filter(impulse, 5)
    k = gaussian_kernel1d(11, 5.0, "rise")
    np.testing.assert_allclose(np.outer(k, k), gkern, rtol=1e-5, atol=1e-8)
    s = gaussian_kernel1d(11, 5.0, "sampled")
    assert s.sum() == pytest.approx(1.0) and s[0] < k[0]   # folding adds mass at the window edges


@pytest.mark.parametrize("padding,mode", [("mean", "constant"), ("zeros", "constant"), ("edge", "nearest"),
                                          ("reflect", "mirror")])
def test_blur_matches_scipy(padding, mode):
    x = np.random.default_rng(6).uniform(0, 1, (12, 14, 3)).astype(np.float32)
    color = (0.2, 0.5, 0.9)
    kern = np.outer(*[gaussian_kernel1d(5, 2.0, "rise")] * 2)
    cval = color if padding == "mean" else (0.0, 0.0, 0.0)
    expected = np.stack([scipy.ndimage.convolve(x[..., c], kern, mode=mode, cval=cval[c]) for c in range(3)], -1)
    got = gaussian_blur(jnp.asarray(x), size=5, sigma=2.0, padding=padding, mean_color=color)
    np.testing.assert_allclose(np.asarray(got), expected, atol=1e-6)


def test_auc_formula():
    assert float(auc(np.asarray([1.0, 0.0, 0.0]))) == pytest.approx(0.25)
    assert float(auc(np.ones(225))) == pytest.approx(1.0)


def test_mean_color_sources():
    class Exposed:
        normalization_mean = (0.1, 0.2, 0.3)

        def __call__(self, x):
            return tiny_cnn(x)

    assert substrate_mean_color(Exposed()) == ((0.1, 0.2, 0.3), "model normalization_mean")

    class Affine:
        preprocess = staticmethod(lambda x: (x - jnp.asarray([0.3, 0.4, 0.5])) / jnp.asarray([0.2, 0.2, 0.2]))

        def __call__(self, x):
            return tiny_cnn(x)

    color, source = substrate_mean_color(Affine())
    np.testing.assert_allclose(color, [0.3, 0.4, 0.5], atol=1e-6)

    class NotAffine:
        preprocess = staticmethod(lambda x: x ** 2 - 0.25)

        def __call__(self, x):
            return tiny_cnn(x)

    assert substrate_mean_color(NotAffine()) == (IMAGENET_MEAN, "ImageNet mean (default)")


def test_protocol_presets_and_record():
    la, rise = PROTOCOLS["la"], PROTOCOLS["rise"]
    assert (la.ranking, la.step, la.num_steps(224, 224), la.insertion_substrate, la.deletion_substrate) == \
        ("element", 672, 224, "zeros", "zeros")
    assert (rise.ranking, rise.step, rise.num_steps(224, 224), rise.insertion_substrate,
            rise.deletion_substrate, rise.blur_size, rise.blur_sigma) == ("pixel", 224, 224, "blur", "mean", 11, 5.0)
    assert get_protocol("la", step=12).name == "la(custom)"
    images, maps = _random(7, 1)
    res = evaluate(tiny_cnn, images, maps, protocol=get_protocol("la", step=96))
    record = json.loads(json.dumps(res.to_dict(curves=True)))
    assert record["protocol"]["step"] == 96 and record["protocol"]["ranking"] == "element"
    assert record["protocol"]["mean_color"] is None and "tie_break" in record["protocol"]
    assert record["insertion_auc"] == pytest.approx(res.insertion_auc)
    assert record["dir"] == pytest.approx(res.deletion_auc / res.insertion_auc)
    assert len(record["insertion_curves"][0]) == 9


# ----------------------------------------------------------------------------- bad input
def test_bad_input_errors():
    images, maps = _random(8, 2)
    with pytest.raises(ValueError, match="attributions must have the shape of images"):
        evaluate(tiny_cnn, images, maps[..., :1])
    bad = maps.copy()
    bad[1, 2, 3, 0] = np.nan
    with pytest.raises(ValueError, match="attributions contains NaN"):
        evaluate(tiny_cnn, images, bad)
    with pytest.raises(ValueError, match="unknown protocol 'deletion'"):
        evaluate(tiny_cnn, images, maps, protocol="deletion")
    with pytest.raises(ValueError, match="protocol.score"):
        get_protocol("la", score="prob")
    with pytest.raises(ValueError, match="protocol.blur_size must be odd"):
        Protocol(blur_size=10)
    with pytest.raises(TypeError, match="unknown protocol fields"):
        get_protocol("rise", sigma=3.0)
    with pytest.raises(ValueError, match="chunk_size"):
        evaluate(tiny_cnn, images, maps, chunk_size=0)
    with pytest.raises(ValueError, match="labels must have shape"):
        evaluate(tiny_cnn, images, maps, labels=[1, 2, 3])
    with pytest.raises(ValueError, match="images must have values in"):
        evaluate(tiny_cnn, images * 2, maps)
