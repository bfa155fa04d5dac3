"""Progress that moves within a batch: the metric's per-chunk callback (numerics untouched), the
runner's bar (per stage and per scored chunk) and its ``--progress=false`` log line per batch."""

from __future__ import annotations

import logging
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from la_iprop.metrics import evaluate, get_protocol
from la_iprop.runs import engine as runner
from la_iprop.runs import progress as progress_module
from la_iprop.runs.config import RunConfig
from la_iprop.runs.engine import run
from la_iprop.runs.store import scores_path


def _tiny_cnn(images):
    """A small convolutional classifier whose weights follow the input dtype (float32 or float64)."""
    k1, k2 = jax.random.split(jax.random.PRNGKey(0))
    w_conv = (jax.random.normal(k1, (3, 3, 3, 8)) * 0.5).astype(images.dtype)
    w_out = jax.random.normal(k2, (8, 10)).astype(images.dtype)
    h = jax.lax.conv_general_dilated(images - 0.5, w_conv, (2, 2), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
    return jnp.tanh(h).mean((1, 2)) @ w_out * 3.0


def _inputs():
    rng = np.random.default_rng(0)
    images = rng.uniform(0, 1, (3, 16, 16, 3)).astype(np.float32)
    return images, rng.normal(size=images.shape).astype(np.float32)


# float64 is the bit-reproducible mode; float32 was also checked bit for bit with Lite0 on la1000
# images under the full la and rise protocols (and the runner test below compares float32 scores).
@pytest.mark.parametrize("precision,protocol", [("float64", get_protocol("la", step=48)),
                                                pytest.param("float32", get_protocol("rise", step=16),
                                                             marks=pytest.mark.slow)])
def test_evaluate_progress_reports_every_chunk_and_changes_no_bit(precision, protocol):
    images, maps = _inputs()
    plain = evaluate(_tiny_cnn, images, maps, protocol=protocol, chunk_size=7, precision=precision)
    calls = []
    reported = evaluate(_tiny_cnn, images, maps, protocol=protocol, chunk_size=7, precision=precision,
                        progress=lambda count, total: calls.append((count, total)))
    for name in ("insertion_curves", "deletion_curves", "insertion_aucs", "deletion_aucs"):
        assert np.array_equal(getattr(plain, name), getattr(reported, name)), name   # bit for bit
    total = 3 * 2 * plain.insertion_curves.shape[1]
    assert {t for _, t in calls} == {total}
    assert sum(c for c, _ in calls) == total and len(calls) == -(-total // 7)   # one call per chunk, padding excluded


def test_evaluate_progress_failure_is_logged_not_raised(caplog):
    images, maps = _inputs()   # (the compiled program of the float32 case above)
    calls = []

    def broken(count, total):
        calls.append(count)
        raise RuntimeError("display gone")

    with caplog.at_level(logging.WARNING):
        result = evaluate(_tiny_cnn, images, maps, protocol=get_protocol("rise", step=16), chunk_size=7,
                          progress=broken)
    assert len(calls) == 1 and "display gone" in caplog.text   # reported once, then not called again
    assert np.isfinite(result.insertion_curves).all()
    with pytest.raises(TypeError, match="progress must be None or a callable"):
        evaluate(_tiny_cnn, images, maps, progress=3)


class _FakeBar:
    """Records what the runner shows; ``first_file``: batch 0's scores file (exists once batch 0 is done)."""

    def __init__(self, first_file, total, initial):
        self.first_file, self.total, self.n = first_file, total, initial
        self.updates, self.postfixes = [], []

    def update(self, amount):
        self.n += amount
        self.updates.append((amount, self.first_file.exists()))

    def set_postfix_str(self, text):
        self.postfixes.append(text)

    def refresh(self):
        pass

    def close(self):
        pass


@pytest.mark.slow
def test_progress_moves_within_the_first_batch_and_logs_each_batch(tmp_path, monkeypatch, caplog):
    """sm on 4 images in batches of 2, protocol la with 5 steps: the bar advances per stage and per scored
    chunk before batch 0 is written; --progress=false logs one line per batch; the scores are the same."""
    monkeypatch.setattr(runner, "resolve_protocol", lambda name: get_protocol(name, step=672 * 45))  # 6 points
    bars = []

    def fake_progress(*, total, initial, desc, enabled):
        if not enabled:
            return real_progress(total=total, initial=initial, desc=desc, enabled=enabled)
        assert desc == "sm"
        bars.append(_FakeBar(scores_path(tmp_path / "bar", "la", "sm", 0), total, initial))
        return bars[-1]

    real_progress = progress_module._progress
    monkeypatch.setattr(progress_module, "_progress", fake_progress)
    config = RunConfig(methods=("sm",), num_images=4, seed=3, batch_size=2)
    run(RunConfig(**{**config.__dict__, "out": str(tmp_path / "bar")}), progress=True)
    (bar,) = bars
    assert bar.total == 4 and bar.n == pytest.approx(4.0, abs=1e-9)
    early = [amount for amount, written in bar.updates if not written]
    assert len(early) >= 3 and 0 < sum(early[:-1]) < 2   # attribution, then chunk by chunk, before batch 0 ends
    assert sum(early) == pytest.approx(2.0)
    assert any("batch 1/2 · attribution" in p for p in bar.postfixes)
    assert any("batch 1/2 · metrics la" in p for p in bar.postfixes)
    assert re.fullmatch(r"sm, ins=\d\.\d{4}, dele=\d\.\d{4}", bar.postfixes[-1])   # the running means stay

    with caplog.at_level(logging.INFO, logger="la_iprop"):   # with IProp: three variants, batch-major
        run(RunConfig(**{**config.__dict__, "iprop": True, "out": str(tmp_path / "log")}), progress=False)
    lines = [r.getMessage() for r in caplog.records if re.match(r"sm\S*: batch \d/2", r.getMessage())]
    assert [line.split(",")[0] for line in lines] == [
        "sm: batch 1/2", "sm+ctrl: batch 1/2", "sm+iprop: batch 1/2",
        "sm: batch 2/2", "sm+ctrl: batch 2/2", "sm+iprop: batch 2/2"], lines
    assert re.search(r"sm: batch 1/2, 2 images \(2/12 maps done\): attribution \d+\.\d s, metrics la \d+\.\d s; "
                     r"\d+\.\d s \([\d.e+-]+ images/s\); ETA \S+ for the run \(sm: ins", lines[0]), lines[0]
    assert "ETA 0s for the run" in lines[-1]
    for b in range(2):   # progress on or off: the same numbers, bit for bit
        with np.load(scores_path(tmp_path / "bar", "la", "sm", b)) as a, \
                np.load(scores_path(tmp_path / "log", "la", "sm", b)) as c:
            for key in ("insertion", "deletion", "insertion_curve", "deletion_curve"):
                assert np.array_equal(a[key], c[key]), key
