"""Lazy pyramidal slide readers.

``open_slide(path)`` returns a :class:`Slide` whose :class:`Level` s read only the
stored tiles a request touches. Coordinates are ``(y, x)``, sizes ``(h, w)``,
images ``uint8 [h, w, 3]`` RGB (``readers._types``). OpenSlide is imported when a
slide is opened with it, not here.

Synthetic slides for tests, demos and benchmarks are written by
``readers.testing``, which is not part of the reader API and not imported here.
"""

from readers.base import Level, Slide
from readers.errors import SlideError
from readers.limits import Limits
from readers.registry import BACKENDS, open_slide

__all__ = [
    "BACKENDS",
    "Level",
    "Limits",
    "Slide",
    "SlideError",
    "open_slide",
]
