"""Benchmark the estimator core against naive baselines written here, in one run.

    python scripts/bench_core.py            # 3x4096x4096 image, 512x512 attention
    python scripts/bench_core.py --size 1024 --attention 128 --repeats 3   # quick

Two tables, N in {10, 100} patches:
- extract_patches (p in {64, 256}): ``pipeline.extract_patches`` vs padding the whole
  image by p and slicing patch by patch in a Python loop.
- sample + expectation on ``[1, N, 64]`` features: ``pipeline.sample`` (softmax over
  logits, Gumbel top-k, gather) then ``pipeline.expectation``, forward and backward
  (the backward timed alone), vs the same draws gathered through a dense one-hot
  ``[B, N, h*w]`` matrix; plus the largest tensor autograd saves for the backward.
Times are the best of ``--repeats`` runs in milliseconds (the least disturbed by other
processes on a shared machine), on ``--threads`` CPU threads (default 1: "on a CPU
core"); ratios are naive / core, measured in this run. The 1-minute load average before
and after is printed: the machine may be shared.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable

import torch

from pipeline import expectation, extract_patches, sample

FEATURES = 64


def _best_ms(fn: Callable[[object], object], repeats: int, setup=lambda: None) -> float:
    """Best time of ``fn(setup())`` over ``repeats`` runs (after a warm-up); ``setup``
    is not timed."""
    fn(setup())
    times = []
    for _ in range(repeats):
        state = setup()
        start = time.perf_counter()
        fn(state)
        times.append(time.perf_counter() - start)
    return 1e3 * min(times)


def naive_extract(x: torch.Tensor, offsets: torch.Tensor, size: int) -> torch.Tensor:
    """Pad the whole image, then slice every patch in a Python loop."""
    padded = torch.nn.functional.pad(x, (size, size, size, size))
    return torch.stack(
        [
            torch.stack(
                [
                    padded[b, :, y + size : y + 2 * size, x_ + size : x_ + 2 * size]
                    for y, x_ in offsets[b].tolist()
                ]
            )
            for b in range(x.shape[0])
        ]
    )


def naive_sample(n: int, logits: torch.Tensor, generator: torch.Generator):
    """The same Gumbel top-k draws, gathered through a dense one-hot [B, N, P] matrix."""
    flat = logits.flatten(1)
    probabilities = torch.softmax(flat, 1)
    with torch.no_grad():
        noise = -torch.empty_like(flat).exponential_(generator=generator).log()
        index = (flat + noise).topk(n, dim=1).indices
    one_hot = torch.nn.functional.one_hot(index, flat.shape[1]).to(flat.dtype)  # [B, N, P]
    return index, (one_hot @ probabilities.unsqueeze(-1)).squeeze(-1)


def _estimate(n: int, logits: torch.Tensor, features: torch.Tensor, dense: bool):
    """The loss ``sum(expectation(features, sampled))`` of one fixed set of draws."""
    generator = torch.Generator().manual_seed(0)
    if dense:
        _, sampled = naive_sample(n, logits, generator)
    else:
        _, sampled = sample(n, logits, use_logits=True, generator=generator)
    return expectation(features, sampled).sum()


def _largest_saved(fn: Callable[[], object]) -> int:
    """Elements of the largest tensor autograd saves for the backward while ``fn`` runs."""
    sizes = [0]

    def pack(t: torch.Tensor) -> torch.Tensor:
        sizes.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return max(sizes)


def main(argv: list[str] | None = None) -> int:
    """Run both tables and print them (Markdown); ``argv`` as on the command line."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", type=int, default=4096, help="image side (pixels)")
    parser.add_argument("--attention", type=int, default=512, help="attention map side")
    parser.add_argument("--repeats", type=int, default=7, help="timed runs per case")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()[0]

    torch.manual_seed(0)
    x = torch.rand(1, 3, args.size, args.size)
    logits = torch.randn(1, args.attention, args.attention, requires_grad=True)
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), image "
        f"3x{args.size}x{args.size} float32, attention {args.attention}^2, "
        f"best of {args.repeats}, times in ms\n"
    )
    print("| N | p | extract_patches | naive pad + loop | ratio |")
    print("|---|---|---|---|---|")
    for n in (10, 100):
        for p in (64, 256):
            offsets = torch.randint(-p // 2, args.size - p // 2, (1, n, 2))
            assert torch.equal(extract_patches(x, offsets, p), naive_extract(x, offsets, p))
            core = _best_ms(lambda _: extract_patches(x, offsets, p), args.repeats)  # noqa: B023
            naive = _best_ms(lambda _: naive_extract(x, offsets, p), args.repeats)  # noqa: B023
            print(f"| {n} | {p} | {core:.3f} | {naive:.1f} | {naive / core:.0f}x |")

    print(
        "\n| N | forward core | forward dense | ratio | backward core | backward dense "
        "| ratio | largest saved core | largest saved dense |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for n in (10, 100):
        features = torch.randn(1, n, FEATURES, requires_grad=True)
        row = []
        for dense in (False, True):
            forward = lambda: _estimate(n, logits, features, dense)  # noqa: B023, E731
            row.append(_best_ms(lambda _: forward(), args.repeats))  # noqa: B023
            row.append(_best_ms(lambda loss: loss.backward(), args.repeats, forward))
            row.append(_largest_saved(forward))
        fwd, bwd, saved, fwd_dense, bwd_dense, saved_dense = row
        print(
            f"| {n} | {fwd:.2f} | {fwd_dense:.2f} | {fwd_dense / fwd:.1f}x | {bwd:.2f} | "
            f"{bwd_dense:.2f} | {bwd_dense / bwd:.1f}x | {saved:,} | {saved_dense:,} |"
        )
    print(f"\nload average (1 min): {load_before:.2f} before, {os.getloadavg()[0]:.2f} after")
    return 0


if __name__ == "__main__":
    sys.exit(main())
