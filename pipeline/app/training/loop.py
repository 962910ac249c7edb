"""Training a slide classifier from a directory of slides and a labels CSV.

Slide thumbnails and tissue masks are read once, at the start (through an on-disk
cache when given). Each epoch then runs through ``streaming.stream_epoch``:
mini-batches of ``TrainConfig.batch_size`` slides, their sampled tiles read in the
background while the model computes, slides kept open in one bounded LRU of handles
for the whole run (validation reads through it too).

Validation slides come from a split of the labelled slides (stratified by class,
grouped by ``case``: all slides of a patient on one side), from an external labels
CSV (``val_labels``), or, in ``cross_validate``, from each of K folds in turn. Every
epoch computes the validation loss, accuracy, balanced accuracy and ROC AUC
(``evaluation.point_metrics``); the best epoch by ``TrainConfig.select_metric`` is
kept.

A run directory holds the model files of ``checkpoint`` (``model.safetensors``: the
best epoch's weights; ``model_last.safetensors``: the last epoch's, which training
resumes from), ``metrics.csv`` (one row per epoch), ``split.csv`` (every labelled
slide and its set) and ``train_state.json`` (epochs done, best epoch, skipped
slides). Everything is rewritten atomically after each epoch; training again into the
same directory resumes after the last finished epoch, with the saved split, and
refuses when the labels changed since (``resplit`` starts the run over). Each
epoch's slide order and patch sampling are seeded by ``(seed, epoch)`` through
explicit generators (the global torch seed is never touched), so a resumed run
follows the same path as an uninterrupted one.
"""

from __future__ import annotations

import json
import os
import time
import warnings
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

import pipeline
from pipeline.app.config import ModelConfig, RunConfig, TrainConfig
from pipeline.app.errors import UserError
from pipeline.app.files import atomic_write_bytes, ensure_directory, read_csv, write_csv
from pipeline.app.model import checkpoint, encoders
from pipeline.app.model.networks import SlideClassifier
from pipeline.app.results.evaluation import point_metrics
from pipeline.app.runtime import resolve_device
from pipeline.app.slide.inputs import slide_seed
from pipeline.app.slide.labels import LabelRow, LabelTable, read_labels
from pipeline.app.slide.views import level0_mpp, low_res_tensor, patch_view, sampling_mask
from pipeline.app.training.augment import Augmentation
from pipeline.app.training.streaming import (
    CachedView,
    Reader,
    SlideHandles,
    StepResult,
    StreamItem,
    ViewCache,
    stack_priors,
    stack_views,
    stream_epoch,
)

METRICS_FILE = "metrics.csv"
STATE_FILE = "train_state.json"
SPLIT_FILE = "split.csv"
CV_SUMMARY_FILE = "cv_summary.csv"
VAL_METRICS = ("val_loss", "val_accuracy", "val_balanced_accuracy", "val_roc_auc")
METRIC_COLUMNS = ("epoch", "train_loss", "train_accuracy", *VAL_METRICS, "entropy_loss", "seconds")
SPLIT_COLUMNS = ("slide", "label", "case", "set", "path")
CV_COLUMNS = ("fold", "best_epoch", "epochs_run", "n_train", "n_val", *VAL_METRICS)


@dataclass
class LabelledSlide:
    """A readable training slide with its attention view cached in memory.

    Attributes:
        path: the slide file; ``label``: class index.
        thumbnail: uint8 [h, w, 3]; ``tissue``: bool [h, w].
        name / case: the slide's name and its case (``labels.LabelRow``).
    """

    path: Path
    label: int
    thumbnail: np.ndarray
    tissue: np.ndarray
    name: str
    case: str

    @property
    def view(self) -> CachedView:
        return CachedView(self.thumbnail, self.tissue)


