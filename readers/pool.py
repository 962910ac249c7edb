"""The threads that decode tiles: one pool per process, shared by every slide and call.

``run_each(fn, items, threads)`` calls ``fn`` on every item with up to ``threads``
threads: the calling thread and ``threads - 1`` helpers of a process-wide pool, all
taking the next item from one shared iterator, so uneven tiles balance themselves and
no thread is started per call. Calls from several threads at once (Dask workers, a
read-ahead thread) share the helpers; a helper that has not started by the time the
caller ran out of items is cancelled, never waited for. Calls made from a helper run
inline (no nested submission, so no deadlock). After a fork the child makes its own
pool.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor, wait
from typing import TypeVar

T = TypeVar("T")

_pools: dict[int, ThreadPoolExecutor] = {}
_lock = threading.Lock()
_local = threading.local()


def _mark_helper() -> None:
    _local.helper = True


def _pool(helpers: int) -> ThreadPoolExecutor:
    """The process's pool of ``helpers`` threads, made on first use."""
    with _lock:
        pool = _pools.get(helpers)
        if pool is None:
            pool = _pools[helpers] = ThreadPoolExecutor(
                helpers, thread_name_prefix="ats-decode", initializer=_mark_helper
            )
        return pool


def _forget_pools() -> None:
    # The parent's threads do not exist in a forked child; its pools must not be used.
    global _lock
    _pools.clear()
    _lock = threading.Lock()


os.register_at_fork(after_in_child=_forget_pools)


def run_each(fn: Callable[[T], object], items: Iterable[T], threads: int) -> None:
    """``fn(item)`` for every item, on up to ``threads`` threads; returns when all are
    done, then raises the first exception any call raised (the others stop taking
    items as soon as one fails)."""
    items = list(items)
    helpers = min(threads, len(items)) - 1
    if helpers <= 0 or getattr(_local, "helper", False):
        for item in items:
            fn(item)
        return
    todo = iter(items)  # list iterators hand out each item once, across threads
    errors: list[BaseException] = []

    def drain() -> None:
        for item in todo:
            if errors:
                return
            try:
                fn(item)
            except BaseException as exc:  # re-raised in the caller
                errors.append(exc)
                return

    futures = [_pool(helpers).submit(drain) for _ in range(helpers)]
    try:
        drain()
    finally:
        for future in futures:
            future.cancel()  # not started: the caller took its items
        wait([f for f in futures if not f.cancelled()])
    if errors:
        raise errors[0]
