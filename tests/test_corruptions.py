"""ImageNet-C corruptions as a data option: deterministic per image id, applied after the resize and crop,
hashed (``read_image`` is the corrupted image), with one-line errors. Needs the extra ``corruptions``."""

from __future__ import annotations

import concurrent.futures
import sys

import numpy as np
import pytest
from conftest import LA1000

from la_iprop.data import open_source
from la_iprop.data.corruptions import parse_corruption

pytest.importorskip("imagecorruptions", reason="the extra la_iprop[corruptions] is not installed")
FOUR = ["gaussian_noise:3", "defocus_blur:3", "jpeg_compression:3", "contrast:3"]
IDS = [0, 7, 999]


@pytest.fixture(scope="module")
def clean():
    return open_source(f"la1000:{LA1000}").load(IDS).images


@pytest.mark.parametrize("corruption", FOUR)
def test_the_four_corruptions_change_pixels_deterministically(clean, corruption):
    source = open_source(f"la1000:{LA1000}", corruption=corruption)
    batch = source.load(IDS)
    assert batch.images.shape == (3, 224, 224, 3) and batch.images.dtype == np.float32
    assert 0 <= batch.images.min() and batch.images.max() <= 1
    np.testing.assert_array_equal(batch.images * 255, np.round(batch.images * 255))   # 8-bit values
    assert np.abs(batch.images - clean).mean() > 0.01                                  # it corrupts
    # Reproducible: a new source, other batches, another order (a resumed run) give the same pixels.
    again = open_source(f"la1000:{LA1000}", corruption=corruption)
    np.testing.assert_array_equal(np.stack([again.load([i]).images[0] for i in reversed(IDS)])[::-1], batch.images)
    # What a run hashes (read_image) is the corrupted image itself.
    np.testing.assert_array_equal(source.read_image(7), batch.images[1])
    assert source.identity()["corruption"]["name"] == corruption.split(":")[0]
    assert source.identity()["corruption"]["package"].startswith("imagecorruptions")


def test_randomness_is_seeded_per_image_and_leaves_numpy_global_state_alone(clean):
    np.random.seed(1234)
    before = np.random.get_state()[1].copy()
    source = open_source(f"la1000:{LA1000}", corruption="gaussian_noise:3")
    noise = source.load(IDS).images - clean
    np.testing.assert_array_equal(np.random.get_state()[1], before)   # the caller's global state is restored
    other_seed = open_source(f"la1000:{LA1000}", corruption="gaussian_noise:3", corruption_seed=1).load(IDS).images
    assert not np.array_equal(other_seed - clean, noise)
    # Concurrent reads (the run engine hashes images in threads) give the sequential pixels.
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        threaded = list(pool.map(source.read_image, IDS * 3))
    for i, image in enumerate(threaded):
        np.testing.assert_array_equal(image, source.read_image(IDS[i % 3]))
    # The package's own seeds (impulse noise) are derived too.
    impulse = open_source("samples", size=64, corruption="impulse_noise:2")
    np.testing.assert_array_equal(impulse.load([0, 1]).images, impulse.load([0, 1]).images)


def test_corruption_acts_after_the_resize_and_crop():
    plain = open_source("samples", size=64).load([0]).images[0]
    blurred = open_source("samples", size=64, corruption="contrast:3").read_image(0)
    assert blurred.shape == (64, 64, 3)
    # contrast at severity 3: (x - mean) * 0.2 + mean per channel, on the 64x64 crop, truncated to uint8
    mean = plain.mean(axis=(0, 1), keepdims=True)
    np.testing.assert_allclose(blurred, np.clip((plain - mean) * 0.2 + mean, 0, 1), atol=1.01 / 255)


@pytest.mark.parametrize("spec, match", [
    pytest.param("gaussian_noise", "corruption must be a string 'NAME:SEVERITY'", id="no-severity"),
    pytest.param("gaussian_noise:3:1", "corruption must be a string 'NAME:SEVERITY'", id="two-colons"),
    pytest.param(3, "corruption must be a string 'NAME:SEVERITY'", id="int"),
    pytest.param("gaussian_noise:6", "severity must be an integer in 1..5, got '6'", id="severity-6"),
    pytest.param("gaussian_noise:0", "severity must be an integer in 1..5, got '0'", id="severity-0"),
    pytest.param("gaussian_noise:x", "severity must be an integer in 1..5, got 'x'", id="severity-x"),
    pytest.param("gaussian_noise:2.5", "severity must be an integer in 1..5", id="severity-float"),
    pytest.param("gausian_noise:3", "unknown corruption 'gausian_noise' in 'gausian_noise:3'; known: "
                 "gaussian_noise, shot_noise", id="unknown-name"),
])
def test_bad_corruptions_are_one_line_errors(spec, match):
    with pytest.raises(ValueError, match=match) as err:
        open_source("samples", corruption=spec)
    assert "\n" not in str(err.value)


def test_small_images_seeds_and_a_missing_package_are_one_line_errors(monkeypatch):
    with pytest.raises(ValueError, match="needs images of at least 32x32 pixels, got size=16"):
        open_source("samples", size=16, corruption="contrast:1")
    with pytest.raises(ValueError, match="corruption_seed must be an integer in \\[0, 2\\*\\*64\\)"):
        parse_corruption("contrast:1", seed=2**64)
    monkeypatch.setitem(sys.modules, "imagecorruptions", None)   # as if the extra were not installed
    with pytest.raises(ImportError, match="corruptions need the optional package imagecorruptions-imaug "
                                          "\\(pip install 'la_iprop\\[corruptions\\]'\\)") as err:
        open_source("samples", corruption="contrast:1")
    assert "\n" not in str(err.value)
