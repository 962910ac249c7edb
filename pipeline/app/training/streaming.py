"""Streaming training: the next slides are planned and read while the model computes.

One optimizer step trains on a mini-batch of ``B`` slides. Each step goes through
three stages::

    plan      read thread   views stacked to [B, 3, h, w]; attention with a snapshot
                            of the weights (no gradient); N positions per slide
    read      read thread   only the tiles under those patches, decoded once each
    estimate  main thread   attention again (with gradient), the feature net on all
                            B x N patches in one call, the expectation, backward, step

``depth`` is the number of batches in flight. With ``depth = 1`` the stages run one
after the other (the serial loop). With ``depth = d > 1`` the next ``d - 1`` batches
are planned and read while the current batch computes, so the main thread (and the
accelerator it drives) waits only when planning and reading are slower than a step.
A batch is planned with the attention weights of the moment it was submitted,
snapshotted then, so the run is deterministic for a seed whatever the threads'
timing; those weights are up to ``d - 1`` steps old when the batch is estimated. The
draws were made from the old attention ``q``, which is a proposal (docs/estimator.md,
sampling from a proposal), and ``AttentionSampling.estimate(..., stale=True)`` weighs
each draw by ``a / q`` with ``a`` the current attention. The estimate and its gradients therefore
stay unbiased; only their variance changes, and little, since one step moves the
attention little. (Draw and features are independent given the positions: the step
that made the weights stale does not bias anything.)

All randomness of an epoch (augmentation transforms, positions) is drawn in the read
thread, batch after batch in submission order: the same sequence as the serial loop.

Memory is bounded by the batches in flight, not by the dataset: views are loaded
from an on-disk cache (``ViewCache``) when a batch is planned, and slides are opened
through a bounded LRU of handles (``SlideHandles``).

Views of different shapes are stacked by padding them to the batch's largest shape
with glass (white, outside the mask); each slide's level is then seen through a
``PaddedSource`` of the matching larger shape, so the core's mapping of attention
cells to patches is unchanged on the real part (padding cells are masked out).
"""

from __future__ import annotations

import copy
import hashlib
import io
import os
from collections import OrderedDict, deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

import pipeline
from pipeline.app.config import ModelConfig
from pipeline.app.files import atomic_write_bytes
from pipeline.app.model.networks import SlideClassifier
from pipeline.app.slide.priors import slide_prior
from pipeline.app.slide.views import level0_mpp, open_view, patch_view
from pipeline.app.training.augment import Augmentation

if TYPE_CHECKING:
    import readers

GLASS = 255
"""Value of the padding of stacked views (white glass; outside the tissue mask)."""


@dataclass(frozen=True)
class CachedView:
    """A slide's attention view: thumbnail uint8 [h, w, 3] and tissue bool [h, w]."""

    thumbnail: np.ndarray
    tissue: np.ndarray


class ViewCache:
    """Attention views cached on disk, one ``.npz`` per slide and view configuration
    (``directory=None``: no disk, every view read from its slide).

    The key hashes the slide's absolute path, size and modification time with the
    view options of ``ModelConfig`` (view size or level, mpp, tissue mask), so an
    edited or replaced slide, or another view size, is computed afresh. Files hold
    plain arrays and are read with ``allow_pickle=False``.
    """

    FIELDS = (
        "low_res_max_side",
        "low_res_level",
        "low_res_mpp",
        "tissue_mask",
        "assume_mpp",
        "slide_mpp",
    )

    def __init__(self, directory: str | os.PathLike | None, config: ModelConfig) -> None:
        self.directory = None if directory is None else Path(directory)
        self.config = config

    def key(self, path: str | os.PathLike) -> str:
        stat = os.stat(path)
        options = [getattr(self.config, f) for f in self.FIELDS]
        text = f"{os.path.abspath(path)}|{stat.st_size}|{stat.st_mtime_ns}|{options}"
        return hashlib.sha256(text.encode()).hexdigest()[:32]

    def load(self, path: str | os.PathLike) -> CachedView:
        """The view of ``path``, from the cache or computed (and then cached)."""
        if self.directory is None:
            return self._read(path)
        file = self.directory / f"{self.key(path)}.npz"
        try:
            with np.load(file, allow_pickle=False) as data:
                return CachedView(data["thumbnail"], data["tissue"])
        except (FileNotFoundError, OSError, KeyError, ValueError):
            pass  # absent or unreadable (e.g. a crash mid-write elsewhere): recompute
        cached = self._read(path)
        buffer = io.BytesIO()
        np.savez(buffer, thumbnail=cached.thumbnail, tissue=cached.tissue)
        atomic_write_bytes(file, buffer.getvalue())
        return cached

    def _read(self, path: str | os.PathLike) -> CachedView:
        with open_view(path, self.config) as view:
            return CachedView(view.thumbnail, view.tissue)


