"""Issue 28: ``precision="float32"`` means full float32 on GPU and TPU too, checked on a CPU-only machine.

JAX's default precision for float32 dots and convolutions is the backend's fast mode (TF32 on NVIDIA
Ampere/Hopper, one bfloat16 pass on TPU) and the CPU ignores the setting, so no computation run here
can show it. ``jax.export`` lowers a jitted function for ``cuda`` or ``tpu`` without the device: the
StableHLO it writes states each ``dot_general``/``convolution``'s precision, which these tests read.
``"float32"`` must give every one ``HIGHEST``; the opt-in ``"float32_fast"`` none (the backend's
default). The depthwise convolution's implementation must follow the platform lowered for (the
library's grouped convolution for ``cuda``/``tpu``, shift-and-add for ``cpu``). On the CPU the two
float32 modes, and the default depthwise form and shift-and-add, give bit-identical numbers.

The lowering tests export abstract models (``jax.eval_shape`` weights, 32x32 images): nothing is
compiled or run, so full-size architectures cost only their tracing.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import re
from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import fast_tier_subset
from jax import export

from la_iprop.attribution import available_methods, get_method
from la_iprop.iprop import knn_graph
from la_iprop.metrics import evaluate, insertion_deletion
from la_iprop.metrics.insertion_deletion import get_protocol
from la_iprop.models import ModelFn, imagenet_normalize
from la_iprop.models.layers import depthwise_conv
from la_iprop.precision import PRECISIONS, precision_scope

SIZE = 32
BATCH = 2
ACCELERATORS = ("cuda", "tpu")   # jax.export's platform names
LITE0_DEPTHWISE_LAYERS = 16   # one per MBConv block of EfficientNet-Lite0

# --- reading the lowered program ------------------------------------------------------------------------------

_MATMUL_OP = re.compile(r"stablehlo\.(dot_general|convolution|dot)\b")
# dot_general prints ``precision = [HIGHEST, HIGHEST]``, convolution ``precision_config = [#stablehlo<precision
# HIGHEST>, ...]`` (and the generic form of either the latter); absent when the precision is the default.
_PRECISION = re.compile(r"precision(?:_config)?\s*=\s*\[([^\]]*)\]")
_PRECISION_VALUE = re.compile(r"\b(DEFAULT|HIGHEST|HIGH)\b")
_GROUPS = re.compile(r"feature_group_count\s*=\s*(\d+)")


@dataclasses.dataclass(frozen=True)
class MatmulOp:
    kind: str                   # "dot_general", "convolution" or "dot"
    precision: tuple[str, ...]  # per operand; () when the op states none (the backend's default)
    groups: int                 # a convolution's feature_group_count (1 otherwise)
    line: str


def matmul_ops(mlir: str) -> list[MatmulOp]:
    """Every dot/convolution of a StableHLO module's text, with its stated precision."""
    ops = []
    for line in mlir.splitlines():
        match = _MATMUL_OP.search(line)
        if not match:
            continue
        stated = _PRECISION.search(line)
        groups = _GROUPS.search(line)
        ops.append(MatmulOp(kind=match.group(1),
                            precision=tuple(_PRECISION_VALUE.findall(stated.group(1))) if stated else (),
                            groups=int(groups.group(1)) if groups else 1, line=line.strip()[:300]))
    return ops


def assert_precision(ops: list[MatmulOp], precision: str) -> None:
    """float32: every op at HIGHEST for both operands; float32_fast: none states HIGH/HIGHEST."""
    assert ops, "the program has no dot_general/convolution: the check would be vacuous"
    if precision == "float32":
        loose = [op.line for op in ops if op.precision != ("HIGHEST", "HIGHEST")]
        assert not loose, f"{len(loose)} of {len(ops)} dots/convolutions not at HIGHEST, e.g. {loose[:3]}"
    else:
        raised = [op.line for op in ops if set(op.precision) - {"DEFAULT"}]
        assert not raised, f"{len(raised)} of {len(ops)} dots/convolutions above the default, e.g. {raised[:3]}"


def lowered(fn: Callable, args, platforms=ACCELERATORS, precision: str | None = None) -> dict[str, str]:
    """``{platform: StableHLO text}`` of ``jax.jit(fn)`` lowered for each platform (inside ``precision``'s
    scope unless None). One jitted function: traced once, then only lowered per platform."""
    jitted = jax.jit(fn)
    with precision_scope(precision) if precision else contextlib.nullcontext():
        return {platform: export.export(jitted, platforms=[platform])(*args).mlir_module() for platform in platforms}


# --- abstract models ----------------------------------------------------------------------------------------

