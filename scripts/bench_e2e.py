"""End-to-end benchmark: attention sampling on a gigapixel slide vs full tiling.

    python scripts/bench_e2e.py [--cache DIR] [--big 100000] [--small 10000] [--tiles 2000]

Builds (once, cached in ``--cache``) two generated JPEG pyramids, ``small`` and
``big`` pixels square, about a third tissue, and prints in one run:

- ATS time per slide on the big slide (open, thumbnail, tissue mask, attention,
  N patch reads, feature network, head) against full tiling: the same feature
  network on every tissue tile of level 0. Full tiling is timed on a random
  subset of ``--tiles`` tissue tiles and extrapolated to all of them.
- peak RSS of each (each runs in its own subprocess, which reports
  ``ru_maxrss``), and ATS's peak RSS on the small vs the big slide;
- bytes read from the file (``rchar`` of ``/proc/self/io`` over the slide's
  processing) against the file size;
- the 1-minute load average before and after (the machine may be shared).

Slides are rendered cheaply: level-0 tiles are copies of a few precomputed
synthetic tissue tiles (``pipeline.app.synth``), chosen per tile by a hash, placed
where the synthetic layout has tissue; coarser levels sample the same mosaic.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

TILE = 256
N_TEXTURES = 8


class MosaicSlide:
    """Renderer of a big synthetic slide from a few tissue tiles.

    ``tissue[ty, tx]`` (bool, one entry per level-0 tile) comes from a synthetic
    layout's blobs; each tissue tile shows ``textures[k]`` with ``k`` a hash of
    the tile index.
    """

    def __init__(self, side: int, seed: int = 0) -> None:
        from pipeline.app.synth import BACKGROUND, make_layout

        layout = make_layout((side, side), seed=seed, positive=False, cell_density=0.0)
        n = -(-side // TILE)
        centres = (np.arange(n) + 0.5) * TILE
        self.tissue = layout.tissue_inside(centres[:, None], centres[None, :])
        self.textures = _tissue_tiles(seed)
        self.background = np.broadcast_to(BACKGROUND.astype(np.uint8), (TILE, TILE, 3))

    def texture_index(self, ty: np.ndarray, tx: np.ndarray) -> np.ndarray:
        return (ty * 7919 + tx * 104729) % N_TEXTURES

    def __call__(self, y0: int, x0: int, h: int, w: int, downsample: float) -> np.ndarray:
        if downsample == 1.0 and y0 % TILE == 0 and x0 % TILE == 0:
            ty, tx = y0 // TILE, x0 // TILE
            if not self.tissue[ty, tx]:
                return np.ascontiguousarray(self.background[:h, :w])
            return self.textures[self.texture_index(ty, tx)][:h, :w]
        ys = ((y0 + np.arange(h) + 0.5) * downsample).astype(np.int64)
        xs = ((x0 + np.arange(w) + 0.5) * downsample).astype(np.int64)
        ty = np.minimum(ys // TILE, self.tissue.shape[0] - 1)[:, None]
        tx = np.minimum(xs // TILE, self.tissue.shape[1] - 1)[None, :]
        k = self.texture_index(ty, tx)
        img = self.textures[k, (ys % TILE)[:, None], (xs % TILE)[None, :]]
        img[~self.tissue[ty, tx]] = self.background[0, 0]
        return img


def _tissue_tiles(seed: int) -> np.ndarray:
    """uint8 [N_TEXTURES, TILE, TILE, 3]: level-0 tiles of a synthetic slide, all tissue."""
    from pipeline.app.synth import make_layout

    layout = make_layout((4096, 4096), seed=seed + 1, positive=True)
    tiles = []
    for ty in range(4096 // TILE):
        for tx in range(4096 // TILE):
            ys = ty * TILE + np.arange(0, TILE, 8)
            xs = tx * TILE + np.arange(0, TILE, 8)
            if layout.tissue_inside(ys[:, None], xs[None, :]).all():
                tiles.append(layout.render(ty * TILE, tx * TILE, TILE, TILE, 1.0))
            if len(tiles) == N_TEXTURES:
                return np.stack(tiles)
    raise RuntimeError("the texture layout has too few all-tissue tiles")


def make_slide(path: Path, side: int) -> None:
    from readers.testing import write_tiff_pyramid

    if path.exists():
        return
    tmp = path.with_suffix(".partial.tiff")
    began = time.perf_counter()
    write_tiff_pyramid(tmp, (side, side), MosaicSlide(side), tile=TILE, mpp=0.25, quality=85)
    os.replace(tmp, path)
    print(
        f"wrote {path} ({path.stat().st_size / 1e9:.2f} GB) in {time.perf_counter() - began:.0f} s"
    )


def _io_read_bytes() -> int:
    """Bytes this process read through read()/pread() so far (page cache or not)."""
    with open("/proc/self/io") as f:
        return int(next(line for line in f if line.startswith("rchar:")).split()[1])


def _peak_rss_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def _bench_model():
    import torch

    from pipeline.app.config import ModelConfig
    from pipeline.app.model.networks import SlideClassifier

    torch.manual_seed(0)
    config = ModelConfig(class_names=("negative", "positive"), low_res_max_side=512, n_patches=16)
    return SlideClassifier(config).eval()


def child_ats(path: str, repeats: int) -> dict:
    """Time ``repeats`` ATS passes over the slide (each one opens the slide anew)."""
    import torch

    torch.set_num_threads(1)
    model = _bench_model()
    _ats_pass(model, path, seed=-1)  # warm-up: imports, allocator, file cache
    times, read = [], []
    for seed in range(repeats):
        before = _io_read_bytes()
        began = time.perf_counter()
        _ats_pass(model, path, seed)
        times.append(time.perf_counter() - began)
        read.append(_io_read_bytes() - before)
    return {
        "seconds": float(np.median(times)),
        "bytes_read": int(np.median(read)),
        "peak_rss_mb": _peak_rss_mb(),
    }


def _ats_pass(model, path: str, seed: int) -> None:
    """What ``predict`` does for one slide, outputs aside: open, view, classify, close."""
    from pipeline.app.prediction.inference import classify_view
    from pipeline.app.slide.views import open_view

    with open_view(path, model.config) as view:
        classify_view(model, view, seed=seed)


def child_tiling(path: str, n_tiles: int) -> dict:
    """Feature network on ``n_tiles`` random tissue tiles of level 0, one at a time."""
    import torch

    import readers
    from pipeline.app.slide.views import open_view

    torch.set_num_threads(1)
    model = _bench_model()
    with open_view(path, model.config) as view:
        tissue_tiles = _tissue_tile_grid(view)
        level = view.slide.levels[0]
        ty, tx = np.nonzero(tissue_tiles)
    rng = np.random.default_rng(0)
    pick = rng.choice(len(ty), size=min(n_tiles, len(ty)), replace=False)
    began = time.perf_counter()
    with readers.open_slide(path) as slide, torch.no_grad():
        level = slide.levels[0]
        for i in pick:
            pixels = level.read_patches([[ty[i] * TILE, tx[i] * TILE]], (TILE, TILE))
            x = torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 255.0
            model.feature_net(x)
    seconds = time.perf_counter() - began
    return {
        "seconds_per_tile": seconds / len(pick),
        "tiles_timed": int(len(pick)),
        "tissue_tiles": int(len(ty)),
        "peak_rss_mb": _peak_rss_mb(),
    }


def _tissue_tile_grid(view) -> np.ndarray:
    """bool [n_tiles_y, n_tiles_x]: level-0 tiles whose centre is tissue in the view."""
    H, W = view.slide.shape[:2]
    h, w = view.tissue.shape
    cy = ((np.arange(-(-H // TILE)) + 0.5) * TILE * h / H).astype(int).clip(0, h - 1)
    cx = ((np.arange(-(-W // TILE)) + 0.5) * TILE * w / W).astype(int).clip(0, w - 1)
    return view.tissue[np.ix_(cy, cx)]


def _run_child(kind: str, path: Path, count: int) -> dict:
    """Run one measurement in a fresh process (its own peak RSS); its JSON result."""
    out = subprocess.run(
        [sys.executable, __file__, "--child", kind, str(path), str(count)],
        capture_output=True,
        text=True,
    )
    if out.returncode:  # the child's traceback, not only its exit status
        raise RuntimeError(f"the {kind} child on {path} exited {out.returncode}:\n{out.stderr}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    """Write the slides and run the benchmark of ``argv``; the exit status."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cache", type=Path, default=Path("/tmp/ats-wsi-bench"))
    parser.add_argument("--big", type=int, default=100_000)
    parser.add_argument("--small", type=int, default=10_000)
    parser.add_argument("--tiles", type=int, default=2000)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--make-only", action="store_true", help="only write the slides")
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        kind, path, count = args.child
        run = child_ats if kind == "ats" else child_tiling
        print(json.dumps(run(path, int(count))))
        return 0

    args.cache.mkdir(parents=True, exist_ok=True)
    small = args.cache / f"mosaic-{args.small}.tiff"
    big = args.cache / f"mosaic-{args.big}.tiff"
    make_slide(small, args.small)
    make_slide(big, args.big)
    if args.make_only:
        return 0
    load_before = os.getloadavg()[0]
    ats_small = _run_child("ats", small, args.repeats)
    ats_big = _run_child("ats", big, args.repeats)
    tiling = _run_child("tiling", big, args.tiles)
    full = tiling["seconds_per_tile"] * tiling["tissue_tiles"]
    size = big.stat().st_size
    print(
        f"slide {args.big} x {args.big}, {size / 1e9:.2f} GB JPEG, "
        f"{tiling['tissue_tiles']} tissue tiles of {TILE}^2 at level 0"
    )
    print(f"ATS per slide:        {ats_big['seconds']:.3f} s (median of {args.repeats})")
    print(
        f"full tiling per slide: {full:.0f} s (extrapolated from {tiling['tiles_timed']} "
        f"random tissue tiles at {tiling['seconds_per_tile'] * 1e3:.1f} ms each)"
    )
    print(f"speed-up:             {full / ats_big['seconds']:.0f}x (target >= 100x)")
    print(
        f"peak RSS ATS:         {ats_big['peak_rss_mb']:.0f} MB; "
        f"full tiling {tiling['peak_rss_mb']:.0f} MB (target < 1500 MB)"
    )
    print(
        f"bytes read by ATS:    {ats_big['bytes_read'] / 1e6:.2f} MB of {size / 1e6:.0f} MB "
        f"= {100 * ats_big['bytes_read'] / size:.3f}% (target < 2%)"
    )
    ratio = ats_big["peak_rss_mb"] / ats_small["peak_rss_mb"]
    print(
        f"peak RSS ATS {args.small}^2 vs {args.big}^2: {ats_small['peak_rss_mb']:.0f} MB vs "
        f"{ats_big['peak_rss_mb']:.0f} MB, ratio {ratio:.2f} (target <= 1.3)"
    )
    print(f"load average (1 min): {load_before:.2f} before, {os.getloadavg()[0]:.2f} after")
    return 0


if __name__ == "__main__":
    sys.exit(main())
