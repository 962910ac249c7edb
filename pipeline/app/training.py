"""Training a slide classifier from a directory of slides and a labels CSV.

Each slide runs through the network alone (slides of any size mix) and gradients
are accumulated over ``TrainConfig.batch_size`` slides per optimizer step. Slide
thumbnails and tissue masks are read once, at the start; each step then reopens its
slide and reads only the sampled patches.

A run directory holds the model files of ``checkpoint`` plus ``metrics.csv`` (one
row per epoch) and ``train_state.json`` (epochs done, the split, skipped slides).
Everything is rewritten atomically after each epoch; training again into the same
directory resumes after the last finished epoch. Each epoch's slide order and
patch sampling are seeded by ``(seed, epoch)`` through explicit generators (the
global torch seed is never touched), so a resumed run follows the same path as an
uninterrupted one.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.app import checkpoint
from pipeline.app.config import ModelConfig, RunConfig, TrainConfig
from pipeline.app.errors import UserError
from pipeline.app.files import atomic_write_bytes, ensure_directory, read_table, write_csv
from pipeline.app.inference import slide_seed
from pipeline.app.models import SlideClassifier
from pipeline.app.runtime import resolve_device
from pipeline.app.slides import low_res_tensor, open_view, sampling_mask

METRICS_FILE = "metrics.csv"
STATE_FILE = "train_state.json"
METRIC_COLUMNS = (
    "epoch", "train_loss", "train_accuracy", "val_loss", "val_accuracy", "entropy_loss", "seconds",
)  # fmt: skip


@dataclass
class LabelledSlide:
    """A readable training slide with its attention view cached in memory.

    Attributes:
        path: the slide file; ``label``: class index.
        thumbnail: uint8 [h, w, 3]; ``tissue``: bool [h, w].
        patch_level: index of the level patches are read from.
    """

    path: Path
    label: int
    thumbnail: np.ndarray
    tissue: np.ndarray
    patch_level: int


def read_labels(
    labels_csv: str | os.PathLike, slides_dir: str | os.PathLike
) -> list[tuple[Path, str]]:
    """``(slide path, label)`` pairs of a CSV with columns ``slide`` and ``label``;
    relative slide names are taken inside ``slides_dir``."""
    rows = read_table(labels_csv, required=("slide", "label"))
    return [(Path(slides_dir) / r["slide"], r["label"].strip()) for r in rows]


def load_slides(
    pairs: list[tuple[Path, str]],
    config: ModelConfig,
    warn: Callable[[str], None],
    progress: bool,
) -> tuple[list[LabelledSlide], list[str]]:
    """Read every labelled slide's view; unreadable or missing ones are reported
    through ``warn`` and returned as messages, not raised."""
    from tqdm import tqdm

    slides, skipped = [], []
    for path, label in tqdm(pairs, desc="reading slides", unit="slide", disable=not progress):
        if label not in config.class_names:
            skipped.append(f"{path}: label {label!r} not in classes {list(config.class_names)}")
            warn(f"skipping {skipped[-1]}")
            continue
        try:
            with open_view(path, config) as view:
                level = view.patch_level.index
                slides.append(
                    LabelledSlide(
                        path, config.class_names.index(label), view.thumbnail, view.tissue, level
                    )
                )
        except Exception as e:  # every unreadable slide is reported and skipped
            skipped.append(f"{path}: {type(e).__name__}: {e}")
            warn(f"skipping {skipped[-1]}")
    return slides, skipped


def split(slides: list[LabelledSlide], fraction: float, seed: int) -> tuple[list, list]:
    """Stratified train/validation split: ``round(fraction * n_class)`` slides of
    each class (at least one when the class has two or more) go to validation."""
    rng = np.random.default_rng([seed, 7])
    train, val = [], []
    for label in sorted({s.label for s in slides}):
        members = [s for s in slides if s.label == label]
        order = rng.permutation(len(members))
        n_val = round(fraction * len(members))
        if fraction > 0 and len(members) >= 2:
            n_val = min(max(n_val, 1), len(members) - 1)
        val.extend(members[i] for i in order[:n_val])
        train.extend(members[i] for i in order[n_val:])
    return train, val


@dataclass
class StepResult:
    loss: float
    entropy_loss: float
    correct: bool


def run_slide(
    model: SlideClassifier,
    slide: LabelledSlide,
    device: torch.device,
    generator: torch.Generator,
    scale: float | None = None,
) -> StepResult:
    """One slide forward; with a ``scale``, also the backward of ``loss * scale``."""
    import readers

    x_low = low_res_tensor(slide.thumbnail, device)
    target = torch.tensor([slide.label], device=device)
    with readers.open_slide(slide.path) as opened:
        out = model.classify(
            x_low, opened.levels[slide.patch_level], sampling_mask(slide.tissue, device), generator
        )
        loss = F.cross_entropy(out.logits, target)
        regularizer = out.draw.regularizer
        if scale is not None:
            ((loss + regularizer) * scale).backward()
    correct = int(out.logits.argmax(1)) == slide.label
    return StepResult(float(loss.detach()), float(regularizer.detach()), correct)


@dataclass
class TrainResult:
    """``history``: one dict per epoch (METRIC_COLUMNS); ``skipped``: messages."""

    run_dir: Path
    model: SlideClassifier
    config: RunConfig
    history: list[dict]
    skipped: list[str]


def resolve_run(
    out: Path,
    pairs: list[tuple[Path, str]],
    model_config: ModelConfig | None,
    train_config: TrainConfig | None,
) -> tuple[RunConfig, bool]:
    """The run's configuration and whether it resumes a run saved in ``out``.

    A resumed run keeps its saved configuration, except the number of epochs, which
    ``train_config`` may extend."""
    if (out / STATE_FILE).is_file() and (out / checkpoint.MODEL_FILE).is_file():
        saved = checkpoint.read_config(out)
        epochs = (train_config or saved.train).epochs
        return RunConfig(saved.model, replace(saved.train, epochs=epochs)), True
    classes = tuple(sorted({label for _, label in pairs}))
    model_config = model_config or ModelConfig(class_names=classes)
    return RunConfig(model_config, train_config or TrainConfig()), False


def new_model(config: ModelConfig, seed: int, device: torch.device) -> SlideClassifier:
    """A freshly initialised classifier; its weights depend on ``seed`` only."""
    # The networks initialise from torch's global generator: fork it, so that the
    # caller's random state is left as it was.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return SlideClassifier(config).to(device)


def train_epoch(
    model: SlideClassifier,
    optimizer: torch.optim.Optimizer,
    slides: list[LabelledSlide],
    config: TrainConfig,
    epoch: int,
    device: torch.device,
    progress: bool,
) -> list[StepResult]:
    """One pass over ``slides`` in the epoch's order, gradients accumulated over
    ``config.batch_size`` slides per optimizer step."""
    from tqdm import tqdm

    model.train()
    generator = torch.Generator(device).manual_seed(slide_seed(config.seed, f"epoch-{epoch}"))
    order = np.random.default_rng([config.seed, epoch]).permutation(len(slides))
    steps = []
    bar = tqdm(order, desc=f"epoch {epoch}/{config.epochs}", leave=False, disable=not progress)
    for n, i in enumerate(bar, start=1):
        steps.append(run_slide(model, slides[i], device, generator, 1.0 / config.batch_size))
        if n % config.batch_size == 0 or n == len(order):
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    return steps


@torch.no_grad()
def evaluate(
    model: SlideClassifier, slides: list[LabelledSlide], seed: int, device: torch.device
) -> list[StepResult]:
    """Each slide once, its sampling seeded by ``slide_seed(seed, path)`` (the same
    draws every epoch, so epochs compare)."""
    model.eval()
    return [
        run_slide(model, s, device, torch.Generator(device).manual_seed(slide_seed(seed, s.path)))
        for s in slides
    ]


def train(
    slides: str | os.PathLike,
    labels: str | os.PathLike,
    out: str | os.PathLike,
    model_config: ModelConfig | None = None,
    train_config: TrainConfig | None = None,
    device: torch.device | str | None = None,
    progress: bool = True,
    log: Callable[[str], None] | None = None,
) -> TrainResult:
    """Train (or resume training) a classifier and save it in ``out``.

    Args:
        slides: directory the labels CSV's slide names are relative to.
        labels: CSV with columns ``slide`` (file name) and ``label`` (class name).
        out: run directory; when it already holds a run, training resumes from its
            last finished epoch with its saved model config, up to
            ``train_config.epochs`` (other saved training options are kept).
        model_config: default ``ModelConfig`` with the sorted labels as classes.
        train_config: default ``TrainConfig()``.
        device: default CUDA when available.
        log: receives one line per epoch and per skipped slide (default: tqdm.write).
    """
    from tqdm import tqdm

    log = log or tqdm.write
    out = ensure_directory(out)
    device = resolve_device(device)
    pairs = read_labels(labels, slides)
    run_config, resuming = resolve_run(out, pairs, model_config, train_config)
    cfg = run_config.train
    loaded, skipped = load_slides(pairs, run_config.model, log, progress)
    train_set, val_set = split(loaded, cfg.val_fraction, cfg.seed)
    if not train_set:
        raise UserError(f"{labels}: no readable training slides ({len(skipped)} skipped)")

    history: list[dict] = []
    if resuming:
        model, _ = checkpoint.load_model(out, device)
    else:
        model = new_model(run_config.model, cfg.seed, device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    if resuming:
        checkpoint.load_optimizer(out, optimizer)
        history = json.loads((out / STATE_FILE).read_text())["history"]
        log(f"resuming {out} after epoch {len(history)}")
    out.mkdir(parents=True, exist_ok=True)

    for epoch in range(len(history) + 1, cfg.epochs + 1):
        began = time.perf_counter()
        steps = train_epoch(model, optimizer, train_set, cfg, epoch, device, progress)
        val_steps = evaluate(model, val_set, cfg.seed, device)
        row = {
            "epoch": epoch,
            "train_loss": _mean(s.loss for s in steps),
            "train_accuracy": _mean(s.correct for s in steps),
            "val_loss": _mean(s.loss for s in val_steps),
            "val_accuracy": _mean(s.correct for s in val_steps),
            "entropy_loss": _mean(s.entropy_loss for s in steps),
            "seconds": round(time.perf_counter() - began, 3),
        }
        history.append(row)
        save_epoch(out, model, optimizer, run_config, history, train_set, val_set, skipped)
        log(
            f"epoch {epoch}: train loss {row['train_loss']:.4f} acc {row['train_accuracy']:.3f}"
            f" | val loss {row['val_loss']:.4f} acc {row['val_accuracy']:.3f}"
        )
    model.eval()
    return TrainResult(out, model, run_config, history, skipped)


def _mean(values) -> float:
    values = [float(v) for v in values]
    return round(sum(values) / len(values), 6) if values else float("nan")


def save_epoch(out, model, optimizer, run_config, history, train_set, val_set, skipped) -> None:
    """Save the model, optimizer, metrics and training state after an epoch."""
    checkpoint.save_model(out, model, run_config)
    checkpoint.save_optimizer(out, optimizer)
    write_csv(out / METRICS_FILE, METRIC_COLUMNS, history)
    state = {
        "epochs_done": history[-1]["epoch"],
        "history": history,
        "train_slides": [str(s.path) for s in train_set],
        "val_slides": [str(s.path) for s in val_set],
        "skipped": skipped,
    }
    # Written last: its presence marks the epoch's files as complete.
    atomic_write_bytes(out / STATE_FILE, json.dumps(state, indent=1).encode())
