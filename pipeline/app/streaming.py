"""Streaming training: the next slides' tiles are read while the model computes.

One optimizer step trains on a mini-batch of ``B`` slides. Each step goes through
three stages::

    plan      main thread   views stacked to [B, 3, h, w]; attention with the current
                            weights; N positions sampled per slide (no gradient)
    read      background    only the tiles under those patches, decoded once each
    estimate  main thread   attention again (with gradient), the feature net on all
                            B x N patches in one call, the expectation, backward, step

``depth`` is the number of batches in flight. With ``depth = 1`` the stages run one
after the other (the serial loop). With ``depth = d > 1`` the next ``d - 1`` batches
are planned and their reads submitted before the current batch computes, so reading
overlaps computing and the accelerator waits only when a read is slower than a step.
Their positions then come from weights up to ``d - 1`` steps old: the draws were made
from the old attention ``q``, which is a proposal in DESIGN section 4b's sense, and
``AttentionSampling.estimate(..., stale=True)`` weighs each draw by ``a / q`` with
``a`` the current attention. The estimate and its
gradients therefore stay unbiased; only their variance changes, and little, since
one step moves the attention little. (Draw and features are independent given the
positions: the step that made the weights stale does not bias anything.)

Memory is bounded by the batches in flight, not by the dataset: views are loaded
from an on-disk cache (``ViewCache``) when a batch is planned, and slides are opened
through a bounded LRU of handles (``SlideHandles``).

Views of different shapes are stacked by padding them to the batch's largest shape
with glass (white, outside the mask); each slide's level is then seen through a
``PaddedSource`` of the matching larger shape, so the core's mapping of attention
cells to patches is unchanged on the real part (padding cells are masked out).
"""

from __future__ import annotations

import hashlib
import io
import os
from collections import OrderedDict, deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F

import pipeline
from pipeline.app.augment import Augmentation
from pipeline.app.config import ModelConfig
from pipeline.app.files import atomic_write_bytes
from pipeline.app.models import SlideClassifier
from pipeline.app.priors import slide_prior
from pipeline.app.slides import level0_mpp, open_view, patch_view

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

    FIELDS = ("low_res_max_side", "low_res_level", "low_res_mpp", "tissue_mask", "assume_mpp",
              "slide_mpp")  # fmt: skip

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
    """One training slide: its file, class index and view cache key."""

    path: Path
    label: int


@dataclass
class StepResult:
    """One slide's forward: cross-entropy, entropy regularizer, class probabilities
    (float [n_classes]) and whether the argmax was right."""

    loss: float
    entropy_loss: float
    correct: bool
    probs: np.ndarray


@dataclass
class _Planned:
    items: list[StreamItem]
    x_low: torch.Tensor  # [B, 3, h, w]
    mask: torch.Tensor | None  # [B, h, w]
    plan: pipeline.Plan
    read: Future  # -> (patches [B, N, 3, p, p] float in [0, 1], offsets [B, N, 2])
    step: int  # optimizer steps done when planned


class Reader:
    """Reads the patches of planned batches in the background, in one thread with its
    own ``SlideHandles`` (the tile decoding itself uses the readers' thread pool)."""

    def __init__(self, max_open: int = 16) -> None:
        self.handles = SlideHandles(max_open)
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="ats-read")

    def submit(self, config: ModelConfig, paths, transforms, ratios, plan, low_size,
               augmentation: Augmentation) -> Future:  # fmt: skip
        """Read the patches of ``plan``: slides ``paths`` seen as ``config`` reads
        patches, through their augmentation ``transforms`` and padded by ``ratios`` to
        ``low_size``. The future gives ``_read_batch``'s pair."""
        args = (config, augmentation, paths, transforms, ratios, plan.samples.cpu(),
                plan.attention_size, low_size)  # fmt: skip
        return self._pool.submit(_read_batch, self.handles, *args)

    def close(self) -> None:
        self._pool.shutdown(wait=True)
        self.handles.close()


