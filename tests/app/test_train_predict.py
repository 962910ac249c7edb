"""Training and prediction through the Python API on real synthetic TIFF slides."""

from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open

from pipeline.app import files
from pipeline.app.config import InputConfig, PredictConfig, RunConfig
from pipeline.app.model.checkpoint import CONFIG_FILE, MODEL_FILE, load_model
from pipeline.app.prediction import inference
from pipeline.app.prediction.batch import predict
from pipeline.app.prediction.inference import predict_slide
from pipeline.app.results import outputs
from pipeline.app.training.loop import METRICS_FILE, STATE_FILE, metric_columns, train
from tests.app.geojson_rfc7946 import check_feature_collection, check_qupath


@pytest.fixture(scope="module")
def run(dataset, tmp_path_factory, small_model_config, quick_train_config):
    small, quick = small_model_config, quick_train_config
    out = tmp_path_factory.mktemp("run")
    return train(
        dataset,
        dataset / "labels.csv",
        out,
        small,
        quick,
        device="cpu",
        progress=False,
        log=lambda _: None,
    )


@pytest.fixture(scope="module")
def predicted(run, dataset, tmp_path_factory):
    out = tmp_path_factory.mktemp("pred")
    return predict(run.run_dir, [dataset], out, config=PredictConfig(seed=0), progress=False)


def test_run_directory_contents(run, n_slides, slide_side):
    d = run.run_dir
    assert RunConfig.from_json((d / CONFIG_FILE).read_text()) == run.config
    metrics = files.read_csv(d / METRICS_FILE)
    assert [int(r["epoch"]) for r in metrics] == [1, 2]
    assert list(metrics[0]) == list(metric_columns(run.model.task))
    state = json.loads((d / STATE_FILE).read_text())
    assert state["epochs_done"] == 2 and state["skipped"] == []
    assert len(state["val_slides"]) == 2 and len(state["train_slides"]) == n_slides - 2


def test_model_files_load_without_pickle(run, dataset, monkeypatch):
    with safe_open(str(run.run_dir / MODEL_FILE), "pt") as f:
        assert any(k.startswith("sampler.attention.") for k in f.keys())

    def refuse(*args, **kwargs):  # injected: any unpickling attempt fails the test
        raise AssertionError("a model file was unpickled")

    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(torch, "load", refuse)
    model, config = load_model(run.run_dir)
    assert config == run.config
    for name, tensor in run.model.state_dict().items():
        torch.testing.assert_close(model.state_dict()[name], tensor.cpu(), rtol=0, atol=0)
    slide = dataset / "slide_001.tiff"
    a, b = predict_slide(model, slide, seed=4), predict_slide(run.model, slide, seed=4)
    np.testing.assert_array_equal(a.probs, b.probs)


def test_resumed_training_equals_uninterrupted(run, dataset, tmp_path, small_model_config):
    one = train(
        dataset,
        dataset / "labels.csv",
        tmp_path,
        small_model_config,
        run.config.train.__class__(**{**run.config.train.__dict__, "epochs": 1}),
        device="cpu",
        progress=False,
        log=lambda _: None,
    )
    assert len(one.history) == 1
    lines = []
    two = train(
        dataset,
        dataset / "labels.csv",
        tmp_path,
        train_config=run.config.train,
        device="cpu",
        progress=False,
        log=lines.append,
    )
    assert any("resuming" in line and "after epoch 1" in line for line in lines)
    assert [h["epoch"] for h in two.history] == [1, 2]
    for name, tensor in run.model.state_dict().items():
        torch.testing.assert_close(two.model.state_dict()[name], tensor, rtol=0, atol=0)


def test_bad_label_rows_are_reported_and_skipped(dataset, tmp_path, small_model_config):
    slides = tmp_path / "slides"
    slides.mkdir()
    for name in ("slide_000.tiff", "slide_001.tiff", "slide_002.tiff", "slide_003.tiff"):
        shutil.copy(dataset / name, slides / name)
    (slides / "notes.tiff").write_text("not a slide\n")
    rows = [
        {"slide": f"slide_00{i}.tiff", "label": ["negative", "positive"][i % 2]} for i in range(4)
    ]
    rows += [
        {"slide": "gone.tiff", "label": "positive"},
        {"slide": "notes.tiff", "label": "negative"},
    ]
    files.write_csv(slides / "labels.csv", ["slide", "label"], rows)
    lines = []
    result = train(
        slides,
        slides / "labels.csv",
        tmp_path / "run",
        small_model_config,
        run_config_epochs(1),
        device="cpu",
        progress=False,
        log=lines.append,
    )
    assert len(result.skipped) == 2
    assert "gone.tiff" in result.skipped[0] and "FileNotFoundError" in result.skipped[0]
    assert "notes.tiff" in result.skipped[1]
    assert sum("skipping" in line for line in lines) == 2