class SlideHandles:
    """A bounded LRU of open slides in this process: no reopen per step, no growth
    with the dataset. The least recently used slide is closed beyond ``max_open``.

    Used from one thread at a time (the loop's reader thread, or a Dask worker task).
    """

    def __init__(self, max_open: int = 16) -> None:
        if max_open < 1:
            raise ValueError(f"max_open: expected >= 1, got {max_open}")
        self.max_open = max_open
        self._open: OrderedDict[str, readers.Slide] = OrderedDict()

    def slide(self, path: str | os.PathLike) -> readers.Slide:
        import readers

        key = os.path.abspath(path)
        slide = self._open.get(key)
        if slide is None:
            slide = self._open[key] = readers.open_slide(path)
            while len(self._open) > self.max_open:
                self._open.popitem(last=False)[1].close()
        self._open.move_to_end(key)
        return slide

    def __len__(self) -> int:
        return len(self._open)

    def close(self) -> None:
        while self._open:
            self._open.popitem()[1].close()


class PaddedSource:
    """A ``PatchSource`` showing ``source`` inside a larger image: its shape scaled by
    ``ratio`` ``(ry, rx)`` (>= 1, the view's padding ratios); patches beyond the source
    read as ``fill``, as beyond any image's edge.

    Example: a 200 x 256 view padded to 256 x 256 has ratio (1.28, 1.0); its 20,000 x
    25,600 level is seen as 25,600 x 25,600, so view pixel ``i`` still maps to level
    pixel ``i * 100`` on both axes."""

    def __init__(self, source: pipeline.PatchSource, ratio: tuple[float, float]) -> None:
        height, width, channels = source.shape
        self.source = source
        self.shape = (round(height * ratio[0]), round(width * ratio[1]), channels)

    def read_patches(self, offsets: np.ndarray, size: tuple[int, int], fill: int = 0):
        return self.source.read_patches(offsets, size, fill)


@dataclass
class StreamItem:
    """One training slide: its file (also the view cache key), its target (as the
    model's task parses it) and the weight of its loss (``None``: unweighted)."""

    path: Path
    target: Any
    weight: float | None = None


@dataclass
class StepResult:
    """One slide's forward: its term of the task's loss, the entropy regularizer, its
    scores (float [n_scores], ``Task.scores``) and its target."""

    loss: float
    entropy_loss: float
    scores: np.ndarray
    target: Any


@dataclass(frozen=True)
class StreamOptions:
    """How ``stream_epoch`` trains: ``batch_size`` slides per optimizer step,
    ``depth`` batches in flight (1: serial), the ``augmentation`` of each slide (its
    view when planned, its patch source when read: attention and patches stay
    aligned), the content ``prior`` of exploration (``priors``), mixed precision on
    CUDA (``amp``), and ``n_patches(slides trained on before a batch)``, the batch's
    patches per slide (``None``: the model's)."""

    batch_size: int = 1
    depth: int = 3
    augmentation: Augmentation = field(default_factory=Augmentation)
    prior: str = "none"
    amp: bool = False
    n_patches: Callable[[int], int] | None = None

    def __post_init__(self) -> None:
        if self.depth < 1:
            raise ValueError(f"depth: expected >= 1 batches in flight, got {self.depth}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size: expected >= 1 slides, got {self.batch_size}")


