"""tifffile backend: TIFF, OME-TIFF, SVS, NDPI pyramids.

Tiles are read with ``os.pread`` at the offsets the TIFF stores and decoded with
the page's own decoder (imagecodecs): one read and one decode per stored tile, no
shared file position, so threads need no lock.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import os
import threading
import xml.etree.ElementTree as ET

import numpy as np
import tifffile

from readers.base import Box, Level, Slide
from readers.errors import SlideError

TIFF_MAGICS = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")

_OME_UM_PER_UNIT = {"nm": 1e-3, "µm": 1.0, "um": 1.0, "mm": 1e3, "cm": 1e4}
_UM_PER_RESUNIT = {tifffile.RESUNIT.CENTIMETER: 1e4, tifffile.RESUNIT.INCH: 25400.0}
_BULKY_TAGS = {
    "TileOffsets",
    "TileByteCounts",
    "StripOffsets",
    "StripByteCounts",
    "JPEGTables",
    "ICCProfile",
    "XMP",
    "IPTC",
    "Photoshop",
}


def is_tiff(path: str) -> bool:
    """True when ``path`` is a file starting with a TIFF or BigTIFF header."""
    try:
        with open(path, "rb") as fh:
            return fh.read(4) in TIFF_MAGICS
    except OSError:
        return False


class TifffileLevel(Level):
    """A level backed by one TIFF page; tiles (or strips) decoded individually."""

    def __init__(self, slide: TifffileSlide, index: int, page: tifffile.TiffPage):
        h, w = page.imagelength, page.imagewidth
        tile = (page.tilelength, page.tilewidth) if page.is_tiled else (page.rowsperstrip, w)
        super().__init__(slide, index, (h, w), tile)  # TIFF stores no downsample
        self._page = page
        self._fd = slide._fd
        self._decode = page.decode  # a closure over the page's codec settings
        # numpy, not tifffile's tuples of Python ints: 8 bytes a tile instead of ~36,
        # which matters at 100k^2 (150k tiles at level 0).
        self._offsets = np.asarray(page.dataoffsets, np.int64)
        self._counts = np.asarray(page.databytecounts, np.int64)
        self._columns = self.grid_shape[1]

    def _release(self) -> None:
        # A closed slide may live on until the cyclic GC (levels and slide refer to
        # each other): drop the page and tile tables now so closing frees them.
        self._page = self._decode = self._offsets = self._counts = None

    def _read_tile(self, ty: int, tx: int, box: Box) -> np.ndarray | None:
        index = ty * self._columns + tx
        count = int(self._counts[index])
        if count == 0:
            return None
        data = os.pread(self._fd, count, int(self._offsets[index]))
        if len(data) != count:
            raise SlideError(
                self.slide.path,
                f"level {self.index} tile (y={ty}, x={tx}) is "
                f"truncated: {len(data)} of {count} bytes",
            )
        _check_declared_size(self, data, ty, tx)
        pixels, _, _ = self._decode(data, index, jpegtables=self._page.jpegtables)
        return pixels[0, box[0] : box[1], box[2] : box[3]]  # [1, h, w, S] -> [h, w, S]


class TifffileSlide(Slide):
    """A TIFF-family slide read through tifffile; the first series is the image."""

    backend = "tifffile"

    @staticmethod
    def accepts(path: str) -> bool:
        """A file with a TIFF header."""
        return is_tiff(path)

    _tif: tifffile.TiffFile | None = None
    _fd: int | None = None

    def _open(self) -> None:
        if not is_tiff(self.path):
            raise SlideError(self.path, f"not a TIFF file (first bytes {_head(self.path)!r})")
        with _tifffile_messages() as messages:
            self._tif = tifffile.TiffFile(self.path)
            series = self._tif.series
        if not series:
            said = "; ".join(m.split("> ", 1)[-1] for m in messages)  # without the repr
            raise SlideError(
                self.path,
                f"no image in the file ({os.path.getsize(self.path)} bytes: truncated or "
                f"damaged?)" + (f": {said}" if said else ""),
            )
        pages = [level.keyframe for level in series[0].levels]
        self._fd = os.open(self.path, os.O_RDONLY)
        for page in pages:
            _check_page(self.path, page, os.fstat(self._fd).st_size)
        self.levels.extend(TifffileLevel(self, k, page) for k, page in enumerate(pages))
        self.mpp = _mpp(self._tif, pages[0])
        self.properties = _properties(self._tif)

    def _close(self) -> None:
        for level in self.levels:
            level._release()
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        if self._tif is not None:
            self._tif.close()
            _break_cycles(self._tif)
            self._tif = None


# The objects a TiffFile makes for itself (others, e.g. its TiffFormat, are shared).
_PER_FILE = (
    tifffile.TiffFile,
    tifffile.TiffPages,
    tifffile.TiffPage,
    tifffile.TiffFrame,
    tifffile.TiffPageSeries,
    tifffile.TiffTags,
    tifffile.TiffTag,
)


def _break_cycles(tif: tifffile.TiffFile) -> None:
    """Empty the objects a closed ``tif`` made for itself.

    A TiffFile, its pages, tags and series refer to each other, so closing leaves them
    (about 0.7 MB of tag tuples for a 20k^2 pyramid, ten times that at 100k^2) to the
    cyclic garbage collector, whose full passes come rarely in a process holding a
    model and cost ~150 ms each: a batch opening thousands of slides grew by the
    slides it had closed. Emptied, they are freed as soon as the slide is.
    """
    stack, seen, found = [tif], set(), []
    while stack:
        obj = stack.pop()
        if id(obj) in seen:
            continue
        seen.add(id(obj))
        if isinstance(obj, _PER_FILE):
            found.append(obj)
            stack.extend(gc.get_referents(obj))
        elif isinstance(obj, (list, tuple)) and obj and isinstance(obj[0], (int, float)):
            continue  # a tag's values (tile offsets: thousands of numbers), no objects
        elif isinstance(obj, (dict, list, tuple, set)):
            stack.extend(gc.get_referents(obj))
    for obj in found:
        if hasattr(obj, "__dict__"):
            obj.__dict__.clear()
        for cls in type(obj).__mro__:
            slots = getattr(cls, "__slots__", ())
            for name in (slots,) if isinstance(slots, str) else slots:
                with contextlib.suppress(AttributeError, TypeError):
                    delattr(obj, name)


_capturing: dict[int, list[str]] = {}


class _Capture(logging.Filter):
    """Keeps tifffile's log records of the threads in ``_tifffile_messages`` off the
    terminal (a stray line beside the one-line error) and in their list instead."""

    def filter(self, record: logging.LogRecord) -> bool:
        messages = _capturing.get(record.thread)
        if messages is None:
            return True
        messages.append(record.getMessage())
        return False


logging.getLogger("tifffile").addFilter(_Capture())


@contextlib.contextmanager
def _tifffile_messages():
    """The messages tifffile logs in this thread during the block."""
    messages = _capturing[threading.get_ident()] = []
    try:
        yield messages
    finally:
        del _capturing[threading.get_ident()]


def _head(path: str) -> bytes | str:
    try:
        with open(path, "rb") as fh:
            return fh.read(8)
    except OSError as exc:
        return exc.strerror or str(exc)


_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}


def jpeg_frame_size(data: bytes) -> tuple[int, int] | None:
    """``(height, width)`` that a JPEG stream's frame header (SOF) declares, read
    from the markers before the scan; ``None`` when there is none."""
    i = 2 if data[:2] == b"\xff\xd8" else 0
    while i + 4 <= len(data) and data[i] == 0xFF:
        marker = data[i + 1]
        if marker in _SOF:
            if i + 9 > len(data):
                return None
            return _be(data, i + 5, 2), _be(data, i + 7, 2)
        if marker == 0xDA:  # start of scan: no frame header before it
            return None
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        i += 2 + _be(data, i + 2, 2)
    return None


def jpeg2000_size(data: bytes) -> tuple[int, int] | None:
    """``(height, width)`` of a JPEG 2000 codestream (raw or in a JP2 file) from its
    SIZ segment: the image area ``(Ysiz - YOsiz, Xsiz - XOsiz)``."""
    siz = data.find(b"\xff\x4f\xff\x51", 0, 1 << 16)  # SOC then SIZ
    if siz < 0 or siz + 24 > len(data):
        return None
    x, y, x0, y0 = (_be(data, siz + 8 + 4 * k, 4) for k in range(4))
    return y - y0, x - x0


def png_size(data: bytes) -> tuple[int, int] | None:
    """``(height, width)`` from a PNG's IHDR chunk."""
    if data[:8] != b"\x89PNG\r\n\x1a\n" or data[12:16] != b"IHDR" or len(data) < 24:
        return None
    return _be(data, 20, 4), _be(data, 16, 4)