def run_config_epochs(epochs):
    from pipeline.app.config import TrainConfig

    return TrainConfig(epochs=epochs, batch_size=2, val_fraction=0.0)


def test_predictions_csv(predicted, dataset, n_slides, slide_side):
    rows = files.read_csv(predicted.out_dir / outputs.PREDICTIONS)
    assert list(rows[0]) == outputs.prediction_columns(["prob_negative", "prob_positive"])
    assert [r["slide"] for r in rows] == [f"slide_{i:03d}" for i in range(n_slides)]
    for r in rows:
        assert r["status"] == "ok" and r["error"] == ""
        assert r["label"] in ("negative", "positive")
        probs = [float(r["prob_negative"]), float(r["prob_positive"])]
        assert abs(sum(probs) - 1) < 1e-5
        assert r["label"] == ("negative", "positive")[int(np.argmax(probs))]


def test_heatmap_and_geojson(predicted, n_slides, slide_side):
    for result in predicted.results:
        # The summary keeps no images (they would grow with the batch): the files do.
        assert result.display is None and result.patches is None
        # The display thumbnail: the slide is smaller than the default 1024 px.
        img = Image.open(outputs.heatmap_path(predicted.out_dir, result.slide))
        img.load()
        assert img.size == (slide_side + outputs.COLOUR_BAR_WIDTH, slide_side)
        assert Image.open(outputs.thumbnail_path(predicted.out_dir, result.slide)).size == (
            slide_side,
            slide_side,
        )
        data = json.loads(outputs.geojson_path(predicted.out_dir, result.slide).read_text())
        check_feature_collection(data)
        check_qupath(data)
        prediction, *features = data["features"]
        assert prediction["properties"]["classification"]["name"] == result.label
        assert len(features) == 6
        for f in features:
            ring = f["geometry"]["coordinates"][0]
            assert ring[0] == ring[-1] and len(ring) == 5
            xs, ys = [p[0] for p in ring], [p[1] for p in ring]
            assert 0 <= min(xs) < max(xs) <= slide_side and 0 <= min(ys) < max(ys) <= slide_side
            assert 0 < f["properties"]["measurements"]["attention"] <= 1
            assert f["properties"]["objectType"] == "detection"


def test_the_summary_keeps_arrays_that_own_their_memory(predicted):
    # A view of a tensor would keep the tensor alive for the whole batch; in one
    # process those small blocks fragmented the heap (docs/soak.md).
    for result in predicted.results:
        for array in (result.probs, result.probs_sd, result.boxes, result.patch_attention):
            assert isinstance(array, np.ndarray) and array.base is None


def test_gallery_patches_are_the_slide_pixels(predicted, dataset):
    import readers

    # The gallery holds the very pixels of each patch, read again from the slide.
    result = next(r for r in predicted.results if r.slide == "slide_001")
    with readers.open_slide(dataset / "slide_001.tiff") as slide:
        for i, box in enumerate(result.boxes):
            y, x, h, w = (int(v) for v in box)
            patch = np.asarray(Image.open(outputs.gallery_path(predicted.out_dir, result.slide, i)))
            np.testing.assert_array_equal(slide.read_region((y, x), 0, (h, w)), patch)


def test_patches_are_in_tissue(predicted, dataset, n_slides, slide_side):
    # The tissue mask on by default: every sampled patch centre lies on tissue
    # (up to the thumbnail's resolution at the tissue's edge).
    from pipeline.app.synth import make_layout

    result = predicted.results[3]
    layout = make_layout((slide_side, slide_side), seed=3 * 100_003 + 3, positive=True)
    y = result.boxes[:, 0] + result.boxes[:, 2] / 2
    x = result.boxes[:, 1] + result.boxes[:, 3] / 2
    near = [layout.tissue_inside(y + dy, x + dx) for dy in (-12, 0, 12) for dx in (-12, 0, 12)]
    assert np.any(near, axis=0).all()


