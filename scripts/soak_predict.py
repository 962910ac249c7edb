"""Soak test of ``predict``: many small slides, every row exactly once, flat memory and
flat time per slide.

    python scripts/soak_predict.py --slides 2000 --cache /tmp/soak
    python scripts/soak_predict.py --slides 12 --size 128 --checkpoints 3 6 --window 4 \
        --warm-up 2 --cache /tmp/soak-quick        # a quick check of the script itself

Generates (once, cached in ``--cache``) ``--slides`` synthetic slides of ``--size``
pixels square, saves an untrained default-architecture model (speed and memory do not
depend on the weights) and runs the batch driver ``prediction.predict`` over the whole
directory twice into fresh output directories: in this process, then on a local Dask
cluster of ``--workers`` processes. For each run it checks that ``predictions.csv``
has every slide exactly once with status ``ok``, and prints:

- peak RSS of this process (``peak_rss_mb``: driver, journal, and in the cluster run
  the scheduler) after 100, 1,000 (``--checkpoints``) and ``--slides`` slides, and of
  the largest worker, with this process's glibc heap statistics (``glibc_heap``) at the
  same points;
- time per slide (wall time between completions) over the first ``--window`` (100)
  slides after ``--warm-up`` (10), i.e. slides 11-110, and over the last 100.

Targets (issue 12): RSS growth under 10 % from 100 to 2,000 slides; time per slide
flat within 10 %. Exit status 1 when a row is missing or duplicated. The 1-minute load
average before and after is printed: the machine may be shared.
"""

from __future__ import annotations

import argparse
import collections
import ctypes
import os
import resource
import sys
import time
from collections.abc import Iterator
from pathlib import Path

CHECKPOINTS = (100, 1000)
WINDOW = 100
WARM_UP = 10


def peak_rss_mb() -> float:
    """This process's peak RSS: Linux's ``VmHWM``, the high-water mark of its own
    memory map (``ru_maxrss`` would start a Dask worker at its parent's RSS)."""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmHWM")) / 1024
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


class _MallInfo2(ctypes.Structure):
    """glibc's ``struct mallinfo2``."""

    _fields_ = [
        (name, ctypes.c_size_t)
        for name in (
            "arena",
            "ordblks",
            "smblks",
            "hblks",
            "hblkhd",
            "usmblks",
            "fsmblks",
            "uordblks",
            "fordblks",
            "keepcost",
        )
    ]


def glibc_heap() -> dict[str, int] | None:
    """glibc's ``mallinfo2()`` over all arenas of this process, in MB (``free_chunks``:
    a count): the heap's size, the bytes in use and free in it. A heap that grows
    while its use does not is fragmented. None without glibc 2.33+."""
    try:
        mallinfo2 = ctypes.CDLL("libc.so.6").mallinfo2
    except (OSError, AttributeError):
        return None
    mallinfo2.restype = _MallInfo2
    info = mallinfo2()
    return {
        "heap": info.arena >> 20,
        "used": info.uordblks >> 20,
        "free": info.fordblks >> 20,
        "free_chunks": info.ordblks,
    }


def soak(
    run_dir: Path,
    slides: Path,
    out: Path,
    n: int,
    client=None,
    checkpoints: tuple[int, ...] = CHECKPOINTS,
) -> dict:
    """Run ``predict`` over ``slides`` into ``out``; RSS at the ``checkpoints`` (and
    after all ``n`` slides) and the completion times of every slide."""
    from pipeline.app.prediction.batch import predict
    from pipeline.app.prediction.cluster import on_cluster
    from pipeline.app.prediction.inference import run_here

    inner = run_here if client is None else on_cluster(client)
    rss: dict[int, tuple[float, float]] = {}
    times: list[float] = []
    marks = {*checkpoints, n}

    def worker_peak() -> float:
        if client is None:
            return 0.0
        return max(client.run(peak_rss_mb).values())

    def measured(model, paths, seed, **options) -> Iterator:
        for result in inner(model, paths, seed, **options):
            yield result  # the driver records it before the next one is asked for
            times.append(time.perf_counter())
            if len(times) in marks:
                rss[len(times)] = (peak_rss_mb(), worker_peak())
                print(
                    f"  {len(times)} slides: glibc heap of this process (MB) {glibc_heap()}",
                    flush=True,
                )

    summary = predict(run_dir, [slides], out, runner=measured, progress=False)
    return {"summary": summary, "rss": rss, "times": times}


def check_rows(out: Path, expected: set[str]) -> list[str]:
    """Problems with ``predictions.csv``: missing, duplicated or failed slides."""
    from pipeline.app import files
    from pipeline.app.results import outputs

    rows = files.read_csv(out / outputs.PREDICTIONS)
    counts = collections.Counter(r["slide"] for r in rows)
    problems = [f"{name} appears {c} times" for name, c in counts.items() if c != 1]
    problems += [f"{name} missing" for name in sorted(expected - set(counts))]
    problems += [f"{r['slide']}: {r['error']}" for r in rows if r["status"] != "ok"]
    return problems


