"""Prediction on a real Dask ``LocalCluster`` (process workers, one thread each).

The reference for every cluster result is ``predict_slide`` run in this process on
the same model, files and seed. Workers are killed with a real SIGKILL.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import time

import dask
import numpy as np
import pytest
import torch

from pipeline.app import files
from pipeline.app.config import ModelConfig, PredictConfig
from pipeline.app.model.networks import SlideClassifier
from pipeline.app.prediction.batch import PredictionStore, predict
from pipeline.app.prediction.cluster import (
    TASK_PREFIX,
    ModelPayload,
    connect,
    on_cluster,
    predict_on_client,
    worker_model,
)
from pipeline.app.prediction.inference import predict_slide
from pipeline.app.results import outputs
from pipeline.app.slide.inputs import list_inputs
from pipeline.app.synth import CLASS_NAMES

SEED = 7
# Float summation order may differ between a 1-thread worker and a multi-thread run.
PROB_TOLERANCE = 1e-5


@pytest.fixture(scope="module")
def model() -> SlideClassifier:
    torch.manual_seed(0)
    config = ModelConfig(
        class_names=CLASS_NAMES, width=8, n_patches=6, patch_size=(32, 32), low_res_max_side=128
    )
    return SlideClassifier(config).eval()


@pytest.fixture(scope="module")
def paths(dataset):
    return [i.path for i in list_inputs([dataset])]


@pytest.fixture(scope="module")
def local_results(model, paths):
    return {str(p): predict_slide(model, p, SEED) for p in paths}


@pytest.fixture(scope="module")
def client():
    with connect(workers=2) as client:
        yield client


def assert_same_result(got, expected):
    assert (got.slide, got.path, got.status, got.label, got.error) == (
        expected.slide,
        expected.path,
        expected.status,
        expected.label,
        expected.error,
    )
    if expected.status == "ok":
        np.testing.assert_allclose(got.probs, expected.probs, rtol=0, atol=PROB_TOLERANCE)
        np.testing.assert_array_equal(got.boxes, expected.boxes)
        np.testing.assert_array_equal(got.thumbnail, expected.thumbnail)
        np.testing.assert_array_equal(got.display, expected.display)
        np.testing.assert_array_equal(got.patches, expected.patches)
        np.testing.assert_allclose(got.attention, expected.attention, rtol=0, atol=1e-6)


def run_into_store(client, model, paths, out_dir, on_result=None):
    """Drive ``predict_on_client`` into a ``PredictionStore``, as ``predict`` will."""
    results = []
    with PredictionStore(out_dir, [f"prob_{c}" for c in CLASS_NAMES]) as store:
        for result in predict_on_client(client, model, paths, seed=SEED):
            if on_result is not None:
                on_result(result)
            store.add(result)
            results.append(result)
    return results


def csv_rows(out_dir) -> list[dict[str, str]]:
    return files.read_csv(out_dir / outputs.PREDICTIONS)


def assert_rows_match(rows, expected_rows):
    """Same slides in the same order, same text, probabilities within tolerance."""
    assert [r["slide"] for r in rows] == [r["slide"] for r in expected_rows]
    for row, expected in zip(rows, expected_rows, strict=True):
        probs = [c for c in expected if c.startswith("prob_")]
        assert {c: row[c] for c in row if c not in probs} == {
            c: expected[c] for c in expected if c not in probs
        }
        for c in probs:
            if expected[c]:
                assert abs(float(row[c]) - float(expected[c])) <= PROB_TOLERANCE


def test_cluster_run_equals_local_run(client, model, paths, local_results, tmp_path):
    results = run_into_store(client, model, paths, tmp_path / "cluster")
    assert sorted(r.path for r in results) == sorted(local_results)
    for result in results:
        assert_same_result(result, local_results[result.path])

    predict(model, paths, tmp_path / "local", config=PredictConfig(seed=SEED), progress=False)
    assert_rows_match(csv_rows(tmp_path / "cluster"), csv_rows(tmp_path / "local"))
    for p in paths:
        cluster = json.loads(outputs.geojson_path(tmp_path / "cluster", p.stem).read_text())
        local = json.loads(outputs.geojson_path(tmp_path / "local", p.stem).read_text())
        assert [without_attention(f) for f in cluster["features"]] == [
            without_attention(f) for f in local["features"]
        ]
        assert outputs.heatmap_path(tmp_path / "cluster", p.stem).is_file()


def without_attention(feature: dict) -> dict:
    """A GeoJSON feature without its (float) measurements, attention and probabilities,
    nor its name (which states the attention rank: near-ties may swap across runs)."""
    drop = ("measurements", "name")
    properties = {k: v for k, v in feature["properties"].items() if k not in drop}
    return {**feature, "properties": properties}


def test_killed_worker_loses_and_duplicates_no_slide(client, model, paths, local_results, tmp_path):
    pids = client.run(os.getpid)  # {worker address: pid}
    killed = {}

    def kill_a_busy_worker(_result):
        if killed:
            return
        busy = {addr: keys for addr, keys in client.processing().items() if keys}
        assert busy, "no worker was running a slide after the first result"
        address, keys = next(iter(busy.items()))
        os.kill(pids[address], signal.SIGKILL)
        killed.update(pid=pids[address], keys=keys)

    results = run_into_store(client, model, paths, tmp_path, on_result=kill_a_busy_worker)

    assert sorted(r.path for r in results) == sorted(local_results)
    for result in results:
        assert_same_result(result, local_results[result.path])
    rows = csv_rows(tmp_path)
    assert sorted(r["slide"] for r in rows) == sorted(p.stem for p in paths)
    assert len(rows) == len(paths) and {r["status"] for r in rows} == {"ok"}
    # The nanny replaced the killed process; later tests get two workers again.
    client.wait_for_workers(2, timeout=60)
    assert killed["pid"] not in client.run(os.getpid).values()


def test_task_killing_every_worker_is_an_error_result(model, paths, local_results, tmp_path):
    # With no failure allowed, the slides on a killed worker end in KilledWorker.
    with (
        dask.config.set({"distributed.scheduler.allowed-failures": 0}),
        connect(workers=1) as client,
    ):
        (pid,) = client.run(os.getpid).values()
        killed_keys = []

        def kill_the_worker(_result):
            # Kill only while the worker holds a slide task: between two tasks (a
            # loaded machine makes that window wide) the kill would lose nothing.
            keys = [k for keys in client.processing().values() for k in keys]
            if not killed_keys and any(str(k).startswith(TASK_PREFIX) for k in keys):
                killed_keys.extend(keys)
                os.kill(pid, signal.SIGKILL)

        results = run_into_store(client, model, paths, tmp_path, on_result=kill_the_worker)

    assert killed_keys
    assert sorted(r.path for r in results) == sorted(local_results)
    errors = [r for r in results if r.status == "error"]
    assert 1 <= len(errors) <= len(killed_keys)
    for result in errors:
        assert result.error.startswith("KilledWorker: ") and result.path in result.error
    for result in results:
        if result.status == "ok":
            assert_same_result(result, local_results[result.path])
    rows = {r["slide"]: r for r in csv_rows(tmp_path)}
    assert len(rows) == len(paths)
    assert sorted(n for n, r in rows.items() if r["status"] == "error") == sorted(
        r.slide for r in errors
    )


def test_lost_scheduler_stops_the_run_and_keeps_finished_slides(model, paths, tmp_path):
    from distributed import LocalCluster

    cluster = LocalCluster(
        n_workers=1, threads_per_worker=1, host="127.0.0.1", dashboard_address="127.0.0.1:0"
    )
    with (
        cluster,
        connect(scheduler=cluster.scheduler_address, timeout=2) as client,
        pytest.raises(ConnectionError, match="lost the connection to the Dask scheduler"),
    ):
        run_into_store(client, model, paths, tmp_path, on_result=lambda _: cluster.close())
    # Slides finished before the loss are saved; the others have no row (no error rows).
    rows = csv_rows(tmp_path)
    assert 1 <= len(rows) < len(paths) and {r["status"] for r in rows} == {"ok"}


def test_bad_slides_are_error_results_and_others_complete(
    client, model, paths, local_results, tmp_path
):
    truncated, text = tmp_path / "truncated.tiff", tmp_path / "notes.svs"
    truncated.write_bytes(paths[2].read_bytes()[:20_000])  # header intact, tiles cut off
    text.write_text("this is a text file\n")
    mixed = [paths[0], truncated, paths[1], text]

    results = run_into_store(client, model, mixed, tmp_path / "out")

    by_path = {r.path: r for r in results}
    assert sorted(by_path) == sorted(str(p) for p in mixed)
    for good in paths[:2]:
        assert_same_result(by_path[str(good)], local_results[str(good)])
    for bad in (truncated, text):
        # The same error text as in this process, naming the file.
        assert_same_result(by_path[str(bad)], predict_slide(model, bad, SEED))
        assert by_path[str(bad)].status == "error" and bad.name in by_path[str(bad)].error
    rows = {r["path"]: r["status"] for r in csv_rows(tmp_path / "out")}
    assert rows == {path: r.status for path, r in by_path.items()}


def test_relative_paths_are_reported_as_given(client, model, paths, local_results, monkeypatch):
    monkeypatch.chdir(paths[0].parent)
    (result,) = predict_on_client(client, model, [paths[0].name], seed=SEED)
    assert result.path == paths[0].name
    assert result.status == "ok"
    np.testing.assert_array_equal(result.boxes, local_results[str(paths[0])].boxes)


def test_weights_travel_as_one_shared_dependency(client, model, paths):
    results = predict_on_client(client, model, paths, seed=SEED)
    next(results)

    def dependencies(dask_scheduler):
        return {
            str(key): sorted(str(d.key) for d in task.dependencies)
            for key, task in dask_scheduler.tasks.items()
            if str(key).startswith(TASK_PREFIX)
        }

    pending = client.run_on_scheduler(dependencies)
    results.close()
    assert pending, "every slide finished before the check"
    (shared,) = {tuple(deps) for deps in pending.values()}
    assert len(shared) == 1 and shared[0].startswith("ats-model-")


def test_stopping_early_cancels_the_rest(client, model, paths):
    results = predict_on_client(client, model, paths, seed=SEED)
    next(results)
    results.close()

    def ats_keys(dask_scheduler):
        return [k for k in dask_scheduler.tasks if str(k).startswith("ats-")]

    # The scheduler forgets cancelled keys asynchronously: wait (bounded) for it.
    for _ in range(600):
        if not client.run_on_scheduler(ats_keys):
            break
        time.sleep(0.05)
    assert client.run_on_scheduler(ats_keys) == []


def test_payload_rebuilds_the_same_model(model):
    payload = ModelPayload.from_model(model)
    rebuilt = payload.build("cpu")
    assert rebuilt.config == model.config
    for (name, a), (_, b) in zip(
        model.state_dict().items(), rebuilt.state_dict().items(), strict=True
    ):
        assert torch.equal(a, b), name
    # Cached per process by the payload's hash: one build for any number of tasks.
    assert worker_model(payload, "cpu") is worker_model(ModelPayload.from_model(model), "cpu")


def test_unreachable_scheduler_is_a_clear_error():
    with socket.socket() as s:  # a free loopback port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    address = f"tcp://127.0.0.1:{port}"
    with pytest.raises(ConnectionError, match=f"{address} within 2 s"):
        with connect(scheduler=address, timeout=2):
            pass


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"scheduler": "tcp://127.0.0.1:1", "workers": 2}, "either scheduler or workers"),
        ({"workers": 0}, "workers: expected an int >= 1, got 0"),
        ({"workers": 1.5}, "workers: expected an int >= 1, got 1.5"),
        ({"scheduler": ""}, "scheduler: expected an address"),
    ],
)
def test_connect_rejects_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        with connect(**kwargs):
            pass


def test_connect_without_arguments_is_no_cluster():
    with connect() as client:
        assert client is None


def test_predict_on_cluster_equals_local(client, model, paths, tmp_path):
    config = PredictConfig(seed=SEED)

    def on_the_cluster():
        runner = on_cluster(client)
        return predict(model, paths, tmp_path / "cluster", config, progress=False, runner=runner)

    summary = on_the_cluster()
    assert not summary.failed and len(summary.results) == len(paths)
    predict(model, paths, tmp_path / "local", config, progress=False)
    assert_rows_match(csv_rows(tmp_path / "cluster"), csv_rows(tmp_path / "local"))
    # A rerun skips everything already done.
    again = on_the_cluster()
    assert again.results == [] and len(again.skipped) == len(paths)


def test_slides_go_out_a_window_at_a_time(client, model, paths):
    # 2 workers x 1 thread: a window of max(8, 4 x 2) = 8 slide tasks; 24 slides.
    from pipeline.app.prediction import cluster

    many = paths * 3
    window = max(cluster.MIN_IN_FLIGHT, cluster.IN_FLIGHT_PER_THREAD * 2)
    known = []

    def slide_tasks(dask_scheduler):
        return sum(str(k).startswith(TASK_PREFIX) for k in dask_scheduler.tasks)

    results = []
    for result in predict_on_client(client, model, many, seed=SEED):
        known.append(client.run_on_scheduler(slide_tasks))
        results.append(result)
    assert sorted(r.path for r in results) == sorted(str(p) for p in many)
    assert max(known) <= window < len(many)
