"""Prediction on a Dask distributed cluster: one task per slide, results as they come.

::

    from pipeline.app.prediction.cluster import connect, predict_on_client

    with connect(workers=4) as client:                      # or scheduler="tcp://host:8786"
        for result in predict_on_client(client, model, paths, seed=0):
            ...                                             # SlideResult, in completion order
        predict(model, slides, out_dir, runner=on_cluster(client))  # the batch driver

How the work is laid out:

- **Weights once.** The model travels as one ``ModelPayload`` (its JSON config and
  its weights as safetensors bytes, so nothing of it is unpickled into code) held by
  a single task that every slide task depends on. Each worker fetches it once and
  rebuilds the model once per process (cached by the payload's hash). It is a task
  rather than ``client.scatter`` data because a task can be recomputed: scattered
  data dies with the last worker holding it, and every later slide task with it.
- **Slides opened in the worker.** Only paths travel; each worker must see the
  slides at the same paths (a shared filesystem). Relative paths are resolved
  against the client's working directory.
- **Same result anywhere.** A slide's sampling is seeded by ``slide_seed(seed,
  file name)`` inside ``predict_slide``, so which worker runs it does not matter.
  Worker tasks run torch on one thread (parallelism comes from workers x threads);
  a different float summation order than a multi-threaded local run can move class
  probabilities in the last digits, never labels or sampled boxes in practice.
- **Faults.** A failure inside ``predict_slide`` is already an ``error`` result. A
  worker process that dies has its slides rescheduled by Dask (up to
  ``distributed.scheduler.allowed-failures`` deaths per task, 3 by default); a task
  that still fails (``KilledWorker`` or any exception outside ``predict_slide``)
  becomes an ``error`` result naming the reason. A finished slide whose result
  was lost with a worker before the client fetched it is submitted again (up to
  ``MAX_RESUBMITS`` times). Each slide is yielded exactly once, however often its
  task ran.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import hashlib
import itertools
import os
import threading
import uuid
from collections import Counter, OrderedDict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from pipeline.app.errors import ConfigError
from pipeline.app.model import checkpoint
from pipeline.app.model.networks import SlideClassifier
from pipeline.app.prediction.inference import Runner, SlideResult, error_result, predict_slide
from pipeline.app.runtime import default_device
from pipeline.app.slide.inputs import slide_name

DEFAULT_TIMEOUT = 10.0
"""Seconds to wait for an existing scheduler before giving up."""

TASK_PREFIX = "ats-predict"
"""Prefix of the slide tasks' keys (what the Dask dashboard groups them by)."""

_MODEL_CACHE_SIZE = 2

MAX_RESUBMITS = 3

IN_FLIGHT_PER_THREAD = 4
MIN_IN_FLIGHT = 8
"""Slide tasks submitted at once: 4 per worker thread, at least 8 (more keep workers
busy no better, and every finished result waits in worker memory until fetched)."""
"""Times a slide whose finished result was lost with a worker is submitted again."""

if TYPE_CHECKING:
    from distributed import Client


@contextlib.contextmanager
def connect(
    scheduler: str | None = None,
    workers: int | None = None,
    timeout: float = DEFAULT_TIMEOUT,
) -> Iterator[Client | None]:
    """A ``distributed.Client`` for the duration of the ``with`` block, or ``None``.

    Args:
        scheduler: address of a running scheduler (``"tcp://10.0.0.5:8786"``, or the
            one a dask-jobqueue / dask-gateway / Kubernetes cluster reports).
        workers: start a ``LocalCluster`` of this many worker processes, one thread
            each, on loopback; closed on exit.
        timeout: seconds to wait for ``scheduler``.

    Neither argument yields ``None``: run in the current process. An unreachable
    ``scheduler`` raises ``ConnectionError`` naming it after ``timeout`` seconds.
    """
    if scheduler is not None and workers is not None:
        raise ConfigError(
            f"give either scheduler or workers, not both (got scheduler={scheduler!r}, "
            f"workers={workers!r})"
        )
    if scheduler is None and workers is None:
        yield None
        return

    from distributed import Client, LocalCluster

    if scheduler is not None:
        if not isinstance(scheduler, str) or not scheduler.strip():
            raise ConfigError(
                f"scheduler: expected an address like 'tcp://host:8786', got {scheduler!r}"
            )
        try:
            client = Client(scheduler, timeout=timeout)
        except OSError as e:  # distributed reports a timeout as a bare OSError
            raise ConnectionError(
                f"cannot reach the Dask scheduler at {scheduler} within {timeout:g} s ({e}); "
                "is it running, and is its address reachable from this machine?"
            ) from None
        with client:
            yield client
        return

    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise ConfigError(f"workers: expected an int >= 1, got {workers!r}")
    cluster = LocalCluster(
        n_workers=workers,
        threads_per_worker=1,
        processes=True,
        host="127.0.0.1",
        dashboard_address="127.0.0.1:0",  # a free port: never clashes with other clusters
    )
    with cluster, Client(cluster, timeout=timeout) as client:
        yield client


@dataclass(frozen=True)
class ModelPayload:
    """A model as it travels to the workers.

    Attributes:
        config_json: ``RunConfig`` JSON holding the model's ``ModelConfig``.
        weights: the state dict as safetensors bytes.
        token: hash of both; names the payload and the model cached on each worker.
    """

    config_json: str
    weights: bytes
    token: str

    @classmethod
    def from_model(cls, model: SlideClassifier) -> ModelPayload:
        config_json, weights = checkpoint.to_bytes(model)
        token = hashlib.sha256(config_json.encode() + weights).hexdigest()[:16]
        return cls(config_json, weights, token)

    def build(self, device: torch.device | str = "cpu") -> SlideClassifier:
        """The model, in eval mode on ``device``."""
        model, _ = checkpoint.from_bytes(
            self.config_json, self.weights, f"model payload {self.token}", device
        )
        return model