def load_slides(
    rows: Sequence[LabelRow],
    config: ModelConfig,
    warn: Callable[[str], None],
    progress: bool,
    cache_dir: str | os.PathLike | None = None,
) -> tuple[list[LabelledSlide], list[str]]:
    """Read every labelled slide's view (through the on-disk ``ViewCache`` in
    ``cache_dir`` when given, so the next run skips it); unreadable or missing ones,
    and labels that are not among ``config.class_names``, are reported through
    ``warn`` and returned as messages, not raised."""
    from tqdm import tqdm

    views = ViewCache(cache_dir, config)
    slides, skipped = [], []
    for row in tqdm(rows, desc="reading slides", unit="slide", disable=not progress):
        if row.label not in config.class_names:
            skipped.append(
                f"{row.path}: label {row.label!r} not in classes {list(config.class_names)}"
            )
            warn(f"skipping {skipped[-1]}")
            continue
        try:
            view = views.load(row.path)
            slides.append(
                LabelledSlide(
                    row.path,
                    config.class_names.index(row.label),
                    view.thumbnail,
                    view.tissue,
                    row.name,
                    row.case,
                )
            )
        except Exception as e:  # every unreadable slide is reported and skipped
            skipped.append(f"{row.path}: {type(e).__name__}: {e}")
            warn(f"skipping {skipped[-1]}")
    return slides, skipped


def check_classes(
    slides: Sequence[LabelledSlide], class_names: Sequence[str], source: Path
) -> list[str]:
    """Messages for the classes without a readable slide; ``UserError`` when fewer
    than two classes have one (there would be nothing to learn)."""
    present = {s.label for s in slides}
    notes = [
        f"{source}: class {name!r} has no readable slide to train on"
        for i, name in enumerate(class_names)
        if i not in present
    ]
    if len(present) < 2:
        found = [class_names[i] for i in sorted(present)]
        raise UserError(
            f"{source}: the readable training slides cover fewer than two classes ({found} "
            f"of {list(class_names)}; {len(slides)} readable slides); nothing to train"
        )
    return notes


def assign_folds(labels: Sequence, cases: Sequence[str], n_folds: int, seed: int) -> np.ndarray:
    """Fold index (int [n], in ``0..n_folds-1``) of each slide: stratified by label,
    grouped by case (sklearn's ``StratifiedGroupKFold``, shuffled by ``seed``), so all
    slides of a case share a fold.

    Raises:
        UserError: fewer cases than folds, or every class smaller than that.
    """
    from sklearn.model_selection import StratifiedGroupKFold

    n_cases, largest = len(set(cases)), max(Counter(labels).values(), default=0)
    if n_folds > min(n_cases, largest):
        raise UserError(
            f"{n_folds} folds need at least {n_folds} cases and a class with {n_folds} slides; "
            f"found {n_cases} cases, at most {largest} slides per class"
        )
    folds = np.zeros(len(labels), dtype=np.int64)
    splitter = StratifiedGroupKFold(n_splits=n_folds, shuffle=True, random_state=seed)
    with warnings.catch_warnings():  # "least populated class has fewer members than folds"
        warnings.simplefilter("ignore", UserWarning)
        for k, (_, held_out) in enumerate(splitter.split(np.zeros(len(labels)), labels, cases)):
            folds[held_out] = k
    return folds


def split(slides: list[LabelledSlide], fraction: float, seed: int) -> tuple[list, list]:
    """Train/validation split: one fold of ``round(1 / fraction)`` (``assign_folds``),
    so stratified by class and grouped by case; fewer folds (a larger share) when
    there are fewer cases, or slides per class, than that. No validation slides when
    ``fraction`` is 0 or there are fewer than two cases."""
    n_cases = len({s.case for s in slides})
    largest = max(Counter(s.label for s in slides).values())
    if fraction == 0 or min(n_cases, largest) < 2:
        return list(slides), []
    n_folds = min(max(2, round(1 / fraction)), n_cases, largest)
    folds = assign_folds([s.label for s in slides], [s.case for s in slides], n_folds, seed)
    return (
        [s for s, k in zip(slides, folds, strict=True) if k != 0],
        [s for s, k in zip(slides, folds, strict=True) if k == 0],
    )


def run_slide(
    model: SlideClassifier,
    slide: LabelledSlide,
    device: torch.device,
    generator: torch.Generator,
    handles: SlideHandles,
) -> StepResult:
    """One slide forward (validation: no gradient is needed, none is taken), the slide
    opened through ``handles`` (no reopening every epoch)."""
    x_low = low_res_tensor(slide.thumbnail, device)
    mask = sampling_mask(slide.tissue, device)
    target = torch.tensor([slide.label], device=device)
    opened = handles.slide(slide.path)
    source, _ = patch_view(opened, model.config, level0_mpp(opened, model.config))
    out = model.classify(x_low, source, mask, generator)
    loss = F.cross_entropy(out.logits, target)
    regularizer = out.draw.regularizer
    probs = out.logits.detach().softmax(1)[0].cpu().numpy()
    correct = int(probs.argmax()) == slide.label
    return StepResult(float(loss.detach()), float(regularizer.detach()), correct, probs)


