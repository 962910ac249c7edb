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

import hashlib
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from pipeline.app.boxes import patch_boxes
from pipeline.app.config import ReportConfig
from pipeline.app.inputs import slide_name
from pipeline.app.models import SlideClassifier
from pipeline.app.slides import SlideView, open_view, prefetch


@dataclass
class SlideResult:
    """The prediction for one input file.

    Attributes:
        slide: the slide's name (file name without suffix); names the output files.
        path: the input path.
        status: ``"ok"`` or ``"error"``.
        label: predicted class (``""`` on error).
        probs: float [n_classes] class probabilities (empty on error).
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
    """

    slide: str
    path: str
    status: str
    label: str = ""
    probs: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32))
    error: str = ""
    thumbnail: np.ndarray | None = None
    display: np.ndarray | None = None
    attention: np.ndarray | None = None
    boxes: np.ndarray | None = None
    patch_attention: np.ndarray | None = None
    patches: np.ndarray | None = None
    slide_shape: tuple[int, int] = (0, 0)
    mpp: float | None = None

    def row(self, class_names: Sequence[str]) -> dict[str, str]:
        """This result as a ``predictions.csv`` row."""
        row = {"slide": self.slide, "path": self.path, "status": self.status, "label": self.label}
        if self.status == "ok":
            row.update(
                {f"prob_{c}": f"{p:.6f}" for c, p in zip(class_names, self.probs, strict=True)}
            )
        row["mpp"] = "" if self.mpp is None else f"{self.mpp:.6g}"
        row["error"] = self.error
        return row


Runner = Callable[..., Iterator[SlideResult]]
"""``runner(model, paths, seed, display_side=DISPLAY_SIDE)`` yields one ``SlideResult``
per path, in any order (``display_side`` as for ``classify_view``)."""

DISPLAY_SIDE = ReportConfig.heatmap_side


def slide_seed(seed: int, path: str | os.PathLike) -> int:
    """Seed of one slide: a stable hash (SHA-256, not Python's salted ``hash``) of
    the run seed and the slide's file name, so it is the same in every process."""
    digest = hashlib.sha256(f"{int(seed)}:{Path(path).name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def classify_view(
    model: SlideClassifier, view: SlideView, seed: int, display_side: int = DISPLAY_SIDE
) -> SlideResult:
    """Classify an open slide view with the sampling fixed by ``seed`` (the run seed);
    the result's ``display`` thumbnail has a longer side of at most ``display_side``."""
    device = next(model.parameters()).device
    generator = torch.Generator(device).manual_seed(slide_seed(seed, view.path))
    with torch.no_grad():
        out = model.classify(view.x_low(device), view.patch_level, view.mask(device), generator)
    draw = out.draw
    probs = torch.softmax(out.logits[0], dim=0).cpu().numpy()
    boxes = patch_boxes(draw.offsets[0].cpu().numpy(), model.config.patch_size, view.level0_scale)
    patch_attention = draw.sampled_attention[0].cpu().numpy().astype(np.float32)
    # Draws past the end of the support (fewer tissue cells than patches) have
    # zero attention and no weight in the estimate: not reported.
    kept = patch_attention > 0
    # The core hands patches as float [0, 1] read from uint8: back to exact bytes.
    patches = (draw.patches[0] * 255).round().clamp(0, 255).to(torch.uint8)  # [N, C, ph, pw]
    patches = patches.permute(0, 2, 3, 1)[..., :3].cpu().numpy()  # [N, ph, pw, 3]
    return SlideResult(
        slide=slide_name(view.path),
        path=str(view.path),
        status="ok",
        label=model.config.class_names[int(probs.argmax())],
        probs=probs,
        thumbnail=view.thumbnail,
        display=view.slide.thumbnail((display_side, display_side)),
        attention=draw.attention[0].cpu().numpy().astype(np.float32),
        boxes=boxes[kept],
        patch_attention=patch_attention[kept],
        patches=patches[kept],
        slide_shape=tuple(int(s) for s in view.slide.shape[:2]),
        mpp=view.patch_mpp,
    )


def error_result(path: str | os.PathLike, error: BaseException) -> SlideResult:
    """The ``error`` result of ``path``; the message names the path once."""
    message = str(error) if str(path) in str(error) else f"{path}: {error}"
    return SlideResult(
        slide=slide_name(path), path=str(path), status="error",
        error=f"{type(error).__name__}: {message}",
    )  # fmt: skip


def predict_slide(
    model: SlideClassifier,
    path: str | os.PathLike,
    seed: int = 0,
    display_side: int = DISPLAY_SIDE,
) -> SlideResult:
    """Open, classify and close one slide; a failure becomes an ``error`` result.

    Pure in the sense needed for distributing it: the result depends only on the
    model, the file and ``seed``.
    """
    try:
        with open_view(path, model.config) as view:
            return classify_view(model, view, seed, display_side)
    except Exception as e:  # a batch reports every slide's failure and goes on
        return error_result(path, e)


def run_here(
    model: SlideClassifier,
    paths: Sequence[Path],
    seed: int,
    display_side: int = DISPLAY_SIDE,
) -> Iterator[SlideResult]:
    """The local ``Runner``: results of ``paths`` in order, in this process, the
    next slide's view read in a background thread while this one is classified."""
    for path, view, error in prefetch(paths, lambda p: open_view(p, model.config)):
        if error is not None:
            yield error_result(path, error)
            continue
        with view:
            try:
                yield classify_view(model, view, seed, display_side)
            except Exception as e:  # reported in the slide's row
                yield error_result(path, e)
