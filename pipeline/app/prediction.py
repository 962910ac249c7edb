"""The batch driver: a resumable prediction of many slides into an output directory.

``predict`` lists the inputs, skips slides whose outputs are complete (unless
``overwrite``), hands the others to a runner (``inference.run_here`` in this process,
or ``cluster.on_cluster(client)``), and records each result as soon as it is known:
its pictures and GeoJSON first (``outputs.write_slide_files``), then the
``predictions.csv`` row, every file replaced atomically. A crash therefore keeps
every finished slide, and a row with status ``ok`` always has its files. At the end
``report.html`` is rebuilt from the directory (``report.write_report``).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from pipeline.app import outputs
from pipeline.app.config import PredictConfig, ReportConfig
from pipeline.app.errors import UserError
from pipeline.app.files import read_csv, write_csv
from pipeline.app.inference import Runner, SlideResult, run_here, slide_name
from pipeline.app.models import SlideClassifier
from pipeline.app.report import write_report
from pipeline.app.runtime import resolve_device

SLIDE_SUFFIXES = (
    ".svs", ".tif", ".tiff", ".ndpi", ".mrxs", ".scn", ".bif", ".vms", ".vmu",
    ".svslide", ".dcm", ".zarr",
)  # fmt: skip
"""File (or directory, for Zarr) suffixes taken as slides when listing a directory."""


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
            raise UserError(f"two inputs share the output name {slide_name(p)!r}: {other} and {p}")
    return list(names.values())  # a file named twice (alone and in its directory) runs once


class PredictionStore:
    """The outputs of a prediction directory, loaded from and saved to disk.

    ``add`` writes a result's files (``outputs.write_slide_files``: gallery,
    thumbnail, heatmap in ``heatmap_scale``, GeoJSON), then rewrites
    ``predictions.csv`` with the new row, each atomically.
    """

    def __init__(
        self,
        out_dir: str | os.PathLike,
        class_names: Sequence[str],
        heatmap_scale: str = ReportConfig.heatmap_scale,
    ) -> None:
        self.out_dir = Path(out_dir)
        self.class_names = tuple(class_names)
        self.heatmap_scale = heatmap_scale
        self.columns = outputs.prediction_columns(self.class_names)
        self.rows = {r["slide"]: r for r in read_csv(self.out_dir / outputs.PREDICTIONS)}

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
            outputs.write_slide_files(self.out_dir, result, self.class_names, self.heatmap_scale)
        self.rows[result.slide] = result.row(self.class_names)
        write_csv(
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
    seed: int = PredictConfig.seed,
    overwrite: bool = False,
    device: torch.device | str | None = None,
    progress: bool = True,
    runner: Runner | None = None,
    report: ReportConfig = ReportConfig(),  # noqa: B008 (frozen, never mutated)
    feature_weights: str | os.PathLike | None = None,
    assume_mpp: float | None = None,
    slide_mpp: Sequence[tuple[str, float]] = (),
) -> PredictSummary:
    """Classify every slide of ``slides`` (files and/or directories) into ``out_dir``.

    Args:
        model: a ``SlideClassifier`` or a run directory to load it from.
        seed: run seed; each slide's sampling uses ``inference.slide_seed(seed, path)``.
        overwrite: redo slides already done in ``out_dir``.
        device: for a run directory; default CUDA when available.
        runner: where the slides run: ``inference.run_here`` (default, this
            process) or ``cluster.on_cluster(client)`` (one task per slide on a Dask
            cluster); results are written here as they come.
        report: heatmap size and colour scale, and whether ``report.html`` is
            rebuilt at the end (also when every slide was already done).
        feature_weights: where the run's encoder weights file is now, for a run
            directory whose frozen encoder is read from it (``checkpoint.load_model``).
        assume_mpp / slide_mpp: microns per pixel of slides whose files state none
            (``ModelConfig``); they replace the model config's own, so slides of
            unknown mpp get error rows unless given here.

    Returns a ``PredictSummary``; slides that failed are in ``summary.failed`` and
    have ``error`` rows in ``predictions.csv``.
    """
    from tqdm import tqdm

    from pipeline.app.checkpoint import load_model

    if not isinstance(model, SlideClassifier):
        model, _ = load_model(model, resolve_device(device), feature_weights=feature_weights)
    model.config = dataclasses.replace(
        model.config, assume_mpp=assume_mpp, slide_mpp=tuple(slide_mpp)
    )
    model.eval()
    paths = list_slides(slides)
    store = PredictionStore(out_dir, model.config.class_names, report.heatmap_scale)
    todo = [p for p in paths if overwrite or not store.is_done(p)]
    skipped = [p for p in paths if p not in todo]
    results = []
    with tqdm(total=len(todo), desc="predict", unit="slide", disable=not progress) as bar:
        for result in (runner or run_here)(model, todo, seed, display_side=report.heatmap_side):
            store.add(result)
            results.append(result)
            bar.update()
    if report.report:
        write_report(out_dir)
    return PredictSummary(Path(out_dir), results, skipped)
