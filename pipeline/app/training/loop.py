"""Training a slide model from a directory of slides and a labels CSV.

The labelled slides are read once, at the start (``data``; through an on-disk view
cache when given). Each epoch then runs through ``streaming.stream_epoch``:
mini-batches of ``TrainConfig.batch_size`` slides, their sampled tiles read in the
background while the model computes, slides kept open in one bounded LRU of handles
for the whole run (validation reads through it too).

Validation slides come from a split of the labelled slides (``splits``: stratified,
grouped by ``case``), from an external labels CSV (``val_labels``), or, in
``crossval``, from each of K folds in turn. Every epoch computes the validation loss
and the task's metrics (``Task.metrics``: accuracy, balanced accuracy and ROC AUC for
classification); the best epoch by the task's selection metric
(``TrainConfig.select_metric``) is kept.

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
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from pipeline.app.config import ModelConfig, RunConfig, TrainConfig
from pipeline.app.errors import UserError
from pipeline.app.files import atomic_write_bytes, ensure_directory, write_csv
from pipeline.app.model import checkpoint, encoders
from pipeline.app.model.networks import SlideClassifier
from pipeline.app.runtime import resolve_device
from pipeline.app.slide.inputs import slide_seed
from pipeline.app.slide.labels import LabelTable
from pipeline.app.slide.views import level0_mpp, low_res_tensor, patch_view, sampling_mask
from pipeline.app.tasks import Task, task_class, task_of
from pipeline.app.training import data, splits
from pipeline.app.training.augment import Augmentation
from pipeline.app.training.cold_start import (
    early_patches,
    fit_attention_to_prior,
    set_exploration,
)
from pipeline.app.training.data import LabelledSlide, Labels
from pipeline.app.training.streaming import (
    CachedView,
    Reader,
    SlideHandles,
    StepResult,
    StreamItem,
    StreamOptions,
    stream_epoch,
)

METRICS_FILE = "metrics.csv"
STATE_FILE = "train_state.json"
SPLIT_FILE = "split.csv"
CV_SUMMARY_FILE = "cv_summary.csv"


def val_metric_columns(task: Task) -> tuple[str, ...]:
    """``val_loss`` and ``val_<metric>`` of each of the task's metrics."""
    return ("val_loss", *(f"val_{m}" for m in task.metric_names))


def metric_columns(task: Task) -> tuple[str, ...]:
    """The columns of ``metrics.csv``: epoch, the training loss and metrics, the
    validation columns, the entropy regularizer and the epoch's seconds."""
    train = tuple(f"train_{m}" for m in task.train_metric_names)
    return ("epoch", "train_loss", *train, *val_metric_columns(task), "entropy_loss", "seconds")


def run_slide(
    model: SlideClassifier,
    slide: LabelledSlide,
    device: torch.device,
    generator: torch.Generator,
    handles: SlideHandles,
) -> tuple[torch.Tensor, float]:
    """One slide forward, the slide opened through ``handles`` (no reopening every
    epoch): the head's outputs ``[1, n_outputs]`` and the entropy regularizer."""
    x_low = low_res_tensor(slide.thumbnail, device)
    mask = sampling_mask(slide.tissue, device)
    opened = handles.slide(slide.path)
    source, _ = patch_view(opened, model.config, level0_mpp(opened, model.config))
    out = model.classify(x_low, source, mask, generator)
    return out.logits, float(out.draw.regularizer.detach())


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
    model_config: ModelConfig | None,
    train_config: TrainConfig | None,
    resplit: bool = False,
) -> tuple[RunConfig, bool]:
    """The run's configuration and whether it resumes a run saved in ``out``.

    A resumed run keeps its saved configuration, except the number of epochs, which
    ``train_config`` may extend. ``resplit`` starts a new run even over a saved one.
    A new run's model config is ``model_config`` (default: classification), which the
    labels complete (``complete_run``)."""
    if not resplit and (out / STATE_FILE).is_file() and (out / checkpoint.MODEL_FILE).is_file():
        saved = checkpoint.read_config(out)
        given = None if model_config is None else model_config.feature_net
        encoders.check_trusted(saved.model.feature_net, given, str(out / checkpoint.CONFIG_FILE))
        epochs = (train_config or saved.train).epochs
        return RunConfig(saved.model, replace(saved.train, epochs=epochs)), True
    return RunConfig(model_config or ModelConfig(), train_config or TrainConfig()), False


def read_run_labels(
    run_config: RunConfig,
    resuming: bool,
    labels: str | os.PathLike,
    slides: str | os.PathLike,
    val_labels: str | os.PathLike | None = None,
    val_slides: str | os.PathLike | None = None,
) -> tuple[RunConfig, LabelTable, LabelTable | None]:
    """The run's label tables, read in its task's target columns (``data.read_tables``),
    and its config completed from them (``complete_run``)."""
    kind = task_class(run_config.model)
    columns = kind.columns(run_config.model)
    pool, external = data.read_tables(
        labels, slides, val_labels, val_slides, columns, kind.empty_is_error
    )
    rows = pool.rows + (external.rows if external else [])
    return complete_run(run_config, [r.values for r in rows], resuming), pool, external