@dataclass
class TrainResult:
    """``history``: one dict per epoch (METRIC_COLUMNS; validation values ``None``
    without validation slides); ``best_epoch``: the epoch whose weights are ``model``
    and ``model.safetensors``; ``skipped``: messages for the slides left out;
    ``notes``: the other remarks about the labels (also logged)."""

    run_dir: Path
    model: SlideClassifier
    config: RunConfig
    history: list[dict]
    best_epoch: int
    skipped: list[str]
    notes: list[str]


def resolve_run(
    out: Path,
    classes: Sequence[str],
    model_config: ModelConfig | None,
    train_config: TrainConfig | None,
    resplit: bool = False,
) -> tuple[RunConfig, bool]:
    """The run's configuration and whether it resumes a run saved in ``out``.

    A resumed run keeps its saved configuration, except the number of epochs, which
    ``train_config`` may extend. ``resplit`` starts a new run even over a saved one.
    A new run's default classes are ``classes``."""
    if not resplit and (out / STATE_FILE).is_file() and (out / checkpoint.MODEL_FILE).is_file():
        saved = checkpoint.read_config(out)
        epochs = (train_config or saved.train).epochs
        return RunConfig(saved.model, replace(saved.train, epochs=epochs)), True
    model_config = encoders.resolve(model_config or ModelConfig(class_names=tuple(classes)))
    return RunConfig(model_config, train_config or TrainConfig()), False


def new_model(config: ModelConfig, seed: int, device: torch.device) -> SlideClassifier:
    """A freshly initialised classifier; its weights depend on ``seed`` only, and on
    the encoder's weights file when ``config.feature_weights`` names one."""
    # The networks initialise from torch's global generator: fork it, so that the
    # caller's random state is left as it was.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = SlideClassifier(config)
    if config.feature_weights is not None:
        encoders.load_weights(model.feature_net, config.feature_weights)
    return model.to(device)


def make_optimizer(model: SlideClassifier, config: TrainConfig) -> torch.optim.Optimizer:
    """AdamW over the attention net and head at ``lr`` and the encoder's trainable
    parameters at ``feature_lr`` (none when it is frozen)."""
    encoder = {id(p) for p in model.feature_net.parameters()}
    others = [p for p in model.parameters() if id(p) not in encoder]
    groups = encoders.parameter_groups(others, model.feature_net, config.lr, config.feature_lr)
    return torch.optim.AdamW(groups, lr=config.lr, weight_decay=config.weight_decay)


def set_exploration(model: SlideClassifier, n_slides: int, config: TrainConfig) -> None:
    """Set the model's exploration weights from ``config``, as schedules over the slides
    trained on (``n_slides`` per epoch); training mode only: ``SlideClassifier`` in eval
    mode samples from the attention."""
    total = round(config.remedy_epochs * n_slides)

    def schedule(weight: float) -> pipeline.proposals.Weight:
        return pipeline.linear_decay(weight, total) if weight and total else weight

    model.sampler.exploration = schedule(config.exploration)
    model.sampler.prior_weight = schedule(config.prior_weight)


def early_patches(
    n_patches: int, n_slides: int, config: TrainConfig
) -> Callable[[int], int] | None:
    """Patches per slide as a function of the slides trained on before a batch
    (``n_slides`` per epoch): ``config.early_patches`` during the first
    ``remedy_epochs``, ``n_patches`` after; None without early patches."""
    if not config.early_patches:
        return None
    until = round(config.remedy_epochs * n_slides)
    return lambda trained: config.early_patches if trained < until else n_patches


