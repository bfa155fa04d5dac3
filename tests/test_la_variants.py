"""LA's ablation hyperparameters: ``strategy`` (mixed / targeted / untargeted runs at equal K) and ``constraint``
(the local box or none), each against a plain-loop transcription in float64; their errors; :func:`la_cost`
against counted model passes."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import in_float64

from la_iprop.attribution import method_hparams
from la_iprop.attribution.la import CONSTRAINTS, STRATEGIES, LACost, la_cost, local_attribution
from la_iprop.precision import float_dtype

NUM_CLASSES = 7
SIZE = 5


def _random_logits(seed: int = 0):
    """A small nonlinear classifier on [N, 5, 5, 3] images: 3x3 conv, tanh, linear head (weights follow the dtype)."""
    rng = np.random.default_rng(seed)
    kernel = rng.normal(size=(3, 3, 3, 3))
    head = rng.normal(size=(SIZE * SIZE * 3, NUM_CLASSES)) / 2

    def logit_fn(images):
        h = jax.lax.conv_general_dilated(images, jnp.asarray(kernel, images.dtype), (1, 1), "SAME",
                                         dimension_numbers=("NHWC", "HWIO", "NHWC"))
        return jnp.tanh(h).reshape(images.shape[0], -1) @ jnp.asarray(head, images.dtype)

    return logit_fn


MODEL = _random_logits()


def _images(batch: int, seed: int = 1) -> np.ndarray:
    images = np.random.default_rng(seed).uniform(0.05, 1.0, size=(batch, SIZE, SIZE, 3))
    images[0, 0, 0] = [0.97, 0.99, 0.0]  # near 1 (the range clips the walk) and a zero element (eps = 0)
    return images.astype(float_dtype())


# --- the maths, written plainly ---------------------------------------------------------------------------------

def _grad_p(x: np.ndarray, c: int) -> np.ndarray:
    """grad_x softmax(logits(x))_c of one image, one class at a time."""
    return np.asarray(jax.grad(lambda v: jax.nn.softmax(MODEL(v[None])[0])[c])(jnp.asarray(x)))


def _replace(c: int, y: int) -> int:
    return (c + 1 if c < NUM_CLASSES - 1 else c - 1) if c == y else c


def _plain_la(x0, y, targets, *, s, T, K, update, step_size, strategy, constraint):
    """LA of one image from the module docstring, with Python loops: K runs, each T steps from x0."""
    eps = x0 / s
    alpha = step_size * eps
    if constraint == "box":
        lower, upper = np.clip(x0 - eps, 0, 1), np.clip(x0 + eps, 0, 1)
    else:
        lower, upper = np.zeros_like(x0), np.ones_like(x0)
    targeted = [(_replace(int(c), y), 1.0) for c in targets]
    runs = {"mixed": targeted + [(y, -1.0)], "targeted": targeted, "untargeted": [(y, -1.0)] * K}[strategy]
    assert len(runs) == K
    total = np.zeros_like(x0)
    for c, d in runs:  # untargeted: K separate (identical) runs, as the definition says
        x = x0
        for _ in range(T):
            g_c, g_y = _grad_p(x, c), _grad_p(x, y)
            base = x0 if update == "restart" else x
            x_next = np.minimum(np.maximum(base + d * alpha * np.sign(g_c), lower), upper)
            total = total - g_y * (x_next - base)
            x = x_next
    return total


WALKS = [("restart", 1.0, "box"), ("pgd", 0.4, "box"), ("pgd", 0.4, "none")]


@in_float64
@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("update,step_size,constraint", WALKS)
@pytest.mark.slow
def test_matches_plain_loops_in_float64(strategy, update, step_size, constraint):
    images = _images(2)
    labels = np.array([2, 6])
    k, t = 3, 4
    # the label among the targets: replaced by 3, and by 5 for the last class
    targets = {"mixed": np.array([[2, 0], [6, 1]]), "targeted": np.array([[2, 0, 4], [1, 6, 3]]),
               "untargeted": None}[strategy]
    ours = np.asarray(local_attribution(MODEL, images, labels, spatial_range=3.0, max_iter=t, sampling_times=k,
                                        update=update, step_size=step_size, strategy=strategy,
                                        constraint=constraint, target_classes=targets))
    assert ours.dtype == np.float64
    for i in range(2):
        expected = _plain_la(images[i], int(labels[i]), [] if targets is None else targets[i], s=3.0, T=t, K=k,
                             update=update, step_size=step_size, strategy=strategy, constraint=constraint)
        assert np.abs(expected).max() > 0
        np.testing.assert_allclose(ours[i], expected, rtol=0, atol=1e-12 * np.abs(expected).max())
        assert np.all(ours[i][images[i] == 0.0] == 0.0)


@in_float64
def test_untargeted_is_one_run_times_k():
    images = _images(2, seed=4)
    common = dict(max_iter=3, spatial_range=4.0)
    one_mixed = np.asarray(local_attribution(MODEL, images, None, sampling_times=1, **common))  # the untargeted run
    one = np.asarray(local_attribution(MODEL, images, None, sampling_times=1, strategy="untargeted", **common))
    np.testing.assert_allclose(one, one_mixed, rtol=0, atol=1e-15 * np.abs(one).max())
    five, iterates = local_attribution(MODEL, images, None, sampling_times=5, strategy="untargeted",
                                       return_iterates=True, **common)
    np.testing.assert_allclose(five, 5 * one, rtol=1e-15, atol=0)
    iterates = np.asarray(iterates)
    assert iterates.shape == (2, 5, 3, SIZE, SIZE, 3)
    assert np.all(iterates == iterates[:, :1])


@in_float64
@pytest.mark.slow
def test_targeted_runs_are_mixed_runs_without_the_untargeted_one():
    images = _images(1, seed=5)
    targets = np.array([1, 3, 4])
    common = dict(max_iter=3, target_classes=targets)
    targeted = local_attribution(MODEL, images, np.array([0]), sampling_times=3, strategy="targeted", **common)
    _, paths = local_attribution(MODEL, images, np.array([0]), sampling_times=4, return_iterates=True, **common)
    _, targeted_paths = local_attribution(MODEL, images, np.array([0]), sampling_times=3, strategy="targeted",
                                          return_iterates=True, **common)
    np.testing.assert_array_equal(targeted_paths, paths[:, :3])
    mixed = local_attribution(MODEL, images, np.array([0]), sampling_times=4, **common)
    untargeted = local_attribution(MODEL, images, np.array([0]), sampling_times=1, max_iter=3)
    np.testing.assert_allclose(targeted + untargeted, mixed, rtol=0, atol=1e-13 * np.abs(mixed).max())


@in_float64
@pytest.mark.parametrize("strategy", ["mixed", "untargeted"])  # targeted: in the plain-loop test
@pytest.mark.slow
def test_no_constraint_is_the_box_walk_until_it_leaves_the_box(strategy):
    images = _images(2, seed=6)
    common = dict(key=jax.random.PRNGKey(0), spatial_range=5.0, sampling_times=3, update="pgd", strategy=strategy)
    # 3 steps of 0.3 eps cannot leave the box: the walks are the same
    short = [local_attribution(MODEL, images, None, max_iter=3, step_size=0.3, constraint=c, **common)
             for c in CONSTRAINTS]
    np.testing.assert_array_equal(*short)
    # 8 steps of 0.5 eps can: the walk without the box goes further (yet stays in [0, 1]) and the map differs
    maps, paths = zip(*[local_attribution(MODEL, images, None, max_iter=8, step_size=0.5, constraint=c,
                                          return_iterates=True, **common) for c in CONSTRAINTS], strict=True)
    x0 = images[:, None, None]
    eps = x0 / 5.0
    outside = [np.abs(np.asarray(p) - x0) > eps * (1 + 1e-12) for p in paths]
    assert not np.any(outside[0]) and np.any(outside[1])
    assert np.all((np.asarray(paths[1]) >= 0) & (np.asarray(paths[1]) <= 1))
    assert not np.allclose(maps[0], maps[1])


# --- model passes ------------------------------------------------------------------------------------------------

def _counted(logit_fn):
    """``logit_fn`` with Python-side counters of the images it evaluates (forward) and of the cotangents it pulls
    back to the input (backward), incremented at run time (``jax.debug.callback``, once per vmapped element)."""
    counts = {"forwards": 0, "backwards": 0}

    def bump(name):
        def callback(array):
            counts[name] += array.shape[0]
        return callback

    def forward(images):
        jax.debug.callback(bump("forwards"), images)
        return logit_fn(images)

    @jax.custom_vjp
    def model(images):
        return forward(images)

    def model_fwd(images):
        return forward(images), images

    def model_bwd(images, cotangent):
        jax.debug.callback(bump("backwards"), cotangent)
        _, pullback = jax.vjp(logit_fn, images)  # the rule's own recomputation is not an algorithm step
        return pullback(cotangent)

    model.defvjp(model_fwd, model_bwd)
    return model, counts


@pytest.mark.parametrize("strategy,t,k,update,constraint,chunk", [
    ("mixed", 3, 4, "restart", "box", None), ("mixed", 1, 3, "restart", "box", 2), ("mixed", 2, 1, "pgd", "none", 1),
    ("targeted", 3, 4, "pgd", "box", None), ("targeted", 2, 3, "restart", "box", 2),
    ("untargeted", 3, 4, "restart", "box", None), ("untargeted", 4, 2, "pgd", "none", 3),
])
@pytest.mark.slow
def test_la_cost_counts_the_model_passes(strategy, t, k, update, constraint, chunk):
    model, counts = _counted(MODEL)
    batch = 2
    local_attribution(model, _images(batch), np.array([1, 6]), key=jax.random.PRNGKey(1), max_iter=t,
                      sampling_times=k, strategy=strategy, update=update, constraint=constraint,
                      run_chunk=chunk).block_until_ready()
    jax.effects_barrier()
    cost = la_cost(max_iter=t, sampling_times=k, strategy=strategy, update=update, constraint=constraint,
                   run_chunk=chunk)
    assert isinstance(cost, LACost)
    assert (counts["forwards"], counts["backwards"]) == (batch * cost.forwards, batch * cost.backwards)


def test_la_cost_formulas():
    assert la_cost() == LACost(1 + 20 * 29, 20 * 59)  # the function defaults: T=30, K=20
    assert la_cost(max_iter=10, sampling_times=6) == (55, 114)
    assert la_cost(max_iter=10, sampling_times=6, strategy="targeted") == (55, 115)
    assert la_cost(max_iter=10, sampling_times=6, strategy="untargeted") == (10, 10)
    assert la_cost(max_iter=10, sampling_times=20, strategy="untargeted") == (10, 10)  # computed once
    assert la_cost(**method_hparams("la")) == la_cost()
    assert la_cost(**dict(method_hparams("la"), update="pgd", constraint="none", max_iter=10)) == la_cost(max_iter=10)


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(strategy="adversarial"), ValueError, "strategy"),
    (dict(max_iter=0), ValueError, "max_iter"),
    (dict(sampling_times=2.0), TypeError, "sampling_times"),
    (dict(constraint="global"), ValueError, "constraint"),
    (dict(update="pgd", constraint=None), TypeError, "constraint"),
    (dict(constraint="none"), ValueError, "constraint='none' needs update='pgd'"),
    (dict(steps=10), TypeError, "steps"),
])
def test_la_cost_bad_values(kwargs, error, match):
    with pytest.raises(error, match=match) as info:
        la_cost(**kwargs)
    assert "\n" not in str(info.value)


# --- defaults and errors -----------------------------------------------------------------------------------------

def test_defaults_are_the_official_walk():
    hparams = method_hparams("la")
    assert hparams["strategy"] == "mixed" and hparams["constraint"] == "box" and hparams["update"] == "restart"


def _exploding(images):
    raise AssertionError("the model was called (or traced) before the arguments were checked")


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(strategy="targetted"), ValueError, "strategy must be one of"),
    (dict(strategy=None), TypeError, "strategy must be a string"),
    (dict(strategy=["mixed"]), TypeError, "strategy"),
    (dict(constraint="global"), ValueError, "constraint must be one of"),
    (dict(constraint=0), TypeError, "constraint must be a string"),
    (dict(update="pgd", constraint=np.array("none")), TypeError, "constraint"),
    (dict(constraint="none"), ValueError, "constraint='none' needs update='pgd'"),
    (dict(update="restart", constraint="none", strategy="untargeted"), ValueError, "update='restart'"),
    (dict(strategy="targeted", target_classes=np.array([1, 2, 3])), ValueError, r"target_classes must have 4 classes"),
    (dict(strategy="targeted", target_classes=np.array([[1, 2, 3, 4, 5]] * 2)), ValueError, "target_classes"),
    (dict(strategy="mixed", target_classes=[1, 2, 3, 4]), ValueError, r"target_classes must have 3 classes"),
    (dict(strategy="untargeted", target_classes=np.array([1, 2, 3])), ValueError, "target_classes must be None"),
])
def test_bad_values_are_one_line_errors_before_any_model_call(kwargs, error, match):
    args = dict(key=jax.random.PRNGKey(0), max_iter=2, sampling_times=4)
    args.update(kwargs)
    with pytest.raises(error, match=match) as info:
        local_attribution(_exploding, _images(2), None, **args)
    assert "\n" not in str(info.value)


def test_targeted_needs_k_classes_to_draw():
    with pytest.raises(ValueError, match=r"sampling_times \(strategy='targeted'\) = 8 targets cannot be drawn"):
        local_attribution(MODEL, _images(1), None, key=jax.random.PRNGKey(0), max_iter=1, sampling_times=8,
                          strategy="targeted")
    # mixed draws K - 1 = 7 of the 7 classes; untargeted draws none and needs no key
    local_attribution(MODEL, _images(1), None, key=jax.random.PRNGKey(0), max_iter=1, sampling_times=8)
    local_attribution(MODEL, _images(1), None, max_iter=1, sampling_times=8, strategy="untargeted")