@dataclass
class _Planned:
    """A batch planned and read in the read thread, ready for its training step."""

    items: list[StreamItem]
    x_low: torch.Tensor  # [B, 3, h, w]
    mask: torch.Tensor | None  # [B, h, w]
    plan: pipeline.Plan
    patches: torch.Tensor  # [B, N, 3, p, p] float in [0, 1]
    offsets: torch.Tensor  # [B, N, 2]
    step: int  # optimizer steps done when submitted (the weights it was planned with)


@dataclass
class _Prepared:
    """What the read thread gives back for one submitted batch: the planned batch
    (None when none of its slides could be read) and the reasons of skipped slides."""

    planned: _Planned | None
    skipped: list[str]


class Reader:
    """Plans and reads batches in the background, in one thread with its own
    ``SlideHandles`` (the tile decoding itself uses the readers' thread pool). Jobs
    run one at a time in submission order."""

    def __init__(self, max_open: int = 16) -> None:
        self.handles = SlideHandles(max_open)
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="ats-read")

    def submit(self, job: Callable, *args) -> Future:
        """Run ``job(handles, *args)`` in the read thread."""
        return self._pool.submit(job, self.handles, *args)

    def close(self) -> None:
        self._pool.shutdown(wait=True)
        self.handles.close()


def read_batch(
    handles: SlideHandles,
    config: ModelConfig,
    paths: Sequence,
    plan: pipeline.Plan,
    low_size: tuple[int, int],
    ratios: Sequence[tuple[float, float]],
    transforms: Sequence | None = None,
    augmentation: Augmentation = Augmentation(),  # noqa: B008
) -> tuple:
    """Patches ``[B, N, 3, p, p]`` (float in [0, 1]) and offsets ``[B, N, 2]`` of
    ``plan``'s positions: slides ``paths`` read as ``config`` reads patches (slides
    opened through ``handles``), seen through their augmentation ``transforms`` and
    padded by ``ratios`` (>= 1, per slide ``(ry, rx)``) to the stacked views' size
    ``low_size``."""
    transforms = [None] * len(paths) if transforms is None else transforms
    sources = []
    for path, transform, ratio in zip(paths, transforms, ratios, strict=True):
        slide = handles.slide(path)
        source, _ = patch_view(slide, config, level0_mpp(slide, config))
        sources.append(PaddedSource(augmentation.source(source, transform), ratio))
    return pipeline.gather_patches(
        sources,
        plan.samples.cpu(),
        plan.attention_size,
        low_size,
        config.patch_size,
        config.receptive_field,
    )


@dataclass(frozen=True)
class _Planning:
    """How the read thread plans: the epoch's views, randomness and options, and a
    planner (the model's sampler with its own copy of the attention network, which
    takes the weights snapshotted at each submission)."""

    planner: pipeline.AttentionSampling
    config: ModelConfig
    views: object  # has load(path) -> CachedView
    generator: torch.Generator
    device: torch.device
    augmentation: Augmentation
    prior: str
    n_patches: Callable[[int], int] | None  # of the slides trained on; None: the model's

    @classmethod
    def of(cls, model: SlideClassifier, **options) -> _Planning:
        sampler = model.sampler
        shared = {id(sampler.feature): sampler.feature}  # only the attention is planned with
        return cls(copy.deepcopy(sampler, memo=shared), model.config, **options)