def test_same_seed_same_predictions_any_order(run, dataset, predicted, tmp_path):
    shuffled = [dataset / f"slide_{i:03d}.tiff" for i in (5, 2, 7, 0, 1, 3, 6, 4)]
    again = predict(
        run.model, shuffled, tmp_path / "again", config=PredictConfig(seed=0), progress=False
    )
    first = (predicted.out_dir / outputs.PREDICTIONS).read_text()
    assert (again.out_dir / outputs.PREDICTIONS).read_text() == first
    one = predict_slide(run.model, dataset / "slide_005.tiff", seed=0)
    row = {r["slide"]: r for r in files.read_csv(predicted.out_dir / outputs.PREDICTIONS)}
    assert one.row(("prob_negative", "prob_positive")) == row["slide_005"]
    other = predict_slide(run.model, dataset / "slide_005.tiff", seed=1)
    assert not np.array_equal(other.boxes, one.boxes)


def test_rerun_skips_finished_slides(run, dataset, tmp_path, monkeypatch, n_slides, slide_side):
    calls = []
    real = inference.classify_view

    def counting(model, view, *args, **options):  # counts, then does the real work
        calls.append(view.path.name)
        return real(model, view, *args, **options)

    monkeypatch.setattr(inference, "classify_view", counting)
    predict(run.model, [dataset], tmp_path, progress=False)
    assert len(calls) == n_slides
    calls.clear()
    summary = predict(run.model, [dataset], tmp_path, progress=False)
    assert calls == [] and len(summary.skipped) == n_slides
    outputs.heatmap_path(tmp_path, "slide_004").unlink()
    predict(run.model, [dataset], tmp_path, progress=False)
    assert calls == ["slide_004.tiff"]
    calls.clear()
    predict(run.model, [dataset], tmp_path, overwrite=True, progress=False)
    assert len(calls) == n_slides


def test_crash_keeps_finished_rows(run, dataset, tmp_path, monkeypatch, n_slides, slide_side):
    real = inference.classify_view
    done = []

    def crash_on_third(model, view, *args, **options):  # injected fault: the process dies
        if len(done) == 2:
            raise KeyboardInterrupt
        done.append(view.path.name)
        return real(model, view, *args, **options)

    monkeypatch.setattr(inference, "classify_view", crash_on_third)
    with pytest.raises(KeyboardInterrupt):
        predict(run.model, [dataset], tmp_path, progress=False)
    rows = files.read_csv(tmp_path / outputs.PREDICTIONS)
    assert [r["slide"] + ".tiff" for r in rows] == done
    monkeypatch.setattr(inference, "classify_view", real)
    summary = predict(run.model, [dataset], tmp_path, progress=False)
    assert len(summary.results) == n_slides - 2 and len(summary.skipped) == 2
    assert len(files.read_csv(tmp_path / outputs.PREDICTIONS)) == n_slides


