"""A Slide travels to a real Dask worker process (pickled as its path) and reads there.

Its tile reads always run on a local thread pool: with a distributed Client
active, no read task reaches the cluster's scheduler.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
from distributed import Client, LocalCluster

from readers import open_slide

OFFSETS = np.array([[5, 7], [300, 410], [990, 1290], [-20, 600]])
SIZE = (100, 140)


def read_on_worker(slide) -> tuple[int, np.ndarray]:
    return os.getpid(), slide.read_patches(OFFSETS, SIZE)


def scheduler_prefixes(client) -> set[str]:
    return set(client.run_on_scheduler(lambda dask_scheduler: list(dask_scheduler.task_prefixes)))


@pytest.fixture(scope="module")
def client():
    with (
        LocalCluster(
            n_workers=1, threads_per_worker=2, processes=True, dashboard_address=None
        ) as cluster,
        Client(cluster) as client,
    ):
        yield client


@pytest.mark.parametrize(
    ("backend", "source"),
    [("openslide", "jpeg_tiff"), ("tifffile", "jpeg_tiff"), ("zarr", "ome_zarr")],
)
def test_slide_reads_in_worker_process(client, request, backend, source):
    with open_slide(request.getfixturevalue(source), backend=backend) as slide:
        pid, remote = client.submit(read_on_worker, slide, pure=False).result(timeout=120)
        assert pid != os.getpid()
        local = slide.read_patches(OFFSETS, SIZE)  # the Client is the default scheduler now
    np.testing.assert_array_equal(remote, local)
    assert scheduler_prefixes(client) == {"read_on_worker"}
