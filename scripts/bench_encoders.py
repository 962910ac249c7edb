"""Pretrained-size encoders under attention sampling vs full tiling, on a 100k² slide.

    pip install -e '.[timm]'     # timm and torchvision (see the README's install lines)
    python scripts/bench_encoders.py [--cache DIR] [--side 100000] [--tiles 48] [--repeats 3]
                                      [--encoders timm:resnet18,...] [--patch 224] [--patches 16]

For each encoder (``timm:resnet18`` and ``timm:vit_small_patch16_224``, random
weights: timing does not depend on them) on the generated slide of
``scripts/bench_e2e.py`` (0.25 µm/px, written once into ``--cache``):

- **ATS prediction** per slide: open, thumbnail, tissue mask, attention, K = 8
  draws (``PredictConfig.draws``) of N = 16 (``--patches``) patches of 224²
  (``--patch``) at exactly 0.5 µm/px, the encoder on each distinct position, head
  (``classify_view``); the table gives the distinct positions of the last run;
- **ATS training step** per slide: what ``ats-wsi train`` does for a batch of one
  slide (``streaming.stream_epoch``, serial): attention, sampling, the patches read,
  the forward, the backward and an optimizer step, the encoder fine-tuned and frozen;
- **full tiling** (CLAM's feature-extraction pass): the same encoder on every tissue
  tile of 224² at 0.5 µm/px, read through the same patch source in batches of 16;
  timed on ``--tiles`` random tissue tiles and extrapolated to all of them.

The encoder sees the patches at their size (``feature_input_size``), 224² for both
default encoders. Medians of ``--repeats`` passes after a warm-up; one torch thread,
CPU. The 1-minute load average before and after is printed: the machine may be shared.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_e2e import make_slide  # noqa: E402  (the same generated slide)

from pipeline.app.config import PredictConfig  # noqa: E402

if TYPE_CHECKING:
    from pipeline.app.training.streaming import CachedView

ENCODERS = ("timm:resnet18", "timm:vit_small_patch16_224")
PATCH, MPP, N_PATCHES, BATCH = 224, 0.5, 16, 16


class InMemoryViews(dict):
    """Attention views held in memory, keyed by path, loaded as ``stream_epoch`` loads
    views: a training run reads each slide's view once, so the step does not."""

    def load(self, path: Path) -> CachedView:
        return self[path]


def build(encoder: str, freeze: bool, patch: int = PATCH, n_patches: int = N_PATCHES):
    """The benchmark's ``SlideClassifier`` (seed 0) with ``encoder``, random weights."""
    from pipeline.app.config import ModelConfig
    from pipeline.app.model.encoders import resolve
    from pipeline.app.model.networks import SlideClassifier

    config = resolve(
        ModelConfig(
            class_names=("negative", "positive"),
            feature_net=encoder,
            patch_size=(patch, patch),
            n_patches=n_patches,
            patch_mpp=MPP,
            low_res_max_side=512,
            feature_input_size=(patch, patch),
            freeze_features=freeze,
        )
    )
    torch.manual_seed(0)
    return SlideClassifier(config)


def median_time(fn, repeats: int) -> float:
    fn(-1)  # warm-up: imports, allocator, file cache
    times = []
    for seed in range(repeats):
        began = time.perf_counter()
        fn(seed)
        times.append(time.perf_counter() - began)
    return float(np.median(times))


def predict_seconds(model, path: Path, repeats: int) -> tuple[float, int]:
    """(median seconds, distinct positions of the last run) of ATS prediction."""
    from pipeline.app.prediction.inference import classify_view
    from pipeline.app.slide.views import open_view

    model.eval()
    distinct = []

    def once(seed: int) -> None:
        with open_view(path, model.config) as view:
            distinct.append(classify_view(model, view, seed).distinct_patches)

    return median_time(once, repeats), distinct[-1]


