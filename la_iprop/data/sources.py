"""Image sources: a spec string in, batches of [0,1] NHWC images with labels out.

Specs:

* ``samples`` — photographs bundled inside installed packages (scikit-image, matplotlib);
* ``folder:PATH`` — image files; labels from ImageNet synset sub-folders
  (``n01440764/...``) or a ``labels.json`` (``{"labels": [...]}`` in sorted file
  order, or ``{"file name": label}``);
* ``la1000:PATH`` — the official LA 1000-image set (``images/{i}.png``, ``labels.json``);
* ``tfds:NAME[:SPLIT]`` — TensorFlow Datasets via ``tfds.data_source`` (ArrayRecord;
  TensorFlow is not needed), e.g. ``tfds:imagenet2012:validation``.

Every image is converted to RGB in [0, 1] by the real range of its mode (see
:func:`to_rgb_float`; modes without a known range are refused by name), its shorter side
resized to ``size`` and centre-cropped to ``size x size`` (see :func:`resize_center_crop`).
Labels unknown to a source are ``-1``; ``labels.json`` files follow one strict schema
(integers in ``[0, num_classes)``, see :func:`read_labels_json`). Untrusted files are
bounded before they are decoded: at most :data:`MAX_PIXELS` pixels per image and
:data:`MAX_LABELS_BYTES` / :data:`MAX_JSON_DEPTH` for a labels file.

``corruption="NAME:SEVERITY"`` applies an ImageNet-C corruption to every image after the
resize and crop (see :mod:`la_iprop.data.corruptions`); ``read_image`` then returns the
corrupted ``size x size`` image, so whatever hashes ``read_image`` hashes the corrupted pixels.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import numbers
import os
import pathlib
import re
from typing import Any, Callable, Sequence

import numpy as np
from PIL import Image, UnidentifiedImageError

from la_iprop.data.corruptions import MIN_SIZE, Corruption, parse_corruption

__all__ = ["Batch", "ImageSource", "open_source", "class_names", "class_name", "to_rgb_float",
           "resize_center_crop", "read_labels_json", "IMAGE_EXTENSIONS", "MAX_PIXELS", "MAX_RESIZE_ASPECT",
           "MAX_LABELS_BYTES", "MAX_JSON_DEPTH", "NUM_CLASSES"]

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm")
NUM_CLASSES = 1000                # source labels are ImageNet class indices
MAX_PIXELS = 50_000_000           # per image, checked from the header before decoding (~1.2 GB peak at the bound)
MAX_RESIZE_ASPECT = 16            # beyond this aspect ratio only the central square is resampled (see resize)
MAX_LABELS_BYTES = 64 * 2**20     # a labels.json for 1.3 M file names fits
MAX_JSON_DEPTH = 32               # the schema needs 2; Python's parser would recurse ~1000 deep and fail


@functools.lru_cache(maxsize=1)
def _imagenet_classes() -> list[tuple[str, str]]:
    path = pathlib.Path(__file__).with_name("imagenet_classes.json")
    return [tuple(entry) for entry in json.loads(path.read_text())]


def class_names() -> list[str]:
    """Human-readable ImageNet class names, index -> name."""
    return [name for _, name in _imagenet_classes()]


def class_name(index: int) -> str:
    return class_names()[index] if 0 <= index < 1000 else ""


def _wnid_to_index() -> dict[str, int]:
    return {wnid: i for i, (wnid, _) in enumerate(_imagenet_classes())}


# ----------------------------------------------------------------------------- decoding
_RGB_MODES = ("1", "L", "RGB", "RGBX", "CMYK", "YCbCr", "LAB", "HSV")   # 8 bits per channel: PIL converts them
_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa")                              # composited over white
_UINT16_MODES = ("I;16", "I;16L", "I;16B", "I;16N")                      # unsigned 16-bit: / 65535


def _check_pixels(height: int, width: int, name: str) -> None:
    if height * width > MAX_PIXELS:
        raise ValueError(f"{name} has {width}x{height} = {height * width / 1e6:.1f} MP, above the "
                         f"{MAX_PIXELS / 1e6:g} MP bound (la_iprop.data.sources.MAX_PIXELS); downscale it first")


def _int_mode_bits(image: Image.Image) -> tuple[int, bool] | None:
    """(bits, signed) of a mode ``I`` image from its file header, or None where the header does not say.
    PNG and PPM/PGM give mode I for 16-bit samples (Pillow scales a PGM ``maxval`` to 16 bits)."""
    if image.format in ("PNG", "PPM"):
        return 16, False
    tags = getattr(image, "tag_v2", None)
    if image.format == "TIFF" and tags is not None:
        bits = tags.get(258, (32,))
        bits = int(bits[0] if isinstance(bits, tuple) else bits)
        sample_format = tags.get(339, (1,))
        sample_format = int(sample_format[0] if isinstance(sample_format, tuple) else sample_format)
        return bits, sample_format == 2
    return None


def _decode(image: Image.Image, name: str) -> np.ndarray:
    """One PIL image -> float32 HxWx3 in [0, 1] by its mode's real range (see :func:`to_rgb_float`)."""
    mode = image.mode
    if mode in _UINT16_MODES:
        array = np.asarray(image, dtype=np.float64)
        array = np.clip(array / 65535.0, 0.0, 1.0).astype(np.float32)
        return np.repeat(array[..., None], 3, axis=-1)
    if mode == "I":
        bits = _int_mode_bits(image)
        if bits is None:
            raise ValueError(f"{name}: 32-bit integer image (mode I) from {image.format or 'memory'} has no declared "
                             "bit depth, so no known value range; save it as 8- or 16-bit")
        count, signed = bits
        top = 2 ** (count - 1 if signed else count) - 1
        array = np.asarray(image, dtype=np.float64)
        lo, hi = float(array.min()), float(array.max())
        if lo < 0 or hi > top:
            raise ValueError(f"{name}: {count}-bit {'signed' if signed else 'unsigned'} integer image (mode I) has "
                             f"values in [{lo:g}, {hi:g}], outside [0, {top}]; expected non-negative intensities")
        return np.repeat((array / top).astype(np.float32)[..., None], 3, axis=-1)
    if mode == "F":
        array = np.asarray(image, dtype=np.float32)
        finite = np.isfinite(array)
        if not finite.all():
            raise ValueError(f"{name}: float image (mode F) has {int((~finite).sum())} NaN or infinite pixels")
        lo, hi = float(array.min()), float(array.max())
        if lo < 0.0 or hi > 1.0:
            raise ValueError(f"{name}: float image (mode F) has values in [{lo:.4g}, {hi:.4g}]; only floats in "
                             "[0, 1] have a known range (rescale it, or save it as 8- or 16-bit)")
        return np.repeat(array[..., None], 3, axis=-1)
    if mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
        mode = image.mode
    if mode in _ALPHA_MODES:
        background = Image.new("RGBA", image.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, image.convert("RGBA"))
    elif mode not in _RGB_MODES:
        raise ValueError(f"{name}: image mode {mode!r} is not supported (supported: "
                         f"{', '.join(_RGB_MODES + _ALPHA_MODES + _UINT16_MODES + ('P', 'I', 'F'))})")
    array = np.array(image if image.mode == "RGB" else image.convert("RGB"), dtype=np.float32)
    array /= 255.0   # in place: a 50 MP image is 600 MB as float32
    return array


