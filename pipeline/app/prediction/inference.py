"""Per-slide inference: one slide in, one picklable ``SlideResult`` out.

``predict_slide`` opens a slide itself and returns its ``SlideResult``; its
randomness (which patches are sampled) comes from a seed derived from the run seed
and the slide's file name by a stable hash, so a slide gets the same prediction
whatever the order of the inputs or the process that runs it.

A *runner* turns a model, slide paths and a run seed into an iterator of results:
``run_here`` (this process, the next slide's view prefetched) below, or
``cluster.on_cluster(client)``. The batch driver (``prediction.predict``) consumes
either without knowing which.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from pipeline.app.config import PredictConfig, ReportConfig
from pipeline.app.model.networks import SlideClassifier
from pipeline.app.results import outputs
from pipeline.app.slide.boxes import patch_boxes
from pipeline.app.slide.inputs import slide_name, slide_seed
from pipeline.app.slide.roi import rasterise, read_polygons, roi_path
from pipeline.app.slide.views import SlideView, open_view, prefetch, sampling_mask


@dataclass
class SlideResult:
    """The prediction for one input file.

    Attributes:
        slide: the slide's name (file name without suffix); names the output files.
        path: the input path.
        status: ``"ok"``, ``"no_tissue"`` (no tissue detected in the attention view,
            or none inside the region of interest: not classified, not an error) or
            ``"error"``.
        label: the predicted label (``Task.label``: the most probable class for
            classification; ``""`` unless ok).
        probs: float [n_scores] the task's scores (``Task.scores``: the class
            probabilities for classification), the mean over the draws (empty
            unless ok).
        probs_sd: float [n_scores] their standard deviation over the draws (0 for
            a single draw).
        tissue_fraction: share of the attention view that is tissue (inside the
            region of interest when one is given), the cells patches may come from.
        flags: quality-control remarks, e.g. ``low_tissue`` (under 1 %),
            ``no_roi_file``.
        error: ``"<ExceptionType>: message"`` on error.
        thumbnail: uint8 [h, w, 3] attention view.
        display: uint8 [H_d, W_d, 3] display thumbnail, longer side at most
            ``display_side`` (``Slide.thumbnail``, never larger than level 0): what
            the heatmap and the patch boxes are drawn on.
        attention: float32 [h', w'] attention map (sums to 1).
        boxes: int64 [N, 4] sampled patches as level-0 boxes ``(y, x, h, w)``
            (``boxes``); those with non-zero attention: N is less than ``n_patches``
            only when the slide has fewer tissue cells.
        patch_attention: float32 [N] attention probability of each patch.
        patches: uint8 [N, ph, pw, 3] the pixels of those patches as the feature
            network saw them (patch level, draw order, same rows as ``boxes``).
        slide_shape: level-0 ``(H, W)``.
        mpp: microns per pixel of the patches the model saw (None when unknown).
        distinct_patches: distinct positions among all draws' patches: what the
            feature network computed (``draws x n_patches`` at most; 0 unless ok).
    """

    slide: str
    path: str
    status: str
    label: str = ""
    probs: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32))
    probs_sd: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32))
    tissue_fraction: float | None = None
    flags: tuple[str, ...] = ()
    error: str = ""
    thumbnail: np.ndarray | None = None
    display: np.ndarray | None = None
    attention: np.ndarray | None = None
    boxes: np.ndarray | None = None
    patch_attention: np.ndarray | None = None
    patches: np.ndarray | None = None
    slide_shape: tuple[int, int] = (0, 0)
    mpp: float | None = None
    distinct_patches: int = 0

    def row(self, score_columns: Sequence[str]) -> dict[str, str]:
        """This result as a ``predictions.csv`` row; ``score_columns`` name the scores
        (``Task.score_columns``), each followed by its spread ``<name>_sd``."""
        row = {"slide": self.slide, "path": self.path, "status": self.status, "label": self.label}
        if self.status == "ok":
            spread = self.probs_sd if len(self.probs_sd) else np.zeros_like(self.probs)
            for c, p, sd in zip(score_columns, self.probs, spread, strict=True):
                row[c], row[outputs.spread_column(c)] = f"{p:.6f}", f"{sd:.6f}"
        fraction = self.tissue_fraction
        row["tissue_fraction"] = "" if fraction is None else f"{fraction:.4f}"
        row["mpp"] = "" if self.mpp is None else f"{self.mpp:.6g}"
        row["distinct_patches"] = str(self.distinct_patches) if self.status == "ok" else ""
        row["flags"] = ";".join(self.flags)
        row["error"] = self.error
        return row


Runner = Callable[..., Iterator[SlideResult]]
"""``runner(model, paths, seed, time_limit=None, **options)`` yields one
``SlideResult`` per path, in any order; ``time_limit`` as for ``open_view``,
``options`` (``display_side``, ``draws``, ``roi_dir``) as for ``classify_view``."""

LOW_TISSUE = 0.01
"""Tissue fraction of the attention view under which a slide is flagged ``low_tissue``."""

DISPLAY_SIDE = ReportConfig.heatmap_side


def classify_view(
    model: SlideClassifier,
    view: SlideView,
    seed: int,
    display_side: int = DISPLAY_SIDE,
    draws: int = PredictConfig.draws,
    roi_dir: str | os.PathLike | None = None,
) -> SlideResult:
    """Predict an open slide view with the sampling fixed by ``seed`` (the run seed).

    ``draws`` independent draws of patches are made from the same attention and their
    scores (the task's: class probabilities for classification) averaged; all their
    patches are read in one pass (a tile under patches of several draws is decoded
    once). Boxes, gallery and attention reported
    are the first draw's. ``roi_dir`` restricts sampling to the slide's region of
    interest (``roi``). The ``display`` thumbnail has a longer side of at most
    ``display_side``. The slide's read-time clock restarts here (``open_view``).
    """
    view.slide.start_clock()
    name = slide_name(view.path)
    tissue, flags = view.tissue, []
    if roi_dir is not None:
        roi_file = roi_path(roi_dir, name)
        if roi_file.is_file():
            polygons = read_polygons(roi_file)
            tissue = tissue & rasterise(polygons, tissue.shape, view.slide.shape[:2])
        else:
            flags.append("no_roi_file")
    fraction = float(tissue.mean())
    if 0 < fraction < LOW_TISSUE:
        flags.append("low_tissue")
    if not tissue.any():
        return SlideResult(
            slide=name,
            path=str(view.path),
            status="no_tissue",
            tissue_fraction=0.0,
            flags=tuple(flags),
            thumbnail=view.thumbnail,
            mpp=view.patch_mpp,
        )
    device = next(model.parameters()).device
    generator = torch.Generator(device).manual_seed(slide_seed(seed, view.path))
    x_low = view.x_low(device).expand(draws, -1, -1, -1)  # [K, 3, h, w]: one per draw
    mask = sampling_mask(tissue, device)
    mask = None if mask is None else mask.expand(draws, -1, -1)
    with torch.no_grad():
        out = model.classify(x_low, view.patch_level, mask, generator)
    draw = out.draw
    each = model.task.scores(out.logits)  # [K, n_scores]
    # What the feature network computed (layers: once per distinct position in eval).
    distinct = len(torch.unique(draw.offsets.flatten(0, 1), dim=0))
    # Copies, not views of the tensors: a view would keep its tensor alive, and a
    # batch keeps every slide's probabilities for the whole run. In one process those
    # small, aligned blocks pinned between the next slides' large buffers fragmented
    # glibc's heap: peak RSS grew 10-13 % over 2,000 slides (docs/soak.md).
    probs = each.mean(0).cpu().numpy().copy()
    spread = (each.std(0) if draws > 1 else torch.zeros_like(each[0])).cpu().numpy().copy()
    boxes = patch_boxes(draw.offsets[0].cpu().numpy(), model.config.patch_size, view.level0_scale)
    patch_attention = draw.sampled_attention[0].cpu().numpy().astype(np.float32)
    # Draws past the end of the support (fewer tissue cells than patches) have
    # zero attention and no weight in the estimate: not reported.
    kept = patch_attention > 0
    # The core hands patches as float [0, 1] read from uint8: back to exact bytes.
    patches = (draw.patches[0] * 255).round().clamp(0, 255).to(torch.uint8)  # [N, C, ph, pw]
    patches = patches.permute(0, 2, 3, 1)[..., :3].cpu().numpy()  # [N, ph, pw, 3]
    return SlideResult(
        slide=name,
        path=str(view.path),
        status="ok",
        label=model.task.label(probs),
        probs=probs,
        probs_sd=spread,
        tissue_fraction=fraction,
        flags=tuple(flags),
        thumbnail=view.thumbnail,
        display=view.slide.thumbnail((display_side, display_side)),
        attention=draw.attention[0].cpu().numpy().astype(np.float32),
        boxes=boxes[kept],
        patch_attention=patch_attention[kept],
        patches=patches[kept],
        slide_shape=tuple(int(s) for s in view.slide.shape[:2]),
        mpp=view.patch_mpp,
        distinct_patches=distinct,
    )


def error_result(path: str | os.PathLike, error: BaseException) -> SlideResult:
    """The ``error`` result of ``path``; the message names the path once."""
    message = str(error) if str(path) in str(error) else f"{path}: {error}"
    return SlideResult(
        slide=slide_name(path),
        path=str(path),
        status="error",
        error=f"{type(error).__name__}: {message}",
    )


def predict_slide(
    model: SlideClassifier,
    path: str | os.PathLike,
    seed: int = 0,
    time_limit: float | None = None,
    **options,
) -> SlideResult:
    """Open, classify and close one slide; a failure becomes an ``error`` result.

    Pure in the sense needed for distributing it: the result depends only on the
    model, the file, ``seed`` and ``options`` (``classify_view``'s); ``time_limit``
    as for ``open_view``.
    """
    try:
        with open_view(path, model.config, time_limit) as view:
            return classify_view(model, view, seed, **options)
    except Exception as e:  # a batch reports every slide's failure and goes on
        return error_result(path, e)


def run_here(
    model: SlideClassifier,
    paths: Sequence[Path],
    seed: int,
    time_limit: float | None = None,
    **options,
) -> Iterator[SlideResult]:
    """The local ``Runner``: results of ``paths`` in order, in this process, the
    next slide's view read in a background thread while this one is classified."""
    views = prefetch(paths, lambda p: open_view(p, model.config, time_limit))
    for path, view, error in views:
        if error is not None:
            yield error_result(path, error)
            continue
        with view:
            try:
                yield classify_view(model, view, seed, **options)
            except Exception as e:  # reported in the slide's row
                yield error_result(path, e)