def fit_attention_to_prior(
    model: SlideClassifier,
    slides: Sequence[LabelledSlide],
    config: TrainConfig,
    device: torch.device,
) -> float:
    """Fit the attention net alone to the content prior ``config.prior`` (see
    ``TrainConfig.prior_init_steps``): each step takes ``batch_size`` slides at random
    and minimises ``-sum_k p_k log a_k``, ``a`` the attention restricted to tissue and
    ``p`` the prior on its grid, normalised. Returns the last step's loss."""
    optimizer = torch.optim.Adam(model.attention_net.parameters(), lr=1e-2)
    rng = np.random.default_rng([config.seed, config.prior_init_steps])
    loss = torch.zeros(())
    for _ in range(config.prior_init_steps):
        chosen = rng.choice(len(slides), size=min(config.batch_size, len(slides)), replace=False)
        views = [slides[i].view for i in chosen]
        x_low, mask, shape = stack_views(views, device)
        prior = stack_priors(views, config.prior, shape, device)
        attention, _ = model.sampler.attend(x_low, mask)  # [B, h', w'], on tissue
        target = pipeline.prior_on_grid(prior, attention.shape[1:])
        loss = pipeline.prior_cross_entropy(attention, target)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return float(loss.detach())


def class_weights(slides: Sequence[LabelledSlide], n_classes: int) -> np.ndarray:
    """float [n_classes]: ``n / (n_classes_present * n_c)`` (1 for a balanced set; 0
    for a class without slides)."""
    counts = np.bincount([s.label for s in slides], minlength=n_classes).astype(float)
    weights = np.zeros(n_classes)
    weights[counts > 0] = len(slides) / ((counts > 0).sum() * counts[counts > 0])
    return weights


def epoch_order(slides: Sequence[LabelledSlide], config: TrainConfig, epoch: int) -> np.ndarray:
    """Indices of the slides one epoch visits (int [len(slides)]): a permutation, or
    with ``balance="sampling"`` a draw with replacement, every class equally likely."""
    rng = np.random.default_rng([config.seed, epoch])
    if config.balance != "sampling":
        return rng.permutation(len(slides))
    p = class_weights(slides, max(s.label for s in slides) + 1)[[s.label for s in slides]]
    return rng.choice(len(slides), size=len(slides), replace=True, p=p / p.sum())


def train_epoch(
    model: SlideClassifier,
    optimizer: torch.optim.Optimizer,
    slides: list[LabelledSlide],
    config: TrainConfig,
    epoch: int,
    device: torch.device,
    reader: Reader,
    progress: bool = False,
    warn: Callable[[str], None] = print,
) -> list[StepResult]:
    """One pass over ``slides`` in the epoch's order: mini-batches of
    ``config.batch_size`` slides, ``config.queue_depth`` batches in flight (``streaming``)."""
    order = epoch_order(slides, config, epoch)
    weights = None
    if config.balance == "weights":
        weights = class_weights(slides, len(model.config.class_names))
    views = {s.path: s.view for s in slides}
    return stream_epoch(
        model,
        optimizer,
        [StreamItem(slides[i].path, slides[i].label) for i in order],
        _Views(views),
        config.batch_size,
        torch.Generator(device).manual_seed(slide_seed(config.seed, f"epoch-{epoch}")),
        device,
        depth=config.queue_depth,
        reader=reader,
        warn=warn,
        augmentation=Augmentation.from_config(config),
        prior=config.prior,
        first_slide=(epoch - 1) * len(slides),
        class_weights=weights,
        amp=config.amp,
        progress=progress,
        n_patches=early_patches(model.config.n_patches, len(slides), config),
    )


class _Views(dict):
    """Views already in memory (``LabelledSlide``), as ``stream_epoch`` loads them."""

    def load(self, path: Path) -> CachedView:
        return self[path]


@torch.no_grad()
def evaluate(
    model: SlideClassifier,
    slides: list[LabelledSlide],
    seed: int,
    device: torch.device,
    handles: SlideHandles,
) -> list[StepResult]:
    """Each slide once, its sampling seeded by ``slide_seed(seed, path)`` (the same
    draws every epoch, so epochs compare). Called between epochs, when the reader
    that shares ``handles`` is idle."""
    model.eval()
    return [
        run_slide(
            model, s, device, torch.Generator(device).manual_seed(slide_seed(seed, s.path)), handles
        )
        for s in slides
    ]


def epoch_row(
    epoch: int, steps: list[StepResult], val_steps: list[StepResult], val_set, seconds: float
) -> dict:
    """The ``metrics.csv`` row of an epoch; validation values ``None`` without
    validation slides (and the AUC ``None`` when undefined, e.g. one class)."""
    row = {
        "epoch": epoch,
        "train_loss": _mean(s.loss for s in steps),
        "train_accuracy": _mean(s.correct for s in steps),
        **dict.fromkeys(VAL_METRICS),
        "entropy_loss": _mean(s.entropy_loss for s in steps),
        "seconds": round(seconds, 3),
    }
    if val_steps:
        y_true = np.array([s.label for s in val_set])
        metrics = point_metrics(y_true, np.stack([s.probs for s in val_steps]))
        row["val_loss"] = _mean(s.loss for s in val_steps)
        row.update({f"val_{k}": None if v is None else round(v, 6) for k, v in metrics.items()})
    return row


