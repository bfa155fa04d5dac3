"""Parity of the Flax ports of torchvision's resnet50, vgg16, inception_v3 and maxvit_t.

For each model a torchvision instance with random weights (fixed seed; biases, norm
affines and BatchNorm running statistics randomised so that each tensor matters) is
saved as a ``.pth``, converted by ``load_model(name, weights=path)`` and compared on a
random image and a la1000 image: logits, the output of every Flax submodule against the
torchvision module of the same name (forward hooks), and input gradients. No pretrained
weights are needed.

Input gradients of ReLU networks are discontinuous: in float32 a pre-activation within
rounding error of 0 can change sign between frameworks (torch float32 itself differs
from torch float64 by ~1% of the gradient scale on these random models). So exactness
is checked in float64 (both frameworks, max difference <= 1e-8 of the scale), and
float32 gradients are required to be as close to the float64 gradient as torch's own
float32 gradient is.
"""

from __future__ import annotations

import copy
import math
import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import ROOT, la1000_images
from flax import traverse_util

from la_iprop.models import CheckpointError, ConversionError, load_model, zoo
from la_iprop.models.inception import inception_torch_name
from la_iprop.models.maxvit import maxvit_torch_name
from la_iprop.models.resnet import resnet_torch_name
from la_iprop.models.vgg import vgg_torch_name

torch = pytest.importorskip("torch")
torchvision = pytest.importorskip("torchvision")

MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)
TORCH_NAMES = {"resnet50": resnet_torch_name, "vgg16": vgg_torch_name, "inception_v3": inception_torch_name,
               "maxvit_t": maxvit_torch_name}
FILES = {"resnet50": "resnet50-0676ba61.pth", "vgg16": "vgg16-397923af.pth",
         "inception_v3": "inception_v3_google-0cc3c7bd.pth", "maxvit_t": "maxvit_t-bc5ab103.pth"}


def _torchvision_model(name):
    models = torchvision.models
    if name == "inception_v3":
        # As inception_v3(weights=IMAGENET1K_V1) builds it: transform_input on, aux head present.
        return models.inception_v3(weights=None, aux_logits=True, transform_input=True, init_weights=True)
    return getattr(models, name)(weights=None)


def _randomise(model, images, seed):
    """Random biases and norm affines; BatchNorm statistics measured on ``images`` then perturbed.

    Measured statistics keep the activations O(1) through the depth (torchvision's
    initialisations assume training-mode BatchNorm); the perturbation makes the
    running statistics differ from any batch's. MaxViT's tiny default init (std 0.02)
    would leave attention uniform and the relative position bias irrelevant, so its
    weights are variance-preserving, its queries/keys sharper and its bias table N(0, 1).
    """
    nn = torch.nn
    gen = torch.Generator().manual_seed(seed)
    rand = lambda shape: torch.randn(shape, generator=gen)  # noqa: E731
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (nn.Conv2d, nn.Linear)):
                if isinstance(model, torchvision.models.MaxVit):
                    module.weight.copy_(rand(module.weight.shape) / math.sqrt(module.weight[0].numel()))
                if module.bias is not None:
                    module.bias.copy_(0.1 * rand(module.bias.shape))
            if isinstance(module, (nn.BatchNorm2d, nn.LayerNorm)):
                module.weight.copy_(0.5 + torch.rand(module.weight.shape, generator=gen))
                module.bias.copy_(0.2 * rand(module.bias.shape))
            if isinstance(module, torchvision.models.maxvit.RelativePositionalMultiHeadAttention):
                module.relative_position_bias_table.copy_(rand(module.relative_position_bias_table.shape))
                module.to_qkv.weight.mul_(2.0)
        norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
        for bn in norms:
            bn.reset_running_stats()
            bn.momentum = None  # cumulative average: one batch -> its statistics
        aux = getattr(model, "AuxLogits", None)
        if aux is not None:
            model.AuxLogits = None  # Inception's training-only head does not fit 224x224 inputs
        model.train()
        model(images)
        model.eval()
        if aux is not None:
            model.AuxLogits = aux
        for bn in norms:
            bn.momentum = 0.1
            bn.running_var.mul_(0.5 + 1.5 * torch.rand(bn.running_var.shape, generator=gen))
            bn.running_mean.add_(0.3 * bn.running_var.sqrt() * rand(bn.running_mean.shape))
    return model