def to_rgb_float(image: Image.Image | np.ndarray, name: str = "image") -> np.ndarray:
    """Any PIL image or array -> float32 HxWx3 in [0, 1], by the real value range of its mode or dtype.

    PIL modes: 8-bit ones (1, L, P, RGB, RGBX, CMYK, YCbCr, LAB, HSV) via PIL's conversion, / 255; with
    alpha (RGBA, LA, PA, RGBa, P with transparency) composited over white (the usual rendering of
    transparency); unsigned 16-bit (I;16*) / 65535; mode I by the bit depth its header declares (PNG,
    PPM: 16; TIFF: BitsPerSample, signed or not), negative values refused; float (F) as it is when in
    [0, 1], refused otherwise (a float TIFF has no other standard range: rescaling it by its own
    min/max would make every image's contrast maximal). Any other mode is refused by name.
    Arrays: uint8 / 255, uint16 / 65535, bool as 0/1, floats in [0, 1]; HxW, HxWx1, HxWx3 or HxWx4
    (alpha over white); other dtypes and float values outside [0, 1] are refused.
    """
    if isinstance(image, Image.Image):
        _check_pixels(image.height, image.width, name)
        return _decode(image, name)
    array = np.asarray(image)
    if array.ndim == 2:
        array = array[..., None]
    if array.ndim != 3 or array.shape[-1] not in (1, 3, 4):
        raise ValueError(f"{name} array must be HxW, HxWx1, HxWx3 or HxWx4, got shape {array.shape}")
    _check_pixels(array.shape[0], array.shape[1], name)
    if array.dtype == np.uint8:
        array = array.astype(np.float32) / 255.0
    elif array.dtype == np.uint16:
        array = array.astype(np.float32) / 65535.0
    elif array.dtype == np.bool_:
        array = array.astype(np.float32)
    elif np.issubdtype(array.dtype, np.floating):
        array = array.astype(np.float32)
        if not np.isfinite(array).all():
            raise ValueError(f"{name}: float array has NaN or infinite values")
        lo, hi = float(array.min()), float(array.max())
        if lo < 0.0 or hi > 1.0:
            raise ValueError(f"{name}: float array has values in [{lo:.4g}, {hi:.4g}]; expected [0, 1]")
    else:
        raise ValueError(f"{name}: array dtype {array.dtype} has no known value range; expected uint8, uint16, "
                         "bool or floats in [0, 1]")
    if array.shape[-1] == 4:
        alpha = array[..., 3:]
        array = array[..., :3] * alpha + (1.0 - alpha)
    if array.shape[-1] == 1:
        array = np.repeat(array, 3, axis=-1)
    return np.clip(array, 0.0, 1.0)


