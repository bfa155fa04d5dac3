"""ImageNet-C corruptions (Hendrycks & Dietterich, ICLR 2019) as a data option: ``"NAME:SEVERITY"``.

The corruptions come from the maintained ``imagecorruptions-imaug`` package (the ``imagecorruptions``
code of Michaelis et al. with ``importlib.resources`` instead of ``pkg_resources``; Apache-2.0), not
hand-written: install the extra ``pip install 'la_iprop[corruptions]'``. They act on the uint8 image
after the resize and centre crop (as ImageNet-C corrupts the 224x224 crop), so a corrupted image
depends on the source's ``size``.

Deterministic: each image's randomness comes from a seed derived from the corruption, its severity,
a base seed and the image's id (not its position or the order of reads), so a run is reproducible
and resumes exactly. The package draws from NumPy's *global* random state (and from its own seeds
for ``glass_blur``/``impulse_noise``): that state is seeded for the call and restored after it,
under a lock (a thread reading another image meanwhile cannot interleave its draws).
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import importlib.metadata
import inspect
import threading
from typing import Any

import numpy as np

from la_iprop.checks import check_seed

__all__ = ["Corruption", "parse_corruption", "corruption_names", "SEVERITIES", "PACKAGE", "EXTRA", "MIN_SIZE"]

PACKAGE = "imagecorruptions-imaug"   # the PyPI distribution (import name: imagecorruptions)
EXTRA = "corruptions"                # pip install 'la_iprop[corruptions]'
SEVERITIES = (1, 2, 3, 4, 5)
MIN_SIZE = 32                        # the package refuses smaller images
_LOCK = threading.Lock()


def _package() -> tuple[Any, str]:
    """The imported package and its distribution's name and version (recorded in a source's identity)."""
    try:
        module = importlib.import_module("imagecorruptions")
    except ImportError as err:   # also the unmaintained imagecorruptions 1.1.2 without pkg_resources
        raise ImportError(f"corruptions need the optional package {PACKAGE} (pip install 'la_iprop[{EXTRA}]'); "
                          f"importing imagecorruptions failed: {str(err).splitlines()[0] if str(err) else err!r}") \
            from None
    for dist in (PACKAGE, "imagecorruptions"):
        try:
            return module, f"{dist}=={importlib.metadata.version(dist)}"
        except importlib.metadata.PackageNotFoundError:
            continue
    return module, "imagecorruptions==unknown"


def corruption_names() -> list[str]:
    """The corruption names the installed package provides (the 15 ImageNet-C ones and 4 extra)."""
    return list(_package()[0].get_corruption_names("all"))


@dataclasses.dataclass(frozen=True)
class Corruption:
    """One corruption at one severity; ``seed`` is the base of the per-image seeds."""
    name: str
    severity: int
    seed: int = 0
    package: str = ""

    @property
    def spec(self) -> str:
        return f"{self.name}:{self.severity}"

    def identity(self) -> dict[str, Any]:
        """What a run records: the corruption, its severity, the base seed and the package that made it."""
        return {"name": self.name, "severity": self.severity, "seed": self.seed, "package": self.package}

    def image_seed(self, image_id: str) -> int:
        """The 128-bit seed of one image: from the corruption, severity, base seed and the image's id."""
        text = f"{self.name}\0{self.severity}\0{self.seed}\0{image_id}".encode()
        return int.from_bytes(hashlib.blake2b(text, digest_size=16).digest(), "little")

    def apply(self, image: np.ndarray, image_id: str) -> np.ndarray:
        """Corrupts one uint8 HxWx3 image (H, W >= 32); returns uint8 of the same shape."""
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] != 3:
            raise ValueError(f"corruption {self.spec}: expected a uint8 HxWx3 image, got {image.dtype} {image.shape}")
        if min(image.shape[:2]) < MIN_SIZE:
            raise ValueError(f"corruption {self.spec} needs images of at least {MIN_SIZE}x{MIN_SIZE} pixels, "
                             f"got {image.shape[0]}x{image.shape[1]}")
        module, _ = _package()
        seed = self.image_seed(str(image_id))
        function = module.corruption_dict[self.name]
        kwargs = {"seed": seed % 2**32} if "seed" in inspect.signature(function).parameters else {}
        state = np.random.RandomState(np.random.MT19937(np.random.SeedSequence(seed))).get_state()
        with _LOCK:
            saved = np.random.get_state()
            try:
                np.random.set_state(state)
                out = module.corrupt(np.ascontiguousarray(image), severity=self.severity,
                                     corruption_name=self.name, **kwargs)
            finally:
                np.random.set_state(saved)
        out = np.asarray(out)
        if out.shape != image.shape or out.dtype != np.uint8:
            raise ValueError(f"corruption {self.spec} returned {out.dtype} {out.shape} for a {image.shape} image")
        return out


def parse_corruption(spec: Any, *, seed: Any = 0) -> Corruption:
    """``"NAME:SEVERITY"`` (e.g. ``"gaussian_noise:3"``) -> :class:`Corruption`; one-line errors naming
    what is wrong (the format, an unknown name with the known ones, a severity outside 1..5)."""
    if isinstance(spec, Corruption):
        return spec
    form = "'NAME:SEVERITY' (e.g. 'gaussian_noise:3', severity 1-5)"
    if not isinstance(spec, str) or spec.count(":") != 1:
        raise ValueError(f"corruption must be a string {form}, got {spec!r}")
    name, _, severity_text = spec.partition(":")
    if not severity_text.strip().isdigit() or int(severity_text) not in SEVERITIES:
        raise ValueError(f"corruption {spec!r}: severity must be an integer in 1..5, got {severity_text!r}")
    seed = check_seed("corruption_seed", seed)
    _, package = _package()
    names = corruption_names()
    if name not in names:
        raise ValueError(f"unknown corruption {name!r} in {spec!r}; known: {', '.join(names)}")
    return Corruption(name, int(severity_text), seed, package)
