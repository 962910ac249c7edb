"""Pretrained-size encoders under attention sampling vs full tiling, on a 100k² slide.

    pip install -e '.[timm]'     # timm and torchvision (see the README's install lines)
    python scripts/bench_encoders.py [--cache DIR] [--side 100000] [--tiles 48] [--repeats 3]

For each encoder (``timm:resnet18`` and ``timm:vit_small_patch16_224``, random
weights: timing does not depend on them) on the generated slide of
``scripts/bench_e2e.py`` (0.25 µm/px, written once into ``--cache``):

- **ATS prediction** per slide: open, thumbnail, tissue mask, attention, N = 16
  patches of 224² at exactly 0.5 µm/px, encoder, head (``classify_view``);
- **ATS training step** per slide: the same forward plus the backward and an
  optimizer step, the encoder fine-tuned and frozen (``training.run_slide``);
- **full tiling** (CLAM's feature-extraction pass): the same encoder on every tissue
  tile of 224² at 0.5 µm/px, read through the same patch source in batches of 16;
  timed on ``--tiles`` random tissue tiles and extrapolated to all of them.

Medians of ``--repeats`` passes after a warm-up; one torch thread, CPU.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_e2e import make_slide  # noqa: E402  (the same generated slide)

ENCODERS = ("timm:resnet18", "timm:vit_small_patch16_224")
PATCH, MPP, N_PATCHES, BATCH = 224, 0.5, 16, 16


def build(encoder: str, freeze: bool):
    from pipeline.app.config import ModelConfig
    from pipeline.app.model.encoders import resolve
    from pipeline.app.model.networks import SlideClassifier

    config = resolve(
        ModelConfig(
            class_names=("negative", "positive"),
            feature_net=encoder,
            patch_size=(PATCH, PATCH),
            n_patches=N_PATCHES,
            patch_mpp=MPP,
            low_res_max_side=512,
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


def predict_seconds(model, path: Path, repeats: int) -> float:
    from pipeline.app.prediction.inference import classify_view
    from pipeline.app.slide.views import open_view

    model.eval()

    def once(seed: int) -> None:
        with open_view(path, model.config) as view:
            classify_view(model, view, seed)

    return median_time(once, repeats)


def train_step_seconds(model, path: Path, repeats: int) -> float:
    from pipeline.app.config import TrainConfig
    from pipeline.app.slide.views import open_view
    from pipeline.app.training.loop import LabelledSlide, make_optimizer, run_slide

    optimizer = make_optimizer(model, TrainConfig())
    device = torch.device("cpu")
    model.train()

    def once(seed: int) -> None:
        # What a training step does per slide: the view is read once per run, so its
        # cost is outside the step (timed in prediction).
        generator = torch.Generator().manual_seed(seed + 1)
        run_slide(model, slide, device, generator, scale=1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    with open_view(path, model.config) as view:
        slide = LabelledSlide(path, 0, view.thumbnail, view.tissue)
    return median_time(once, repeats)


def tiling(model, path: Path, n_tiles: int) -> tuple[float, int]:
    """(seconds per tile, number of tissue tiles) of full tiling at 0.5 µm/px."""
    from pipeline.app.slide.views import open_view

    model.eval()
    with open_view(path, model.config) as view, torch.no_grad():
        source = view.patch_level  # the slide at exactly 0.5 µm/px
        H, W = source.shape[:2]
        h, w = view.tissue.shape
        cy = ((np.arange(H // PATCH) + 0.5) * PATCH * h / H).astype(int)
        cx = ((np.arange(W // PATCH) + 0.5) * PATCH * w / W).astype(int)
        ty, tx = np.nonzero(view.tissue[np.ix_(cy, cx)])
        pick = np.random.default_rng(0).choice(len(ty), size=min(n_tiles, len(ty)), replace=False)
        offsets = np.stack([ty[pick], tx[pick]], axis=1) * PATCH
        model.feature_net(torch.rand(2, 3, PATCH, PATCH))  # warm-up
        began = time.perf_counter()
        for start in range(0, len(offsets), BATCH):
            pixels = source.read_patches(offsets[start : start + BATCH], (PATCH, PATCH))
            x = torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 255.0
            model.feature_net(x)
        seconds = time.perf_counter() - began
    return seconds / len(offsets), len(ty)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cache", type=Path, default=Path("/tmp/ats-wsi-bench"))
    parser.add_argument("--side", type=int, default=100_000)
    parser.add_argument("--tiles", type=int, default=48)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--encoders", default=",".join(ENCODERS))
    args = parser.parse_args()
    torch.set_num_threads(1)
    args.cache.mkdir(parents=True, exist_ok=True)
    path = args.cache / f"mosaic-{args.side}.tiff"
    make_slide(path, args.side)

    print(
        f"slide {args.side}² at 0.25 µm/px; N = {N_PATCHES} patches of {PATCH}² at {MPP} µm/px;"
        f" torch {torch.__version__}, 1 thread"
    )
    print(
        "| encoder | ATS predict / slide | ATS train step, fine-tuned / frozen | "
        "full tiling / slide | tissue tiles | ratio (tiling / ATS predict) |"
    )
    print("|---|---|---|---|---|---|")
    for encoder in args.encoders.split(","):
        model = build(encoder, freeze=False)
        predict = predict_seconds(model, path, args.repeats)
        per_tile, n_tiles = tiling(model, path, args.tiles)
        tuned = train_step_seconds(model, path, args.repeats)
        frozen_model = build(encoder, freeze=True)
        frozen_model.load_state_dict(model.state_dict())
        frozen = train_step_seconds(frozen_model, path, args.repeats)
        full = per_tile * n_tiles
        print(
            f"| `{encoder}` | {predict:.2f} s | {tuned:.2f} s / {frozen:.2f} s | "
            f"{full:,.0f} s ({per_tile * 1e3:.0f} ms/tile, {args.tiles} timed) | "
            f"{n_tiles:,} | **{full / predict:,.0f}×** |",
            flush=True,
        )


if __name__ == "__main__":
    main()