_models: OrderedDict[tuple[str, str], SlideClassifier] = OrderedDict()
_models_lock = threading.Lock()


def worker_model(payload: ModelPayload, device: str | None = None) -> SlideClassifier:
    """The model of ``payload`` in this process, built on first use and cached (the
    last ``_MODEL_CACHE_SIZE`` payloads)."""
    device = str(device or default_device())
    key = (payload.token, device)
    with _models_lock:
        model = _models.get(key)
        if model is None:
            model = _models[key] = payload.build(device)
            while len(_models) > _MODEL_CACHE_SIZE:
                _models.popitem(last=False)
        _models.move_to_end(key)
        return model


def _load_payload(payload: ModelPayload) -> ModelPayload:
    """The weights task: its result is what the slide tasks receive."""
    return payload


def _predict_task(
    payload: ModelPayload, path: str, seed: int, device: str | None, options: dict
) -> SlideResult:
    # Parallelism comes from workers x threads; torch's own threads would oversubscribe.
    torch.set_num_threads(1)
    return predict_slide(worker_model(payload, device), path, seed, **options)


def predict_on_client(
    client: Client,
    model: SlideClassifier,
    paths: Iterable[str | os.PathLike],
    seed: int = 0,
    device: torch.device | str | None = None,
    **options,
) -> Iterator[SlideResult]:
    """Classify ``paths`` on ``client``'s cluster, yielding each slide's ``SlideResult``
    as soon as it completes (completion order, each path exactly once).

    Args:
        client: a connected ``distributed.Client`` (see ``connect``).
        model: the classifier; its weights are sent to the workers once.
        paths: slide files, readable at the same paths on every worker.
        seed: run seed, as for ``predict_slide``; results equal a local run's.
        device: torch device on the workers; default CUDA where a worker has it.
        options: ``time_limit`` as for ``open_view``; ``display_side``, ``draws``,
            ``roi_dir`` as for ``classify_view`` (a ``roi_dir`` must be readable by
            the workers at the same path).

    Slides are submitted a window at a time (``IN_FLIGHT_PER_THREAD`` per worker
    thread), so memory on the workers does not grow with the batch however slowly the
    caller consumes the results. ``result.path`` is the path as given. Stopping the
    iteration early cancels the slides not yet yielded.
    """
    from distributed import as_completed

    paths = [Path(p) for p in paths]
    device_name = None if device is None else str(device)
    run = uuid.uuid4().hex[:8]
    payload = ModelPayload.from_model(model)
    weights = client.submit(_load_payload, payload, key=f"ats-model-{payload.token}-{run}")
    numbers = itertools.count()

    def submit(path: Path):
        return client.submit(
            _predict_task,
            weights,
            os.path.abspath(path),
            int(seed),
            device_name,
            options,
            key=f"{TASK_PREFIX}-{slide_name(path)}-{run}-{next(numbers)}",
        )

    # Slides go out a window at a time: results wait in worker memory until this
    # process has written them, so a slow writer must not let them pile up.
    window = max(MIN_IN_FLIGHT, IN_FLIGHT_PER_THREAD * sum(client.nthreads().values()))
    waiting = collections.deque(paths)
    pending: dict = {}
    completed = as_completed()

    def top_up() -> None:
        while waiting and len(pending) < window:
            path = waiting.popleft()
            future = submit(path)
            pending[future] = path
            completed.add(future)

    resubmitted: Counter[Path] = Counter()
    top_up()
    try:
        for future in completed:
            path = pending.pop(future)
            if _lost(future) and resubmitted[path] < MAX_RESUBMITS:
                # Its result died with a worker before it was fetched: run it again.
                resubmitted[path] += 1
                waiting.appendleft(path)
                top_up()
                continue
            result = _result_of(future, path)
            future.release()  # a finished slide is never recomputed after a worker loss
            top_up()
            yield result
    finally:
        client.cancel([*pending, weights])


def on_cluster(client: Client, device: torch.device | str | None = None) -> Runner:
    """A ``Runner`` (see ``inference``) that runs each slide as a task on ``client``'s
    cluster, for ``prediction.predict(..., runner=on_cluster(client))``."""

    def run(model: SlideClassifier, paths, seed: int, **options) -> Iterator[SlideResult]:
        return predict_on_client(client, model, paths, seed, device, **options)

    return run


def _lost(future) -> bool:
    """A slide task that ended neither finished nor failed while the client is still
    connected: its result was lost with a worker (or cancelled by another client)."""
    return future.status not in ("finished", "error") and future.client.status == "running"


def _result_of(future, path: Path) -> SlideResult:
    """The ``SlideResult`` of a finished or failed slide task."""
    if future.status == "finished":
        return dataclasses.replace(future.result(), path=str(path))
    if future.status == "error":
        return error_result(path, future.exception())
    # Cancelled: not a property of the slide, so no error row; a rerun will do it.
    if future.client.status != "running":
        raise ConnectionError(
            f"lost the connection to the Dask scheduler before {path} was done; "
            "finished slides are saved, run again to do the rest"
        )
    raise RuntimeError(
        f"the Dask task {future.key!r} of {path} was cancelled (by another client?); "
        "finished slides are saved, run again to do the rest"
    )