def _abstract(module: nn.Module, preprocess, name: str) -> ModelFn:
    variables = jax.eval_shape(module.init, jax.random.PRNGKey(0), jax.ShapeDtypeStruct((1, SIZE, SIZE, 3),
                                                                                          jnp.float32))
    return ModelFn(variables=variables, module=module, preprocess=preprocess, name=name, input_size=SIZE)


@pytest.fixture(scope="module")
def lite0_abstract() -> ModelFn:
    from la_iprop.models.efficientnet_lite import EfficientNetLite, lite_preprocess
    return _abstract(EfficientNetLite(width=1.0, depth=1.0), lite_preprocess, "efficientnet_lite0")


@pytest.fixture(scope="module")
def resnet50_abstract() -> ModelFn:
    from la_iprop.models.resnet import ResNet50
    return _abstract(ResNet50(), imagenet_normalize, "resnet50")


IMAGES = jax.ShapeDtypeStruct((BATCH, SIZE, SIZE, 3), jnp.float32)
LABELS = jax.ShapeDtypeStruct((BATCH,), jnp.int32)
FLOAT32_MODES = ("float32", "float32_fast")


# --- the precision of every dot/convolution, lowered for GPU and TPU ---------------------------------------

@pytest.mark.parametrize("precision", FLOAT32_MODES)
@pytest.mark.parametrize("model_name", ["lite0", "resnet50"])
def test_model_forward_precision_on_accelerators(model_name, precision, request):
    model = request.getfixturevalue(f"{model_name}_abstract")
    for text in lowered(lambda m, x: m(x), (model, IMAGES), precision=precision).values():
        assert_precision(matmul_ops(text), precision)


@pytest.mark.parametrize("precision", FLOAT32_MODES)
@pytest.mark.parametrize("method,hparams", [("sm", {}), pytest.param("ig", {"steps": 3}, marks=pytest.mark.slow)])
def test_gradient_method_precision_on_accelerators(method, hparams, precision, lite0_abstract):
    """The registered entry point, called with ``precision=`` inside the exported function."""
    def explain(model, images, labels):
        return get_method(method).fn(model, images, labels, precision=precision, **hparams)

    for text in lowered(explain, (lite0_abstract, IMAGES, LABELS)).values():
        ops = matmul_ops(text)
        assert_precision(ops, precision)
        assert any(op.kind == "convolution" and op.groups > 1 for op in ops)  # the gradient's depthwise: library


@pytest.mark.parametrize("precision", FLOAT32_MODES)
@pytest.mark.slow
def test_la_step_precision_on_accelerators(precision, lite0_abstract):
    def explain(model, images, labels):
        return get_method("la").fn(model, images, labels, key=jax.random.PRNGKey(0), max_iter=2, sampling_times=2,
                                   precision=precision)

    for text in lowered(explain, (lite0_abstract, IMAGES, LABELS)).values():
        assert_precision(matmul_ops(text), precision)


@pytest.mark.parametrize("precision", FLOAT32_MODES)
def test_metric_chunk_precision_on_accelerators(precision, lite0_abstract):
    """The insertion/deletion games' jitted scorer (what :func:`evaluate` runs inside its scope)."""
    protocol = get_protocol("la")

    def play(model, images, maps, labels):
        return insertion_deletion._play(model, images, maps, labels, protocol=protocol, chunk_size=4)

    for text in lowered(play, (lite0_abstract, IMAGES, IMAGES, LABELS), precision=precision).values():
        assert_precision(matmul_ops(text), precision)


def test_evaluate_scores_inside_its_precision_scope(monkeypatch):
    """evaluate traces its scorer with the call's matmul precision (so the export above is what it runs)."""
    seen = []
    original = insertion_deletion._play

    def spy(*args, **kwargs):
        seen.append(jax.config.jax_default_matmul_precision)
        return original(*args, **kwargs)

    monkeypatch.setattr(insertion_deletion, "_play", spy)
    images = np.random.default_rng(0).uniform(size=(1, 8, 8, 3)).astype(np.float32)
    for precision in FLOAT32_MODES:
        evaluate(lambda x: x.mean(axis=(1, 2)) @ jnp.eye(3), images, images, precision=precision)
    assert seen == ["highest", None]


def test_iprop_colour_transform_precision_on_accelerators():
    """IProp's CIELab conversion is a matrix product: full float32 in a float32 call."""
    image = jax.ShapeDtypeStruct((12, 12, 3), jnp.float32)
    for precision in FLOAT32_MODES:
        for text in lowered(lambda x: knn_graph(x, k=4, radius=1, color_space="lab").weights, (image,),
                            precision=precision).values():
            assert_precision(matmul_ops(text), precision)