def _normalise(images_nhwc, dtype=torch.float32):
    """[0,1] NHWC (numpy or tensor) -> ImageNet-normalised NCHW torch tensor; constants in float64, as JAX's."""
    x = images_nhwc if isinstance(images_nhwc, torch.Tensor) else torch.from_numpy(np.asarray(images_nhwc, np.float64))
    mean = torch.tensor(MEAN, dtype=torch.float64)
    std = torch.tensor(STD, dtype=torch.float64)
    return ((x.double() - mean) / std).permute(0, 3, 1, 2).to(dtype)


@pytest.fixture(scope="module")
def inputs():
    """A uniform-noise image and la1000 image 0, NHWC float32 in [0,1]."""
    noise = np.random.default_rng(0).uniform(0, 1, (1, 224, 224, 3)).astype(np.float32)
    photo, _ = la1000_images([0])
    return np.concatenate([noise, photo]).astype(np.float32)


class Pair:
    def __init__(self, name, torch_model, model_fn, path):
        self.name, self.torch_model, self.model_fn, self.path = name, torch_model, model_fn, path


@pytest.fixture(scope="module", params=list(TORCH_NAMES))
def pair(request, tmp_path_factory, inputs):
    name = request.param
    torch.manual_seed(0)
    model = _torchvision_model(name)
    calibration = np.random.default_rng(1).uniform(0, 1, (2, 224, 224, 3))
    model = _randomise(model, _normalise(calibration), seed=1)
    path = tmp_path_factory.mktemp(name) / f"{name}.pth"
    torch.save(model.state_dict(), path)
    yield Pair(name, model, load_model(name, weights=str(path)), path)


def _nhwc(t, like_shape):
    """A torch output in the Flax layout: NCHW feature maps are transposed, [B, G, P, D] kept."""
    array = t.detach().numpy()
    if array.shape == tuple(like_shape):
        return array
    if array.ndim == 4 and array.transpose(0, 2, 3, 1).shape == tuple(like_shape):
        return array.transpose(0, 2, 3, 1)
    raise AssertionError(f"torch output {array.shape} does not match Flax {tuple(like_shape)}")


def test_logits_and_every_layer_match(pair, inputs):
    """Logits and the output of every Flax submodule vs the torchvision module of the same name."""
    fn = pair.model_fn
    torch_name = TORCH_NAMES[pair.name]
    logits, state = jax.jit(lambda f, x: f.module.apply(f.variables, f.preprocess(x), capture_intermediates=True,
                                                         mutable=["intermediates"]))(fn, jnp.asarray(inputs))
    captured = {path[:-1]: value[0] for path, value in
                traverse_util.flatten_dict(state["intermediates"]).items() if path[:-1]}
    torch_modules = dict(pair.torch_model.named_modules())
    outputs, hooks, unmatched = {}, [], []
    for path in captured:
        module_name = torch_name(("params", *path, "kernel")).rsplit(".", 1)[0]
        if module_name not in torch_modules:
            unmatched.append(f"{'/'.join(path)} -> {module_name}")
            continue

        def hook(_, __, out, key=path):
            outputs[key] = out.detach().clone()  # before in-place ReLUs / residual adds modify it

        hooks.append(torch_modules[module_name].register_forward_hook(hook))
    assert not unmatched, f"Flax modules without a torchvision counterpart: {unmatched}"
    try:
        with torch.no_grad():
            torch_logits = pair.torch_model(_normalise(inputs)).numpy()
    finally:
        for h in hooks:
            h.remove()

    scale = np.abs(torch_logits).max()
    assert scale > 1e-2
    assert np.abs(np.asarray(fn(jnp.asarray(inputs))) - torch_logits).max() <= 1e-3 * scale
    assert np.abs(np.asarray(logits) - torch_logits).max() <= 1e-3 * scale

    # Every layer, each within 1e-4 of its own scale: activations are continuous, so
    # float32 differences stay at rounding level all the way down.
    assert len(outputs) == len(captured)
    layers = {name for name, m in torch_modules.items() if not name.startswith("AuxLogits")
              and isinstance(m, (torch.nn.Conv2d, torch.nn.Linear, torch.nn.BatchNorm2d, torch.nn.LayerNorm))}
    compared = {torch_name(("params", *path, "kernel")).rsplit(".", 1)[0] for path in outputs}
    assert layers <= compared, f"layers not compared: {sorted(layers - compared)[:10]}"
    errors = {}
    for path, flax_out in captured.items():
        ref = _nhwc(outputs[path], flax_out.shape)
        errors["/".join(path)] = np.abs(np.asarray(flax_out) - ref).max() / max(np.abs(ref).max(), 1e-6)
    worst = max(errors, key=errors.get)
    assert errors[worst] <= 1e-4, f"{worst}: relative error {errors[worst]:.2e}"