def selection_key(row: dict, metric: str) -> tuple[float, float]:
    """Larger is better: the validation ``metric`` (``-inf`` where undefined), then
    the lower validation loss."""
    value = row[f"val_{metric}"]
    return (float("-inf") if value is None else value, -row["val_loss"])


def _mean(values) -> float | None:
    values = [float(v) for v in values]
    return round(sum(values) / len(values), 6) if values else None


def _describe(row: dict) -> str:
    def fmt(v):
        return "n/a" if v is None else f"{v:.3f}"

    text = f"train loss {row['train_loss']:.4f} acc {row['train_accuracy']:.3f} | "
    if row["val_loss"] is None:
        return text + "no validation slides"
    return text + (
        f"val loss {row['val_loss']:.4f} acc {fmt(row['val_accuracy'])} "
        f"bal acc {fmt(row['val_balanced_accuracy'])} AUC {fmt(row['val_roc_auc'])}"
    )


@dataclass
class _Labels:
    """The labels of a run: the training pool and the optional external validation
    table, read and checked, and the slides that could be read."""

    pool: LabelTable
    external: LabelTable | None
    slides: list[LabelledSlide]
    val_slides: list[LabelledSlide]
    skipped: list[str]
    notes: list[str]


def _read_tables(labels, slides, val_labels, val_slides) -> tuple[LabelTable, LabelTable | None]:
    pool = read_labels(labels, slides)
    if val_labels is None:
        return pool, None
    external = read_labels(val_labels, slides if val_slides is None else val_slides)
    both = sorted({r.name for r in pool.rows} & {r.name for r in external.rows})
    if both:
        raise UserError(
            f"{val_labels}: {len(both)} validation slides are also in {labels} (e.g. "
            f"{', '.join(both[:3])}): they would be trained on"
        )
    return pool, external


def _load(pool, external, config: ModelConfig, log, progress, cache_dir=None) -> _Labels:
    """Read the slides of both tables and report every label problem before training."""
    for message in pool.left_out + (external.left_out if external else []):
        log(f"skipping {message}")
    notes = pool.notes + (external.notes if external else [])
    for message in notes:
        log(message)
    skipped = pool.left_out + (external.left_out if external else [])
    loaded, unread = load_slides(pool.rows, config, log, progress, cache_dir)
    val_loaded, val_unread = [], []
    if external is not None:
        val_loaded, val_unread = load_slides(external.rows, config, log, progress, cache_dir)
    class_notes = check_classes(loaded, config.class_names, pool.source)
    for message in class_notes:
        log(message)
    return _Labels(
        pool, external, loaded, val_loaded, skipped + unread + val_unread, notes + class_notes
    )


