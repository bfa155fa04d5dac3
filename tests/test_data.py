"""Image sources: samples, folder, la1000 and tfds (a tiny ArrayRecord dataset built here)."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from conftest import LA1000
from PIL import Image

from la_iprop.data import class_name, class_names, open_source


def _check_batch(batch, n, size):
    assert batch.images.shape == (n, size, size, 3)
    assert batch.images.dtype == np.float32
    assert 0.0 <= batch.images.min() and batch.images.max() <= 1.0
    assert batch.labels.shape == (n,)


def test_samples_are_bundled_photos():
    source = open_source("samples", size=96)
    assert source.ids == ["chelsea", "coffee", "astronaut", "rocket", "motorcycle_left", "grace_hopper"]
    batch = source.load(range(len(source)))
    _check_batch(batch, 6, 96)
    assert (batch.labels == -1).all()
    assert batch.images.std() > 0.1  # real photographs, not blank arrays


def test_la1000_matches_files():
    source = open_source(f"la1000:{LA1000}")
    assert len(source) == 1000
    batch = source.load([0, 999])
    _check_batch(batch, 2, 224)
    expected = np.asarray(Image.open(LA1000 / "images" / "999.png").convert("RGB"), np.float32) / 255
    np.testing.assert_array_equal(batch.images[1], expected)
    labels = json.loads((LA1000 / "labels.json").read_text())["labels"]
    assert batch.labels.tolist() == [labels[0], labels[999]]
    assert class_name(int(batch.labels[0])) == class_names()[labels[0]]


def test_folder_with_synset_subfolders_and_odd_modes(tmp_path):
    rng = np.random.default_rng(0)
    (tmp_path / "n01440764").mkdir()
    (tmp_path / "n01443537").mkdir()
    rgb = rng.integers(0, 256, (50, 70, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(tmp_path / "n01440764" / "a.png")
    Image.fromarray(rgb[..., 0]).save(tmp_path / "n01440764" / "gray.png")  # L
    Image.fromarray(np.dstack([rgb, np.full((50, 70), 255, np.uint8)])).save(tmp_path / "n01443537" / "rgba.png")
    Image.fromarray(rgb).convert("P").save(tmp_path / "n01443537" / "palette.png")
    Image.fromarray((rgb[..., 0].astype(np.uint16) * 257)).save(tmp_path / "n01443537" / "deep.png")  # I;16
    source = open_source(f"folder:{tmp_path}", size=32)
    batch = source.load(range(len(source)))
    _check_batch(batch, 5, 32)
    by_id = dict(zip(batch.ids, batch.labels.tolist(), strict=True))
    assert by_id["n01440764/a.png"] == 0 and by_id["n01443537/rgba.png"] == 1
    images = dict(zip(batch.ids, batch.images, strict=True))
    # Opaque RGBA equals RGB; a gray image has equal channels; 16-bit keeps its range.
    np.testing.assert_allclose(images["n01443537/rgba.png"], images["n01440764/a.png"], atol=1e-6)
    gray = images["n01440764/gray.png"]
    assert np.allclose(gray[..., 0], gray[..., 1])
    np.testing.assert_allclose(images["n01443537/deep.png"], gray, atol=2 / 255)


def test_folder_with_labels_json_and_errors(tmp_path):
    for i in range(3):
        Image.new("RGB", (10, 10), (i * 50, 0, 0)).save(tmp_path / f"{i}.jpg")
    (tmp_path / "labels.json").write_text(json.dumps({"labels": [5, 6, 7]}))
    assert open_source(f"folder:{tmp_path}", size=8).load([0, 2]).labels.tolist() == [5, 7]
    (tmp_path / "labels.json").write_text(json.dumps({"labels": [5]}))
    with pytest.raises(ValueError, match="1 labels but"):
        open_source(f"folder:{tmp_path}")
    (tmp_path / "labels.json").unlink()
    (tmp_path / "broken.png").write_bytes(b"garbage")
    source = open_source(f"folder:{tmp_path}", size=8)
    broken = source.ids.index("broken.png")
    with pytest.raises(ValueError, match="broken.png"):
        source.load([broken])
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="no image files"):
        open_source(f"folder:{empty}")
    with pytest.raises(ValueError, match="not found"):
        open_source(f"folder:{tmp_path / 'nope'}")
    with pytest.raises(ValueError, match="unknown data spec"):
        open_source("imagenet")


def test_tfds_array_record_source_without_tensorflow(tmp_path):
    tfds = pytest.importorskip("tensorflow_datasets")
    rng = np.random.default_rng(1)
    arrays = [rng.integers(0, 256, (40, 30, 3), dtype=np.uint8) for _ in range(3)]

    class TinyImages(tfds.core.GeneratorBasedBuilder):
        VERSION = tfds.core.Version("1.0.0")

        def _info(self):
            return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
                "image": tfds.features.Image(shape=(None, None, 3)),
                "label": tfds.features.ClassLabel(num_classes=1000)}))

        def _split_generators(self, dl_manager):
            return {"validation": self._generate_examples()}

        def _generate_examples(self):
            for i, array in enumerate(arrays):
                encoded = io.BytesIO()  # pre-encoded PNG: encoding arrays would need TensorFlow
                Image.fromarray(array).save(encoded, format="PNG")
                encoded.seek(0)
                yield i, {"image": encoded, "label": 100 + i}

    TinyImages(data_dir=str(tmp_path), file_format="array_record").download_and_prepare()
    source = open_source("tfds:tiny_images:validation", size=30, tfds_data_dir=str(tmp_path))
    assert len(source) == 3
    batch = source.load([0, 1, 2])
    _check_batch(batch, 3, 30)
    assert sorted(batch.labels.tolist()) == [100, 101, 102]
    for image, label in zip(batch.images, batch.labels, strict=True):
        original = arrays[label - 100].astype(np.float32)[5:35] / 255  # 40x30 -> centre 30x30
        np.testing.assert_allclose(image, original, atol=1e-6)
    with pytest.raises(ValueError, match="cannot open tfds dataset"):
        open_source("tfds:no_such_dataset", tfds_data_dir=str(tmp_path))