def _prepare(
    handles: SlideHandles,
    planning: _Planning,
    items: list[StreamItem],
    weights: dict,
    step: int,
    first_slide: int,
) -> _Prepared:
    """Plan and read one batch in the read thread (see the module docstring). Slides
    whose view or tiles cannot be read are skipped with their reason; a batch of
    unreadable tiles is skipped whole (one read serves the batch)."""
    loaded, skipped = [], []
    for item in items:
        try:
            loaded.append((item, planning.views.load(item.path)))
        except Exception as e:  # unreadable slide: reported, training goes on
            skipped.append(f"skipping {item.path}: {type(e).__name__}: {e}")
    if not loaded:
        return _Prepared(None, skipped)
    items, cached = (list(t) for t in zip(*loaded, strict=True))
    augmentation, generator = planning.augmentation, planning.generator
    transforms = [augmentation.choose(generator) for _ in cached]
    cached = [_transformed(v, augmentation, t) for v, t in zip(cached, transforms, strict=True)]
    x_low, mask, (h, w) = stack_views(cached, planning.device)
    priors = None
    if planning.prior != "none":
        priors = stack_priors(cached, planning.prior, (h, w), planning.device)
    planning.planner.attention.load_state_dict(weights)
    if planning.n_patches is not None:
        planning.planner.n_patches = planning.n_patches(first_slide)
    plan = planning.planner.plan(x_low, mask, generator, priors, step=first_slide)
    ratios = [(h / v.tissue.shape[0], w / v.tissue.shape[1]) for v in cached]
    try:
        patches, offsets = read_batch(
            handles,
            planning.config,
            [i.path for i in items],
            plan,
            (h, w),
            ratios,
            transforms,
            augmentation,
        )
    except Exception as e:  # an unreadable tile: the batch is skipped, not the run
        skipped.append(f"skipping {[str(i.path) for i in items]}: {type(e).__name__}: {e}")
        return _Prepared(None, skipped)
    return _Prepared(_Planned(items, x_low, mask, plan, patches, offsets, step), skipped)


def stack_priors(
    views: Sequence[CachedView], prior: str, shape: tuple[int, int], device: torch.device
) -> torch.Tensor:
    """Each view's content prior (``priors.slide_prior``), zero-padded to ``shape``
    ``(h, w)`` as ``stack_views`` pads: float [B, h, w]."""
    stacked = torch.zeros(len(views), *shape, device=device)
    for i, v in enumerate(views):
        prior_map = slide_prior(prior, v.thumbnail, v.tissue)
        stacked[i, : prior_map.shape[0], : prior_map.shape[1]] = torch.from_numpy(prior_map)
    return stacked


def stack_views(views: Sequence[CachedView], device: torch.device) -> tuple:
    """Views padded with glass to the largest shape and stacked.

    Returns ``x_low float [B, 3, h, w]`` in [0, 1], the tissue ``mask`` (BoolTensor
    ``[B, h, w]``, or None when every view is all tissue or all glass), and per view
    the padded size ``(h, w)`` of its own ``(h_i, w_i)``.
    """
    h = max(v.thumbnail.shape[0] for v in views)
    w = max(v.thumbnail.shape[1] for v in views)
    x = np.full((len(views), h, w, 3), GLASS, np.uint8)
    tissue = np.zeros((len(views), h, w), bool)
    for i, v in enumerate(views):
        vh, vw = v.tissue.shape
        x[i, :vh, :vw] = v.thumbnail[..., :3]
        # A view without detected tissue (or mask off) may be sampled anywhere on it.
        tissue[i, :vh, :vw] = v.tissue if v.tissue.any() else True
    x_low = (torch.from_numpy(x).to(device).permute(0, 3, 1, 2).float() / 255.0).contiguous()
    mask = None if tissue.all() else torch.from_numpy(tissue).to(device)
    return x_low, mask, (h, w)


