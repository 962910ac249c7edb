"""The backends by name, and ``open_slide``."""

from __future__ import annotations

import os

from readers._openslide import OpenSlideSlide
from readers._tifffile import TifffileSlide
from readers._zarr import ZarrSlide
from readers.base import Slide
from readers.errors import SlideError

BACKENDS: dict[str, type[Slide]] = {
    "zarr": ZarrSlide,
    "openslide": OpenSlideSlide,
    "tifffile": TifffileSlide,
}
"""Backend classes by name, in the order ``backend="auto"`` tries them."""


def open_slide(path: str | os.PathLike, backend: str = "auto", threads: int | None = None) -> Slide:
    """Open a slide lazily.

    Args:
        path: a slide file (SVS, NDPI, TIFF, OME-TIFF, ...) or a Zarr / OME-Zarr
            directory.
        backend: ``"openslide"``, ``"tifffile"``, ``"zarr"`` or ``"auto"``: the
            first backend, in ``BACKENDS`` order, that accepts the path and opens
            it (Zarr for directories, OpenSlide for formats it recognises,
            tifffile for other TIFFs). ``Slide.backend`` says which one did.
        threads: threads decoding the tiles of one ``read_patches`` call
            (default: the number of CPUs, at most 8).

    Raises:
        FileNotFoundError: nothing exists at ``path``.
        SlideError: no backend can open the file; the message names the path and
            each backend's reason.
        ValueError: unknown ``backend`` name.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"no slide at {path!r}")
    if backend != "auto":
        if backend not in BACKENDS:
            raise ValueError(
                f"backend must be 'auto' or one of {sorted(BACKENDS)}, got {backend!r}"
            )
        return BACKENDS[backend](path, threads=threads)
    reasons = []
    for name, cls in BACKENDS.items():
        if not cls.accepts(path):
            continue
        try:
            return cls(path, threads=threads)
        except SlideError as exc:
            reasons.append(f"{name}: {exc.reason}")
    if not reasons:
        size = os.path.getsize(path) if os.path.isfile(path) else None
        what = "an empty file" if size == 0 else "not a slide format any backend recognises"
        raise SlideError(path, what)
    raise SlideError(path, "; ".join(reasons))
