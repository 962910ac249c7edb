"""Prediction: one pure function per slide, and a resumable driver over many.

``predict_slide`` opens a slide itself and returns a picklable ``SlideResult``; its
randomness (which patches are sampled) comes from a seed derived from the run seed
and the slide's file name by a stable hash, so a slide gets the same prediction
whatever the order of the inputs or the process that runs it.

``predict`` lists the inputs, skips slides whose outputs are complete (unless
``overwrite``), runs the others while prefetching the next slide's view, and
records each result as soon as it is known: heatmap and GeoJSON first, then the
``predictions.csv`` row, every file replaced atomically. A crash therefore keeps
every finished slide, and a row with status ``ok`` always has its files.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from pipeline.app import outputs
from pipeline.app.models import SlideClassifier
from pipeline.app.slides import SlideView, open_view, prefetch

if TYPE_CHECKING:
    import distributed

SLIDE_SUFFIXES = (
    ".svs", ".tif", ".tiff", ".ndpi", ".mrxs", ".scn", ".bif", ".vms", ".vmu",
    ".svslide", ".dcm", ".zarr",
)  # fmt: skip
"""File (or directory, for Zarr) suffixes taken as slides when listing a directory."""


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
        attention: float32 [h', w'] attention map (sums to 1).
        boxes: int64 [N, 4] sampled patches as ``(y, x, h, w)`` in level-0 pixels
            (those with non-zero attention: N is less than ``n_patches`` only when
            the slide has fewer tissue cells).
        patch_attention: float32 [N] attention probability of each patch.
        slide_shape: level-0 ``(H, W)``.
    """

    slide: str
    path: str
    status: str
    label: str = ""
    probs: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32))
    error: str = ""
    thumbnail: np.ndarray | None = None
    attention: np.ndarray | None = None
    boxes: np.ndarray | None = None
    patch_attention: np.ndarray | None = None
    slide_shape: tuple[int, int] = (0, 0)

    def row(self, class_names: Sequence[str]) -> dict[str, str]:
        """This result as a ``predictions.csv`` row."""
        row = {"slide": self.slide, "path": self.path, "status": self.status, "label": self.label}
        if self.status == "ok":
            row.update(
                {f"prob_{c}": f"{p:.6f}" for c, p in zip(class_names, self.probs, strict=True)}
            )
        row["error"] = self.error
        return row


