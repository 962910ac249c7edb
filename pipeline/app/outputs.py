"""The layout of a prediction output directory, and its image and GeoJSON files.

Each file is written atomically (``files``). Layout under an output directory::

    predictions.csv           one row per input file (PREDICTION_COLUMNS)
    heatmaps/<slide>.png      attention over the thumbnail
    patches/<slide>.geojson   sampled patches, level-0 pixel rectangles (QuPath)
"""

from __future__ import annotations

import io
import json
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from pipeline.app.boxes import box_ring
from pipeline.app.files import atomic_write_bytes

PREDICTIONS = "predictions.csv"
BASE_COLUMNS = ("slide", "path", "status", "label")


def prediction_columns(class_names: Sequence[str]) -> list[str]:
    """``slide, path, status, label, prob_<class>..., mpp, error`` (``mpp``: microns per
    pixel of the patches, empty when the slide's is unknown)."""
    return [*BASE_COLUMNS, *(f"prob_{c}" for c in class_names), "mpp", "error"]


def heatmap_path(out_dir: str | os.PathLike, slide: str) -> Path:
    return Path(out_dir) / "heatmaps" / f"{slide}.png"


def geojson_path(out_dir: str | os.PathLike, slide: str) -> Path:
    return Path(out_dir) / "patches" / f"{slide}.geojson"


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
        boxes: int [N, 4] level-0 boxes (``boxes``); clipped to the slide.
        attention: float [N], attention probability of each patch.
        slide_shape: level-0 ``(H, W, ...)``.
        slide / label: recorded in each feature's properties; ``label`` becomes the
            QuPath classification.
    """
    features = []
    for box, a in zip(np.asarray(boxes).tolist(), np.asarray(attention).tolist(), strict=True):
        ring = box_ring(box, slide_shape)
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