def per_slide(
    times: list[float], first: bool, window: int = WINDOW, warm_up: int = WARM_UP
) -> float:
    """Mean seconds between completions over the ``window`` slides after the first
    ``warm_up`` (``first``; slides 11-110 by default) or over the last ``window``."""
    span = times[warm_up : warm_up + window + 1] if first else times[-window - 1 :]
    return (span[-1] - span[0]) / (len(span) - 1)


def main(argv: list[str] | None = None) -> int:
    """Run the soak of ``argv`` and print its table; 1 when a row is missing or duplicated."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--slides", type=int, default=2000)
    parser.add_argument("--size", type=int, default=512, help="slide side in pixels")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--cache", type=Path, default=Path("/tmp/ats-soak"))
    parser.add_argument(
        "--checkpoints",
        type=int,
        nargs="+",
        default=list(CHECKPOINTS),
        help="slides after which peak RSS is taken (and after all of them); growth is "
        "measured from the first",
    )
    parser.add_argument("--window", type=int, default=WINDOW, help="slides per time window")
    parser.add_argument("--warm-up", type=int, default=WARM_UP, help="slides before the first")
    args = parser.parse_args(argv)
    checkpoints = tuple(sorted(args.checkpoints))
    least = args.warm_up + 2 * args.window + 1
    if args.slides < least:
        parser.error(
            f"--slides: at least {least} (two windows of {args.window} slides after "
            f"{args.warm_up} warm-up ones)"
        )
    if checkpoints[0] < 1 or checkpoints[-1] > args.slides:
        parser.error(f"--checkpoints: expected slide counts in 1..{args.slides}")

    import torch

    from pipeline.app.config import ModelConfig, RunConfig
    from pipeline.app.model.checkpoint import save_model
    from pipeline.app.model.networks import SlideClassifier
    from pipeline.app.prediction.cluster import connect
    from pipeline.app.slide.inputs import list_inputs
    from pipeline.app.synth import CLASS_NAMES, write_dataset

    slides = args.cache / f"slides-{args.slides}x{args.size}"
    if not (slides / "labels.csv").is_file():
        write_dataset(slides, n=args.slides, size=args.size, seed=0, progress=True, workers=2)
    expected = {i.name for i in list_inputs([slides])}
    run_dir = args.cache / "run"
    torch.manual_seed(0)
    model = SlideClassifier(ModelConfig(class_names=CLASS_NAMES))
    save_model(run_dir, model, RunConfig(model=model.config))

    stamp = time.strftime("%Y%m%d-%H%M%S")
    failed = False
    load_before = os.getloadavg()[0]
    print(f"{args.slides} slides of {args.size}^2 px; torch threads {torch.get_num_threads()}")
    first = checkpoints[0]
    window = f"{args.warm_up + 1}-{args.warm_up + args.window}"
    header = (
        f"| run | {' | '.join(f'RSS @{c}' for c in checkpoints)} | RSS @N | growth {first}->N "
        f"| s/slide, {window} | s/slide, last {args.window} | change | rows |"
    )
    lines = [header, "|" + " --- |" * (len(checkpoints) + 7)]
    for label, workers in (("one process", None), (f"--workers {args.workers}", args.workers)):
        out = args.cache / f"out-{stamp}-{workers or 0}"
        with connect(workers=workers) as client:
            got = soak(run_dir, slides, out, args.slides, client, checkpoints)
        problems = check_rows(out, expected)
        failed |= bool(problems)
        for p in problems[:10]:
            print(f"{label}: {p}", file=sys.stderr)
        rss, times = got["rss"], got["times"]
        start = per_slide(times, True, args.window, args.warm_up)
        end = per_slide(times, False, args.window, args.warm_up)
        cells = []
        for mark in (*checkpoints, args.slides):
            driver, worker = rss.get(mark, (float("nan"), 0.0))
            cells.append(f"{driver:.0f} MB" + (f" (worker {worker:.0f})" if worker else ""))
        growth = rss[args.slides][0] / rss[first][0] - 1
        if workers:
            growth = max(growth, rss[args.slides][1] / rss[first][1] - 1)
        rows = "ok" if not problems else f"{len(problems)} problems"
        lines.append(
            f"| {label} | {' | '.join(cells)} | {growth:+.1%} | {start:.3f} | {end:.3f} "
            f"| {end / start - 1:+.1%} | {len(expected)} exactly once: {rows} |"
        )
        print(lines[-1], flush=True)
    print("\n".join(lines))
    print(f"load average (1 min): {load_before:.2f} before, {os.getloadavg()[0]:.2f} after")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
