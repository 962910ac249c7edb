"""The decode pool (``readers.pool``): one per process, shared, balanced, fork-safe, and
the same pixels whatever the number of threads (real slides, real threads)."""

from __future__ import annotations

import multiprocessing
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from readers import open_slide
from readers.pool import run_each


def _offsets(shape, n, size, seed=0):
    rng = np.random.default_rng(seed)
    return rng.integers(-size // 2, [shape[0] - size // 2, shape[1] - size // 2], size=(n, 2))


@pytest.mark.parametrize("backend", ["tifffile", "openslide"])
def test_pixels_do_not_depend_on_the_number_of_threads(jpeg_tiff, backend):
    with open_slide(jpeg_tiff, backend=backend, threads=1) as one:
        offsets = _offsets(one.shape, 40, 150)
        expected = one.levels[0].read_patches(offsets, (150, 150))
    for threads in (2, 3, 8):
        with open_slide(jpeg_tiff, backend=backend, threads=threads) as many:
            assert np.array_equal(many.levels[0].read_patches(offsets, (150, 150)), expected)


def test_the_real_slide_reads_the_same_with_one_or_two_threads(cmu_svs):
    with open_slide(cmu_svs, threads=1) as one, open_slide(cmu_svs, threads=2) as two:
        offsets = _offsets(one.shape, 32, 256, seed=1)
        assert np.array_equal(
            one.read_patches(offsets, (256, 256)), two.read_patches(offsets, (256, 256))
        )


def test_every_item_runs_once_and_the_caller_takes_part():
    seen, threads = [], set()

    def record(item):
        time.sleep(0.001)  # long enough for the helper to take items too
        seen.append(item)
        threads.add(threading.current_thread().name)

    run_each(record, range(200), threads=2)
    assert sorted(seen) == list(range(200))
    assert threading.current_thread().name in threads
    assert any(name.startswith("ats-decode") for name in threads)


def test_the_first_error_is_raised_after_every_running_call_finished():
    done_after_return = []
    returned = threading.Event()

    def work(item):
        if item == 5:
            raise ValueError("tile 5 is broken")
        time.sleep(0.002)
        if returned.is_set():
            done_after_return.append(item)

    with pytest.raises(ValueError, match="tile 5 is broken"):
        run_each(work, range(100), threads=3)
    returned.set()
    time.sleep(0.05)
    assert done_after_return == []  # nothing still writes into the caller's arrays


def test_a_call_from_a_helper_runs_inline_without_deadlock():
    results = []

    def outer(item):
        run_each(results.append, [(item, k) for k in range(3)], threads=2)

    run_each(outer, range(10), threads=2)
    assert sorted(results) == [(i, k) for i in range(10) for k in range(3)]


def test_concurrent_callers_share_a_bounded_pool(jpeg_tiff):
    """Eight threads reading at once (as Dask worker threads do) get their own pixels
    and start no thread beyond the pool's."""
    with open_slide(jpeg_tiff, threads=1) as reference:
        offsets = [_offsets(reference.shape, 12, 128, seed=s) for s in range(8)]
        expected = [reference.read_patches(o, (128, 128)) for o in offsets]
    results = [None] * 8

    def helpers() -> int:
        return sum(t.name.startswith("ats-decode") for t in threading.enumerate())

    before = helpers()
    with open_slide(jpeg_tiff, threads=2) as slide:

        def read(k):
            results[k] = slide.read_patches(offsets[k], (128, 128))

        callers = [threading.Thread(target=read, args=(k,)) for k in range(8)]
        for t in callers:
            t.start()
        for t in callers:
            t.join()
    assert all(np.array_equal(r, e) for r, e in zip(results, expected, strict=True))
    assert helpers() <= before + 1  # at most the one helper of the 2-thread pool


def _read_in_child(path, queue):
    with open_slide(path, threads=2) as slide:
        queue.put(slide.read_patches([[10, 20]], (64, 64)).sum())


def test_a_forked_child_reads_with_its_own_pool(jpeg_tiff):
    with open_slide(jpeg_tiff, threads=2) as slide:
        expected = slide.read_patches([[10, 20], [300, 400]], (64, 64))[:1].sum()
    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    child = context.Process(target=_read_in_child, args=(str(jpeg_tiff), queue))
    child.start()
    got = queue.get(timeout=60)
    child.join(timeout=60)
    assert child.exitcode == 0 and got == expected


def test_a_process_that_read_exits_promptly(jpeg_tiff):
    code = (
        "from readers import open_slide\n"
        f"s = open_slide({str(jpeg_tiff)!r}, threads=4)\n"
        "s.read_patches([[0, 0], [500, 600]], (256, 256))\n"
        "print('read')\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and done.stdout == "read\n", done.stderr
