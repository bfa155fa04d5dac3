"""Image sources: samples, folder, la1000 and tfds (a tiny ArrayRecord dataset built here)."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from conftest import LA1000
from PIL import Image

from la_iprop.data import class_name, class_names, open_source, to_rgb_float


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
    with pytest.raises(ValueError, match="cannot open tfds dataset 'no_such_dataset'") as err:
        open_source("tfds:no_such_dataset", tfds_data_dir=str(tmp_path))
    assert "\n" not in str(err.value) and len(str(err.value)) < 500   # not tfds' listing of every dataset
    with pytest.raises(ValueError, match="cannot open tfds dataset 'tiny_images' split 'nope'") as err:
        open_source("tfds:tiny_images:nope", tfds_data_dir=str(tmp_path))
    assert "\n" not in str(err.value) and len(str(err.value)) < 500


# ------------------------------------------------------------------------------------- labels.json schema
def _one_line(err) -> str:
    text = str(err.value)
    assert "\n" not in text and len(text) < 400, text
    return text


def _folder_with(tmp_path, count=3):
    for i in range(count):
        Image.new("RGB", (8, 8), (i * 50, 0, 0)).save(tmp_path / f"{i}.png")
    return tmp_path


def _la1000_with(tmp_path, count=3):
    (tmp_path / "images").mkdir()
    _folder_with(tmp_path / "images", count)
    return tmp_path


BAD_LABELS = [
    pytest.param('{"labels": [1.7, 2, 3]}', "labels\\[0\\] is 1.7 \\(a float\\)", id="float"),
    pytest.param('{"labels": [1, 2.0, 3]}', "labels\\[1\\] is 2.0 \\(a float\\)", id="integral-float"),
    pytest.param('{"labels": [1, true, 3]}', "labels\\[1\\] is True \\(a boolean\\)", id="bool"),
    pytest.param('{"labels": [1, 2, null]}', "labels\\[2\\] is None \\(null\\)", id="null"),
    pytest.param('{"labels": ["1", 2, 3]}', "labels\\[0\\] is '1' \\(a string\\)", id="string"),
    pytest.param('{"labels": [[1], [2], [3]]}', "labels\\[0\\] is a list", id="nested-list"),
    pytest.param('{"labels": [1, NaN, 3]}', "labels\\[1\\] is nan \\(a float\\)", id="nan"),
    pytest.param('{"labels": [1, 1000, 3]}', "labels\\[1\\] is 1000; expected an integer class index in "
                 "\\[0, 1000\\)", id="range-high"),
    pytest.param('{"labels": [-1, 2, 3]}', "labels\\[0\\] is -1; expected", id="negative"),
    pytest.param('{"labels": [1, 2, 1%s]}' % ("0" * 40), "labels\\[2\\] is an integer of 41 digits", id="huge-int"),
    pytest.param('{"labels": [1, 2, 1%s]}' % ("0" * 5000), "cannot read labels file .*: Exceeds the limit",
                 id="int-beyond-parser"),
    pytest.param("[" * 100000 + "]" * 100000, "nests 100000 levels deep \\(at most 32\\)", id="deep-nesting"),
    pytest.param('{"labels": [1, 2]}', "lists 2 labels but .* holds 3 images", id="short"),
    pytest.param('{"labels": {"a": 1}}', "'labels' must be a list of integers, got dict", id="labels-dict"),
    pytest.param('{"labels": [1, 2, 3], "x": 1}', "has 'labels' and other keys \\['x'\\]", id="extra-key"),
    pytest.param('{"0.png": 1, "1.png": 2}', "has no label for 1 image\\(s\\), e.g. \\['2.png'\\]", id="missing-key"),
    pytest.param('{"0.png": 1, "1.png": 2, "2.png": 7.5}', "\\['2.png'\\] is 7.5 \\(a float\\)", id="dict-float"),
    pytest.param("[1, 2, 3]", "must be .* got a JSON list", id="top-level-list"),
    pytest.param('{"labels": [1, 2, 3]', "cannot read labels file .*: Expecting", id="truncated"),
    pytest.param(b"\xff\xfe{", "cannot read labels file .*: 'utf-8' codec", id="not-utf8"),
]


@pytest.mark.parametrize("content, match", BAD_LABELS)
def test_folder_labels_json_schema_is_strict(tmp_path, content, match):
    _folder_with(tmp_path)
    path = tmp_path / "labels.json"
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(ValueError, match=match) as err:
        open_source(f"folder:{tmp_path}")
    assert str(path) in _one_line(err)


@pytest.mark.parametrize("content, match", [
    p for p in BAD_LABELS if p.id not in ("short", "extra-key", "missing-key", "dict-float")] + [
    pytest.param('{"0.png": 1}', "must be \\{\"labels\": \\[...\\]\\} .* got keys \\['0.png'\\]", id="no-labels-key"),
    pytest.param('{"labels": [1, 2, 3, 4]}', "lists 4 labels but .* lacks 1 of images 0.png..3.png, e.g. "
                 "\\['3.png'\\]", id="more-labels-than-images"),
])
def test_la1000_labels_json_schema_is_strict(tmp_path, content, match):
    _la1000_with(tmp_path)
    path = tmp_path / "labels.json"
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(ValueError, match=match) as err:
        open_source(f"la1000:{tmp_path}")
    assert str(path) in _one_line(err)


def test_labels_json_size_is_bounded_before_reading(tmp_path, monkeypatch):
    from la_iprop.data import sources

    _folder_with(tmp_path)
    (tmp_path / "labels.json").write_text(json.dumps({"labels": [1, 2, 3]}))
    assert open_source(f"folder:{tmp_path}").load([0, 1, 2]).labels.tolist() == [1, 2, 3]
    monkeypatch.setattr(sources, "MAX_LABELS_BYTES", 10)
    with pytest.raises(ValueError, match="labels.json has 21 bytes, above the bound of 10") as err:
        open_source(f"folder:{tmp_path}")
    _one_line(err)


def test_labels_json_good_forms_and_class_count(tmp_path):
    _folder_with(tmp_path)
    path = tmp_path / "labels.json"
    path.write_text(json.dumps({"2.png": 0, "0.png": 999, "1.png": 5}))
    assert open_source(f"folder:{tmp_path}").load([0, 1, 2]).labels.tolist() == [999, 5, 0]
    path.write_text(json.dumps({"labels": [0, 9, 3]}))
    assert open_source(f"folder:{tmp_path}", num_classes=10).load([1]).labels.tolist() == [9]
    with pytest.raises(ValueError, match="labels\\[1\\] is 9; expected an integer class index in \\[0, 5\\)"):
        open_source(f"folder:{tmp_path}", num_classes=5)


# ------------------------------------------------------------------------------------- image modes
def _exact(image, tmp_path, name, **save):
    """Saves ``image`` and reads it back through a folder source at its own size (no resize)."""
    folder = tmp_path / name.replace(".", "_")
    folder.mkdir()
    image.save(folder / name, **save)
    return open_source(f"folder:{folder}", size=image.width).load([0]).images[0]


def test_every_mode_is_read_by_its_real_range(tmp_path):
    rng = np.random.default_rng(3)
    rgb = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
    as_float = rgb.astype(np.float32) / 255
    gray = rgb[..., 0]
    # A float TIFF in [0, 1] keeps its values (it used to become almost black).
    values = rng.uniform(0.2, 0.9, (32, 32)).astype(np.float32)
    out = _exact(Image.fromarray(values, "F"), tmp_path, "float.tif")
    np.testing.assert_array_equal(out, np.repeat(values[..., None], 3, -1))
    # Unsigned 16-bit (PNG, TIFF: I;16) and PPM/PGM (mode I, 16 bits; Pillow scales maxval to 16 bits).
    deep = (gray.astype(np.uint16) * 257)
    for name in ("deep.png", "deep.tif"):
        np.testing.assert_allclose(_exact(Image.fromarray(deep), tmp_path, name)[..., 0], gray / 255, atol=1e-6)
    pgm = tmp_path / "pgm"
    pgm.mkdir()
    (pgm / "ten_bit.ppm").write_bytes(b"P5\n32 32\n1023\n" + (gray.astype(np.uint16) * 4).astype(">u2").tobytes())
    np.testing.assert_allclose(open_source(f"folder:{pgm}", size=32).load([0]).images[0, ..., 0],
                               gray.astype(np.float64) * 4 / 1023, atol=1e-4)
    # 32-bit signed TIFF (mode I): by the range of int32, not by its own maximum.
    ints = (gray.astype(np.int32) << 23)
    np.testing.assert_allclose(_exact(Image.fromarray(ints, "I"), tmp_path, "i32.tif")[..., 0],
                               ints / (2**31 - 1), rtol=1e-6)
    # 8-bit modes through PIL's conversion; alpha over white.
    base = Image.fromarray(rgb)
    for mode in ("1", "L", "P", "CMYK"):
        expected = np.asarray(base.convert(mode).convert("RGB"), np.float32) / 255
        np.testing.assert_array_equal(_exact(base.convert(mode), tmp_path, f"m{mode}.tif"), expected)
    np.testing.assert_array_equal(_exact(base, tmp_path, "rgb.png"), as_float)
    half = Image.fromarray(np.dstack([rgb, np.full((32, 32), 128, np.uint8)]))
    out = _exact(half, tmp_path, "rgba.png")
    np.testing.assert_allclose(out, as_float * 128 / 255 + (1 - 128 / 255), atol=1 / 255)
    np.testing.assert_allclose(_exact(half.convert("LA"), tmp_path, "la.png")[..., 0],
                               np.asarray(half.convert("L"), np.float32) / 255 * 128 / 255 + (1 - 128 / 255),
                               atol=1 / 255)


@pytest.mark.parametrize("mode", ["YCbCr", "HSV", "RGBX", "LAB"])
def test_other_colour_spaces_in_memory(mode):
    rgb = Image.fromarray(np.random.default_rng(4).integers(0, 256, (16, 16, 3), dtype=np.uint8))
    image = rgb.convert(mode) if mode != "HSV" else Image.fromarray(np.asarray(rgb), "HSV")
    expected = np.asarray(image.convert("RGB"), np.float32) / 255
    np.testing.assert_array_equal(to_rgb_float(image), expected)


@pytest.mark.parametrize("make, match", [
    pytest.param(lambda: Image.fromarray(np.full((8, 8), 2.0, np.float32), "F"),
                 "float image \\(mode F\\) has values in \\[2, 2\\]; only floats in \\[0, 1\\]", id="float>1"),
    pytest.param(lambda: Image.fromarray(np.full((8, 8), np.nan, np.float32), "F"),
                 "float image \\(mode F\\) has 64 NaN or infinite pixels", id="float-nan"),
    pytest.param(lambda: Image.fromarray(np.full((8, 8), -5, np.int32), "I"),
                 "mode I\\) from memory has no declared bit depth", id="int-in-memory"),
    pytest.param(lambda: Image.new("La", (8, 8)), "image mode 'La' is not supported \\(supported: 1, L, ",
                 id="La"),
])
def test_modes_without_a_known_range_are_refused_by_name(make, match):
    with pytest.raises(ValueError, match=match) as err:
        to_rgb_float(make())
    _one_line(err)


def test_negative_int_tiff_and_float_files_out_of_range_are_refused(tmp_path):
    Image.fromarray(np.full((8, 8), -5, np.int32), "I").save(tmp_path / "neg.tif")
    Image.fromarray(np.full((8, 8), 1.5, np.float32), "F").save(tmp_path / "hot.tif")
    source = open_source(f"folder:{tmp_path}", size=8)
    with pytest.raises(ValueError, match="hot.tif: float image \\(mode F\\) has values in \\[1.5, 1.5\\]") as err:
        source.load([source.ids.index("hot.tif")])
    _one_line(err)
    with pytest.raises(ValueError, match="neg.tif: 32-bit signed integer image \\(mode I\\) has values in "
                                         "\\[-5, -5\\], outside \\[0, 2147483647\\]") as err:
        source.load([source.ids.index("neg.tif")])
    _one_line(err)


@pytest.mark.parametrize("array, match", [
    pytest.param(np.full((8, 8, 3), 1.5, np.float32), "float array has values in \\[1.5, 1.5\\]", id="float>1"),
    pytest.param(np.full((8, 8, 3), np.nan, np.float32), "float array has NaN", id="nan"),
    pytest.param(np.zeros((8, 8, 3), np.int32), "array dtype int32 has no known value range", id="int32"),
    pytest.param(np.zeros((8, 8, 2), np.uint8), "must be HxW, HxWx1, HxWx3 or HxWx4", id="channels"),
])
def test_arrays_without_a_known_range_are_refused(array, match):
    with pytest.raises(ValueError, match=match):
        to_rgb_float(array)


# ------------------------------------------------------------------------------------- size bounds
def _png_header_only(path, width, height):
    """A PNG whose header claims ``width x height`` (no pixel data): decoding it would fail, reading its
    header does not, so a refusal proves the bound is checked before decoding."""
    import struct
    import zlib

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
                     + chunk(b"IEND", b""))


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")   # PIL's own warning at open
def test_pixel_count_is_bounded_before_decoding(tmp_path):
    _png_header_only(tmp_path / "huge.png", 12000, 12000)
    source = open_source(f"folder:{tmp_path}")
    with pytest.raises(ValueError, match="huge.png has 12000x12000 = 144.0 MP, above the 50 MP bound") as err:
        source.load([0])
    _one_line(err)
    with pytest.raises(ValueError, match="image has 8000x7000 = 56.0 MP"):
        to_rgb_float(np.broadcast_to(np.zeros((1, 1, 3), np.uint8), (7000, 8000, 3)))


def _full_resize(image, size):
    """Today's resize: the whole image resized (shorter side = size), then the centre crop."""
    h, w = image.shape[:2]
    scale = size / min(h, w)
    new_h, new_w = max(size, round(h * scale)), max(size, round(w * scale))
    pil = Image.fromarray(np.round(image * 255.0).astype(np.uint8))
    resized = np.asarray(pil.resize((new_w, new_h), Image.BILINEAR), dtype=np.float32) / 255.0
    top, left = (new_h - size) // 2, (new_w - size) // 2
    return resized[top:top + size, left:left + size]


