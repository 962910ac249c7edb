"""The backends by name, and ``open_slide``."""

from __future__ import annotations

import os
import stat

from readers._openslide import OpenSlideSlide
from readers._tifffile import TifffileSlide
from readers._zarr import ZarrSlide
from readers.base import Slide
from readers.errors import SlideError
from readers.limits import Limits

BACKENDS: dict[str, type[Slide]] = {
    "openslide": OpenSlideSlide,
    "tifffile": TifffileSlide,
    "zarr": ZarrSlide,
}
"""Backend classes by name."""

TIFFFILE_FIRST = {"generic-tiff", "aperio"}
"""OpenSlide formats whose stored tile grid is the image, so tifffile reads them exactly.

``auto`` prefers tifffile for these: it decodes stored tiles directly (about 7x
faster than OpenSlide's ``read_region`` in ``scripts/bench_readers.py``) and is
exact at every level. Other formats OpenSlide knows (NDPI, MRXS, SCN, BIF with
overlapping tiles, DICOM...) go to OpenSlide first.
"""


def auto_order(path: str) -> list[str]:
    """Names of the backends ``backend="auto"`` tries for ``path``, best first."""
    if ZarrSlide.accepts(path):
        return ["zarr"]
    vendor = OpenSlideSlide.vendor(path)
    tiff = ["tifffile"] if TifffileSlide.accepts(path) else []
    if vendor is None:
        return tiff
    if vendor in TIFFFILE_FIRST:
        return [*tiff, "openslide"]
    return ["openslide", *tiff]


def special_file_kind(path: str | os.PathLike) -> str | None:
    """What ``path`` is when it is neither a regular file nor a directory (``"a
    FIFO"``, ``"a socket"``, ``"a character device"``, ``"a block device"``), else
    ``None``. Follows symbolic links."""
    mode = os.stat(path).st_mode
    if stat.S_ISREG(mode) or stat.S_ISDIR(mode):
        return None
    for test, kind in (
        (stat.S_ISFIFO, "a FIFO"),
        (stat.S_ISSOCK, "a socket"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
    ):
        if test(mode):
            return kind
    return "not a file"


def open_slide(
    path: str | os.PathLike,
    backend: str = "auto",
    threads: int | None = None,
    limits: Limits | None = None,
) -> Slide:
    """Open a slide lazily.

    Args:
        path: a slide file (SVS, NDPI, TIFF, OME-TIFF, ...) or a Zarr / OME-Zarr
            directory.
        backend: ``"openslide"``, ``"tifffile"``, ``"zarr"`` or ``"auto"``: the
            first of ``auto_order(path)`` that opens it (Zarr for directories;
            tifffile, then OpenSlide, for generic tiled TIFF and Aperio SVS;
            OpenSlide, then tifffile, for the other formats OpenSlide knows;
            tifffile for other TIFFs). ``Slide.backend`` says which one did.
        threads: threads decoding the tiles of one ``read_patches`` call
            (default: the number of CPUs, at most 8).
        limits: what the file may cost (``readers.Limits``: tile and level sizes,
            thumbnail streaming, read time); the defaults when ``None``.

    Raises:
        FileNotFoundError: nothing exists at ``path``.
        SlideError: no backend can open the file; the message names the path and
            each backend's reason.
        ValueError: unknown ``backend`` name.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"no slide at {path!r}")
    kind = special_file_kind(path)
    if kind is not None:
        # Opening a FIFO for reading blocks until a writer comes; never try.
        raise SlideError(path, f"not a regular file ({kind})")
    if backend != "auto":
        if backend not in BACKENDS:
            raise ValueError(
                f"backend must be 'auto' or one of {sorted(BACKENDS)}, got {backend!r}"
            )
        return BACKENDS[backend](path, threads=threads, limits=limits)
    reasons = []
    for name in auto_order(path):
        try:
            return BACKENDS[name](path, threads=threads, limits=limits)
        except SlideError as exc:
            reasons.append(exc.reason)  # "<backend>: <what is wrong>"
    if not reasons:
        size = os.path.getsize(path) if os.path.isfile(path) else None
        what = "an empty file" if size == 0 else "not a slide format any backend recognises"
        raise SlideError(path, what)
    raise SlideError(path, "; ".join(reasons))
