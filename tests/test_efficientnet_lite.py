"""The Flax EfficientNet-Lite0 port against the PyTorch reference and the official logits."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from conftest import la1000_images

from la_iprop.models import ConversionError, load_model, load_state_dict
from la_iprop.models.efficientnet_lite import lite_preprocess
from la_iprop.models.layers import depthwise_conv
from la_iprop.models.zoo import EMBEDDED_LITE0_CHECKPOINT

_logits = jax.jit(lambda model, x: model(x))


@pytest.fixture(scope="module")
def torch_lite0():
    from efficientnet_lite_pytorch import EfficientNet
    model = EfficientNet.from_name("efficientnet-lite0")
    model.load_state_dict(torch.load(EMBEDDED_LITE0_CHECKPOINT(), weights_only=True))
    return model.eval()


def test_logits_match_pytorch_reference(lite0, torch_lite0):
    images, _ = la1000_images([0, 17, 333, 512, 998])
    rng = np.random.default_rng(0)
    images = np.concatenate([images, rng.uniform(size=(2, 224, 224, 3)).astype(np.float32)])
    ours = np.asarray(_logits(lite0, images))
    with torch.no_grad():
        x = torch.from_numpy(np.asarray(lite_preprocess(images))).permute(0, 3, 1, 2)
        theirs = torch_lite0(x).numpy()
    assert np.abs(ours - theirs).max() <= 1e-3
    np.testing.assert_array_equal(ours.argmax(-1), theirs.argmax(-1))


def test_logits_match_official_reference(lite0, la_reference):
    images, _ = la1000_images(la_reference["image_index"])
    ours = np.asarray(_logits(lite0, images))
    assert np.abs(ours - la_reference["logits"]).max() <= 1e-3
    np.testing.assert_array_equal(ours.argmax(-1), la_reference["predicted"])


@pytest.mark.slow
def test_top1_accuracy_on_la1000(lite0):
    correct = 0
    for start in range(0, 1000, 100):
        images, labels = la1000_images(range(start, start + 100))
        correct += int((np.asarray(_logits(lite0, images)).argmax(-1) == labels).sum())
    accuracy = correct / 1000
    assert accuracy >= 0.905, accuracy  # PyTorch reference: 0.911 with this preprocessing


@pytest.mark.parametrize("stride,kernel,size", [(1, 3, 9), (2, 3, 10), (2, 5, 11), (1, 5, 8)])
@pytest.mark.slow
def test_depthwise_implementations_agree(stride, kernel, size):
    rng = np.random.default_rng(stride * 10 + kernel)
    x = jnp.asarray(rng.normal(size=(2, size, size, 6)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(kernel, kernel, 6)), jnp.float32)
    pad = ((1, 2), (2, 1))
    a = depthwise_conv(x, w, stride, pad, impl="shift_add")
    b = depthwise_conv(x, w, stride, pad, impl="library")
    np.testing.assert_allclose(a, b, atol=1e-5)
    # ... and both equal PyTorch's grouped convolution.
    xt = torch.nn.functional.pad(torch.from_numpy(np.asarray(x)).permute(0, 3, 1, 2), (2, 1, 1, 2))
    wt = torch.from_numpy(np.asarray(w)).permute(2, 0, 1)[:, None]
    ref = torch.nn.functional.conv2d(xt, wt, stride=stride, groups=6).permute(0, 2, 3, 1).numpy()
    np.testing.assert_allclose(a, ref, atol=1e-4)
    ga = jax.grad(lambda v: depthwise_conv(v, w, stride, pad, impl="shift_add").sum())(x)
    gb = jax.grad(lambda v: depthwise_conv(v, w, stride, pad, impl="library").sum())(x)
    np.testing.assert_allclose(ga, gb, atol=1e-4)


def test_converter_names_missing_unexpected_and_misshaped_tensors():
    state = load_state_dict(EMBEDDED_LITE0_CHECKPOINT())
    broken = dict(state)
    del broken["_blocks.3._bn1.running_var"]
    broken["_extra.weight"] = np.zeros(3, np.float32)
    broken["_fc.bias"] = np.zeros(10, np.float32)
    with pytest.raises(ConversionError) as info:
        load_model("efficientnet_lite0", weights=broken)
    message = str(info.value)
    assert "_blocks.3._bn1.running_var" in message and "missing" in message
    assert "_extra.weight" in message and "unexpected" in message
    assert "_fc.bias" in message and "mis-shaped" in message


def test_unknown_model_and_missing_weights_are_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="unknown model 'resnet5'"):
        load_model("resnet5")
    with pytest.raises(FileNotFoundError, match="not found"):
        load_model("efficientnet_lite0", weights=tmp_path / "nope.pth")