def train(
    slides: str | os.PathLike,
    labels: str | os.PathLike,
    out: str | os.PathLike,
    model_config: ModelConfig | None = None,
    train_config: TrainConfig | None = None,
    device: torch.device | str | None = None,
    progress: bool = True,
    log: Callable[[str], None] | None = None,
    val_labels: str | os.PathLike | None = None,
    val_slides: str | os.PathLike | None = None,
    resplit: bool = False,
    cache_dir: str | os.PathLike | None = None,
) -> TrainResult:
    """Train (or resume training) a classifier and save it in ``out``.

    Args:
        slides: directory the labels CSV's slide names are relative to.
        labels: CSV with columns ``slide``, ``label`` and optionally ``case``
            (``labels.read_labels``); problems in it are reported before training.
        out: run directory; when it already holds a run, training resumes from its
            last finished epoch with its saved model config and split, up to
            ``train_config.epochs`` (other saved training options are kept).
        model_config: default ``ModelConfig`` with the sorted labels as classes.
        train_config: default ``TrainConfig()``.
        device: default CUDA when available.
        log: receives one line per epoch and per label problem (default: tqdm.write).
        val_labels / val_slides: a fixed external validation set (labels CSV, and the
            directory its names are relative to, default ``slides``) instead of a
            split of ``labels``.
        resplit: when ``out`` holds a run whose labels have changed since, start it
            over (new split, epoch 1) instead of refusing.
        cache_dir: where slides' attention views are cached on disk (keyed by path,
            size, modification time and view options), so the next run skips
            reading them; ``None`` reads them every run.

    Raises:
        UserError: the labels changed under a resumed run (without ``resplit``); fewer
            than two classes among the readable slides; no readable training slide.
    """
    from tqdm import tqdm

    log = log or tqdm.write
    out = ensure_directory(out)
    pool, external = _read_tables(labels, slides, val_labels, val_slides)
    classes = sorted(set(pool.classes) | set(external.classes if external else ()))
    run_config, resuming = resolve_run(out, classes, model_config, train_config, resplit)
    sets = saved_split(out, pool, external) if resuming else None
    data = _load(pool, external, run_config.model, log, progress, cache_dir)
    if sets is not None:
        train_set, val_set = _apply_split(sets, data)
    elif external is not None:
        train_set, val_set = data.slides, data.val_slides
    else:
        cfg = run_config.train
        train_set, val_set = split(data.slides, cfg.val_fraction, cfg.seed)
    return fit(out, run_config, resuming, train_set, val_set, data, device, progress, log)


def fit(
    out: Path,
    run_config: RunConfig,
    resuming: bool,
    train_set: list[LabelledSlide],
    val_set: list[LabelledSlide],
    data: _Labels,
    device: torch.device | str | None,
    progress: bool,
    log: Callable[[str], None],
) -> TrainResult:
    """The epochs of one run directory, from its last finished epoch on; stops early
    after ``patience`` epochs without a better validation metric."""
    cfg = run_config.train
    device = resolve_device(device)
    if not train_set:
        raise UserError(f"{data.pool.source}: no readable training slides")
    history: list[dict] = []
    best_epoch = 0
    if resuming:
        last = checkpoint.LAST_MODEL_FILE  # runs of earlier versions have only the one file
        weights = last if (out / last).is_file() else checkpoint.MODEL_FILE
        model, _ = checkpoint.load_model(out, device, weights_file=weights)
    else:
        model = new_model(run_config.model, cfg.seed, device)
        if cfg.prior_init_steps:
            loss = fit_attention_to_prior(model, train_set, cfg, device)
            log(
                f"attention fitted to the {cfg.prior} prior in {cfg.prior_init_steps} steps "
                f"(cross-entropy {loss:.3f})"
            )
    set_exploration(model, len(train_set), cfg)
    optimizer = make_optimizer(model, cfg)
    if cfg.amp and device.type != "cuda":
        log(f"amp: mixed precision needs CUDA; training in float32 on {device}")
    if resuming:
        checkpoint.load_optimizer(out, optimizer)
        state = json.loads((out / STATE_FILE).read_text())
        history, best_epoch = state["history"], state.get("best_epoch", len(state["history"]))
        log(f"resuming {out} after epoch {len(history)}")
    else:
        out.mkdir(parents=True, exist_ok=True)
        # A run started over (resplit): until its first epoch is saved, the directory
        # must not look resumable with the old weights and the new split.
        (out / STATE_FILE).unlink(missing_ok=True)
        _write_split(out, data, train_set, val_set)
    log(f"{len(train_set)} training slides, {len(val_set)} validation slides")
    if not val_set:
        log(
            "no validation slides: no model selection or early stopping; "
            "model.safetensors holds the last epoch"
        )

    reader = Reader()  # its slide handles stay open across epochs
    try:
        while len(history) < cfg.epochs and not _stopped(history, best_epoch, cfg, log):
            epoch = len(history) + 1
            began = time.perf_counter()
            steps = train_epoch(
                model, optimizer, train_set, cfg, epoch, device, reader, progress, log
            )
            val_steps = evaluate(model, val_set, cfg.seed, device, reader.handles)
            row = epoch_row(epoch, steps, val_steps, val_set, time.perf_counter() - began)
            history.append(row)
            best = history[best_epoch - 1] if best_epoch else None
            improved = (
                not val_set
                or best is None
                or (selection_key(row, cfg.select_metric) > selection_key(best, cfg.select_metric))
            )
            best_epoch = epoch if improved else best_epoch
            save_epoch(
                out, model, optimizer, run_config, history, best_epoch, data, train_set, val_set
            )
            log(f"epoch {epoch}: {_describe(row)}" + (" (best)" if improved and val_set else ""))
    finally:
        reader.close()
    if best_epoch != len(history):
        model, _ = checkpoint.load_model(out, device)
        log(
            f"best epoch {best_epoch} by validation {cfg.select_metric}: "
            f"{out / checkpoint.MODEL_FILE}"
        )
    model.eval()
    return TrainResult(out, model, run_config, history, best_epoch, data.skipped, data.notes)


