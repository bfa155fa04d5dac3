"""Image sources: a spec string in, batches of [0,1] NHWC images with labels out.

Specs:

* ``samples`` — photographs bundled inside installed packages (scikit-image, matplotlib);
* ``folder:PATH`` — image files; labels from ImageNet synset sub-folders
  (``n01440764/...``) or a ``labels.json`` (``{"labels": [...]}`` in sorted file
  order, or ``{"file name": label}``);
* ``la1000:PATH`` — the official LA 1000-image set (``images/{i}.png``, ``labels.json``);
* ``tfds:NAME[:SPLIT]`` — TensorFlow Datasets via ``tfds.data_source`` (ArrayRecord;
  TensorFlow is not needed), e.g. ``tfds:imagenet2012:validation``.

Every image is converted to RGB (grayscale, RGBA, palette and 16-bit inputs included),
its shorter side resized to ``size`` and centre-cropped to ``size x size``. Labels
unknown to a source are ``-1``.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import pathlib
from typing import Callable, Sequence

import numpy as np
from PIL import Image, UnidentifiedImageError

__all__ = ["Batch", "ImageSource", "open_source", "class_names", "class_name", "to_rgb_float",
           "resize_center_crop", "IMAGE_EXTENSIONS"]

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm")


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
def to_rgb_float(image: Image.Image | np.ndarray) -> np.ndarray:
    """Any PIL image or array -> float32 HxWx3 in [0, 1].

    16-bit images keep their full range; RGBA/LA are composited over white (the usual
    rendering of transparency); palette and grayscale images are expanded to RGB.
    """
    if isinstance(image, Image.Image):
        if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
            array = np.asarray(image, dtype=np.float64)
            scale = 65535.0 if image.mode.startswith("I;16") or array.max() > 255 else 255.0
            array = np.clip(array / scale, 0.0, 1.0).astype(np.float32)
            return np.repeat(array[..., None], 3, axis=-1)
        if image.mode == "P":
            image = image.convert("RGBA" if "transparency" in image.info else "RGB")
        if image.mode in ("RGBA", "LA", "PA"):
            background = Image.new("RGBA", image.size, (255, 255, 255, 255))
            image = Image.alpha_composite(background, image.convert("RGBA"))
        return np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    array = np.asarray(image)
    if array.ndim == 2:
        array = array[..., None]
    if array.ndim != 3 or array.shape[-1] not in (1, 3, 4):
        raise ValueError(f"image array must be HxW, HxWx1, HxWx3 or HxWx4, got shape {array.shape}")
    if np.issubdtype(array.dtype, np.integer):
        array = array.astype(np.float32) / (65535.0 if array.dtype == np.uint16 else 255.0)
    array = array.astype(np.float32)
    if array.shape[-1] == 4:
        alpha = array[..., 3:]
        array = array[..., :3] * alpha + (1.0 - alpha)
    if array.shape[-1] == 1:
        array = np.repeat(array, 3, axis=-1)
    return np.clip(array, 0.0, 1.0)


def resize_center_crop(image: np.ndarray, size: int) -> np.ndarray:
    """Resizes the shorter side to ``size`` (bilinear, antialiased) and centre-crops."""
    h, w = image.shape[:2]
    if (h, w) == (size, size):
        return image.astype(np.float32)
    scale = size / min(h, w)
    new_h, new_w = max(size, round(h * scale)), max(size, round(w * scale))
    pil = Image.fromarray(np.round(image * 255.0).astype(np.uint8))
    resized = np.asarray(pil.resize((new_w, new_h), Image.BILINEAR), dtype=np.float32) / 255.0
    top, left = (new_h - size) // 2, (new_w - size) // 2
    return resized[top:top + size, left:left + size]


def _read_file(path: pathlib.Path) -> np.ndarray:
    try:
        with Image.open(path) as image:
            image.load()
            return to_rgb_float(image)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        raise ValueError(f"cannot read image file {path}: {err}") from None


# ----------------------------------------------------------------------------- sources
@dataclasses.dataclass(frozen=True)
class Batch:
    images: np.ndarray   # [n, size, size, 3] float32 in [0, 1]
    labels: np.ndarray   # [n] int32, -1 where unknown
    ids: list[str]       # stable identifiers (file names, sample names, record indices)


@dataclasses.dataclass
class ImageSource:
    """A random-access image collection: ``len(source)`` and ``source.load(indices)``."""
    spec: str
    size: int
    ids: list[str]
    read_image: Callable[[int], np.ndarray]
    read_labels: Callable[[list[int]], np.ndarray]

    def __len__(self) -> int:
        return len(self.ids)

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
    return ImageSource("samples", size, names, lambda i: to_rgb_float(readers[names[i]]()),
                       lambda indices: np.full(len(indices), -1, np.int32))


def _label_from_json(root: pathlib.Path, files: list[pathlib.Path]) -> np.ndarray | None:
    path = root / "labels.json"
    if not path.is_file():
        return None
    try:
        content = json.loads(path.read_text())
    except (json.JSONDecodeError, OSError) as err:
        raise ValueError(f"cannot read labels file {path}: {err}") from None
    if isinstance(content, dict) and isinstance(content.get("labels"), list):
        labels = content["labels"]
        if len(labels) != len(files):
            raise ValueError(f"{path} lists {len(labels)} labels but {root} holds {len(files)} images")
        return np.asarray(labels, np.int32)
    if isinstance(content, dict):
        missing = [f.name for f in files if f.name not in content and str(f.relative_to(root)) not in content]
        if missing:
            raise ValueError(f"{path} has no label for {len(missing)} image(s), e.g. {missing[:3]}")
        return np.asarray([content.get(str(f.relative_to(root)), content.get(f.name)) for f in files], np.int32)
    raise ValueError(f"{path} must be {{'labels': [...]}} or {{'file name': label}}")


def _folder(path: str, size: int) -> ImageSource:
    root = pathlib.Path(path).expanduser()
    if not root.is_dir():
        raise ValueError(f"image folder not found: {root}")
    files = sorted((p for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()),
                   key=lambda p: _natural_key(p.relative_to(root)))
    if not files:
        raise ValueError(f"no image files ({', '.join(IMAGE_EXTENSIONS)}) found in folder {root}")
    labels = _label_from_json(root, files)
    if labels is None:
        wnids = _wnid_to_index()
        labels = np.asarray([wnids.get(f.parent.name, -1) if f.parent != root else -1 for f in files], np.int32)
    ids = [str(f.relative_to(root)) for f in files]
    return ImageSource(f"folder:{root}", size, ids, lambda i: _read_file(files[i]), _from_array(labels))


def _natural_key(path: pathlib.Path):
    """Sort ``2.png`` before ``10.png``."""
    return [(0, int(part), "") if part.isdigit() else (1, 0, part)
            for part in str(path.with_suffix("")).replace(os.sep, "/").split("/")] + [(1, 0, path.suffix)]


def _la1000(path: str, size: int) -> ImageSource:
    root = pathlib.Path(path).expanduser()
    labels_path = root / "labels.json"
    if not (root / "images").is_dir() or not labels_path.is_file():
        raise ValueError(f"la1000 folder {root} must contain images/ and labels.json")
    labels = np.asarray(json.loads(labels_path.read_text())["labels"], np.int32)
    ids = [str(i) for i in range(len(labels))]
    return ImageSource(f"la1000:{root}", size, ids, lambda i: _read_file(root / "images" / f"{i}.png"),
                       _from_array(labels))


def _tfds(name_split: str, size: int, data_dir: str | None) -> ImageSource:
    import tensorflow_datasets as tfds

    name, _, split = name_split.partition(":")
    split = split or "validation"
    try:
        source = tfds.data_source(name, split=split, data_dir=data_dir, download=False)
    except Exception as err:  # noqa: BLE001 - tfds raises many types for a missing dataset
        raise ValueError(f"cannot open tfds dataset {name!r} split {split!r} in data_dir {data_dir!r}: {err}") from None
    count = len(source)
    if count == 0:
        raise ValueError(f"tfds dataset {name}:{split} is empty")

    has_labels = "label" in getattr(source.dataset_info, "features", {})

    def read_image(i: int) -> np.ndarray:
        return to_rgb_float(np.asarray(source[i]["image"]))

    def read_labels(indices: list[int]) -> np.ndarray:
        # Read per record on demand: reading all labels up front would decode every image.
        if not has_labels:
            return np.full(len(indices), -1, np.int32)
        return np.asarray([int(source[i]["label"]) for i in indices], np.int32)

    return ImageSource(f"tfds:{name}:{split}", size, [str(i) for i in range(count)], read_image, read_labels)


def open_source(spec: str, *, size: int = 224, tfds_data_dir: str | None = None) -> ImageSource:
    """Opens an image source from its spec (see the module docstring)."""
    if not isinstance(spec, str) or not spec:
        raise ValueError(f"data spec must be a non-empty string like 'samples' or 'folder:PATH', got {spec!r}")
    kind, _, arg = spec.partition(":")
    if kind == "samples" and not arg:
        return _samples(size)
    if kind in ("folder", "la1000", "tfds") and not arg:
        raise ValueError(f"data spec {spec!r} needs a path or name after '{kind}:'")
    if kind == "folder":
        return _folder(arg, size)
    if kind == "la1000":
        return _la1000(arg, size)
    if kind == "tfds":
        return _tfds(arg, size, tfds_data_dir)
    raise ValueError(f"unknown data spec {spec!r}: expected 'samples', 'folder:PATH', 'la1000:PATH' "
                     "or 'tfds:NAME[:SPLIT]'")