# Small settings per method, so that each traced program stays cheap.
_REGISTRY_HPARAMS = {
    "agi": dict(num_targets=2, max_iter=2),
    "attexplore": dict(max_iter=2, num_samples=2, sample_chunk=2),
    "big": dict(epsilons=(0.01, 0.1), attack_steps=2, attack_step_size=None, steps=3),
    "mfaba": dict(max_iter=3, step_size=0.01),
    "la": dict(max_iter=2, sampling_times=2),
    "sg": dict(samples=2),
    "ig": dict(steps=3),
    "eg": dict(samples=2),
    "gig": dict(steps=3),
}


class _TinyCNN(nn.Module):
    activation: Callable = jax.nn.relu   # DeepLIFT swaps it for its rescale rule

    @nn.compact
    def __call__(self, x):
        x = self.activation(nn.Conv(4, (3, 3))(x))
        x = self.activation(nn.Conv(6, (3, 3), strides=(2, 2))(x))
        return nn.Dense(10)(jnp.mean(x, axis=(1, 2)))


def _tiny(variables=None) -> ModelFn:
    module = _TinyCNN()
    if variables is None:
        variables = jax.eval_shape(module.init, jax.random.PRNGKey(0), jax.ShapeDtypeStruct((1, 8, 8, 3),
                                                                                              jnp.float32))
    return ModelFn(variables=variables, module=module, preprocess=lambda x: x, name="tiny", input_size=8,
                   num_classes=10)


@pytest.mark.parametrize("name", sorted(available_methods()))
def test_every_method_is_full_float32_on_gpu(name):
    """Every registered method's program for ``cuda`` in a float32 call: all dots/convolutions HIGHEST
    (a tiny conv + dense classifier, so each program traces in about a second)."""
    model = _tiny()
    hparams = dict(_REGISTRY_HPARAMS.get(name, {}))
    if get_method(name).needs_reference_set:
        hparams["reference_images"] = np.random.default_rng(1).uniform(size=(3, 8, 8, 3)).astype(np.float32)

    def explain(m, images, labels):
        return get_method(name).fn(m, images, labels, key=jax.random.PRNGKey(0), precision="float32", **hparams)

    args = (model, jax.ShapeDtypeStruct((BATCH, 8, 8, 3), jnp.float32), LABELS)
    assert_precision(matmul_ops(lowered(explain, args, ("cuda",))["cuda"]), "float32")


def test_modes_do_not_share_a_traced_program(lite0_abstract):
    """JAX keys its trace cache on the matmul precision: one jitted function, exported in turn in each
    mode, gets each mode's precision (no program of one mode is reused in the other)."""
    jitted = jax.jit(lambda m, x: m(x))
    for precision in ("float32", "float32_fast", "float32"):
        with precision_scope(precision):
            text = export.export(jitted, platforms=["cuda"])(lite0_abstract, IMAGES).mlir_module()
        assert_precision(matmul_ops(text), precision)


# --- the depthwise convolution follows the lowering platform ------------------------------------------------

def test_depthwise_form_follows_the_lowering_platform(lite0_abstract):
    """The program lowered for cuda/tpu holds the library's grouped convolution (cuDNN's depthwise
    kernels), the one for cpu the shift-and-add form (no grouped convolution), whatever the host."""
    counts = {}
    for platform, text in lowered(lambda m, x: m(x), (lite0_abstract, IMAGES), ("cpu", *ACCELERATORS)).items():
        ops = matmul_ops(text)
        counts[platform] = (sum(op.groups > 1 for op in ops), len(ops))
    for platform in ACCELERATORS:
        assert counts[platform][0] == LITE0_DEPTHWISE_LAYERS, counts
    grouped_cpu, total_cpu = counts["cpu"]
    assert grouped_cpu == 0 and total_cpu == counts["cuda"][1] - LITE0_DEPTHWISE_LAYERS, counts


def test_default_depthwise_is_shift_add_bit_for_bit_on_cpu():
    """impl=None on the CPU is the shift-and-add form exactly: forward and both cotangents (jitted, where
    the platform-dependent choice is staged out), strides 1 and 2."""
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(2, 9, 10, 5)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(3, 3, 5)), jnp.float32)
    padding = ((1, 1), (0, 1))

    @functools.partial(jax.jit, static_argnums=(0, 1))
    def forward_and_vjp(impl, stride):
        out, pullback = jax.vjp(lambda v, k: depthwise_conv(v, k, stride, padding, impl), x, w)
        return (out, *pullback(jnp.cos(out)))

    for stride in (1, 2):
        for a, b in zip(forward_and_vjp(None, stride), forward_and_vjp("shift_add", stride), strict=True):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


# --- on the CPU the two float32 modes are the same numbers --------------------------------------------------

@pytest.fixture(scope="module")
def tiny_cpu():
    """The tiny classifier with real (random-initialised) weights, two 8x8 images and their labels."""
    model = _tiny(_TinyCNN().init(jax.random.PRNGKey(1), jnp.zeros((1, 8, 8, 3))))
    return model, np.random.default_rng(2).uniform(0.05, 1.0, (2, 8, 8, 3)).astype(np.float32), np.array([3, 7])