def _stopped(history: list[dict], best_epoch: int, cfg: TrainConfig, log) -> bool:
    """True (and said) once ``patience`` epochs have passed without improvement."""
    if not cfg.patience or not history or history[-1]["val_loss"] is None:
        return False
    if len(history) - best_epoch < cfg.patience:
        return False
    log(
        f"early stop after epoch {len(history)}: no better validation {cfg.select_metric} "
        f"in {cfg.patience} epochs (best epoch {best_epoch})"
    )
    return True


def _write_split(out: Path, data: _Labels, train_set, val_set) -> None:
    """``split.csv``: every usable label row with its set (``train``, ``val``, or
    ``unread`` for a slide that could not be read)."""
    sets = {s.name: "train" for s in train_set} | {s.name: "val" for s in val_set}
    rows = data.pool.rows + (data.external.rows if data.external else [])
    write_csv(
        out / SPLIT_FILE,
        SPLIT_COLUMNS,
        [
            {
                "slide": r.name,
                "label": r.label,
                "case": r.case,
                "set": sets.get(r.name, "unread"),
                "path": str(r.path),
            }
            for r in rows
        ],
    )


def saved_split(out: Path, pool: LabelTable, external: LabelTable | None) -> dict[str, str]:
    """The set (``train``, ``val`` or ``unread``) of each slide name in the split saved
    in ``out``; ``UserError`` when the labels differ from the ones it was made from
    (checked before any slide is read)."""
    saved = read_csv(out / SPLIT_FILE)
    if not saved:
        raise UserError(f"{out}: no {SPLIT_FILE} to resume from; train again with --resplit")
    before = {r["slide"]: (r["label"], r["case"]) for r in saved}
    now = {name: (label, case) for name, label, case in _split_key(pool, external)}
    if before != now:
        raise UserError(
            f"{pool.source}: the labels changed since {out} was split "
            f"({_changes(before, now)}); resuming would train on validation slides. "
            "Use a new --out, or --resplit to split again and train from epoch 1"
        )
    return {r["slide"]: r["set"] for r in saved}


def _split_key(pool: LabelTable, external: LabelTable | None) -> list[tuple[str, str, str]]:
    return sorted(pool.key() + (external.key() if external else []))


def _apply_split(sets: dict[str, str], data: _Labels) -> tuple[list, list]:
    slides = data.slides + data.val_slides
    return (
        [s for s in slides if sets[s.name] == "train"],
        [s for s in slides if sets[s.name] == "val"],
    )


def _changes(before: dict, now: dict) -> str:
    def some(names) -> str:
        names = sorted(names)
        return ", ".join(names[:3]) + (", ..." if len(names) > 3 else "")

    added, removed = now.keys() - before.keys(), before.keys() - now.keys()
    changed = {n for n in now.keys() & before.keys() if now[n] != before[n]}
    parts = [
        f"{len(names)} slides {what}: {some(names)}"
        for what, names in (
            ("added", added),
            ("removed", removed),
            ("with a new label or case", changed),
        )
        if names
    ]
    return "; ".join(parts)


def save_epoch(
    out, model, optimizer, run_config, history, best_epoch, data, train_set, val_set
) -> None:
    """Save the last and (when it is this epoch) the best model, the optimizer, the
    metrics and the training state after an epoch."""
    checkpoint.save_model(out, model, run_config, checkpoint.LAST_MODEL_FILE)
    if best_epoch == history[-1]["epoch"]:
        checkpoint.save_model(out, model, run_config)
    checkpoint.save_optimizer(out, optimizer)
    write_csv(out / METRICS_FILE, METRIC_COLUMNS, history)
    state = {
        "epochs_done": history[-1]["epoch"],
        "best_epoch": best_epoch,
        "select_metric": run_config.train.select_metric,
        "history": history,
        "train_slides": [str(s.path) for s in train_set],
        "val_slides": [str(s.path) for s in val_set],
        "skipped": data.skipped,
        "notes": data.notes,
    }
    # Written last: its presence marks the epoch's files as complete.
    atomic_write_bytes(out / STATE_FILE, json.dumps(state, indent=1).encode())