def stream_epoch(
    model: SlideClassifier,
    optimizer: torch.optim.Optimizer,
    items: Sequence[StreamItem],
    views: ViewCache,
    generator: torch.Generator,
    device: torch.device,
    options: StreamOptions = StreamOptions(),  # noqa: B008 (frozen)
    reader: Reader | None = None,
    first_slide: int = 0,
    warn: Callable[[str], None] = print,
    progress: bool = False,
    on_step: Callable[[], None] | None = None,
) -> list[StepResult]:
    """One pass over ``items`` in mini-batches of ``options.batch_size`` slides,
    ``options.depth`` batches in flight. See the module docstring.

    ``views`` has ``load(path) -> CachedView`` (a ``ViewCache``, or views held in
    memory). ``first_slide`` counts the slides trained on before this epoch (the
    exploration schedules' step). A slide that cannot be read (view or tiles) is
    skipped with a ``warn`` message; training goes on. ``on_step`` is called after
    every optimizer step (benchmarks). Returns one ``StepResult`` per slide trained on.
    """
    from tqdm import tqdm

    depth, batch_size, amp = options.depth, options.batch_size, options.amp
    model.train()
    own_reader = reader is None
    reader = reader or Reader()
    planning = _Planning.of(
        model,
        views=views,
        generator=generator,
        device=device,
        augmentation=options.augmentation,
        prior=options.prior,
        n_patches=options.n_patches,
    )
    batches = [list(items[i : i + batch_size]) for i in range(0, len(items), batch_size)]
    queue: deque[tuple[int, Future]] = deque()  # (slides in the batch, its _Prepared)
    results: list[StepResult] = []
    steps, submitted, planned_slides = 0, 0, first_slide
    bar = tqdm(total=len(items), unit="slide", leave=False, disable=not progress)
    scaler = torch.amp.GradScaler(device.type, enabled=amp and device.type == "cuda")
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed shapes: N patches of one size
    try:
        while True:
            while len(queue) < depth and submitted < len(batches):
                batch = batches[submitted]
                # Cloned here, so the batch is planned with the weights of this moment.
                weights = {
                    k: v.detach().clone() for k, v in model.sampler.attention.state_dict().items()
                }
                queue.append(
                    (
                        len(batch),
                        reader.submit(_prepare, planning, batch, weights, steps, planned_slides),
                    )
                )
                submitted += 1
                planned_slides += len(batch)
            if not queue:
                return results
            size, future = queue.popleft()
            prepared = future.result()
            bar.update(size)
            for message in prepared.skipped:
                warn(message)
            if prepared.planned is None:
                continue
            results += _train_step(
                model,
                optimizer,
                prepared.planned,
                steps != prepared.planned.step,
                device,
                scaler,
            )
            steps += 1
            if on_step is not None:
                on_step()
    finally:
        bar.close()
        for _, future in queue:
            future.cancel()
        if own_reader:
            reader.close()


def _transformed(view: CachedView, augmentation: Augmentation, transform) -> CachedView:
    """``view`` under the slide's augmentation ``transform`` (geometry only)."""
    if transform is None:
        return view
    thumbnail = augmentation.image(torch.from_numpy(view.thumbnail).permute(2, 0, 1), transform)
    tissue = augmentation.image(torch.from_numpy(view.tissue), transform)
    return CachedView(thumbnail.permute(1, 2, 0).numpy(), tissue.numpy())


def _train_step(model, optimizer, planned: _Planned, stale: bool, device, scaler):
    task, items = model.task, planned.items
    patches = planned.patches
    if device.type == "cuda":
        # Pinned host memory lets the copy overlap the kernels still running.
        patches = patches.pin_memory().to(device, non_blocking=True)
    target = task.collate([i.target for i in items], device)
    with torch.autocast(device.type, enabled=scaler.is_enabled()):
        out = model.sampler.estimate(
            planned.x_low, patches, planned.offsets, planned.plan, planned.mask, stale=stale
        )
        outputs = model.head(out.features)
    losses = task.loss(outputs.float(), target)  # [B]
    weighted = losses
    if any(i.weight is not None for i in items):
        weights = [1.0 if i.weight is None else i.weight for i in items]
        weighted = losses * torch.tensor(weights, dtype=torch.float32, device=device)
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(weighted.mean() + out.regularizer).backward()
    scaler.step(optimizer)
    scaler.update()
    # A copy, not a view keeping the tensor alive for the epoch (see classify_view).
    scores = task.scores(outputs.detach().float()).cpu().numpy().copy()
    entropy = float(out.regularizer.detach())
    return [
        StepResult(float(loss), entropy, s, item.target)
        for loss, s, item in zip(losses.tolist(), scores, items, strict=True)
    ]