def resize_center_crop(image: np.ndarray, size: int) -> np.ndarray:
    """Resizes the shorter side to ``size`` (bilinear, antialiased, on 8-bit values) and centre-crops.

    Up to an aspect ratio of :data:`MAX_RESIZE_ASPECT` the whole image is resized and then cropped, so
    the resized intermediate holds at most ``MAX_RESIZE_ASPECT * size**2`` pixels. Beyond it (a 1 x 2000
    strip would otherwise be resized to 448000 x 224) only the central square is resampled (PIL's
    ``box``, the same filter geometry): the result then differs from the full resize by at most one
    8-bit step (the filter weights are rounded at other offsets), and memory stays ``size**2``.
    """
    h, w = image.shape[:2]
    if (h, w) == (size, size):
        return image.astype(np.float32)
    scale = size / min(h, w)
    new_h, new_w = max(size, round(h * scale)), max(size, round(w * scale))
    top, left = (new_h - size) // 2, (new_w - size) // 2
    pixels = np.empty(image.shape, np.uint8)
    for row in range(0, h, 512):   # in row blocks: a float32 copy of a 50 MP image would be 600 MB more
        block = np.multiply(image[row:row + 512], np.float32(255.0), dtype=np.float32)
        pixels[row:row + 512] = np.round(block, out=block)
    pil = Image.fromarray(pixels)
    del pixels
    if max(h, w) <= MAX_RESIZE_ASPECT * min(h, w):
        resized = np.asarray(pil.resize((new_w, new_h), Image.BILINEAR), dtype=np.float32) / 255.0
        return resized[top:top + size, left:left + size]
    sx, sy = w / new_w, h / new_h
    box = (left * sx, top * sy, (left + size) * sx, (top + size) * sy)
    return np.asarray(pil.resize((size, size), Image.BILINEAR, box=box), dtype=np.float32) / 255.0


def _read_file(path: pathlib.Path) -> np.ndarray:
    """Decodes one file, its pixel count checked from the header before the pixels are decoded."""
    try:
        with Image.open(path) as image:
            _check_pixels(image.height, image.width, f"image file {path}")
            image.load()
            return to_rgb_float(image, f"image file {path}")
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        message = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise ValueError(message if str(path) in message else f"cannot read image file {path}: {message}") from None


# ----------------------------------------------------------------------------- labels.json
_JSON_STRING = re.compile(r'"(?:[^"\\]|\\.)*"')


def _json_depth(text: str) -> int:
    """The deepest nesting of ``[``/``{`` outside strings (vectorised: the file may be 64 MB)."""
    codes = np.frombuffer(_JSON_STRING.sub('""', text).encode("utf-8"), np.uint8)
    steps = np.isin(codes, (ord("["), ord("{"))).astype(np.int64) - np.isin(codes, (ord("]"), ord("}")))
    return int(np.cumsum(steps).max()) if steps.size else 0


