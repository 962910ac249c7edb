"""What one slide may cost: bounds a hostile or broken file cannot push past.

A slide file is untrusted input: its headers can declare a 65500 x 65500 tile in a
2 KB file, or 10^6 x 10^6 pixels without a pyramid, so that a reader trusting them
allocates gigabytes or streams for hours. Every ``Slide`` carries a :class:`Limits`;
the defaults are far above any real slide (a 40x whole-mount slide is ~300,000 px on
a side, tiles are 256-1024 px) and a file over one is a :class:`SlideError` naming
the limit.
"""

from __future__ import annotations

import time
from dataclasses import dataclass


@dataclass(frozen=True)
class Limits:
    """Bounds on one open slide; ``None`` turns a bound off.

    Attributes:
        tile_pixels: most pixels of one stored tile (or strip, or Zarr chunk), checked
            when the slide is opened: one decoded tile is ``3 * tile_pixels`` bytes.
        side: most pixels on either side of any level, checked when opened.
        stream_pixels: most pixels of the level that ``Slide.thumbnail`` reduces:
            with a pyramid it is a small level; without one, level 0 is streamed
            (4e10 is 200,000 x 200,000 pixels, minutes of decoding).
        seconds: wall time the slide's reads may take, counted from when it is
            opened or from its last ``Slide.start_clock()``; checked before each
            stored tile is decoded, so a read stops within one tile's decoding.
    """

    tile_pixels: int | None = 100_000_000
    side: int | None = 1_000_000
    stream_pixels: int | None = 40_000_000_000
    seconds: float | None = None

    def __post_init__(self) -> None:
        for name in ("tile_pixels", "side", "stream_pixels", "seconds"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise ValueError(f"Limits.{name} must be > 0 or None, got {value!r}")

    def deadline(self) -> float | None:
        """``time.monotonic()`` value after which reads stop, from now."""
        return None if self.seconds is None else time.monotonic() + self.seconds


def over(value: int, limit: int | None) -> bool:
    """True when ``limit`` is set and ``value`` exceeds it."""
    return limit is not None and value > limit
