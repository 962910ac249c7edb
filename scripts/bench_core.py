"""Benchmark the estimator core against the code a user would write, in one run.

    python scripts/bench_core.py            # 3x4096x4096 image, 512x512 attention
    python scripts/bench_core.py --busy     # the same with the other core kept busy
    python scripts/bench_core.py --size 1024 --attention 128 --rounds 5   # quick

Two tables, N in {10, 100} patches:
- extract_patches (p in {64, 256}, patches inside the image): ``pipeline.extract_patches``
  vs the slice loop a user would write (``torch.stack`` of ``x[b, :, y:y+p, x:x+p]``),
  and against a copy of its output (``clone``: the floor of any method that returns
  new memory).
- sample + expectation on ``[1, N, 64]`` features: ``pipeline.sample`` (softmax over
  logits, Gumbel top-k, gather) then ``pipeline.expectation``, forward and backward
  (the backward timed alone), vs the same draws gathered through a dense one-hot
  ``[B, N, h*w]`` matrix; plus the largest tensor autograd saves for the backward.
The methods of a row run interleaved (A B A B ..., ``--rounds`` rounds after a
warm-up); times are the median (and the minimum) in milliseconds, on ``--threads`` CPU
threads (default 1: "on a CPU core"); ratios are of medians measured in this run.
``--busy`` starts one CPU-bound process for the whole run (a shared machine). The
1-minute load average before and after is printed.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from functools import partial

import torch

from pipeline import expectation, extract_patches, sample

FEATURES = 64


def interleaved_ms(
    cases: dict[str, tuple[Callable[[object], object], Callable[[], object]]], rounds: int
) -> dict[str, tuple[float, float]]:
    """``{name: (median, min)}`` milliseconds of ``fn(setup())`` for each ``name: (fn,
    setup)``, the cases run one after the other in each of ``rounds`` rounds (after a
    warm-up round); ``setup`` is not timed."""
    times: dict[str, list[float]] = {name: [] for name in cases}
    for round_ in range(rounds + 1):
        for name, (fn, setup) in cases.items():
            state = setup()
            start = time.perf_counter()
            fn(state)
            if round_:
                times[name].append(1e3 * (time.perf_counter() - start))
    return {name: (statistics.median(t), min(t)) for name, t in times.items()}


def _untimed_setup(fn: Callable[[], object]) -> tuple[Callable[[object], object], Callable]:
    """An ``interleaved_ms`` case timing ``fn()`` alone."""
    return (lambda _: fn()), (lambda: None)


def slice_loop(x: torch.Tensor, offsets: torch.Tensor, size: int) -> torch.Tensor:
    """The loop a user would write: one slice per patch (patches inside ``x``)."""
    return torch.stack(
        [
            torch.stack([x[b, :, y : y + size, x_ : x_ + size] for y, x_ in offsets[b].tolist()])
            for b in range(x.shape[0])
        ]
    )


@contextlib.contextmanager
def busy_core(enabled: bool) -> Iterator[None]:
    """One CPU-bound process for the duration of the block, when ``enabled``."""
    if not enabled:
        yield
        return
    spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        yield
    finally:
        spinner.kill()
        spinner.wait()


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
    parser.add_argument("--rounds", type=int, default=7, help="interleaved timed rounds")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--busy", action="store_true", help="keep one other core busy")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()[0]

    torch.manual_seed(0)
    x = torch.rand(1, 3, args.size, args.size)
    logits = torch.randn(1, args.attention, args.attention, requires_grad=True)
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), image "
        f"3x{args.size}x{args.size} float32, attention {args.attention}^2, median (min) "
        f"of {args.rounds} interleaved rounds, times in ms"
        + (", one other CPU-bound process running" if args.busy else "")
        + "\n"
    )
    with busy_core(args.busy):
        print(
            "| N | p | output MB | extract_patches | slice loop | copy of the output | "
            "loop / extract_patches | extract_patches / copy |"
        )
        print("|---|---|---|---|---|---|---|---|")
        for n in (10, 100):
            for p in (64, 256):
                offsets = torch.randint(0, args.size - p + 1, (1, n, 2))
                out = extract_patches(x, offsets, p)
                assert torch.equal(out, slice_loop(x, offsets, p))
                t = interleaved_ms(
                    {
                        "core": _untimed_setup(partial(extract_patches, x, offsets, p)),
                        "loop": _untimed_setup(partial(slice_loop, x, offsets, p)),
                        "copy": _untimed_setup(out.clone),
                    },
                    args.rounds,
                )
                (core, core_min), (loop, loop_min), (copy, copy_min) = t.values()
                print(
                    f"| {n} | {p} | {out.numel() * 4 / 1e6:.1f} | {core:.3f} ({core_min:.3f}) | "
                    f"{loop:.3f} ({loop_min:.3f}) | {copy:.3f} ({copy_min:.3f}) | "
                    f"{loop / core:.2f}x | {core / copy:.2f}x |"
                )

        print(
            "\n| N | forward core | forward dense | ratio | backward core | backward dense "
            "| ratio | largest saved core | largest saved dense |"
        )
        print("|---|---|---|---|---|---|---|---|---|")
        for n in (10, 100):
            features = torch.randn(1, n, FEATURES, requires_grad=True)
            forward = {dense: partial(_estimate, n, logits, features, dense) for dense in (0, 1)}
            t = interleaved_ms(
                {
                    "fwd": _untimed_setup(forward[False]),
                    "fwd_dense": _untimed_setup(forward[True]),
                    "bwd": (torch.Tensor.backward, forward[False]),
                    "bwd_dense": (torch.Tensor.backward, forward[True]),
                },
                args.rounds,
            )
            (fwd, _), (fwd_dense, _), (bwd, _), (bwd_dense, _) = t.values()
            saved, saved_dense = (_largest_saved(forward[dense]) for dense in (0, 1))
            print(
                f"| {n} | {fwd:.2f} | {fwd_dense:.2f} | {fwd_dense / fwd:.1f}x | {bwd:.2f} | "
                f"{bwd_dense:.2f} | {bwd_dense / bwd:.1f}x | {saved:,} | {saved_dense:,} |"
            )
    print(f"\nload average (1 min): {load_before:.2f} before, {os.getloadavg()[0]:.2f} after")
    return 0


if __name__ == "__main__":
    sys.exit(main())