def _torch_input_grad(model, images, labels, dtype):
    x = torch.from_numpy(np.asarray(images, np.float64)).requires_grad_()
    logits = model(_normalise(x, dtype))
    logits[torch.arange(len(labels)), torch.as_tensor(labels)].sum().backward()
    return x.grad.numpy()


@jax.jit
def _jax_input_grad(fn, images, labels):
    return jax.grad(lambda x: jnp.take_along_axis(fn(x), labels[:, None], axis=1).sum())(images)


def test_input_gradients_match(pair, inputs):
    """d logit_y / d image in float64 (exact port) and float32 (as accurate as torch's own float32)."""
    with torch.no_grad():
        labels = pair.torch_model(_normalise(inputs)).argmax(1).numpy()
    model64 = copy.deepcopy(pair.torch_model).double()
    g_torch64 = _torch_input_grad(model64, inputs, labels, torch.float64)
    del model64
    g_torch32 = _torch_input_grad(pair.torch_model, inputs, labels, torch.float32)
    g_jax32 = np.asarray(_jax_input_grad(pair.model_fn, jnp.asarray(inputs), jnp.asarray(labels)), np.float64)
    with jax.enable_x64(True):
        fn64 = pair.model_fn.replace(variables=jax.tree_util.tree_map(lambda v: jnp.asarray(v, jnp.float64),
                                                                      pair.model_fn.variables))
        # One image suffices for exactness (float64 convolutions are slow on CPU).
        g_jax64 = np.asarray(_jax_input_grad(fn64, jnp.asarray(inputs[1:], jnp.float64), jnp.asarray(labels[1:])))

    scale = np.abs(g_torch64).max()
    assert scale > 0
    assert g_jax64.dtype == np.float64
    assert np.abs(g_jax64 - g_torch64[1:]).max() <= 1e-8 * scale

    norm = np.linalg.norm
    torch_error = norm(g_torch32 - g_torch64) / norm(g_torch64)
    jax_error = norm(g_jax32 - g_torch64) / norm(g_torch64)
    assert jax_error <= max(3 * torch_error, 1e-4), (jax_error, torch_error)


