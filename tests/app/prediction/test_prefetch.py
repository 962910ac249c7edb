"""The background prefetcher: order, overlap, per-item errors, cleanup."""

import threading

import pytest

from pipeline.app.slide.views import prefetch


class Resource:
    def __init__(self, value):
        self.value = value
        self.closed = False

    def close(self):
        self.closed = True


def test_yields_in_order_with_errors_in_place():
    def load(i):
        if i == 2:
            raise ValueError(f"item {i} is unreadable")
        return Resource(i)

    got = [(item, None if r is None else r.value, e) for item, r, e in prefetch(range(5), load)]
    assert [g[0] for g in got] == [0, 1, 2, 3, 4]
    assert [g[1] for g in got] == [0, 1, None, 3, 4]
    assert isinstance(got[2][2], ValueError) and "item 2" in str(got[2][2])


def test_next_item_loads_while_the_current_one_is_processed():
    started = {i: threading.Event() for i in range(3)}

    def load(i):
        started[i].set()
        return Resource(i)

    for item, _, _ in prefetch(range(3), load):
        if item < 2:
            # Without a background load this would time out: nobody else loads item+1.
            assert started[item + 1].wait(timeout=10)


def test_stopping_early_closes_loaded_items():
    made = []

    def load(i):
        made.append(Resource(i))
        return made[-1]

    gen = prefetch(range(4), load)
    next(gen)
    gen.close()
    # The consumer owns item 0; item 1 was either never loaded (cancelled) or closed.
    assert not made[0].closed
    assert all(r.closed for r in made[1:]) and len(made) <= 2


def test_empty():
    assert list(prefetch([], pytest.fail)) == []
