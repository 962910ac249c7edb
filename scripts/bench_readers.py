"""Benchmark ``Level.read_patches`` on a large JPEG pyramid against three baselines.

For N unaligned 256 x 256 patches at level 0 it times, in one run, with the same
random offsets for every method (fresh offsets per repeat, methods interleaved):

- ``read_patches`` through the tifffile and the OpenSlide backends;
- (a) the floor: the bare decode (``pread`` + ``page.decode``) of exactly the
  tiles the patches touch, in one thread and in the reader's thread count;
- (b) a loop of OpenSlide ``read_region``, one call per patch;
- (c) slicing a dask array of the whole level (tifffile's zarr store, one chunk
  per tile) and computing the stack with the threaded scheduler;
- (d) fastslide and (e) tiffslide, one ``read_region`` per patch, when installed
  (``pip install -e '.[bench]'``; skipped otherwise), with the largest
  difference of their pixels from ours (libjpeg's, through imagecodecs).

and prints median times and the ratios, and the 1-minute load average before and after
(the machine may be shared). The slide (default 32768 x 32768, JPEG 256-pixel tiles) is
generated on first use and cached.

    python scripts/bench_readers.py [--slide PATH] [--size 32768] [--repeats 7]
    python scripts/bench_readers.py --write-check 50000   # peak RSS of a 50k x 50k write
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from readers import open_slide
from readers.testing import write_tiff_pyramid

PATCH = 256
TILE = 256


def cached_slide(path: Path, size: int) -> Path:
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        print(f"writing {size} x {size} JPEG pyramid to {path} (once) ...", flush=True)
        start = time.perf_counter()
        partial = path.with_suffix(".partial.tif")
        write_tiff_pyramid(partial, (size, size), tile=TILE, compression="jpeg", quality=90)
        partial.rename(path)
        print(
            f"  written in {time.perf_counter() - start:.0f} s, "
            f"{path.stat().st_size / 2**20:.0f} MiB",
            flush=True,
        )
    return path


def touched_tiles(offsets: np.ndarray, tile: int) -> list[tuple[int, int]]:
    tiles = set()
    for y, x in offsets.tolist():
        for ty in range(y // tile, (y + PATCH - 1) // tile + 1):
            for tx in range(x // tile, (x + PATCH - 1) // tile + 1):
                tiles.add((ty, tx))
    return sorted(tiles)


class DecodeFloor:
    """Read and decode given tiles of the level-0 page directly, nothing else."""

    def __init__(self, path: Path):
        import tifffile

        self.tif = tifffile.TiffFile(path)
        self.page = self.tif.pages[0]
        self.fd = os.open(path, os.O_RDONLY)
        self.columns = -(-self.page.imagewidth // self.page.tilewidth)

    def decode(self, tile: tuple[int, int]) -> np.ndarray:
        index = tile[0] * self.columns + tile[1]
        data = os.pread(self.fd, self.page.databytecounts[index], self.page.dataoffsets[index])
        return self.page.decode(data, index, jpegtables=self.page.jpegtables)[0]

    def sequential(self, tiles):
        for tile in tiles:
            self.decode(tile)

    def threaded(self, tiles, pool: ThreadPoolExecutor):
        list(pool.map(self.decode, tiles))


def peer_readers(path: Path) -> dict[str, object]:
    """``{name: read(offsets) -> uint8 [N, PATCH, PATCH, 3]}`` of the peers installed."""
    peers = {}
    try:
        import fastslide
    except ImportError:
        print("fastslide not installed: skipped")
    else:
        fast = fastslide.FastSlide.from_file_path(str(path))  # no tile cache: fair

        def fastslide_loop(offsets):
            return np.stack(
                [
                    np.asarray(fast.read_region((int(x), int(y)), 0, (PATCH, PATCH)).numpy())
                    for y, x in offsets
                ]
            )[..., :3]

        peers["(d) fastslide read_region loop"] = fastslide_loop
    try:
        import tiffslide
    except ImportError:
        print("tiffslide not installed: skipped")
    else:
        tiff = tiffslide.TiffSlide(path)

        def tiffslide_loop(offsets):
            return np.stack(
                [
                    np.asarray(tiff.read_region((int(x), int(y)), 0, (PATCH, PATCH)))
                    for y, x in offsets
                ]
            )[..., :3]

        peers["(e) tiffslide read_region loop"] = tiffslide_loop
    return peers


def bench(path: Path, ns: list[int], repeats: int, seed: int) -> None:
    import dask
    import dask.array as da
    import openslide
    import tifffile

    load_before = os.getloadavg()[0]
    rng = np.random.default_rng(seed)
    tslide = open_slide(path, backend="tifffile")
    oslide = open_slide(path, backend="openslide")
    osr = openslide.OpenSlide(path)
    floor = DecodeFloor(path)
    pool = ThreadPoolExecutor(tslide.threads)
    level0 = da.from_zarr(tifffile.imread(path, aszarr=True, level=0), zarr_format=2)
    H, W = tslide.shape[:2]

    def openslide_loop(offsets):
        return [
            np.asarray(osr.read_region((int(x), int(y)), 0, (PATCH, PATCH)))[..., :3]
            for y, x in offsets
        ]

    def dask_slicing(offsets):
        # One compute over all slices: chunks shared by several patches are read once.
        # (da.stack would first rechunk the differently-chunked slices to a common grid.)
        slices = [level0[y : y + PATCH, x : x + PATCH] for y, x in offsets.tolist()]
        return np.stack(dask.compute(*slices, scheduler="threads", num_workers=tslide.threads))

    methods = {
        "read_patches, tifffile backend": lambda o, t: tslide.levels[0].read_patches(
            o, (PATCH,) * 2
        ),
        "read_patches, openslide backend": lambda o, t: oslide.levels[0].read_patches(
            o, (PATCH,) * 2
        ),
        "(a) floor: decode touched tiles, 1 thread": lambda o, t: floor.sequential(t),
        f"(a') floor: decode touched tiles, {tslide.threads} threads": lambda o, t: floor.threaded(
            t, pool
        ),
        "(b) OpenSlide read_region loop": lambda o, t: openslide_loop(o),
        "(c) dask slicing of the whole level": lambda o, t: dask_slicing(o),
    }
    peers = peer_readers(path)
    methods.update({name: (lambda o, t, read=read: read(o)) for name, read in peers.items()})
    print(
        f"slide {path} ({H} x {W}, {TILE}-pixel JPEG tiles), {tslide.threads} threads, "
        f"{os.cpu_count()} CPUs, median of {repeats} repeats with fresh offsets\n"
    )
    # Agreement check before timing: the reader returns what the dask slice holds.
    offsets = rng.integers(0, [H - PATCH, W - PATCH], size=(8, 2))
    ours = tslide.levels[0].read_patches(offsets, (PATCH,) * 2)
    assert np.array_equal(ours, dask_slicing(offsets))
    for name, read in peers.items():
        difference = np.abs(read(offsets).astype(int) - ours).max()
        print(f"{name}: pixels differ from libjpeg's (ours) by up to {difference} levels")
    for n in ns:
        times = {name: [] for name in methods}
        n_tiles = []
        for r in range(repeats + 1):  # the first round warms caches and imports, not counted
            offsets = rng.integers(0, [H - PATCH, W - PATCH], size=(n, 2))
            tiles = touched_tiles(offsets, TILE)
            names = list(methods)
            names = names[r % len(names) :] + names[: r % len(names)]  # rotate the order
            for name in names:
                start = time.perf_counter()
                methods[name](offsets, tiles)
                if r:
                    times[name].append(time.perf_counter() - start)
            if r:
                n_tiles.append(len(tiles))
        med = {name: statistics.median(ts) for name, ts in times.items()}
        ours = med["read_patches, tifffile backend"]
        print(
            f"N = {n} patches of {PATCH}^2, median {statistics.median(n_tiles):.0f} distinct tiles"
        )
        print("| method | median ms | ratio to read_patches (tifffile) |")
        print("| --- | ---: | ---: |")
        for name, t in med.items():
            print(f"| {name} | {1e3 * t:.1f} | {t / ours:.2f} |")
        seq = med["(a) floor: decode touched tiles, 1 thread"]
        thr = next(t for name, t in med.items() if name.startswith("(a')"))
        print(
            f"\nread_patches (tifffile) / floor 1 thread = {ours / seq:.2f}; "
            f"/ floor {tslide.threads} threads = {ours / thr:.2f} (target <= 1.1)"
        )
        for name in peers:
            print(f"{name} / read_patches (tifffile) = {med[name] / ours:.2f} (target > 1)")
        print(
            f"read_patches (openslide) / floor {tslide.threads} threads = "
            f"{med['read_patches, openslide backend'] / thr:.2f}"
        )
        print(
            f"OpenSlide loop / read_patches (tifffile) = "
            f"{med['(b) OpenSlide read_region loop'] / ours:.2f}; / read_patches (openslide) = "
            f"{med['(b) OpenSlide read_region loop'] / med['read_patches, openslide backend']:.2f}"
            " (target >= 2)"
        )
        print(
            f"dask slicing / read_patches (tifffile) = "
            f"{med['(c) dask slicing of the whole level'] / ours:.2f}\n",
            flush=True,
        )
    pool.shutdown()
    for handle in (tslide, oslide, osr):
        handle.close()
    print(f"load average (1 min): {load_before:.2f} before, {os.getloadavg()[0]:.2f} after")


def write_check(size: int, directory: Path) -> None:
    """Write a ``size x size`` JPEG pyramid and report time, file size and peak RSS."""
    path = directory / f"write-check-{size}.tif"
    start = time.perf_counter()
    try:
        write_tiff_pyramid(path, (size, size), tile=TILE, compression="jpeg", quality=90)
        with open_slide(path) as slide:
            levels = len(slide.levels)
        print(
            f"wrote {size} x {size} ({levels} levels, {path.stat().st_size / 2**30:.2f} GiB) "
            f"in {time.perf_counter() - start:.0f} s; peak RSS "
            f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10:.0f} MiB "
            f"(raw level 0 would be {3 * size * size / 2**30:.1f} GiB)"
        )
    finally:
        path.unlink(missing_ok=True)


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark (or the write check) of ``argv``; the exit status."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    cache = Path(tempfile.gettempdir()) / "ats-wsi-bench"
    parser.add_argument("--slide", type=Path, help="benchmark slide (generated if missing)")
    parser.add_argument("--size", type=int, default=32768, help="side of the generated slide")
    parser.add_argument("--n", type=int, nargs="+", default=[32, 128], help="patches per call")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--write-check",
        type=int,
        metavar="SIZE",
        help="only write a SIZE x SIZE pyramid and report peak RSS",
    )
    args = parser.parse_args(argv)
    if args.write_check:
        write_check(args.write_check, args.slide.parent if args.slide else cache)
        return 0
    path = cached_slide(args.slide or cache / f"bench-{args.size}.tif", args.size)
    bench(path, args.n, args.repeats, args.seed)
    return 0


if __name__ == "__main__":
    sys.exit(main())