def train_step_seconds(model, path: Path, repeats: int) -> float:
    """Median seconds of one training step on the slide, as ``ats-wsi train`` takes it:
    ``stream_epoch`` over a batch of this one slide, serially (depth 1)."""
    from pipeline.app.config import TrainConfig
    from pipeline.app.slide.views import open_view
    from pipeline.app.training.loop import make_optimizer
    from pipeline.app.training.streaming import (
        CachedView,
        Reader,
        StreamItem,
        StreamOptions,
        stream_epoch,
    )

    optimizer = make_optimizer(model, TrainConfig())
    device = torch.device("cpu")
    # The view is read once per run, so its cost is outside the step (timed in
    # prediction); the reader keeps the slide open from step to step, as a run does.
    with open_view(path, model.config) as view:
        views = InMemoryViews({path: CachedView(view.thumbnail, view.tissue)})
    items = [StreamItem(path, 0)]
    serial = StreamOptions(batch_size=1, depth=1)
    reader = Reader()

    def once(seed: int) -> None:
        generator = torch.Generator().manual_seed(seed + 1)
        stream_epoch(model, optimizer, items, views, generator, device, serial, reader)

    try:
        return median_time(once, repeats)
    finally:
        reader.close()


def tiling(model, path: Path, n_tiles: int) -> tuple[float, int]:
    """(seconds per tile, number of tissue tiles) of full tiling at 0.5 µm/px."""
    from pipeline.app.slide.views import open_view

    model.eval()
    patch = model.config.patch_size[0]
    with open_view(path, model.config) as view, torch.no_grad():
        source = view.patch_level  # the slide at exactly 0.5 µm/px
        H, W = source.shape[:2]
        h, w = view.tissue.shape
        cy = ((np.arange(H // patch) + 0.5) * patch * h / H).astype(int)
        cx = ((np.arange(W // patch) + 0.5) * patch * w / W).astype(int)
        ty, tx = np.nonzero(view.tissue[np.ix_(cy, cx)])
        pick = np.random.default_rng(0).choice(len(ty), size=min(n_tiles, len(ty)), replace=False)
        offsets = np.stack([ty[pick], tx[pick]], axis=1) * patch
        model.feature_net(torch.rand(2, 3, patch, patch))  # warm-up
        began = time.perf_counter()
        for start in range(0, len(offsets), BATCH):
            pixels = source.read_patches(offsets[start : start + BATCH], (patch, patch))
            x = torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 255.0
            model.feature_net(x)
        seconds = time.perf_counter() - began
    return seconds / len(offsets), len(ty)


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark of ``argv`` and print its table (Markdown); the exit status."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cache", type=Path, default=Path("/tmp/ats-wsi-bench"))
    parser.add_argument("--side", type=int, default=100_000)
    parser.add_argument("--tiles", type=int, default=48)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--encoders", default=",".join(ENCODERS))
    parser.add_argument("--patch", type=int, default=PATCH, help="patch side in pixels")
    parser.add_argument("--patches", type=int, default=N_PATCHES, help="patches per slide (N)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    draws = PredictConfig.draws
    load_before = os.getloadavg()[0]
    args.cache.mkdir(parents=True, exist_ok=True)
    path = args.cache / f"mosaic-{args.side}.tiff"
    make_slide(path, args.side)

    print(
        f"slide {args.side}² at 0.25 µm/px; N = {args.patches} patches of {args.patch}² at "
        f"{MPP} µm/px; torch {torch.__version__}, 1 thread"
    )
    print(
        "| encoder | ATS predict / slide | distinct patches (of K x N) | "
        "ATS train step, fine-tuned / frozen | "
        "full tiling / slide | tissue tiles | ratio (tiling / ATS predict) |"
    )
    print("|---|---|---|---|---|---|---|")
    for encoder in args.encoders.split(","):
        model = build(encoder, False, args.patch, args.patches)
        predict, distinct = predict_seconds(model, path, args.repeats)
        per_tile, n_tiles = tiling(model, path, args.tiles)
        tuned = train_step_seconds(model, path, args.repeats)
        frozen_model = build(encoder, True, args.patch, args.patches)
        frozen_model.load_state_dict(model.state_dict())
        frozen = train_step_seconds(frozen_model, path, args.repeats)
        full = per_tile * n_tiles
        print(
            f"| `{encoder}` | {predict:.2f} s | {distinct} (of {draws * args.patches}) | "
            f"{tuned:.2f} s / {frozen:.2f} s | "
            f"{full:,.0f} s ({per_tile * 1e3:.0f} ms/tile, {args.tiles} timed) | "
            f"{n_tiles:,} | **{full / predict:,.0f}×** |",
            flush=True,
        )
    print(f"\nload average (1 min): {load_before:.2f} before, {os.getloadavg()[0]:.2f} after")
    return 0


if __name__ == "__main__":
    sys.exit(main())