def _read_batch(handles, config, augmentation, paths, transforms, ratios, samples,
                attention_size, low_size):  # fmt: skip
    """Patches ``[B, N, 3, p, p]`` (float in [0, 1]) and offsets ``[B, N, 2]`` of a batch."""
    sources = []
    for path, transform, ratio in zip(paths, transforms, ratios, strict=True):
        slide = handles.slide(path)
        source, _ = patch_view(slide, config, level0_mpp(slide, config))
        sources.append(PaddedSource(augmentation.source(source, transform), ratio))
    return pipeline.gather_patches(
        sources, samples, attention_size, low_size, config.patch_size, config.receptive_field
    )


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
    batch_size: int,
    generator: torch.Generator,
    device: torch.device,
    depth: int = 3,
    reader: Reader | None = None,
    warn: Callable[[str], None] = print,
    augmentation: Augmentation = Augmentation(),  # noqa: B008 (frozen)
    prior: str = "none",
    first_slide: int = 0,
    class_weights: np.ndarray | None = None,
    amp: bool = False,
    progress: bool = False,
    on_step: Callable[[], None] | None = None,
) -> list[StepResult]:
    """One pass over ``items`` in mini-batches of ``batch_size`` slides, ``depth``
    batches in flight (1: serial). See the module docstring.

    ``views`` has ``load(path) -> CachedView`` (a ``ViewCache``, or views held in
    memory). ``augmentation`` transforms each slide (its view when planned, its patch
    source when read: attention and patches stay aligned). ``prior`` names the
    content prior of exploration (``priors``); ``first_slide`` counts the slides
    trained on before this epoch (the exploration schedules' step). ``class_weights``
    (float [n_classes]) weighs each slide's loss. ``amp``: mixed precision on CUDA.
    A slide that cannot be read (view or tiles) is skipped with a ``warn`` message;
    training goes on. ``on_step`` is called after
    every optimizer step (benchmarks). Returns one ``StepResult`` per slide trained on.
    """
    from tqdm import tqdm

    if depth < 1:
        raise ValueError(f"depth: expected >= 1 batches in flight, got {depth}")
    model.train()
    own_reader = reader is None
    reader = reader or Reader()
    batches = iter([list(items[i : i + batch_size]) for i in range(0, len(items), batch_size)])
    queue: deque[_Planned] = deque()
    results: list[StepResult] = []
    steps, planned_slides = 0, first_slide
    bar = tqdm(total=len(items), unit="slide", leave=False, disable=not progress)
    scaler = torch.amp.GradScaler(device.type, enabled=amp and device.type == "cuda")
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed shapes: N patches of one size
    try:
        while True:
            while len(queue) < depth:
                planned = _plan_next(model, batches, views, generator, device, reader, steps,
                                     planned_slides, prior, augmentation, warn)  # fmt: skip
                if planned is None:
                    break
                planned_slides += len(planned.items)
                queue.append(planned)
            if not queue:
                return results
            bar.update(len(queue[0].items))
            planned = queue.popleft()
            try:
                patches, offsets = planned.read.result()
            except Exception as e:  # an unreadable tile: the batch is skipped, not the run
                warn(f"skipping {[str(i.path) for i in planned.items]}: {type(e).__name__}: {e}")
                continue
            results += _train_step(model, optimizer, planned, patches, offsets, steps, device,
                                   class_weights, scaler)  # fmt: skip
            steps += 1
            if on_step is not None:
                on_step()
    finally:
        bar.close()
        for planned in queue:
            planned.read.cancel()
        if own_reader:
            reader.close()


def _plan_next(model, batches: Iterator, views, generator, device, reader, steps, slides,
               prior, augmentation, warn):  # fmt: skip
    """Plan the next batch that has readable views, or None at the end."""
    for batch in batches:
        loaded = []
        for item in batch:
            try:
                loaded.append((item, views.load(item.path)))
            except Exception as e:  # unreadable slide: reported, training goes on
                warn(f"skipping {item.path}: {type(e).__name__}: {e}")
        if not loaded:
            continue
        items, cached = zip(*loaded, strict=True)
        transforms = [augmentation.choose(generator) for _ in cached]
        cached = [_transformed(v, augmentation, t) for v, t in zip(cached, transforms, strict=True)]
        x_low, mask, (h, w) = stack_views(cached, device)
        priors = None
        if prior != "none":
            priors = torch.zeros(x_low.shape[0], h, w, device=device)
            for i, v in enumerate(cached):
                prior_map = slide_prior(prior, v.thumbnail, v.tissue)
                priors[i, : prior_map.shape[0], : prior_map.shape[1]] = torch.from_numpy(prior_map)
        plan = model.sampler.plan(x_low, mask, generator, priors, step=slides)
        ratios = [(h / v.tissue.shape[0], w / v.tissue.shape[1]) for v in cached]
        read = reader.submit(model.config, [i.path for i in items], transforms, ratios, plan,
                             (h, w), augmentation)  # fmt: skip
        return _Planned(list(items), x_low, mask, plan, read, steps)
    return None


def _transformed(view: CachedView, augmentation: Augmentation, transform) -> CachedView:
    """``view`` under the slide's augmentation ``transform`` (geometry only)."""
    if transform is None:
        return view
    thumbnail = augmentation.image(torch.from_numpy(view.thumbnail).permute(2, 0, 1), transform)
    tissue = augmentation.image(torch.from_numpy(view.tissue), transform)
    return CachedView(thumbnail.permute(1, 2, 0).numpy(), tissue.numpy())


def _train_step(model, optimizer, planned: _Planned, patches, offsets, steps, device,
                class_weights, scaler):  # fmt: skip
    if device.type == "cuda":
        # Pinned host memory lets the copy overlap the kernels still running.
        patches = patches.pin_memory().to(device, non_blocking=True)
    target = torch.tensor([i.label for i in planned.items], device=device)
    with torch.autocast(device.type, enabled=scaler.is_enabled()):
        out = model.sampler.estimate(planned.x_low, patches, offsets, planned.plan,
                                     planned.mask, stale=planned.step != steps)  # fmt: skip
        logits = model.head(out.features)
    losses = F.cross_entropy(logits.float(), target, reduction="none")  # [B]
    weighted = losses if class_weights is None else losses * _on(class_weights, device)[target]
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(weighted.mean() + out.regularizer).backward()
    scaler.step(optimizer)
    scaler.update()
    probs = logits.detach().float().softmax(1).cpu().numpy()
    entropy = float(out.regularizer.detach())
    return [
        StepResult(float(loss), entropy, int(p.argmax()) == item.label, p)
        for loss, p, item in zip(losses.tolist(), probs, planned.items, strict=True)
    ]


def _on(weights: np.ndarray, device: torch.device) -> torch.Tensor:
    return torch.as_tensor(weights, dtype=torch.float32, device=device)