def webp_size(data: bytes) -> tuple[int, int] | None:
    """``(height, width)`` from a WebP's first chunk (VP8X canvas, VP8L or VP8 frame)."""
    if data[:4] != b"RIFF" or data[8:12] != b"WEBP" or len(data) < 30:
        return None
    kind = data[12:16]
    if kind == b"VP8X":
        return _le(data, 27, 3) + 1, _le(data, 24, 3) + 1
    if kind == b"VP8L":
        bits = _le(data, 21, 4)
        return ((bits >> 14) & 0x3FFF) + 1, (bits & 0x3FFF) + 1
    if kind == b"VP8 ":
        return _le(data, 28, 2) & 0x3FFF, _le(data, 26, 2) & 0x3FFF
    return None


def _be(data: bytes, at: int, n: int) -> int:
    return int.from_bytes(data[at : at + n], "big")


def _le(data: bytes, at: int, n: int) -> int:
    return int.from_bytes(data[at : at + n], "little")


DECLARED_SIZE = {
    6: jpeg_frame_size,  # old-style JPEG
    7: jpeg_frame_size,
    34892: jpeg_frame_size,  # lossy JPEG (DNG)
    33003: jpeg2000_size,  # Aperio JPEG 2000, YCbCr
    33004: jpeg2000_size,
    33005: jpeg2000_size,  # Aperio JPEG 2000, RGB
    34712: jpeg2000_size,
    34933: png_size,
    34927: webp_size,
    50001: webp_size,
}
"""Readers of the image size a tile's header declares, by TIFF compression code.

Byte-stream codecs (deflate, LZW, zstd, ...) decode into a buffer of the tile's size,
so a stream that expands further is an error, not an allocation. Image codecs
allocate what their header declares: those here are checked first. JPEG XR, JPEG XL
and LERC are decoded trusting their headers (docs/security.md)."""


