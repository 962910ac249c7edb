"""The batch driver: a resumable prediction of many slides into an output directory.

``predict`` (or ``prepare_batch`` then ``Batch.run``, which lets a caller start a
cluster only once every user error has been ruled out) proceeds in this order:

1. the model is loaded and the inputs listed (``inputs.list_inputs``): a bad run
   directory, slides CSV or device is a ``UserError`` before anything is written;
2. the output directory is locked (``dirlock``: one writer at a time) and its
   manifest checked (``journal``): a directory made by another model or other
   options is refused unless ``overwrite``;
3. slides already done under the same manifest are skipped, the others handed to a
   runner (``inference.run_here`` in this process, or ``cluster.on_cluster(client)``);
4. each result is recorded as soon as it is known: its pictures and GeoJSON first
   (``outputs.write_slide_files``), then one journal line (appended and fsync'ed).
   ``predictions.csv`` is rebuilt from the journal atomically every few seconds and
   at the end, and then ``report.html`` from the directory (``report.write_report``).

A kill at any point therefore loses at most the slides in flight, and a record with
status ``ok`` always has its files.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import hashlib
import itertools
import json
import os
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from pipeline.app.config import (
    InputConfig,
    PredictConfig,
    ReportConfig,
    model_config_from_dict,
    package_version,
)
from pipeline.app.errors import ConfigError, UserError
from pipeline.app.files import write_csv
from pipeline.app.model.networks import SlideClassifier
from pipeline.app.prediction.dirlock import DirectoryLock
from pipeline.app.prediction.inference import Runner, SlideResult, run_here
from pipeline.app.prediction.journal import (
    JOURNAL_FILE,
    MANIFEST_FILE,
    Journal,
    differences,
    manifest_id,
    read_manifest,
    write_manifest,
)
from pipeline.app.progress import progress_bar
from pipeline.app.results import outputs
from pipeline.app.results.report import write_report
from pipeline.app.runtime import resolve_device
from pipeline.app.slide.inputs import SlideInput, list_inputs
from pipeline.app.tasks import Task, task_of

DONE = ("ok", "no_tissue")
"""Statuses of finished slides (a rerun skips them; ``error`` slides are retried)."""

MANIFEST_FORMAT = "ats-wsi-predictions"
MANIFEST_VERSION = 1

REBUILD_SECONDS = 5.0
"""``predictions.csv`` is rebuilt at most this often during a run, and only when the
rows added since the last rebuild are at least ``REBUILD_FRACTION`` of the table..."""
REBUILD_FRACTION = 0.1
REBUILD_MAX_SECONDS = 60.0
"""... or this long has passed: the bytes rewritten stay proportional to the number of
slides (a geometric series) while the table is never more than a minute stale."""


def prediction_manifest(model: SlideClassifier, config: PredictConfig) -> dict[str, Any]:
    """What an output directory is bound to: the model (SHA-256 of its safetensors
    weights, equal to ``model.safetensors``'s, and its ``ModelConfig``), every field of
    ``config``, and the package version."""
    from pipeline.app.model.checkpoint import to_bytes

    _, weights = to_bytes(model)
    return {
        "format": MANIFEST_FORMAT,
        "version": MANIFEST_VERSION,
        "ats_wsi": package_version(),
        "model": {
            "weights_sha256": hashlib.sha256(weights).hexdigest(),
            "config": dataclasses.asdict(model.config),
        },
        "predict": dataclasses.asdict(config),
    }


def prediction_task(predictions: str | os.PathLike) -> Task | None:
    """The task of the model that made a prediction directory (or the
    ``predictions.csv`` in it), read from its manifest; ``None`` without one."""
    path = Path(predictions)
    manifest = read_manifest(path if path.is_dir() else path.parent)
    if manifest is None:
        return None
    source = str((path if path.is_dir() else path.parent) / MANIFEST_FILE)
    try:
        config = manifest["model"]["config"]
    except (KeyError, TypeError):
        raise ConfigError(f"{source}: no model config") from None
    return task_of(model_config_from_dict(config, source))


class PredictionStore:
    """The outputs of a prediction directory: per-slide files, the journal of finished
    slides and ``predictions.csv`` rebuilt from it.

    Use it as a context manager: entering locks the directory (``UserError`` if
    another process writes it) and binds it to ``manifest`` (``UserError`` if it was
    made under another one, unless ``overwrite``: then the earlier slides' files and
    records are removed first); leaving rebuilds ``predictions.csv`` and unlocks.

    Args:
        score_columns: the model's scores in ``predictions.csv``
            (``Task.score_columns``: ``prob_<class>`` for classification).
        manifest: what the outputs are bound to (``prediction_manifest``); default
            one naming only ``score_columns``.
        heatmap_scale: colour scale of the heatmaps (``ReportConfig``).
    """

    def __init__(
        self,
        out_dir: str | os.PathLike,
        score_columns: Sequence[str],
        manifest: dict[str, Any] | None = None,
        overwrite: bool = False,
        heatmap_scale: str = ReportConfig.heatmap_scale,
    ) -> None:
        self.out_dir = Path(out_dir)
        self.heatmap_scale = heatmap_scale
        self.score_columns = tuple(score_columns)
        self.columns = outputs.prediction_columns(self.score_columns)
        # Through JSON, so that tuples compare equal to the lists read back from disk.
        self.manifest = json.loads(json.dumps(manifest or {"columns": self.score_columns}))
        self.manifest_id = manifest_id(self.manifest)
        self.overwrite = overwrite
        self.records: dict[str, dict[str, Any]] = {}
        self.journal = Journal(self.out_dir / JOURNAL_FILE)
        self._lock = DirectoryLock(self.out_dir)
        self._rebuilt_at = time.monotonic()
        self._new = 0

    def __enter__(self) -> PredictionStore:
        self._lock.acquire()
        try:
            self._bind()
            mine = (r for r in self.journal.records() if r.get("manifest") == self.manifest_id)
            self.records = {r["slide"]: r for r in mine}
            self.journal.open()
        except BaseException:
            self._lock.release()
            raise
        return self

    def __exit__(self, *exc_info: object) -> None:
        try:
            if self._new or not (self.out_dir / outputs.PREDICTIONS).exists():
                self.write_csv()
        finally:
            self.journal.close()
            self._lock.release()

    def _bind(self) -> None:
        """Check the directory's manifest against ours; write ours if it has none."""
        old = read_manifest(self.out_dir)
        if old == self.manifest:
            return
        legacy = [
            p.name for p in (self.out_dir / outputs.PREDICTIONS, self.journal.path) if p.exists()
        ]
        if old is not None or legacy:
            if not self.overwrite:
                what = (
                    "; ".join(differences(old, self.manifest)[:4])
                    if old is not None
                    else f"{' and '.join(legacy)} without a manifest (an older ats-wsi?)"
                )
                raise UserError(
                    f"{self.out_dir}: holds predictions made differently ({what}); "
                    "use --overwrite to replace them, or choose another output directory"
                )
            self._clear()
        write_manifest(self.out_dir, self.manifest)

    def _clear(self) -> None:
        """Remove the files and records of every slide of the journal."""
        for record in self.journal.records():
            for name in record.get("files", []):
                (self.out_dir / name).unlink(missing_ok=True)
        self.journal.reset()
        (self.out_dir / outputs.PREDICTIONS).unlink(missing_ok=True)

    def is_done(self, slide: SlideInput) -> bool:
        """True when ``slide`` has an ``ok`` record of this manifest, for this path,
        and every file that record names exists."""
        record = self.records.get(slide.name)
        return (
            record is not None
            and record["row"].get("status") in DONE
            and record["row"].get("path") == str(slide.path)
            and all((self.out_dir / name).is_file() for name in record.get("files", []))
        )

    def add(self, result: SlideResult) -> None:
        """Write ``result``'s files, then its journal record."""
        written = []
        if result.status == "ok":
            files = outputs.write_slide_files(
                self.out_dir, result, self.score_columns, self.heatmap_scale
            )
            written = [str(p.relative_to(self.out_dir)) for p in files]
        record = {
            "manifest": self.manifest_id,
            "slide": result.slide,
            "row": result.row(self.score_columns),
            "files": written,
        }
        self.journal.append(record)
        self.records[result.slide] = record
        self._new += 1
        elapsed = time.monotonic() - self._rebuilt_at
        if elapsed >= REBUILD_SECONDS and (
            self._new >= REBUILD_FRACTION * len(self.records) or elapsed >= REBUILD_MAX_SECONDS
        ):
            self.write_csv()

    def write_csv(self) -> None:
        """Rebuild ``predictions.csv`` (one row per slide, sorted) atomically."""
        rows = [self.records[name]["row"] for name in sorted(self.records)]
        write_csv(self.out_dir / outputs.PREDICTIONS, self.columns, rows)
        self._rebuilt_at = time.monotonic()
        self._new = 0


@dataclass
class PredictSummary:
    """What a ``predict`` call did.

    Attributes:
        results: this call's results, in completion order, without their images
            (thumbnail, display, attention map, patches: kept for every slide, those
            would grow with the batch; they are in the slide's files).
        skipped: inputs already done under the same manifest.
    """

    out_dir: Path
    results: list[SlideResult]
    skipped: list[Path]

    @property
    def failed(self) -> list[SlideResult]:
        return [r for r in self.results if r.status == "error"]


@dataclass
class Batch:
    """A prediction ready to run: model loaded, inputs listed, output directory
    locked and bound (see ``prepare_batch``)."""

    model: SlideClassifier
    config: PredictConfig
    inputs: list[SlideInput]
    store: PredictionStore
    report: ReportConfig = ReportConfig()  # noqa: RUF009 (frozen)
    time_limit: float | None = InputConfig.slide_time_limit

    def run(self, runner: Runner | None = None, progress: bool = True) -> PredictSummary:
        """Predict every input not done yet; see ``predict``."""
        store = self.store
        bad = [i for i in self.inputs if i.error]
        todo = [i for i in self.inputs if not i.error and (store.overwrite or not store.is_done(i))]
        skipped = [i.path for i in self.inputs if not i.error and i not in todo]
        by_path = {str(i.path): i for i in todo}
        results: list[SlideResult] = []
        with progress_bar(len(bad) + len(todo), "predict", enabled=progress) as bar:
            given = (
                SlideResult(slide=i.name, path=str(i.path), status="error", error=i.error)
                for i in bad
            )
            computed = (runner or run_here)(
                self.model,
                [i.path for i in todo],
                self.config.seed,
                time_limit=self.time_limit,
                display_side=self.report.heatmap_side,
                draws=self.config.draws,
                roi_dir=self.config.roi_dir,
            )
            for result in itertools.chain(given, computed):
                if result.path in by_path:
                    result = dataclasses.replace(result, slide=by_path[result.path].name)
                store.add(result)
                results.append(
                    dataclasses.replace(
                        result, thumbnail=None, display=None, attention=None, patches=None
                    )
                )
                bar.update()
        store.write_csv()
        if self.report.report:
            write_report(store.out_dir)
        return PredictSummary(store.out_dir, results, skipped)


@contextlib.contextmanager
def prepare_batch(
    model: SlideClassifier | str | os.PathLike,
    slides: Iterable[str | os.PathLike],
    out_dir: str | os.PathLike,
    config: PredictConfig = PredictConfig(),  # noqa: B008 (frozen, never mutated)
    report: ReportConfig = ReportConfig(),  # noqa: B008
    inputs: InputConfig = InputConfig(),  # noqa: B008
    overwrite: bool = False,
    device: torch.device | str | None = None,
    feature_weights: str | os.PathLike | None = None,
    trust_feature_net: str | None = None,
) -> Iterator[Batch]:
    """Check everything the user gave and lock ``out_dir``, for the ``with`` block.

    Every user error (a missing run directory, an unknown device, a bad slides CSV,
    no inputs at all, an output directory that cannot be written, is locked by
    another process or was made by another model) is raised here, before any slide
    is read.

    Args:
        model: a ``SlideClassifier`` or a run directory to load it from. A model
            given is not modified (its config stays as it is).
        slides: slide files and directories (see ``inputs.list_inputs``).
        config: seed (each slide's sampling uses ``slide_seed(seed, path)``), draws
            and region-of-interest directory (``PredictConfig``).
        report: heatmap size and colour scale, and whether ``report.html`` is
            rebuilt at the end (also when every slide was already done).
        inputs: sub-directories, a slides CSV, and the mpp of slides whose files
            state none (``InputConfig``).
        overwrite: redo slides already done, and replace the outputs of a directory
            made by another model or with other options (otherwise a ``UserError``).
        device: for a run directory; default CUDA when available.
        feature_weights: where the run's encoder weights file is now, for a run
            directory whose frozen encoder is read from it (``checkpoint.load_model``).
        trust_feature_net: the ``module:callable`` encoder factory the user trusts a
            run directory to name (``checkpoint.load_model``); any other is refused.
    """
    from pipeline.app.model.checkpoint import load_model

    if not isinstance(model, SlideClassifier):
        model, _ = load_model(
            model,
            resolve_device(device),
            feature_weights=feature_weights,
            trust_feature_net=trust_feature_net,
        )
    else:
        # The caller's model keeps its config: a shallow copy (same weights) takes
        # this batch's slide metadata.
        model = copy.copy(model)
    model.config = dataclasses.replace(
        model.config, assume_mpp=inputs.assume_mpp, slide_mpp=inputs.slide_mpp
    )
    model.eval()
    if config.roi_dir is not None:
        config = dataclasses.replace(config, roi_dir=str(Path(config.roi_dir).absolute()))
    slides = list(slides)
    if not slides and inputs.slides_csv is None:
        raise UserError("no slides given (name files or directories, or a slides CSV)")
    listed = list_inputs(slides, recursive=inputs.recursive, slides_csv=inputs.slides_csv)
    manifest = prediction_manifest(model, config)
    with PredictionStore(
        out_dir, model.task.score_columns, manifest, overwrite, report.heatmap_scale
    ) as store:
        yield Batch(model, config, listed, store, report, inputs.slide_time_limit)


def predict(
    model: SlideClassifier | str | os.PathLike,
    slides: Iterable[str | os.PathLike],
    out_dir: str | os.PathLike,
    config: PredictConfig = PredictConfig(),  # noqa: B008 (frozen, never mutated)
    report: ReportConfig = ReportConfig(),  # noqa: B008
    inputs: InputConfig = InputConfig(),  # noqa: B008
    overwrite: bool = False,
    device: torch.device | str | None = None,
    feature_weights: str | os.PathLike | None = None,
    trust_feature_net: str | None = None,
    progress: bool = True,
    runner: Runner | None = None,
) -> PredictSummary:
    """Predict every slide of ``slides`` (files and/or directories) into ``out_dir``.

    Args:
        model, slides, config, report, inputs, overwrite, device, feature_weights,
        trust_feature_net: as for ``prepare_batch``.
        progress: a bar on a terminal, plain lines every few seconds elsewhere.
        runner: where the slides run: ``inference.run_here`` (default, this
            process) or ``cluster.on_cluster(client)`` (one task per slide on a Dask
            cluster); results are written here as they come.

    Returns a ``PredictSummary``; slides that failed (unreadable inputs included) are
    in ``summary.failed`` and have ``error`` rows in ``predictions.csv``.
    """
    with prepare_batch(
        model,
        slides,
        out_dir,
        config,
        report,
        inputs,
        overwrite,
        device,
        feature_weights,
        trust_feature_net,
    ) as batch:
        return batch.run(runner, progress)