def read_labels_json(path: str | os.PathLike) -> Any:
    """Reads a labels file with bounded size and nesting; one-line errors naming it.

    Bounded before parsing (:data:`MAX_LABELS_BYTES`, :data:`MAX_JSON_DEPTH`): Python's parser
    recurses once per nesting level and a 100000-deep file would end in RecursionError."""
    path = pathlib.Path(path)
    try:
        count = path.stat().st_size
        if count > MAX_LABELS_BYTES:
            raise ValueError(f"labels file {path} has {count} bytes, above the bound of {MAX_LABELS_BYTES} "
                             "(la_iprop.data.sources.MAX_LABELS_BYTES)")
        text = path.read_bytes().decode("utf-8-sig")
        depth = _json_depth(text)
        if depth > MAX_JSON_DEPTH:
            raise ValueError(f"labels file {path} nests {depth} levels deep (at most {MAX_JSON_DEPTH}); expected "
                             '{"labels": [...]} or {"file name": label}')
        return json.loads(text)
    except (OSError, UnicodeDecodeError, RecursionError) as err:
        raise ValueError(f"cannot read labels file {path}: {str(err).splitlines()[0] or type(err).__name__}") from None
    except ValueError as err:   # JSONDecodeError, and integers beyond Python's digit limit
        message = str(err).splitlines()[0]
        raise ValueError(message if str(path) in message else f"cannot read labels file {path}: {message}") from None


def _label(path: pathlib.Path, where: str, value: Any, num_classes: int) -> int:
    """One label: a JSON integer in ``[0, num_classes)`` (not 1.7, 1.0, true, null or "1")."""
    expected = f"expected an integer class index in [0, {num_classes})"
    if type(value) is not int:
        kind = {bool: "a boolean", float: "a float", str: "a string", list: "a list", dict: "an object",
                type(None): "null"}.get(type(value), type(value).__name__)
        shown = repr(value) if not isinstance(value, (list, dict)) else ""
        raise ValueError(f"labels file {path}: {where} is {shown + ' (' if shown else ''}{kind}{')' if shown else ''}; "
                         f"{expected}")
    if not 0 <= value < num_classes:
        shown = str(value) if len(str(value)) <= 30 else f"an integer of {len(str(abs(value)))} digits"
        raise ValueError(f"labels file {path}: {where} is {shown}; {expected}")
    return value


def _label_list(path: pathlib.Path, labels: Any, count: int | None, num_classes: int, what: str) -> np.ndarray:
    if not isinstance(labels, list):
        raise ValueError(f"labels file {path}: 'labels' must be a list of integers, got {type(labels).__name__}")
    if count is not None and len(labels) != count:
        raise ValueError(f"labels file {path} lists {len(labels)} labels but {what} holds {count} images; "
                         "expected one label per image")
    return np.asarray([_label(path, f"labels[{i}]", v, num_classes) for i, v in enumerate(labels)], np.int32)


def _label_from_json(root: pathlib.Path, files: list[pathlib.Path], num_classes: int) -> np.ndarray | None:
    path = root / "labels.json"
    if not path.is_file():
        return None
    content = read_labels_json(path)
    if isinstance(content, dict) and "labels" in content:
        if len(content) != 1:
            others = sorted(k for k in content if k != "labels")[:3]
            raise ValueError(f"labels file {path} has 'labels' and other keys {others}; expected either "
                             '{"labels": [...]} or {"file name": label}')
        return _label_list(path, content["labels"], len(files), num_classes, str(root))
    if isinstance(content, dict):
        names = [str(f.relative_to(root)).replace(os.sep, "/") for f in files]
        keys = [n if n in content else f.name for n, f in zip(names, files, strict=True)]
        missing = [n for n, k in zip(names, keys, strict=True) if k not in content]
        if missing:
            raise ValueError(f"labels file {path} has no label for {len(missing)} image(s), e.g. {missing[:3]}; "
                             "expected a key per image (its path in the folder or its file name)")
        return np.asarray([_label(path, f"[{k!r}]", content[k], num_classes) for k in keys], np.int32)
    raise ValueError(f"labels file {path} must be {{\"labels\": [...]}} or {{\"file name\": label}}, "
                     f"got a JSON {type(content).__name__}")


# ----------------------------------------------------------------------------- sources
@dataclasses.dataclass(frozen=True)
class Batch:
    images: np.ndarray   # [n, size, size, 3] float32 in [0, 1]
    labels: np.ndarray   # [n] int32, -1 where unknown
    ids: list[str]       # stable identifiers (file names, sample names, record indices)