def complete_run(
    run_config: RunConfig, values: Sequence[tuple[str, ...]], resuming: bool
) -> RunConfig:
    """A new run's config completed from the target cells ``values`` of its labels'
    rows (the task's ``complete``: e.g. the classes found in the labels) and its
    encoder (``encoders.resolve``), its selection metric settled (the task's default
    when ``None``). A resumed run's config is returned as saved; nothing given is
    modified."""
    if resuming:
        return run_config
    model = task_class(run_config.model).complete(run_config.model, values)
    model = encoders.resolve(model)
    task = task_of(model)
    train = replace(
        run_config.train, select_metric=task.check_select(run_config.train.select_metric)
    )
    return RunConfig(model, train)


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


def epoch_order(slides: Sequence[LabelledSlide], config: TrainConfig, epoch: int, task: Task):
    """Indices of the slides one epoch visits (int [len(slides)]): a permutation, or
    with ``balance="sampling"`` a draw with replacement weighted by the task's
    ``balance_weights`` (for classification: every class equally likely)."""
    rng = np.random.default_rng([config.seed, epoch])
    if config.balance != "sampling":
        return rng.permutation(len(slides))
    p = task.balance_weights([s.target for s in slides])
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
    task = model.task
    order = epoch_order(slides, config, epoch, task)
    weights = [None] * len(slides)
    if config.balance == "weights":
        weights = task.balance_weights([s.target for s in slides]).tolist()
    views = {s.path: s.view for s in slides}
    options = StreamOptions(
        batch_size=config.batch_size,
        depth=config.queue_depth,
        augmentation=Augmentation.from_config(config),
        prior=config.prior,
        amp=config.amp,
        n_patches=early_patches(model.config.n_patches, len(slides), config),
    )
    return stream_epoch(
        model,
        optimizer,
        [StreamItem(slides[i].path, slides[i].target, weights[i]) for i in order],
        _Views(views),
        torch.Generator(device).manual_seed(slide_seed(config.seed, f"epoch-{epoch}")),
        device,
        options,
        reader=reader,
        first_slide=(epoch - 1) * len(slides),
        warn=warn,
        progress=progress,
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
    draws every epoch, so epochs compare); the loss is the task's over the whole set
    (a survival loss compares slides). Called between epochs, when the reader that
    shares ``handles`` is idle."""
    model.eval()
    if not slides:
        return []
    task = model.task
    forwards = [
        run_slide(
            model, s, device, torch.Generator(device).manual_seed(slide_seed(seed, s.path)), handles
        )
        for s in slides
    ]
    outputs = torch.cat([o for o, _ in forwards])  # [n, n_outputs]
    targets = [s.target for s in slides]
    losses = task.loss(outputs, task.collate(targets, device))
    scores = task.scores(outputs).cpu().numpy()
    return [
        StepResult(float(loss), entropy, s, target)
        for loss, (_, entropy), s, target in zip(
            losses.tolist(), forwards, scores, targets, strict=True
        )
    ]


def epoch_row(
    task: Task, epoch: int, steps: list[StepResult], val_steps: list[StepResult], seconds: float
) -> dict:
    """The ``metrics.csv`` row of an epoch (``metric_columns``); validation values
    ``None`` without validation slides (and a metric ``None`` when undefined, e.g.
    the AUC of one class)."""
    row = {
        "epoch": epoch,
        "train_loss": _mean(s.loss for s in steps),
        **dict.fromkeys(f"train_{m}" for m in task.train_metric_names),
        **dict.fromkeys(val_metric_columns(task)),
        "entropy_loss": _mean(s.entropy_loss for s in steps),
        "seconds": round(seconds, 3),
    }
    if steps:
        metrics = task.train_metrics([s.target for s in steps], np.stack([s.scores for s in steps]))
        row.update({f"train_{k}": _round(v) for k, v in metrics.items()})
    if val_steps:
        metrics = task.metrics(
            [s.target for s in val_steps], np.stack([s.scores for s in val_steps])
        )
        row["val_loss"] = _mean(s.loss for s in val_steps)
        row.update({f"val_{k}": _round(v) for k, v in metrics.items()})
    return row


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 6)


def selection_key(row: dict, metric: str) -> tuple[float, float]:
    """Larger is better: the validation ``metric`` (``-inf`` where undefined), then
    the lower validation loss."""
    value = row[f"val_{metric}"]
    return (float("-inf") if value is None else value, -row["val_loss"])


def _mean(values) -> float | None:
    values = [float(v) for v in values]
    return round(sum(values) / len(values), 6) if values else None


def _describe(row: dict, task: Task) -> str:
    def fmt(v):
        return "n/a" if v is None else f"{v:.3f}"

    def metrics(prefix: str, names: Sequence[str]) -> str:
        return " ".join(f"{m.replace('_', ' ')} {fmt(row[f'{prefix}_{m}'])}" for m in names)

    text = f"train loss {row['train_loss']:.4f} {metrics('train', task.train_metric_names)} | "
    if row["val_loss"] is None:
        return text + "no validation slides"
    return text + f"val loss {row['val_loss']:.4f} {metrics('val', task.metric_names)}"


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
    """Train (or resume training) a model and save it in ``out``.

    Args:
        slides: directory the labels CSV's slide names are relative to.
        labels: CSV with columns ``slide``, the task's target columns (``label`` for
            classification) and optionally ``case`` (``labels.read_labels``);
            problems in it are reported before training.
        out: run directory; when it already holds a run, training resumes from its
            last finished epoch with its saved model config and split, up to
            ``train_config.epochs`` (other saved training options are kept).
        model_config: the model and its task; default ``ModelConfig()``
            (classification), completed from the labels (``Task.complete``: e.g.
            the sorted labels as classes). Not modified.
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
        UserError: the labels changed under a resumed run (without ``resplit``);
            targets the task cannot learn from (e.g. fewer than two classes among the
            readable slides); no readable training slide.
    """
    from tqdm import tqdm

    log = log or tqdm.write
    out = ensure_directory(out)
    run_config, resuming = resolve_run(out, model_config, train_config, resplit)
    run_config, pool, external = read_run_labels(
        run_config, resuming, labels, slides, val_labels, val_slides
    )
    sets = splits.saved_split(out, pool, external) if resuming else None
    task = task_of(run_config.model)
    labelled = data.load(pool, external, run_config.model, task, log, progress, cache_dir)
    if sets is not None:
        train_set, val_set = splits.apply_split(sets, labelled)
    elif external is not None:
        train_set, val_set = labelled.slides, labelled.val_slides
    else:
        cfg = run_config.train
        train_set, val_set = splits.split(labelled.slides, task, cfg.val_fraction, cfg.seed)
    return fit(out, run_config, resuming, train_set, val_set, labelled, device, progress, log)


def fit(
    out: Path,
    run_config: RunConfig,
    resuming: bool,
    train_set: list[LabelledSlide],
    val_set: list[LabelledSlide],
    data: Labels,
    device: torch.device | str | None,
    progress: bool,
    log: Callable[[str], None],
) -> TrainResult:
    """The epochs of one run directory, from its last finished epoch on; stops early
    after ``patience`` epochs without a better validation metric."""
    cfg = run_config.train
    device = resolve_device(device)
    task = task_of(run_config.model)
    select = task.check_select(cfg.select_metric)
    if not train_set:
        raise UserError(f"{data.pool.source}: no readable training slides")
    history: list[dict] = []
    best_epoch = 0
    if resuming:
        last = checkpoint.LAST_MODEL_FILE  # runs of earlier versions have only the one file
        weights = last if (out / last).is_file() else checkpoint.MODEL_FILE
        model, _ = checkpoint.load_model(
            out, device, weights_file=weights, trust_feature_net=run_config.model.feature_net
        )
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
        splits.write_split(out, data, train_set, val_set)
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
            row = epoch_row(task, epoch, steps, val_steps, time.perf_counter() - began)
            history.append(row)
            best = history[best_epoch - 1] if best_epoch else None
            improved = (
                not val_set
                or best is None
                or (selection_key(row, select) > selection_key(best, select))
            )
            best_epoch = epoch if improved else best_epoch
            save_epoch(
                out, model, optimizer, run_config, history, best_epoch, data, train_set, val_set
            )
            described = _describe(row, task)
            log(f"epoch {epoch}: {described}" + (" (best)" if improved and val_set else ""))
    finally:
        reader.close()
    if best_epoch != len(history):
        model, _ = checkpoint.load_model(
            out, device, trust_feature_net=run_config.model.feature_net
        )
        log(f"best epoch {best_epoch} by validation {select}: {out / checkpoint.MODEL_FILE}")
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


def save_epoch(
    out, model, optimizer, run_config, history, best_epoch, data, train_set, val_set
) -> None:
    """Save the last and (when it is this epoch) the best model, the optimizer, the
    metrics and the training state after an epoch."""
    checkpoint.save_model(out, model, run_config, checkpoint.LAST_MODEL_FILE)
    if best_epoch == history[-1]["epoch"]:
        checkpoint.save_model(out, model, run_config)
    checkpoint.save_optimizer(out, optimizer)
    write_csv(out / METRICS_FILE, metric_columns(task_of(run_config.model)), history)
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
