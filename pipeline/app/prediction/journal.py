"""The bookkeeping of an output directory: what made it, and what is done.

::

    OUT_DIR/manifest.json   what the outputs are bound to (model, options, version)
    OUT_DIR/journal.jsonl   one JSON line per finished slide, appended and fsync'ed

The **manifest** is a JSON object; ``manifest_id`` is a hash of it. A directory whose
manifest differs from a run's is refused by the batch driver (``differences`` says
how) unless it is told to overwrite.

The **journal** is append-only: each record is one line written with a single
``write`` on an ``O_APPEND`` descriptor and ``fsync``'ed, so a record costs one small
write whatever the size of the batch, and a kill at any point leaves every earlier
record intact. A kill in the middle of a line leaves a torn last line: it is cut off
when the journal is next opened (the slide it described is done again). Files are
created with mode 0666 minus the umask, like any other output.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pipeline.app.errors import ConfigError
from pipeline.app.files import atomic_write_bytes

MANIFEST_FILE = "manifest.json"
JOURNAL_FILE = "journal.jsonl"


def manifest_id(manifest: dict[str, Any]) -> str:
    """16 hex digits of the SHA-256 of ``manifest``'s canonical JSON."""
    text = json.dumps(manifest, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def read_manifest(out_dir: str | os.PathLike) -> dict[str, Any] | None:
    """The manifest of ``out_dir``, or ``None`` if it has none."""
    path = Path(out_dir) / MANIFEST_FILE
    try:
        body = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        raise ConfigError(f"{path}: unreadable manifest ({e}); use --overwrite") from None
    if not isinstance(body, dict):
        raise ConfigError(f"{path}: not a manifest (expected a JSON object)")
    return body


def write_manifest(out_dir: str | os.PathLike, manifest: dict[str, Any]) -> None:
    text = json.dumps(manifest, indent=2, sort_keys=True) + "\n"
    atomic_write_bytes(Path(out_dir) / MANIFEST_FILE, text.encode())


def differences(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """``"key.sub: old -> new"`` for every leaf that differs, in key order."""
    out = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out.extend(f"{key}.{d}" for d in differences(a, b))
        elif a != b:
            out.append(f"{key}: {_short(a)} -> {_short(b)}")
    return out


def _short(value: Any) -> str:
    text = json.dumps(value)
    return text if len(text) <= 40 else text[:37] + "..."


class Journal:
    """An append-only file of JSON records, one per line.

    ``records()`` reads the valid records (a torn last line is left out);
    ``append(record)`` writes one durably; ``reset()`` empties the journal atomically.
    Open it (``with journal:``) to append; the first open cuts a torn last line off.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self._fd: int | None = None

    def records(self) -> Iterator[dict[str, Any]]:
        try:
            f = open(self.path, "rb")
        except FileNotFoundError:
            return
        with f:
            for line in f:
                if not line.endswith(b"\n"):
                    return  # torn by a kill mid-write: not a record
                try:
                    record = json.loads(line)
                except ValueError:
                    continue
                if isinstance(record, dict):
                    yield record

    def open(self) -> None:
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
        size = os.fstat(self._fd).st_size
        if size:
            with open(self.path, "rb") as f:
                f.seek(max(0, size - 1))
                if f.read(1) != b"\n":
                    f.seek(0)
                    keep = f.read().rfind(b"\n") + 1
                    os.ftruncate(self._fd, keep)

    def append(self, record: dict[str, Any]) -> None:
        """Write ``record`` as one line and ``fsync`` it."""
        if self._fd is None:
            raise RuntimeError(f"{self.path}: journal not open")
        line = (json.dumps(record, sort_keys=True, separators=(",", ":")) + "\n").encode()
        os.write(self._fd, line)  # O_APPEND: one write lands whole at the end
        os.fsync(self._fd)

    def reset(self) -> None:
        """Replace the journal by an empty one (atomically)."""
        atomic_write_bytes(self.path, b"")
        if self._fd is not None:
            self.close()
            self.open()

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> Journal:
        self.open()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
