"""Output files of prediction, each written atomically.

Every writer renders into a temporary file in the destination directory and
``os.replace``s it over the destination, so a reader (or a crash) only ever sees
the old file or the complete new one.

Layout under an output directory::

    predictions.csv           one row per input file (PREDICTION_COLUMNS)
    heatmaps/<slide>.png      attention over the thumbnail
    patches/<slide>.geojson   sampled patches, level-0 pixel rectangles (QuPath)
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import uuid
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np

PREDICTIONS = "predictions.csv"
BASE_COLUMNS = ("slide", "path", "status", "label")


def prediction_columns(class_names: Sequence[str]) -> list[str]:
    """``slide, path, status, label, prob_<class>..., error``."""
    return [*BASE_COLUMNS, *(f"prob_{c}" for c in class_names), "error"]


def heatmap_path(out_dir: str | os.PathLike, slide: str) -> Path:
    return Path(out_dir) / "heatmaps" / f"{slide}.png"


def geojson_path(out_dir: str | os.PathLike, slide: str) -> Path:
    return Path(out_dir) / "patches" / f"{slide}.geojson"


@contextlib.contextmanager
def atomic_target(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary sibling of ``path`` to write; on success it replaces
    ``path`` in one ``os.replace``, on error it is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Created with open(mode="x") rather than mkstemp, so it gets the umask's
    # permissions like any other output file, not mkstemp's 0600.
    tmp = path.parent / f".{path.name}.{uuid.uuid4().hex}.tmp"
    tmp.open("xb").close()
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (see ``atomic_target``)."""
    with atomic_target(path) as tmp, open(tmp, "wb") as f:
        f.write(data)


def write_csv(path: str | os.PathLike, columns: Sequence[str], rows: Iterable[dict]) -> None:
    """Atomically write ``rows`` (dicts keyed by ``columns``; missing keys empty)."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(columns), lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({c: row.get(c, "") for c in columns})
    atomic_write_bytes(path, buf.getvalue().encode())


def read_csv(path: str | os.PathLike) -> list[dict[str, str]]:
    """Rows of a CSV file with a header; ``[]`` if the file does not exist."""
    try:
        # utf-8-sig: spreadsheets often save CSV with a byte-order mark.
        with open(path, newline="", encoding="utf-8-sig") as f:
            return list(csv.DictReader(f))
    except FileNotFoundError:
        return []


def write_heatmap_png(
    path: str | os.PathLike, thumbnail: np.ndarray, attention: np.ndarray, alpha: float = 0.7
) -> None:
    """Blend an attention map over a thumbnail and save it as PNG.

    Args:
        thumbnail: uint8 [H, W, 3], the low-resolution view.
        attention: float [h', w'] (any positive scale), stretched over the
            thumbnail; shown in a yellow-red ramp scaled to its 99th percentile.
    """
    from PIL import Image

    if attention.ndim != 2:
        raise ValueError(f"attention: expected [h, w], got shape {attention.shape}")
    h, w = thumbnail.shape[:2]
    # Scaled to a high percentile rather than the maximum, so one sharp peak does
    # not wash out the rest of the map.
    positive = attention[attention > 0]
    peak = float(np.percentile(positive, 99)) if positive.size else 0.0
    level = np.clip(attention / peak, 0, 1) if peak > 0 else np.zeros_like(attention)
    level_img = Image.fromarray((255 * level).astype(np.uint8)).resize((w, h), Image.BILINEAR)
    t = np.asarray(level_img, dtype=np.float32)[..., None] / 255.0
    # Ramp: 0 -> thumbnail untouched, 1 -> red, through yellow.
    colour = np.concatenate([np.ones_like(t), 1.0 - t, np.clip(0.6 - t, 0, 1)], axis=2) * 255
    weight = alpha * np.sqrt(t)
    blended = thumbnail[..., :3].astype(np.float32) * (1 - weight) + colour * weight
    buf = io.BytesIO()
    Image.fromarray(blended.clip(0, 255).astype(np.uint8)).save(buf, format="PNG")
    atomic_write_bytes(path, buf.getvalue())


def patches_feature_collection(
    boxes: np.ndarray,
    attention: np.ndarray,
    slide_shape: Sequence[int],
    slide: str,
    label: str,
) -> dict:
    """GeoJSON FeatureCollection of patch rectangles, as QuPath imports them.

    Args:
        boxes: int [N, 4] ``(y, x, h, w)`` in level-0 pixels; clipped to the slide
            (a patch may hang over the edge, where it was filled).
        attention: float [N], attention probability of each patch.
        slide_shape: level-0 ``(H, W, ...)``.
        slide / label: recorded in each feature's properties; ``label`` becomes the
            QuPath classification.

    GeoJSON orders coordinates ``(x, y)``; this is the only place that flips axes.
    """
    height, width = int(slide_shape[0]), int(slide_shape[1])
    features = []
    for (y, x, h, w), a in zip(
        np.asarray(boxes).tolist(), np.asarray(attention).tolist(), strict=True
    ):
        y0, x0 = min(max(y, 0), height), min(max(x, 0), width)
        y1, x1 = min(max(y + h, 0), height), min(max(x + w, 0), width)
        ring = [[x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]]
        features.append(
            {
                "type": "Feature",
                "geometry": {"type": "Polygon", "coordinates": [ring]},
                "properties": {
                    "objectType": "annotation",
                    "classification": {"name": label},
                    "name": f"{slide} patch {len(features)}",
                    "attention": a,
                    "slide": slide,
                },
            }
        )
    return {"type": "FeatureCollection", "features": features}


def write_geojson(path: str | os.PathLike, collection: dict) -> None:
    atomic_write_bytes(path, (json.dumps(collection, indent=1) + "\n").encode())
