"""Progress of a long loop: a tqdm bar on a terminal, plain periodic lines elsewhere.

A scheduler's log file (Slurm, cron, ``nohup``) is not a terminal; a bar redrawn with
carriage returns fills it with one garbled line per update. There, ``progress_bar``
prints a complete line every ``every`` seconds and one at the end::

    predict: 120/2000 slides, 0.84 s/slide, about 26 min left
"""

from __future__ import annotations

import sys
import time
from typing import IO, Any

PLAIN_EVERY = 10.0
"""Seconds between two plain progress lines."""


class PlainProgress:
    """``update`` / ``close`` like tqdm's, printing to ``stream`` (``None``: nothing)."""

    def __init__(
        self, total: int, desc: str, unit: str, stream: IO[str] | None, every: float = PLAIN_EVERY
    ) -> None:
        self.total, self.desc, self.unit, self.stream, self.every = total, desc, unit, stream, every
        self.done = 0
        self.start = self.last = time.monotonic()
        self._printed = 0

    def update(self, n: int = 1) -> None:
        self.done += n
        if time.monotonic() - self.last >= self.every:
            self._print()

    def _print(self) -> None:
        self.last = time.monotonic()
        self._printed = self.done
        if self.stream is None:
            return
        line = f"{self.desc}: {self.done}/{self.total} {self.unit}s"
        if self.done:
            per = (self.last - self.start) / self.done
            line += f", {per:.2f} s/{self.unit}"
            if self.done < self.total:
                line += f", about {_duration(per * (self.total - self.done))} left"
        print(line, file=self.stream, flush=True)

    def close(self) -> None:
        if self._printed != self.done:
            self._print()

    def __enter__(self) -> PlainProgress:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def progress_bar(
    total: int, desc: str, unit: str = "slide", enabled: bool = True, stream: IO[str] | None = None
) -> Any:
    """A context manager with ``update(n=1)``: a tqdm bar when ``stream`` (default
    stderr) is a terminal, ``PlainProgress`` lines otherwise, silent unless ``enabled``."""
    stream = sys.stderr if stream is None else stream
    if enabled and stream.isatty():
        from tqdm import tqdm

        return tqdm(total=total, desc=desc, unit=unit, file=stream)
    return PlainProgress(total, desc, unit, stream if enabled else None)


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"