@dataclass
class CrossValidation:
    """``folds``: the ``TrainResult`` of each fold (``run_dir/fold_<k>``);
    ``summary``: the rows of ``cv_summary.csv``."""

    run_dir: Path
    folds: list[TrainResult]
    summary: list[dict]


def cross_validate(
    slides: str | os.PathLike,
    labels: str | os.PathLike,
    out: str | os.PathLike,
    folds: int,
    model_config: ModelConfig | None = None,
    train_config: TrainConfig | None = None,
    device: torch.device | str | None = None,
    progress: bool = True,
    log: Callable[[str], None] | None = None,
    resplit: bool = False,
    cache_dir: str | os.PathLike | None = None,
) -> CrossValidation:
    """Stratified, case-grouped K-fold cross-validation: fold k trains on the other
    folds and validates on fold k, in ``out/fold_<k>`` (a run directory as ``train``
    writes it, resumable the same way); ``out/cv_summary.csv`` gets each fold's
    validation metrics at its best epoch, then their mean and standard deviation.

    Slides are read once for all folds. Arguments as ``train``; ``folds`` >= 2."""
    from tqdm import tqdm

    if folds < 2:
        raise UserError(f"folds: expected >= 2, got {folds}")
    log = log or tqdm.write
    out = Path(out)
    pool, _ = _read_tables(labels, slides, None, None)
    run_config, resuming = resolve_run(
        out / "fold_1", pool.classes, model_config, train_config, resplit
    )
    if resuming:
        saved_split(out / "fold_1", pool, None)  # refuse changed labels before reading slides
    data = _load(pool, None, run_config.model, log, progress, cache_dir)
    cfg = run_config.train
    assigned = assign_folds(
        [s.label for s in data.slides], [s.case for s in data.slides], folds, cfg.seed
    )
    results = []
    for k in range(folds):
        fold_dir = out / f"fold_{k + 1}"
        log(f"fold {k + 1}/{folds}")
        fold_config, resuming = resolve_run(fold_dir, pool.classes, run_config.model, cfg, resplit)
        if resuming:
            train_set, val_set = _apply_split(saved_split(fold_dir, pool, None), data)
        else:
            train_set = [s for s, f in zip(data.slides, assigned, strict=True) if f != k]
            val_set = [s for s, f in zip(data.slides, assigned, strict=True) if f == k]
        results.append(
            fit(fold_dir, fold_config, resuming, train_set, val_set, data, device, progress, log)
        )
    summary = cv_summary(results)
    write_csv(out / CV_SUMMARY_FILE, CV_COLUMNS, summary)
    mean, sd = summary[-2], summary[-1]
    log(
        f"cross-validation over {folds} folds: "
        + ", ".join(f"{m} {mean[m]} ± {sd[m]}" for m in VAL_METRICS if mean[m] != "")
        + f"; {out / CV_SUMMARY_FILE}"
    )
    return CrossValidation(out, results, summary)


def cv_summary(results: Sequence[TrainResult]) -> list[dict]:
    """One row per fold (validation metrics at its best epoch), then ``mean`` and
    ``sd`` (sample standard deviation over the folds where a metric is defined)."""
    rows = []
    for k, result in enumerate(results, start=1):
        state = json.loads((result.run_dir / STATE_FILE).read_text())
        best = result.history[result.best_epoch - 1]
        rows.append(
            {
                "fold": k,
                "best_epoch": result.best_epoch,
                "epochs_run": len(result.history),
                "n_train": len(state["train_slides"]),
                "n_val": len(state["val_slides"]),
                **{m: best[m] for m in VAL_METRICS},
            }
        )
    mean, sd = {"fold": "mean"}, {"fold": "sd"}
    for m in VAL_METRICS:
        values = [r[m] for r in rows if r[m] is not None]
        mean[m] = round(float(np.mean(values)), 6) if values else ""
        sd[m] = round(float(np.std(values, ddof=1)), 6) if len(values) > 1 else ""
    return [*rows, mean, sd]
