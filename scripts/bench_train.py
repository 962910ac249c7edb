"""Training throughput: the serial loop versus the streaming loop, on generated slides.

    python scripts/bench_train.py [--cache DIR] [--slides 100] [--side 20000]

Builds (once, in ``--cache``) ``--distinct`` generated JPEG pyramids of ``--side``
pixels square (``bench_e2e``'s mosaic renderer) and hard-links them to ``--slides``
names, so every slide is a separate file for the loops (own view, own handle) while
the disk holds a few. Then, in one run, for two feature networks:

- ``simulated accelerator``: a feature net whose kernels take a fixed time per batch
  without using the CPU (``--latency`` ms per 16 patches, the order of a ResNet-18 on
  16 x 224^2 patches on a GPU; the backward ``--backward`` times as long: 1 is as long
  as the forward, while a convolutional network's backward computes gradients for both
  its inputs and its weights, about twice the forward's arithmetic), plus a cheap
  projection so that gradients flow. Its kernels run on a queue with CUDA's semantics
  (``Stream``): the host waits for the forward, whose features it reads next, but not
  for the backward, so the host's own part of the step (the attention network's
  backward, the optimizer) runs while the device computes, as it does with a GPU;
  ``--blocking`` makes the host wait for every kernel instead. The accelerator's busy
  fraction is its kernels' time over the wall time;
- ``CPU``: the default small CNN, computed on this CPU.

it reports slides per second of:

- ``serial``: the loop before streaming: one slide per step, its tiles read and then
  computed, the slide reopened every step (``stream_epoch`` with one batch of one
  slide in flight and a handle cache of one slide);
- ``streaming``: ``streaming.stream_epoch`` with mini-batches of ``--batch`` slides and
  ``--depth`` batches in flight;
- ``bound``: ``1 / max(read time, compute time)`` per slide, both measured separately
  in the same run (read: the patches of a planned batch alone; compute: a training step
  on patches already in memory);

and the peak RSS after 10 %, 50 % and 100 % of the slides of a streaming epoch.
``--busy`` keeps one other CPU-bound process running for the whole measurement (a
shared machine). The 1-minute load average before and after is printed.
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_core import busy_core  # noqa: E402
from bench_e2e import TILE, MosaicSlide  # noqa: E402

from pipeline.app.config import ModelConfig  # noqa: E402
from pipeline.app.training.loop import new_model  # noqa: E402
from pipeline.app.training.streaming import (  # noqa: E402
    Reader,
    StreamItem,
    StreamOptions,
    ViewCache,
    read_batch,
    stack_views,
    stream_epoch,
)


class Stream:
    """A simulated accelerator's queue of kernels, with CUDA's semantics: a launched
    kernel runs after the ones before it, without the host; the host waits only to
    read a result (``synchronize``). ``blocking``: every launch waits for its kernel,
    as if each were followed by a synchronisation."""

    def __init__(self, blocking: bool) -> None:
        self.blocking = blocking
        self.free_at = 0.0  # perf_counter time when the queued kernels are done
        self.busy = 0.0  # seconds of kernels launched

    def launch(self, seconds: float) -> None:
        self.free_at = max(time.perf_counter(), self.free_at) + seconds
        self.busy += seconds
        if self.blocking:
            self.synchronize()

    def synchronize(self) -> None:
        time.sleep(max(0.0, self.free_at - time.perf_counter()))


class _Kernel(torch.autograd.Function):
    """Identity whose forward and backward launch a kernel of the given duration on
    ``stream``. The forward then waits for it (its output is read by the host next);
    the backward does not (nothing reads the weights' gradients before the next
    forward, which waits for the whole queue)."""

    @staticmethod
    def forward(ctx, x, stream, seconds, backward_seconds):
        ctx.stream, ctx.seconds = stream, backward_seconds
        stream.launch(seconds)
        stream.synchronize()
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        ctx.stream.launch(ctx.seconds)
        return grad, None, None, None


class SimulatedAccelerator(nn.Module):
    """Patches ``[M, 3, p, p]`` -> features ``[M, 16]``: the mean of every 16th pixel
    and a linear layer (negligible CPU), with a kernel of ``latency`` seconds per 16
    patches on ``stream`` in the forward and ``backward`` times as long in the
    backward."""

    out_features = 16

    def __init__(self, stream: Stream, latency: float, backward: float) -> None:
        super().__init__()
        self.stream, self.latency, self.backward_ratio = stream, latency, backward
        self.project = nn.Linear(3, self.out_features)

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        features = self.project(patches[..., ::16, ::16].mean(dim=(2, 3)))  # [M, 16]
        # After the projection, so that the backward (which the weights need) runs too.
        seconds = self.latency * len(patches) / 16
        return _Kernel.apply(features, self.stream, seconds, seconds * self.backward_ratio)


def make_slides(cache: Path, n: int, distinct: int, side: int) -> list[Path]:
    from readers.testing import write_tiff_pyramid

    cache.mkdir(parents=True, exist_ok=True)
    sources = []
    for k in range(distinct):
        path = cache / f"source_{side}_{k}.tiff"
        if not path.exists():
            began = time.perf_counter()
            tmp = path.with_suffix(".partial.tiff")
            write_tiff_pyramid(
                tmp, (side, side), MosaicSlide(side, seed=k), tile=TILE, mpp=0.25, quality=85
            )
            os.replace(tmp, path)
            print(f"wrote {path} in {time.perf_counter() - began:.0f} s", flush=True)
        sources.append(path)
    links = cache / f"slides_{side}"
    links.mkdir(exist_ok=True)
    paths = []
    for i in range(n):
        link = links / f"slide_{i:03d}.tiff"
        if not link.exists():
            os.link(sources[i % distinct], link)
        paths.append(link)
    return paths


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def bench(name, stream: Stream | None, paths, args, views_dir) -> dict:
    """One row of the table; ``stream``: the simulated accelerator's (None: the CPU)."""
    config = ModelConfig(
        class_names=("negative", "positive"),
        n_patches=args.patches,
        patch_size=(args.patch, args.patch),
        low_res_max_side=256,
    )
    device = torch.device("cpu")
    views = ViewCache(views_dir, config)
    for path in paths:  # the view cache is filled once, as a first epoch would
        views.load(path)

    def model():
        m = new_model(config, 0, device)
        if stream is not None:
            m.sampler.feature = SimulatedAccelerator(stream, args.latency / 1000, args.backward)
            m.head = nn.Linear(m.sampler.feature.out_features, 2)
        return m

    items = [StreamItem(p, i % 2) for i, p in enumerate(paths)]
    result = {"network": name}

    # Serial: one slide per step, read then computed, each slide reopened per step.
    m = model()
    busy = stream.busy if stream else 0.0
    reopening = Reader(max_open=1)
    began = time.perf_counter()
    stream_epoch(
        m,
        torch.optim.AdamW(m.parameters()),
        items,
        views,
        torch.Generator().manual_seed(0),
        device,
        StreamOptions(batch_size=1, depth=1),
        reader=reopening,
    )
    if stream:
        stream.synchronize()
    wall = time.perf_counter() - began
    reopening.close()
    result["serial slides/s"] = len(paths) / wall
    result["serial busy"] = (stream.busy - busy) / wall if stream else None

    # Streaming, with RSS at 10 %, 50 %, 100 % of the slides.
    m = model()
    rss, done = {}, [0]
    marks = {round(len(paths) * f / args.batch) for f in (0.1, 0.5, 1.0)}

    def on_step():
        done[0] += 1
        if done[0] in marks:
            rss[done[0] * args.batch] = _peak_rss_mb()

    busy = stream.busy if stream else 0.0
    began = time.perf_counter()
    stream_epoch(
        m,
        torch.optim.AdamW(m.parameters()),
        items,
        views,
        torch.Generator().manual_seed(0),
        device,
        StreamOptions(batch_size=args.batch, depth=args.depth),
        on_step=on_step,
    )
    if stream:
        stream.synchronize()
    wall = time.perf_counter() - began
    result["streaming slides/s"] = len(paths) / wall
    result["streaming busy"] = (stream.busy - busy) / wall if stream else None
    result["peak RSS MB by slides"] = {k: round(v) for k, v in sorted(rss.items())}

    # The bound: read and compute of the same batches, measured apart.
    reader = Reader()
    batches = [items[i : i + args.batch] for i in range(0, len(items), args.batch)]
    read_s = compute_s = 0.0
    optimizer = torch.optim.AdamW(m.parameters())
    for batch in batches:
        cached = [views.load(i.path) for i in batch]
        x_low, mask, (h, w) = stack_views(cached, device)
        plan = m.sampler.plan(x_low, mask, torch.Generator().manual_seed(1))
        began = time.perf_counter()
        ratios = [(h / v.tissue.shape[0], w / v.tissue.shape[1]) for v in cached]
        patches, offsets = reader.submit(
            read_batch, m.config, [i.path for i in batch], plan, (h, w), ratios
        ).result()
        read_s += time.perf_counter() - began
        began = time.perf_counter()
        out = m.sampler.estimate(x_low, patches, offsets, plan, mask)
        loss = nn.functional.cross_entropy(
            m.head(out.features), torch.tensor([i.target for i in batch])
        )
        optimizer.zero_grad()
        (loss + out.regularizer).backward()
        optimizer.step()
        if stream:
            stream.synchronize()
        compute_s += time.perf_counter() - began
    reader.close()
    result["read s/slide"] = read_s / len(paths)
    result["compute s/slide"] = compute_s / len(paths)
    result["bound slides/s"] = len(paths) / max(read_s, compute_s)
    return result