@dataclasses.dataclass
class ImageSource:
    """A random-access image collection: ``len(source)`` and ``source.load(indices)``.

    ``read_image(i)`` is the decoded image before the resize; with a ``corruption`` it is the
    corrupted ``size x size`` image (what :meth:`load` returns), so a content hash of ``read_image``
    covers the corrupted pixels. :meth:`identity` names everything that decides the pixels.
    """
    spec: str
    size: int
    ids: list[str]
    read_image: Callable[[int], np.ndarray]
    read_labels: Callable[[list[int]], np.ndarray]
    corruption: Corruption | None = None

    def __post_init__(self):
        decoded = getattr(self.read_image, "decoded", self.read_image)   # dataclasses.replace: wrap once
        self.read_image = decoded
        if self.corruption is not None:
            corruption, size, ids = self.corruption, self.size, self.ids

            def read_corrupted(i: int) -> np.ndarray:
                pixels = np.round(resize_center_crop(decoded(i), size) * 255.0).astype(np.uint8)
                return corruption.apply(pixels, ids[i]).astype(np.float32) / 255.0

            read_corrupted.decoded = decoded
            self.read_image = read_corrupted

    def __len__(self) -> int:
        return len(self.ids)

    def identity(self) -> dict[str, Any]:
        """The spec, the size and the corruption (None, or its name, severity, seed and package)."""
        return {"spec": self.spec, "size": int(self.size),
                "corruption": None if self.corruption is None else self.corruption.identity()}

    def load(self, indices: Sequence[int]) -> Batch:
        indices = [int(i) for i in indices]
        for i in indices:
            if not 0 <= i < len(self):
                raise IndexError(f"image index {i} out of range for {self.spec} ({len(self)} images)")
        images = np.stack([resize_center_crop(self.read_image(i), self.size) for i in indices]) if indices else \
            np.zeros((0, self.size, self.size, 3), np.float32)
        labels = np.asarray(self.read_labels(indices), np.int32).reshape(len(indices))
        return Batch(images, labels, [self.ids[i] for i in indices])


def _from_array(labels: np.ndarray) -> Callable[[list[int]], np.ndarray]:
    return lambda indices: labels[indices]


def _samples(size: int) -> ImageSource:
    import matplotlib.cbook
    import skimage.data

    readers = {
        "chelsea": skimage.data.chelsea,
        "coffee": skimage.data.coffee,
        "astronaut": skimage.data.astronaut,
        "rocket": skimage.data.rocket,
        "motorcycle_left": lambda: skimage.data.stereo_motorcycle()[0],
        "grace_hopper": lambda: np.asarray(Image.open(
            matplotlib.cbook.get_sample_data("grace_hopper.jpg", asfileobj=False)).convert("RGB")),
    }
    names = list(readers)
    return ImageSource("samples", size, names, lambda i: to_rgb_float(readers[names[i]](), names[i]),
                       lambda indices: np.full(len(indices), -1, np.int32))


def _folder(path: str, size: int, num_classes: int) -> ImageSource:
    root = pathlib.Path(path).expanduser()
    if not root.is_dir():
        raise ValueError(f"image folder not found: {root}")
    files = sorted((p for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()),
                   key=lambda p: _natural_key(p.relative_to(root)))
    if not files:
        raise ValueError(f"no image files ({', '.join(IMAGE_EXTENSIONS)}) found in folder {root}")
    labels = _label_from_json(root, files, num_classes)
    if labels is None:
        wnids = _wnid_to_index()
        labels = np.asarray([wnids.get(f.parent.name, -1) if f.parent != root else -1 for f in files], np.int32)
    ids = [str(f.relative_to(root)) for f in files]
    return ImageSource(f"folder:{root}", size, ids, lambda i: _read_file(files[i]), _from_array(labels))


def _natural_key(path: pathlib.Path):
    """Sort ``2.png`` before ``10.png``."""
    return [(0, int(part), "") if part.isdigit() else (1, 0, part)
            for part in str(path.with_suffix("")).replace(os.sep, "/").split("/")] + [(1, 0, path.suffix)]


