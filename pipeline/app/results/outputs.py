"""The layout of a prediction output directory, and its image and GeoJSON files.

Each file is written atomically (``files``). Layout under an output directory::

    predictions.csv             one row per input file (PREDICTION_COLUMNS)
    report.html                 the review page (``report``), built from the files below
    heatmaps/<slide>.png        attention over the display thumbnail, patch boxes, colour bar
    thumbnails/<slide>.jpg      the display thumbnail with the patch boxes
    gallery/<slide>/<i>.png     patch ``i`` (GeoJSON detection order) at full resolution
    patches/<slide>.geojson     the prediction and the sampled patches, level-0 pixels (QuPath)

Patch boxes are numbered by attention rank (1 = most attention, ``attention_order``)
in every picture and in the report, so a box on the heatmap and its patch in the
gallery carry the same number.
"""

from __future__ import annotations

import gc
import io
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.app.files import atomic_write_bytes
from pipeline.app.slide.boxes import box_ring

PREDICTIONS = "predictions.csv"
BASE_COLUMNS = ("slide", "path", "status", "label")
COLOUR_MAP = "viridis"
"""Perceptually uniform, readable by colour-blind viewers, distinct from H&E pinks."""
SCALE_KEY = "Description"
"""PNG text chunk of a heatmap that states its colour scale (read by ``report``)."""


def prediction_columns(score_columns: Sequence[str]) -> list[str]:
    """``slide, path, status, label``, the task's scores (``Task.score_columns``, e.g.
    ``prob_<class>...``), their spreads (``<score>_sd...``), ``tissue_fraction, mpp,
    distinct_patches, flags, error`` (``inference.SlideResult`` documents them;
    ``mpp``: microns per pixel of the patches, empty when the slide's is unknown)."""
    return [
        *BASE_COLUMNS,
        *score_columns,
        *(spread_column(c) for c in score_columns),
        "tissue_fraction",
        "mpp",
        "distinct_patches",
        "flags",
        "error",
    ]


SPREAD_SUFFIX = "_sd"


def spread_column(score: str) -> str:
    """The ``predictions.csv`` column of a score's spread over the draws."""
    return score + SPREAD_SUFFIX


def score_columns_of(header: Sequence[str]) -> tuple[str, ...]:
    """The score columns of a ``predictions.csv`` header: those with a spread column
    ``<score>_sd`` beside them, in order (``prediction_columns``); for files without
    spreads, the ``prob_<class>`` columns."""
    scores = tuple(c for c in header if spread_column(c) in header)
    if scores:
        return scores
    return tuple(c for c in header if c.startswith("prob_") and not c.endswith(SPREAD_SUFFIX))


def score_heading(column: str) -> str:
    """How a score column is shown: ``p(<class>)`` for ``prob_<class>``, else as named."""
    return f"p({column[len('prob_') :]})" if column.startswith("prob_") else column


def heatmap_path(out_dir: str | os.PathLike, slide: str) -> Path:
    return Path(out_dir) / "heatmaps" / f"{slide}.png"


def thumbnail_path(out_dir: str | os.PathLike, slide: str) -> Path:
    return Path(out_dir) / "thumbnails" / f"{slide}.jpg"


def gallery_path(out_dir: str | os.PathLike, slide: str, index: int) -> Path:
    """Patch ``index`` of ``slide``: the index of its detection in the GeoJSON."""
    return Path(out_dir) / "gallery" / slide / f"{index:03d}.png"


def geojson_path(out_dir: str | os.PathLike, slide: str) -> Path:
    return Path(out_dir) / "patches" / f"{slide}.geojson"


def attention_order(patch_attention: Sequence[float]) -> np.ndarray:
    """int64 [N]: patch indices by decreasing attention (ties keep draw order);
    patch ``order[r]`` has rank ``r + 1``."""
    return np.argsort(-np.asarray(patch_attention, dtype=np.float64), kind="stable")


def write_slide_files(
    out_dir: str | os.PathLike,
    result: Any,
    score_columns: Sequence[str],
    heatmap_scale: str = "absolute",
) -> list[Path]:
    """Write the per-slide files of an ``ok`` result (``inference.SlideResult``, read
    by attribute): gallery, thumbnail, heatmap, then the GeoJSON. Returns their paths
    (a rerun checks they all exist: ``prediction.PredictionStore.is_done``)."""
    slide = result.slide
    written = [gallery_path(out_dir, slide, i) for i in range(len(result.patches))]
    for path, patch in zip(written, result.patches, strict=True):
        write_png(path, patch)
    written.append(thumbnail_path(out_dir, slide))
    write_thumbnail_jpeg(
        written[-1], result.display, result.boxes, result.patch_attention, result.slide_shape
    )
    written.append(heatmap_path(out_dir, slide))
    write_heatmap_png(
        written[-1],
        result.display,
        result.attention,
        result.boxes,
        result.patch_attention,
        result.slide_shape,
        heatmap_scale,
    )
    probs = dict(zip(score_columns, np.asarray(result.probs).tolist(), strict=True))
    collection = patches_feature_collection(
        result.boxes, result.patch_attention, result.slide_shape, slide, result.label, probs
    )
    written.append(geojson_path(out_dir, slide))
    write_geojson(written[-1], collection)
    return written