def _check_declared_size(level: TifffileLevel, data: bytes, ty: int, tx: int) -> None:
    """An image-codec tile may not declare more pixels than its TIFF tile: the decoder
    would allocate what the header says (65500 x 65500 from a 2 KB file)."""
    read = DECLARED_SIZE.get(int(level._page.compression))
    size = None if read is None else read(data)
    tile_h, tile_w = level.tile_shape[:2]
    if size is not None and (size[0] > tile_h or size[1] > tile_w):
        raise SlideError(
            level.slide.path,
            f"level {level.index} tile (y={ty}, x={tx}) is a "
            f"{level._page.compression.name.replace('_', ' ')} image of {size[0]}x{size[1]} "
            f"pixels in a {tile_h}x{tile_w} tile",
        )


def _check_page(path: str, page: tifffile.TiffPage, file_size: int) -> None:
    """Reject, at open time, what the tile reader could not decode."""
    if page.dtype != np.uint8:
        raise SlideError(path, f"unsupported sample type {page.dtype} (expected uint8)")
    if page.samplesperpixel not in (1, 3, 4):
        raise SlideError(path, f"unsupported samples per pixel {page.samplesperpixel}")
    if page.samplesperpixel > 1 and page.planarconfig != tifffile.PLANARCONFIG.CONTIG:
        raise SlideError(path, "unsupported planar (separate) sample layout")
    if page.compression not in tifffile.TIFF.DECOMPRESSORS:
        raise SlideError(path, f"unsupported compression {page.compression!r}")
    ends = np.asarray(page.dataoffsets, np.int64) + np.asarray(page.databytecounts, np.int64)
    if ends.size and int(ends.max()) > file_size:
        raise SlideError(
            path,
            f"truncated: tile data extends to byte {int(ends.max())} "
            f"but the file has {file_size} bytes",
        )


def _mpp(tif: tifffile.TiffFile, page: tifffile.TiffPage) -> tuple[float, float] | None:
    """``(y, x)`` microns per pixel from Aperio, OME or TIFF resolution metadata."""
    if page.is_svs:
        # tifffile's parser turns numeric values into int/float, others stay str.
        mpp = tifffile.tifffile.svs_description_metadata(page.description).get("MPP")
        if isinstance(mpp, (int, float)):
            return float(mpp), float(mpp)
    if tif.is_ome:
        pixels = ET.fromstring(tif.ome_metadata).find(".//{*}Pixels")
        if pixels is not None and "PhysicalSizeX" in pixels.attrib:
            mpp = (_ome_um(pixels, "PhysicalSizeY"), _ome_um(pixels, "PhysicalSizeX"))
            return None if None in mpp else mpp
    if "XResolution" not in page.tags or "YResolution" not in page.tags:
        return None  # tifffile would give 1 pixel per inch, the tags' defaults
    per_unit = _UM_PER_RESUNIT.get(page.resolutionunit)
    xres, yres = page.resolution
    if per_unit is None or not xres > 0 or not yres > 0:
        return None
    return per_unit / yres, per_unit / xres


def _ome_um(pixels: ET.Element, name: str) -> float | None:
    """Microns of an OME ``PhysicalSizeX/Y`` (Y defaults to X), None for other units."""
    per_unit = _OME_UM_PER_UNIT.get(pixels.attrib.get(name + "Unit", "µm"))
    value = pixels.attrib.get(name, pixels.attrib["PhysicalSizeX"])
    return None if per_unit is None else float(value) * per_unit


def _properties(tif: tifffile.TiffFile) -> dict[str, str]:
    page = tif.pages.first
    props = {"tifffile.series": tif.series[0].kind}
    for tag in page.tags:
        if tag.name not in _BULKY_TAGS and isinstance(tag.value, (str, int, float, tuple)):
            props[f"tiff.{tag.name}"] = str(tag.value)
    return props