def _la1000(path: str, size: int, num_classes: int) -> ImageSource:
    root = pathlib.Path(path).expanduser()
    labels_path = root / "labels.json"
    if not (root / "images").is_dir() or not labels_path.is_file():
        raise ValueError(f"la1000 folder {root} must contain images/ and labels.json")
    content = read_labels_json(labels_path)
    if not isinstance(content, dict) or "labels" not in content:
        got = f"keys {sorted(content)[:3]}" if isinstance(content, dict) else f"a JSON {type(content).__name__}"
        raise ValueError(f'labels file {labels_path} must be {{"labels": [...]}} (one class index per image '
                         f"images/0.png, 1.png, ...), got {got}")
    labels = _label_list(labels_path, content["labels"], None, num_classes, "")
    present = {p.name for p in (root / "images").iterdir()}
    missing = [f"{i}.png" for i in range(len(labels)) if f"{i}.png" not in present]
    if missing:
        raise ValueError(f"labels file {labels_path} lists {len(labels)} labels but {root / 'images'} lacks "
                         f"{len(missing)} of images 0.png..{len(labels) - 1}.png, e.g. {missing[:3]}")
    ids = [str(i) for i in range(len(labels))]
    return ImageSource(f"la1000:{root}", size, ids, lambda i: _read_file(root / "images" / f"{i}.png"),
                       _from_array(labels))


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return (text.splitlines()[0][:300] if text else type(err).__name__)


def _tfds(name_split: str, size: int, data_dir: str | None) -> ImageSource:
    import tensorflow_datasets as tfds

    name, _, split = name_split.partition(":")
    split = split or "validation"
    try:
        source = tfds.data_source(name, split=split, data_dir=data_dir, download=False)
    except Exception as err:  # noqa: BLE001 - tfds raises many types; its text may list all 260+ datasets
        raise ValueError(f"cannot open tfds dataset {name!r} split {split!r} in data_dir {data_dir!r}: "
                         f"{_first_line(err)}") from None
    count = len(source)
    if count == 0:
        raise ValueError(f"tfds dataset {name}:{split} is empty")

    has_labels = "label" in getattr(source.dataset_info, "features", {})

    def read_image(i: int) -> np.ndarray:
        return to_rgb_float(np.asarray(source[i]["image"]), f"tfds {name}:{split} record {i}")

    def read_labels(indices: list[int]) -> np.ndarray:
        # Read per record on demand: reading all labels up front would decode every image.
        if not has_labels:
            return np.full(len(indices), -1, np.int32)
        return np.asarray([int(source[i]["label"]) for i in indices], np.int32)

    return ImageSource(f"tfds:{name}:{split}", size, [str(i) for i in range(count)], read_image, read_labels)


def open_source(spec: str, *, size: int = 224, tfds_data_dir: str | None = None, corruption: str | None = None,
                corruption_seed: int = 0, num_classes: int = NUM_CLASSES) -> ImageSource:
    """Opens an image source from its spec (see the module docstring).

    ``corruption``: None, or ``"NAME:SEVERITY"`` (an ImageNet-C corruption applied after the resize;
    needs the extra ``la_iprop[corruptions]``); ``corruption_seed`` is the base of its per-image seeds.
    ``num_classes``: the range ``[0, num_classes)`` of the labels in a ``labels.json``.
    """
    if not isinstance(spec, str) or not spec:
        raise ValueError(f"data spec must be a non-empty string like 'samples' or 'folder:PATH', got {spec!r}")
    if isinstance(size, bool) or not isinstance(size, numbers.Integral) or size < 1:
        raise ValueError(f"size must be a positive integer, got {size!r}")
    size = int(size)
    parsed = None
    if corruption is not None:
        parsed = parse_corruption(corruption, seed=corruption_seed)
        if size < MIN_SIZE:
            raise ValueError(f"corruption {corruption!r} needs images of at least {MIN_SIZE}x{MIN_SIZE} pixels, "
                             f"got size={size}")
    kind, _, arg = spec.partition(":")
    if kind == "samples" and not arg:
        source = _samples(size)
    elif kind in ("folder", "la1000", "tfds") and not arg:
        raise ValueError(f"data spec {spec!r} needs a path or name after '{kind}:'")
    elif kind == "folder":
        source = _folder(arg, size, num_classes)
    elif kind == "la1000":
        source = _la1000(arg, size, num_classes)
    elif kind == "tfds":
        source = _tfds(arg, size, tfds_data_dir)
    else:
        raise ValueError(f"unknown data spec {spec!r}: expected 'samples', 'folder:PATH', 'la1000:PATH' "
                         "or 'tfds:NAME[:SPLIT]'")
    if parsed is not None:
        source = dataclasses.replace(source, corruption=parsed)
    return source