def write_png(path: str | os.PathLike, rgb: np.ndarray) -> None:
    """Save uint8 [h, w, 3] ``rgb`` as a lossless PNG."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(rgb, dtype=np.uint8)).save(buf, format="PNG")
    atomic_write_bytes(path, buf.getvalue())


def _display_boxes(boxes: np.ndarray, slide_shape: Sequence[int], display_hw: Sequence[int]):
    """float [N, 4] level-0 boxes ``(y, x, h, w)`` in display pixels."""
    scale = np.array(display_hw[:2], np.float64) / np.array(slide_shape[:2], np.float64)
    return np.asarray(boxes, np.float64).reshape(-1, 4) * np.tile(scale, 2)


def write_thumbnail_jpeg(
    path: str | os.PathLike,
    display: np.ndarray,
    boxes: np.ndarray,
    patch_attention: np.ndarray,
    slide_shape: Sequence[int],
) -> None:
    """The display thumbnail (uint8 [H, W, 3]) with each patch's level-0 box drawn
    on it (``boxes`` int [N, 4] ``(y, x, h, w)``) and numbered by attention rank."""
    from PIL import Image, ImageDraw

    image = Image.fromarray(np.ascontiguousarray(display[..., :3]))
    draw = ImageDraw.Draw(image)
    shown = _display_boxes(boxes, slide_shape, display.shape)
    for rank, i in enumerate(attention_order(patch_attention), start=1):
        y, x, h, w = shown[i]
        # Black under white: visible on glass and on dark tissue alike.
        draw.rectangle([x - 1, y - 1, x + w, y + h], outline=(0, 0, 0), width=3)
        draw.rectangle([x - 1, y - 1, x + w, y + h], outline=(255, 255, 255), width=1)
        draw.text(
            (x + 2, y + 1), str(rank), fill=(255, 255, 255), stroke_width=2, stroke_fill=(0, 0, 0)
        )
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=90)
    atomic_write_bytes(path, buf.getvalue())


def heatmap_norm(attention: np.ndarray, scale: str):
    """The colour normalisation of ``attention`` (float [h', w'], sums to 1) and the
    sentence stating it. ``scale``: ``"absolute"`` or ``"relative"`` (``ReportConfig``)."""
    from matplotlib.colors import LogNorm, Normalize

    peak = float(attention.max()) if attention.size else 0.0
    if scale == "absolute":
        uniform = 1.0 / max(attention.size, 1)
        text = (
            f"attention probability per cell, log scale from {uniform:.2g} "
            f"(uniform over the {attention.shape[0]} x {attention.shape[1]} grid) to 1"
        )
        return LogNorm(vmin=uniform, vmax=1.0, clip=True), text
    if scale == "relative":
        text = f"attention relative to this slide's largest cell ({peak:.3g} per cell), linear"
        return Normalize(vmin=0.0, vmax=peak if peak > 0 else 1.0, clip=True), text
    raise ValueError(f"heatmap scale: expected 'absolute' or 'relative', got {scale!r}")


COLOUR_BAR_WIDTH = 160
"""Pixels right of the image in a heatmap PNG: the colour bar and its labels."""


def write_heatmap_png(
    path: str | os.PathLike,
    display: np.ndarray,
    attention: np.ndarray,
    boxes: np.ndarray,
    patch_attention: np.ndarray,
    slide_shape: Sequence[int],
    scale: str = "absolute",
) -> None:
    """The attention map over the display thumbnail, with patch boxes and a colour bar.

    The image part is the display thumbnail's size exactly (H x W pixels, never
    upsampled); the colour bar takes ``COLOUR_BAR_WIDTH`` pixels to its right. Each
    attention cell covers its share of the thumbnail in ``COLOUR_MAP``, transparent
    where the attention is 0 (no tissue) and more opaque as it grows. The scale's
    statement (``heatmap_norm``) is the colour bar's label and the PNG's
    ``SCALE_KEY`` text.

    Args:
        display: uint8 [H, W, 3] display thumbnail.
        attention: float [h', w'] attention map (sums to 1).
        boxes: int [N, 4] level-0 patch boxes ``(y, x, h, w)``; patch_attention: float [N].
        slide_shape: level-0 ``(H0, W0, ...)``.
        scale: ``"absolute"`` or ``"relative"`` (``heatmap_norm``).
    """
    from matplotlib import colormaps
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.cm import ScalarMappable
    from matplotlib.figure import Figure
    from matplotlib.patches import Rectangle
    from PIL import Image
    from PIL.PngImagePlugin import PngInfo

    if attention.ndim != 2:
        raise ValueError(f"attention: expected [h, w], got shape {attention.shape}")
    norm, text = heatmap_norm(attention, scale)
    h, w = display.shape[:2]
    dpi = 100
    fig = Figure(figsize=((w + COLOUR_BAR_WIDTH) / dpi, h / dpi), dpi=dpi, facecolor="white")
    ax = fig.add_axes((0, 0, w / (w + COLOUR_BAR_WIDTH), 1))
    ax.set_axis_off()
    ax.imshow(display[..., :3], interpolation="nearest")
    level = np.asarray(norm(attention), dtype=np.float64).clip(0, 1)
    alpha = np.where(attention > 0, 0.25 + 0.5 * level, 0.0)
    ax.imshow(
        attention,
        cmap=colormaps[COLOUR_MAP],
        norm=norm,
        alpha=alpha,
        extent=(0, w, h, 0),
        interpolation="nearest",
    )
    shown = _display_boxes(boxes, slide_shape, display.shape)
    for rank, i in enumerate(attention_order(patch_attention), start=1):
        y, x, bh, bw = shown[i]
        ax.add_patch(Rectangle((x, y), bw, bh, fill=False, edgecolor="white", linewidth=1.2))
        ax.text(x, y, str(rank), color="white", fontsize=9, va="bottom")
    ax.set_xlim(0, w)
    ax.set_ylim(h, 0)
    bar_left = (w + 10) / (w + COLOUR_BAR_WIDTH)
    cax = fig.add_axes((bar_left, 0.05, 24 / (w + COLOUR_BAR_WIDTH), 0.9))
    bar = fig.colorbar(ScalarMappable(norm=norm, cmap=colormaps[COLOUR_MAP]), cax=cax)
    bar.set_label("attention per cell" if scale == "absolute" else "attention / max", fontsize=14)
    bar.ax.tick_params(labelsize=12)
    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    rgb = np.array(canvas.buffer_rgba())[..., :3]  # opaque: no alpha channel to store
    del fig, canvas, ax, cax, bar
    # A figure is a web of reference cycles that only a full collection frees; left to
    # the collector's thresholds, a long batch's peak memory creeps up heatmap by heatmap.
    gc.collect(1)
    info = PngInfo()
    info.add_text(SCALE_KEY, text)
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG", pnginfo=info)
    atomic_write_bytes(path, buf.getvalue())


def heatmap_scale_text(path: str | os.PathLike) -> str:
    """The colour-scale statement of a heatmap PNG (``""`` when it has none)."""
    from PIL import Image

    with Image.open(path) as image:  # .info holds the text chunks before the pixels
        return str(image.info.get(SCALE_KEY, ""))


def patches_feature_collection(
    boxes: np.ndarray,
    attention: np.ndarray,
    slide_shape: Sequence[int],
    slide: str,
    label: str,
    probs: Mapping[str, float],
) -> dict:
    """GeoJSON FeatureCollection (RFC 7946) of a slide's prediction, as QuPath 0.5
    imports it (File > Import objects).

    The first feature is the prediction: an ``annotation`` covering the slide,
    classified as ``label``, with the scores as ``measurements`` (named as in
    ``predictions.csv``: ``prob_<class>`` for classification) and ``slide`` /
    ``label`` as ``metadata``. Then one
    ``detection`` per patch (draw order; ``gallery_path`` index), without a
    classification (a patch is not itself labelled), its attention probability as
    the measurement ``attention`` (QuPath keeps ``measurements`` and drops unknown
    properties; detections can be coloured by it with Measure > Show measurement maps).

    Args:
        boxes: int [N, 4] level-0 boxes (``boxes``); clipped to the slide.
        attention: float [N], attention probability of each patch.
        slide_shape: level-0 ``(H, W, ...)``.
        slide / label: the slide's name and predicted label.
        probs: score column -> score.
    """
    height, width = int(slide_shape[0]), int(slide_shape[1])
    features = [
        {
            "type": "Feature",
            "geometry": {
                "type": "Polygon",
                "coordinates": [box_ring((0, 0, height, width), slide_shape)],
            },
            "properties": {
                "objectType": "annotation",
                "name": f"{slide}: {label}",
                "classification": {"name": label},
                "measurements": {c: float(p) for c, p in probs.items()},
                "metadata": {"slide": slide, "label": label},
            },
        }
    ]
    attention = np.asarray(attention).tolist()
    ranks = np.empty(len(attention), np.int64)
    ranks[attention_order(attention)] = np.arange(1, len(attention) + 1)
    for i, (box, a) in enumerate(zip(np.asarray(boxes).tolist(), attention, strict=True)):
        features.append(
            {
                "type": "Feature",
                "geometry": {"type": "Polygon", "coordinates": [box_ring(box, slide_shape)]},
                "properties": {
                    "objectType": "detection",
                    "name": f"patch {i} (attention rank {ranks[i]})",
                    "measurements": {"attention": float(a)},
                },
            }
        )
    return {"type": "FeatureCollection", "features": features}


def write_geojson(path: str | os.PathLike, collection: dict) -> None:
    atomic_write_bytes(path, (json.dumps(collection, indent=1) + "\n").encode())