def test_missing_and_unexpected_tensors_are_named(pair):
    state_dict = {k: v.numpy() for k, v in pair.torch_model.state_dict().items()}
    keys = [k for k in state_dict if not k.endswith(("num_batches_tracked", "relative_position_index"))
            and not k.startswith("AuxLogits")]
    missing = keys[len(keys) // 2]
    del state_dict[missing]
    state_dict["head.extra.weight"] = np.zeros((3, 3), np.float32)
    with pytest.raises(ConversionError, match=re.escape(missing)) as err:
        load_model(pair.name, weights=state_dict)
    assert "head.extra.weight" in str(err.value) and "1 missing" in str(err.value)


def test_activation_and_max_pool_are_swappable_fields(pair, inputs):
    """Every nonlinearity torchvision applies with ReLU/GELU goes through ``activation`` (DeepLIFT
    swaps it), every max-pool through ``max_pool``: call sites counted while tracing."""
    calls = {"activation": 0, "max_pool": 0}
    module = pair.model_fn.module

    def counted(kind, base):
        def wrapper(*args, **kwargs):
            calls[kind] += 1
            return base(*args, **kwargs)
        return wrapper

    overrides = {"activation": counted("activation", module.activation)}
    if hasattr(module, "max_pool"):
        overrides["max_pool"] = counted("max_pool", module.max_pool)
    jax.eval_shape(pair.model_fn.with_module(**overrides), jnp.asarray(inputs[:1]))

    torch_calls = {"activation": 0, "max_pool": 0}
    nn = torch.nn
    hooks = []
    for name, m in pair.torch_model.named_modules():
        if name.startswith("AuxLogits"):  # inactive at inference
            continue
        kind = ("activation" if isinstance(m, (nn.ReLU, nn.GELU, torchvision.models.inception.BasicConv2d))
                else "max_pool" if isinstance(m, (nn.MaxPool2d, torchvision.models.inception.InceptionB,
                                                  torchvision.models.inception.InceptionD)) else None)
        if kind:  # BasicConv2d ends in F.relu; InceptionB/D each hold one F.max_pool2d
            hooks.append(m.register_forward_hook(lambda *_, k=kind: torch_calls.__setitem__(k, torch_calls[k] + 1)))
    try:
        with torch.no_grad():
            pair.torch_model(_normalise(inputs[:1]))
    finally:
        for h in hooks:
            h.remove()
    assert calls == torch_calls and calls["activation"] > 10


@pytest.mark.parametrize("pair", ["resnet50"], indirect=True)  # one architecture is enough for the format
def test_flax_checkpoint_roundtrip(pair, tmp_path):
    """scripts/convert_weights.py writes a .msgpack that loads to the same variables."""
    out = tmp_path / "resnet50.msgpack"
    subprocess.run([sys.executable, str(ROOT / "scripts" / "convert_weights.py"), "resnet50", str(pair.path),
                    "--out", str(out)], check=True, capture_output=True, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert sorted(os.listdir(tmp_path)) == ["resnet50.msgpack"]  # no temporary file left behind
    loaded = load_model("resnet50", weights=str(out))
    same = jax.tree_util.tree_map(lambda a, b: bool(np.array_equal(a, b)), loaded.variables, pair.model_fn.variables)
    assert all(jax.tree_util.tree_leaves(same))

    with pytest.raises(ConversionError, match="holds variables of 'resnet50', not 'vgg16'"):
        load_model("vgg16", weights=str(out))
    broken = tmp_path / "broken.msgpack"
    broken.write_bytes(out.read_bytes()[:1000])
    with pytest.raises(CheckpointError):
        load_model("resnet50", weights=str(broken))
    partial = pair.model_fn.replace(variables={"params": {k: v for k, v in pair.model_fn.variables["params"].items()
                                                          if k != "fc"},
                                               "batch_stats": pair.model_fn.variables["batch_stats"]})
    zoo.save_flax_checkpoint(partial, tmp_path / "partial.msgpack")
    with pytest.raises(ConversionError, match="params/fc/kernel"):
        load_model("resnet50", weights=str(tmp_path / "partial.msgpack"))


def test_wrong_architecture_is_refused_naming_tensors():
    state_dict = {k: v.numpy() for k, v in torchvision.models.resnet18(weights=None).state_dict().items()}
    with pytest.raises(ConversionError) as err:
        load_model("resnet50", weights=state_dict)
    message = str(err.value)
    assert "layer1.0.conv3.weight" in message  # missing: resnet18 has no third conv per block
    assert "layer1.0.conv1.weight: checkpoint (64, 64, 3, 3)" in message  # mis-shaped
    with pytest.raises(ConversionError, match=r"features\.0\.weight[\s\S]*unexpected[\s\S]*conv1\.weight"):
        load_model("vgg16", weights=state_dict)
    with pytest.raises(ConversionError, match=r"Conv2d_1a_3x3\.conv\.weight"):
        load_model("inception_v3", weights=state_dict)
    with pytest.raises(ConversionError, match=r"stem\.0\.0\.weight"):
        load_model("maxvit_t", weights=state_dict)


def test_relative_position_index_is_checked():
    from la_iprop.models.maxvit import check_relative_position_index, relative_position_index

    reference = torchvision.models.maxvit._get_relative_position_index(7, 7).numpy()
    assert np.array_equal(relative_position_index(7), reference)
    name = "blocks.0.layers.0.layers.window_attention.attn_layer.1.relative_position_index"
    assert check_relative_position_index({name: reference, "x": np.zeros(1)}).keys() == {"x"}
    with pytest.raises(ConversionError, match=re.escape(name)):
        check_relative_position_index({name: reference[::-1]})


@pytest.mark.parametrize("pair", ["resnet50"], indirect=True)  # the cache lookup is the same for every model
def test_without_weights_the_zoo_names_the_file_and_finds_the_torch_cache(monkeypatch, tmp_path, pair):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("TORCH_HOME", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    for name, file in FILES.items():
        with pytest.raises(FileNotFoundError, match=re.escape(file)):
            load_model(name)
    home_cache = tmp_path / "home" / ".cache" / "torch" / "hub" / "checkpoints"
    home_cache.mkdir(parents=True)
    (home_cache / FILES["resnet50"]).symlink_to(pair.path)
    assert zoo.torchvision_checkpoint(FILES["resnet50"]) == str(home_cache / FILES["resnet50"])
    torch_home = tmp_path / "torch_home"
    (torch_home / "hub" / "checkpoints").mkdir(parents=True)
    (torch_home / "hub" / "checkpoints" / FILES["resnet50"]).symlink_to(pair.path)
    monkeypatch.setenv("TORCH_HOME", str(torch_home))
    assert zoo.torchvision_checkpoint(FILES["resnet50"]) == str(torch_home / "hub" / "checkpoints" / FILES["resnet50"])
    loaded = load_model("resnet50")
    assert np.array_equal(loaded.variables["params"]["fc"]["kernel"], pair.model_fn.variables["params"]["fc"]["kernel"])