def test_resize_is_unchanged_for_ordinary_images_and_bounded_for_strips(monkeypatch):
    from la_iprop.data import resize_center_crop

    rng = np.random.default_rng(5)
    for (h, w), size in [((300, 500), 224), ((500, 300), 224), ((100, 1000), 224), ((1000, 90), 96),
                         ((17, 272), 32), ((213, 320), 260), ((50, 70), 32)]:   # aspect up to 16: identical
        image = rng.integers(0, 256, (h, w, 3)).astype(np.float32) / 255
        np.testing.assert_array_equal(resize_center_crop(image, size), _full_resize(image, size))
    sizes, real = [], Image.Image.resize
    monkeypatch.setattr(Image.Image, "resize", lambda self, s, *a, **k: sizes.append(s) or real(self, s, *a, **k))
    for (h, w) in [(10, 400), (400, 12), (1, 2000)]:   # beyond: the central square only, within one 8-bit step
        image = rng.integers(0, 256, (h, w, 3)).astype(np.float32) / 255
        sizes.clear()
        out = resize_center_crop(image, 32)
        assert sizes == [(32, 32)]   # no (32 * aspect) x 32 intermediate
        np.testing.assert_allclose(out, _full_resize(image, 32), atol=1.01 / 255)


def test_samples_and_la1000_read_as_before():
    """The decoding and resize give today's arrays: la1000 files as PIL reads them, samples resized as before."""
    source = open_source(f"la1000:{LA1000}")
    for i, image in zip(range(0, 1000, 97), source.load(range(0, 1000, 97)).images, strict=True):
        np.testing.assert_array_equal(image, np.asarray(Image.open(LA1000 / "images" / f"{i}.png").convert("RGB"),
                                                        np.float32) / 255)
    samples = open_source("samples", size=224)
    for i in range(len(samples)):
        np.testing.assert_array_equal(samples.load([i]).images[0], _full_resize(samples.read_image(i), 224))