def slide_name(path: str | os.PathLike) -> str:
    """Output name of a slide: its file name without the suffix."""
    name = Path(path).name
    for suffix in (".ome.tiff", ".ome.tif", ".ome.zarr"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return Path(name).stem


def slide_seed(seed: int, path: str | os.PathLike) -> int:
    """Seed of one slide: a stable hash (SHA-256, not Python's salted ``hash``) of
    the run seed and the slide's file name, so it is the same in every process."""
    digest = hashlib.sha256(f"{int(seed)}:{Path(path).name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def classify_view(model: SlideClassifier, view: SlideView, seed: int) -> SlideResult:
    """Classify an open slide view with the sampling fixed by ``seed`` (the run seed)."""
    device = next(model.parameters()).device
    generator = torch.Generator(device).manual_seed(slide_seed(seed, view.path))
    with torch.no_grad():
        out = model.sample(view.x_low(device), view.patch_level, generator)
    probs = torch.softmax(out.logits[0], dim=0).cpu().numpy()
    scale = view.level0_scale
    ph, pw = model.config.patch_size
    offsets = out.offsets[0].cpu().numpy().astype(np.float64)  # [N, 2] (y, x) patch level
    boxes = np.concatenate(
        [
            np.round(offsets * scale),
            np.tile([round(ph * scale), round(pw * scale)], (len(offsets), 1)),
        ],
        axis=1,
    ).astype(np.int64)
    patch_attention = out.sampled_attention[0].cpu().numpy().astype(np.float32)
    # Draws past the end of the support (fewer tissue cells than patches) have
    # zero attention and no weight in the estimate: not reported.
    kept = patch_attention > 0
    return SlideResult(
        slide=slide_name(view.path),
        path=str(view.path),
        status="ok",
        label=model.config.class_names[int(probs.argmax())],
        probs=probs,
        thumbnail=view.thumbnail,
        attention=out.attention[0].cpu().numpy().astype(np.float32),
        boxes=boxes[kept],
        patch_attention=patch_attention[kept],
        slide_shape=tuple(int(s) for s in view.slide.shape[:2]),
    )


def error_result(path: str | os.PathLike, error: BaseException) -> SlideResult:
    message = str(error) if str(path) in str(error) else f"{path}: {error}"
    return SlideResult(
        slide=slide_name(path), path=str(path), status="error",
        error=f"{type(error).__name__}: {message}",
    )  # fmt: skip


def predict_slide(model: SlideClassifier, path: str | os.PathLike, seed: int = 0) -> SlideResult:
    """Open, classify and close one slide; a failure becomes an ``error`` result.

    Pure in the sense needed for distributing it: the result depends only on the
    model, the file and ``seed``.
    """
    try:
        with open_view(path, model.config) as view:
            return classify_view(model, view, seed)
    except Exception as e:  # a batch reports every slide's failure and goes on
        return error_result(path, e)


def list_slides(inputs: Iterable[str | os.PathLike]) -> list[Path]:
    """Expand ``inputs`` (slide files or directories) into slide paths.

    A directory contributes its entries whose suffix is in ``SLIDE_SUFFIXES``
    (sorted; hidden files skipped), whether or not they turn out readable: an
    unreadable one gets an error row. Named files are taken as they are.
    """
    paths: list[Path] = []
    for item in inputs:
        item = Path(item)
        if item.is_dir() and item.suffix.lower() != ".zarr":
            paths.extend(
                p for p in sorted(item.iterdir())
                if not p.name.startswith(".") and p.suffix.lower() in SLIDE_SUFFIXES
            )  # fmt: skip
        elif item.exists():
            paths.append(item)
        else:
            raise FileNotFoundError(f"{item}: no such file or directory")
    names: dict[str, Path] = {}
    for p in paths:
        other = names.setdefault(slide_name(p), p)
        if other.resolve() != p.resolve():
            raise ValueError(f"two inputs share the output name {slide_name(p)!r}: {other} and {p}")
    return list(names.values())  # a file named twice (alone and in its directory) runs once


class PredictionStore:
    """The outputs of a prediction directory, loaded from and saved to disk.

    ``add`` writes a result's heatmap and GeoJSON, then rewrites
    ``predictions.csv`` with the new row, each atomically.
    """

    def __init__(self, out_dir: str | os.PathLike, class_names: Sequence[str]) -> None:
        self.out_dir = Path(out_dir)
        self.class_names = tuple(class_names)
        self.columns = outputs.prediction_columns(self.class_names)
        self.rows = {r["slide"]: r for r in outputs.read_csv(self.out_dir / outputs.PREDICTIONS)}

    def is_done(self, path: str | os.PathLike) -> bool:
        """True when the slide has an ``ok`` row and both of its output files."""
        name = slide_name(path)
        row = self.rows.get(name)
        return (
            row is not None
            and row.get("status") == "ok"
            and outputs.heatmap_path(self.out_dir, name).is_file()
            and outputs.geojson_path(self.out_dir, name).is_file()
        )

    def add(self, result: SlideResult) -> None:
        if result.status == "ok":
            outputs.write_heatmap_png(
                outputs.heatmap_path(self.out_dir, result.slide), result.thumbnail, result.attention
            )
            collection = outputs.patches_feature_collection(
                result.boxes, result.patch_attention, result.slide_shape, result.slide, result.label
            )
            outputs.write_geojson(outputs.geojson_path(self.out_dir, result.slide), collection)
        self.rows[result.slide] = result.row(self.class_names)
        outputs.write_csv(
            self.out_dir / outputs.PREDICTIONS,
            self.columns,
            sorted(self.rows.values(), key=_by_slide),
        )


def _by_slide(row: dict[str, str]) -> str:
    return row["slide"]


@dataclass
class PredictSummary:
    """What a ``predict`` call did. ``results`` holds this call's results only."""

    out_dir: Path
    results: list[SlideResult]
    skipped: list[Path]

    @property
    def failed(self) -> list[SlideResult]:
        return [r for r in self.results if r.status != "ok"]


def predict(
    model: SlideClassifier | str | os.PathLike,
    slides: Iterable[str | os.PathLike],
    out_dir: str | os.PathLike,
    seed: int = 0,
    overwrite: bool = False,
    device: torch.device | str | None = None,
    progress: bool = True,
    client: distributed.Client | None = None,
) -> PredictSummary:
    """Classify every slide of ``slides`` (files and/or directories) into ``out_dir``.

    Args:
        model: a ``SlideClassifier`` or a run directory to load it from.
        seed: run seed; each slide's sampling uses ``slide_seed(seed, path)``.
        overwrite: redo slides already done in ``out_dir``.
        device: for a run directory; default CUDA when available.
        client: a ``distributed.Client``: one task per slide on its cluster
            (``pipeline.app.cluster``), results written here as they complete;
            ``None`` runs in this process.

    Returns a ``PredictSummary``; slides that failed are in ``summary.failed`` and
    have ``error`` rows in ``predictions.csv``.
    """
    from tqdm import tqdm

    from pipeline.app.checkpoint import load_model

    if not isinstance(model, SlideClassifier):
        model, _ = load_model(model, device or default_device())
    model.eval()
    paths = list_slides(slides)
    store = PredictionStore(out_dir, model.config.class_names)
    todo = [p for p in paths if overwrite or not store.is_done(p)]
    skipped = [p for p in paths if p not in todo]
    results = []
    bar = tqdm(total=len(todo), desc="predict", unit="slide", disable=not progress)
    if client is not None:
        from pipeline.app.cluster import predict_on_client

        stream = predict_on_client(client, model, todo, seed, device=device)
    else:
        stream = _predict_here(model, todo, seed)
    for result in stream:
        store.add(result)
        results.append(result)
        bar.update()
    bar.close()
    return PredictSummary(Path(out_dir), results, skipped)


def _predict_here(
    model: SlideClassifier, paths: Sequence[Path], seed: int
) -> Iterator[SlideResult]:
    """Results of ``paths`` in this process, the next slide's view prefetched."""
    for path, view, error in prefetch(paths, lambda p: open_view(p, model.config)):
        if error is not None:
            yield error_result(path, error)
            continue
        with view:
            try:
                yield classify_view(model, view, seed)
            except Exception as e:  # reported in the slide's row
                yield error_result(path, e)


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
