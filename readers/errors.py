"""The one exception every backend raises for a file it cannot open or decode."""

from __future__ import annotations

import os


class SlideError(Exception):
    """A slide file that no backend can open or decode.

    ``path`` is the file and ``reason`` says what is wrong with it; the message
    names both, e.g. ``"slide.svs: not a TIFF file (first bytes b'hell')"``.
    """

    def __init__(self, path: str | os.PathLike, reason: str):
        self.path = os.fspath(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")

    def __reduce__(self):
        # Exceptions travel back from Dask workers pickled; the default reduce
        # would call __init__ with the formatted message only.
        return (type(self), (self.path, self.reason))