@pytest.mark.parametrize("name", fast_tier_subset(sorted(available_methods()), fast={"la", "sm"}))
def test_float32_and_float32_fast_are_bit_identical_on_cpu(name, tiny_cpu):
    """The CPU computes every float32 dot/convolution in float32 whatever the stated precision, so HIGHEST
    changes no bit there: every registered method's maps (tiny classifier)."""
    model, images, labels = tiny_cpu
    hparams = dict(_REGISTRY_HPARAMS.get(name, {}))
    if get_method(name).needs_reference_set:
        hparams["reference_images"] = np.random.default_rng(1).uniform(size=(3, 8, 8, 3)).astype(np.float32)
    maps = [np.asarray(get_method(name).fn(model, images, labels, key=jax.random.PRNGKey(0), precision=precision,
                                           **hparams)) for precision in FLOAT32_MODES]
    assert maps[0].dtype == np.float32
    np.testing.assert_array_equal(maps[0], maps[1])


def test_float32_and_float32_fast_curves_are_bit_identical_on_cpu(tiny_cpu):
    model, images, labels = tiny_cpu
    games = [evaluate(model, images, images, labels=labels, protocol="rise", precision=precision)
             for precision in FLOAT32_MODES]
    np.testing.assert_array_equal(games[0].insertion_curves, games[1].insertion_curves)
    np.testing.assert_array_equal(games[0].deletion_curves, games[1].deletion_curves)


@pytest.mark.slow
def test_float32_and_float32_fast_are_bit_identical_on_cpu_lite0(lite0):
    """The same on EfficientNet-Lite0 (64x64): a gradient method's and LA's maps, the metric's curves."""
    rng = np.random.default_rng(4)
    images = rng.uniform(size=(2, 64, 64, 3)).astype(np.float32)
    labels = np.array([3, 500])
    results = {}
    for precision in FLOAT32_MODES:
        sm = get_method("sm").fn(lite0, images, labels, precision=precision)
        la = get_method("la").fn(lite0, images, labels, key=jax.random.PRNGKey(0), max_iter=2, sampling_times=2,
                                 precision=precision)
        game = evaluate(lite0, images, np.asarray(sm), labels=labels, chunk_size=8, precision=precision)
        assert sm.dtype == la.dtype == jnp.float32
        results[precision] = [np.asarray(sm), np.asarray(la), game.insertion_curves, game.deletion_curves]
    for a, b in zip(results["float32"], results["float32_fast"], strict=True):
        np.testing.assert_array_equal(a, b)


# --- the scope ----------------------------------------------------------------------------------------------

def test_three_precisions_and_their_scopes():
    from la_iprop.precision import float_dtype, precision_dtype, resolve_precision
    assert PRECISIONS == ("float32", "float64", "float32_fast")
    outside = jax.config.jax_default_matmul_precision   # None unless the environment sets it
    expected = {"float32": ("highest", False), "float32_fast": (None, False), "float64": (outside, True)}
    for precision, (matmul, x64) in expected.items():
        with precision_scope(precision):
            assert jax.config.jax_default_matmul_precision == matmul and jax.config.jax_enable_x64 == x64
            assert float_dtype() == precision_dtype(precision) == (np.float64 if x64 else np.float32)
            assert resolve_precision(None) == precision   # a nested call inherits the mode
    # a caller's own global setting: the float32 modes replace it for the call, float64 leaves it; restored after
    with jax.default_matmul_precision("bfloat16"):
        for precision, inside in (("float32", "highest"), ("float32_fast", None), ("float64", "bfloat16")):
            with precision_scope(precision):
                assert jax.config.jax_default_matmul_precision == inside
            assert jax.config.jax_default_matmul_precision == "bfloat16"
        with pytest.raises(RuntimeError, match="inside"), precision_scope("float32"):
            raise RuntimeError("inside")
        assert jax.config.jax_default_matmul_precision == "bfloat16"
    assert jax.config.jax_default_matmul_precision == outside and not jax.config.jax_enable_x64


@pytest.mark.parametrize("bad", ["float32-fast", "tf32", None, 32])
def test_bad_precision_names_the_argument_and_the_three_values(bad):
    from la_iprop.precision import check_precision, precision_dtype
    for check in (check_precision, precision_dtype):
        with pytest.raises(ValueError, match=r"precision must be one of \['float32', 'float64', 'float32_fast'\]"):
            check(bad)
    if bad is not None:   # None is "inherit" for an entry point
        with pytest.raises(ValueError, match="precision must be one of"):
            get_method("sm").fn(lambda x: x.mean(axis=(1, 2)), np.zeros((1, 4, 4, 3), np.float32), None,
                                precision=bad)