def _percent(fraction: float | None) -> str:
    return "-" if fraction is None else f"{fraction:.0%}"


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark of ``argv`` and print its table (Markdown); the exit status."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", type=Path, default=Path("runs/bench_train"))
    parser.add_argument("--slides", type=int, default=100)
    parser.add_argument("--distinct", type=int, default=4)
    parser.add_argument("--side", type=int, default=20000)
    parser.add_argument("--patches", type=int, default=16)
    parser.add_argument("--patch", type=int, default=224)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--depth", type=int, default=3, help="batches in flight")
    parser.add_argument("--latency", type=float, default=10.0, help="ms per 16 patches")
    parser.add_argument(
        "--backward", type=float, default=1.0, help="backward latency over forward latency"
    )
    parser.add_argument(
        "--blocking",
        action="store_true",
        help="the host waits for every simulated kernel, not only for the features it reads",
    )
    parser.add_argument(
        "--busy", action="store_true", help="keep one other CPU-bound process running"
    )
    args = parser.parse_args(argv)
    paths = make_slides(args.cache, args.slides, args.distinct, args.side)
    load_before = os.getloadavg()[0]
    with busy_core(args.busy):
        rows = [
            bench(
                "simulated accelerator", Stream(args.blocking), paths, args, args.cache / "views"
            ),
            bench("CPU (small CNN)", None, paths, args, args.cache / "views"),
        ]
    print(
        f"\n{args.slides} slides of {args.side}^2, N={args.patches} patches of {args.patch}^2, "
        f"batch {args.batch}, depth {args.depth}, simulated latency {args.latency} ms/16 "
        f"patches forward, x{args.backward} backward, "
        f"{'blocking' if args.blocking else 'asynchronous'} kernels"
        f"{', one other CPU-bound process running' if args.busy else ''}\n"
    )
    print(
        "| network | serial slides/s | streaming slides/s | speed-up | bound slides/s "
        "| streaming / bound | busy serial | busy streaming | read s/slide | compute s/slide "
        "| peak RSS MB at slides |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['network']} | {r['serial slides/s']:.2f} | {r['streaming slides/s']:.2f} "
            f"| {r['streaming slides/s'] / r['serial slides/s']:.2f}x "
            f"| {r['bound slides/s']:.2f} | {r['streaming slides/s'] / r['bound slides/s']:.0%} "
            f"| {_percent(r['serial busy'])} | {_percent(r['streaming busy'])} "
            f"| {r['read s/slide']:.3f} | {r['compute s/slide']:.3f} "
            f"| {r['peak RSS MB by slides']} |"
        )
    print(f"\nload average (1 min): {load_before:.2f} before, {os.getloadavg()[0]:.2f} after")
    return 0


if __name__ == "__main__":
    sys.exit(main())