def test_bad_files_get_error_rows(run, dataset, tmp_path):
    slides = tmp_path / "mixed"
    slides.mkdir()
    shutil.copy(dataset / "slide_000.tiff", slides / "good_a.tiff")
    shutil.copy(dataset / "slide_001.tiff", slides / "good_b.tiff")
    data = (dataset / "slide_002.tiff").read_bytes()
    (slides / "truncated.tiff").write_bytes(data[: len(data) // 3])
    (slides / "notes.svs").write_text("this is a text file\n")
    (slides / "readme.txt").write_text("not a slide suffix: not listed\n")
    summary = predict(run.model, [slides], tmp_path / "out", progress=False)
    rows = {r["slide"]: r for r in files.read_csv(tmp_path / "out" / outputs.PREDICTIONS)}
    assert sorted(rows) == ["good_a", "good_b", "notes", "truncated"]
    assert rows["good_a"]["status"] == rows["good_b"]["status"] == "ok"
    for name, suffix in (("notes", ".svs"), ("truncated", ".tiff")):
        assert rows[name]["status"] == "error" and rows[name]["label"] == ""
        assert f"{name}{suffix}" in rows[name]["error"]
    assert sorted(r.slide for r in summary.failed) == ["notes", "truncated"]


def test_real_svs_without_pyramid(run, cmu_svs):
    # CMU-1-Small-Region.svs: one 2967 x 2220 level, JPEG tiles; the view is
    # streamed down from level 0 and patches stay on the tissue and in the slide.
    result = predict_slide(run.model, cmu_svs, seed=0)
    assert result.status == "ok", result.error
    assert result.slide_shape == (2967, 2220)
    assert max(result.thumbnail.shape[:2]) == 128
    y, x, h, w = result.boxes.T
    assert (y + h > 0).all() and (y < 2967).all() and (x + w > 0).all() and (x < 2220).all()


def test_list_inputs(tmp_path):
    from pipeline.app.slide.inputs import list_inputs

    (tmp_path / "a").mkdir()
    for name in ("x.svs", "y.tiff", "notes.txt", ".hidden.svs"):
        (tmp_path / "a" / name).write_text("")
    a = tmp_path / "a"
    assert [(i.path, i.name, i.error) for i in list_inputs([a])] == [
        (a / "x.svs", "x", ""),
        (a / "y.tiff", "y", ""),
    ]
    assert [i.path for i in list_inputs([a, a / "y.tiff"])] == [a / "x.svs", a / "y.tiff"]  # once


def test_fewer_tissue_cells_than_patches(run, dataset):
    from pipeline.app.prediction.inference import classify_view
    from pipeline.app.slide.views import open_view

    with open_view(dataset / "slide_001.tiff", run.model.config) as view:
        view.tissue = np.zeros_like(view.tissue)
        view.tissue[60:62, 60:64] = True  # 2 attention cells of 2x2 pixels
        result = classify_view(run.model, view, seed=0)
    assert len(result.boxes) == 2 and result.patch_attention.sum() == pytest.approx(1.0)
    assert np.isfinite(result.probs).all()
    centres = result.boxes[:, :2] + result.boxes[:, 2:] // 2  # level 0, thumbnail is 1/8
    assert ((centres >= 60 * 8) & (centres < 64 * 8)).all()


def test_model_files_that_do_not_match(run, tmp_path):
    shutil.copytree(run.run_dir, tmp_path / "run")
    config = json.loads((tmp_path / "run" / CONFIG_FILE).read_text())
    config["model"]["width"] = 12
    (tmp_path / "run" / CONFIG_FILE).write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"run/model.safetensors: weights do not match config"):
        load_model(tmp_path / "run")
    with pytest.raises(FileNotFoundError, match="is .*empty a run directory"):
        load_model(tmp_path / "empty")


def test_predict_leaves_the_callers_model_config_alone(run, dataset, tmp_path):
    before = run.model.config
    slide = [dataset / "slide_001.tiff"]
    summary = predict(
        run.model, slide, tmp_path, inputs=InputConfig(assume_mpp=0.25), progress=False
    )
    assert run.model.config is before and before.assume_mpp is None
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["model"]["config"]["assume_mpp"] == 0.25 and len(summary.results) == 1


def test_classification_is_unchanged_by_the_task_seam(run, predicted):
    """The module's run and predictions (the same as ``ats-wsi synth --n 8 --size 1024
    --seed 3``, ``train --epochs 2 --batch-size 2 --n-patches 6 --patch-size 32
    --low-res-max-side 128``, ``predict --seed 0``) against the files the release
    before the task seam wrote. Equal to the byte on the machine they were made on;
    the tolerance covers another CPU's float summation order (and the feature network
    computing each distinct position of the draws once since)."""
    before = json.loads(
        (Path(__file__).parent / "data" / "classification_before_tasks.json").read_text()
    )
    rows = files.read_csv(predicted.out_dir / outputs.PREDICTIONS)
    assert len(rows) == len(before["predictions"])
    for row, old in zip(rows, before["predictions"], strict=True):
        row.pop("path")
        row.pop("distinct_patches")  # added since (the feature network's work per slide)
        assert list(row) == list(old)
        for column, value in old.items():
            if column.startswith("prob_"):
                assert abs(float(row[column]) - float(value)) <= 2e-6, (row["slide"], column)
            else:
                assert row[column] == value, (row["slide"], column)
    metrics = files.read_csv(run.run_dir / "metrics.csv")
    for row, old in zip(metrics, before["metrics"], strict=True):
        assert [c for c in row if c != "seconds"] == list(old)
        for column, value in old.items():
            assert float(row[column]) == pytest.approx(float(value), abs=2e-6), column
