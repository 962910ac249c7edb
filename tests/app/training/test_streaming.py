"""The streaming training loop: the serial loop's weights at depth 0, reads ahead at
depth > 0, unreadable slides skipped, bounded handles, the on-disk view cache."""

from __future__ import annotations

import dataclasses
import os
import shutil

import numpy as np
import pytest
import torch

from pipeline.app.slide.labels import read_labels
from pipeline.app.slide.views import level0_mpp, low_res_tensor, patch_view, sampling_mask
from pipeline.app.tasks import task_of
from pipeline.app.training.data import load_slides
from pipeline.app.training.loop import new_model
from pipeline.app.training.streaming import (
    PaddedSource,
    Reader,
    SlideHandles,
    StreamItem,
    StreamOptions,
    ViewCache,
    stream_epoch,
)


@pytest.fixture
def labelled(dataset, small_model_config):
    rows = read_labels(dataset / "labels.csv", dataset).rows
    slides, _ = load_slides(rows, small_model_config, task_of(small_model_config), print, False)
    return slides


def _optimizer(model):
    return torch.optim.AdamW(model.parameters(), lr=3e-3)


def _stream(model, labelled, cache, order, reader=None, on_step=None, **options):
    items = [StreamItem(labelled[i].path, labelled[i].target) for i in order]
    optimizer = _optimizer(model)
    generator = torch.Generator().manual_seed(11)
    device, stream = torch.device("cpu"), StreamOptions(**options)
    results = stream_epoch(
        model, optimizer, items, cache, generator, device, stream, reader=reader, on_step=on_step
    )
    return results, optimizer


def _serial_reference(model, labelled, order, generator):
    """The loop before streaming, written out: one slide at a time, opened for its
    step, classified with the model's own draw, one optimizer step per slide."""
    import readers

    optimizer = _optimizer(model)
    model.train()
    for i in order:
        slide = labelled[i]
        with readers.open_slide(slide.path) as opened:
            source, _ = patch_view(opened, model.config, level0_mpp(opened, model.config))
            out = model.classify(
                low_res_tensor(slide.thumbnail), source, sampling_mask(slide.tissue), generator
            )
            loss = torch.nn.functional.cross_entropy(out.logits, torch.tensor([slide.target]))
            optimizer.zero_grad()
            (loss + out.draw.regularizer).backward()
            optimizer.step()


def test_one_batch_in_flight_of_single_slides_is_the_serial_loop(
    labelled, small_model_config, tmp_path
):
    order = np.random.default_rng(5).permutation(len(labelled))
    serial = new_model(small_model_config, 0, torch.device("cpu"))
    _serial_reference(serial, labelled, order, torch.Generator().manual_seed(11))
    streamed = new_model(small_model_config, 0, torch.device("cpu"))
    results, _ = _stream(
        streamed, labelled, ViewCache(tmp_path, small_model_config), order, batch_size=1, depth=1
    )
    assert len(results) == len(labelled)
    for (name, a), b in zip(
        serial.state_dict().items(), streamed.state_dict().values(), strict=True
    ):
        assert torch.equal(a, b), name
    # Reading ahead draws from weights one step old, weighed as a proposal: other
    # (finite) weights, the documented difference.
    ahead = new_model(small_model_config, 0, torch.device("cpu"))
    _stream(ahead, labelled, ViewCache(tmp_path, small_model_config), order, batch_size=1, depth=2)
    weights = [(a, b) for a, b in zip(serial.parameters(), ahead.parameters(), strict=True)]
    assert all(torch.isfinite(b).all() for _, b in weights)
    assert any(not torch.equal(a, b) for a, b in weights)


def test_reading_ahead_trains_on_every_slide_in_mini_batches(
    labelled, small_model_config, tmp_path
):
    cache = ViewCache(tmp_path, small_model_config)
    model = new_model(small_model_config, 0, torch.device("cpu"))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    reader = Reader()
    submitted, steps = [], []
    real_submit = reader.submit
    reader.submit = lambda *a: submitted.append(len(steps)) or real_submit(*a)
    results, _ = _stream(
        model,
        labelled,
        cache,
        range(len(labelled)),
        batch_size=3,
        depth=3,
        reader=reader,
        on_step=lambda: steps.append(1),
    )
    reader.close()
    assert len(results) == len(labelled) and len(steps) == 3  # 8 slides in batches of 3
    # Three batches planned and their reads submitted before the first step ran.
    assert submitted == [0, 0, 0]
    assert all(np.isfinite(r.loss) for r in results)
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_reading_ahead_is_deterministic_for_a_seed(labelled, small_model_config, tmp_path):
    """Batches are planned in the read thread with the weights snapshotted when they
    were submitted: the threads' timing cannot change what is trained."""
    runs = []
    for _ in range(2):
        model = new_model(small_model_config, 0, torch.device("cpu"))
        _stream(
            model,
            labelled,
            ViewCache(tmp_path, small_model_config),
            range(len(labelled)),
            batch_size=2,
            depth=3,
        )
        runs.append(model.state_dict())
    for name, a in runs[0].items():
        assert torch.equal(a, runs[1][name]), name


def test_an_unreadable_slide_is_skipped_and_training_goes_on(
    labelled, small_model_config, tmp_path
):
    broken = tmp_path / "broken.tiff"
    shutil.copy(labelled[0].path, broken)
    with open(broken, "r+b") as f:
        f.truncate(os.path.getsize(broken) // 3)  # tiles cut off: the view fails
    model = new_model(small_model_config, 0, torch.device("cpu"))
    items = [StreamItem(broken, 0), *(StreamItem(s.path, s.target) for s in labelled[1:])]
    messages = []
    results = stream_epoch(
        model,
        _optimizer(model),
        items,
        ViewCache(tmp_path / "views", small_model_config),
        generator=torch.Generator().manual_seed(0),
        device=torch.device("cpu"),
        options=StreamOptions(batch_size=2, depth=2),
        warn=messages.append,
    )
    assert len(results) == len(labelled) - 1
    assert len(messages) == 1 and "broken.tiff" in messages[0]


def _open_files() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_handles_stay_bounded(labelled):
    handles = SlideHandles(max_open=2)
    before = _open_files()
    for _ in range(3):
        for slide in labelled:
            level = handles.slide(slide.path).levels[0]
            assert level.read_patches(np.array([[0, 0]]), (8, 8)).shape == (1, 8, 8, 3)
            assert len(handles) <= 2
    assert _open_files() - before <= 2 * 2  # at most two slides' descriptors
    handles.close()
    assert _open_files() <= before


def test_view_cache_reads_once_and_notices_a_changed_file(
    dataset, small_model_config, tmp_path, monkeypatch
):
    slide = tmp_path / "slide.tiff"
    shutil.copy(dataset / "slide_001.tiff", slide)
    cache = ViewCache(tmp_path / "views", small_model_config)
    first = cache.load(slide)
    calls = []
    import pipeline.app.training.streaming as streaming

    real = streaming.open_view
    monkeypatch.setattr(streaming, "open_view", lambda *a: calls.append(a) or real(*a))
    again = ViewCache(tmp_path / "views", small_model_config).load(slide)  # the next run
    assert calls == []
    np.testing.assert_array_equal(first.thumbnail, again.thumbnail)
    np.testing.assert_array_equal(first.tissue, again.tissue)
    os.utime(slide, ns=(1, 1))  # a replaced file: another mtime
    cache.load(slide)
    assert len(calls) == 1
    other = dataclasses.replace(small_model_config, low_res_max_side=64)
    assert ViewCache(tmp_path / "views", other).load(slide).thumbnail.shape[0] == 64


def test_padded_source_keeps_the_mapping(labelled):
    handles = SlideHandles()
    level = handles.slide(labelled[0].path).levels[0]
    padded = PaddedSource(level, (1.5, 1.0))
    assert padded.shape == (round(level.shape[0] * 1.5), level.shape[1], 3)
    offsets = np.array([[10, 20], [level.shape[0] - 4, 0]])
    np.testing.assert_array_equal(
        padded.read_patches(offsets, (8, 8)), level.read_patches(offsets, (8, 8))
    )
    handles.close()


def test_augmented_batches_train(labelled, small_model_config, tmp_path):
    from pipeline.app.training.augment import Augmentation

    model = new_model(small_model_config, 0, torch.device("cpu"))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    results, _ = _stream(
        model,
        labelled,
        ViewCache(tmp_path, small_model_config),
        range(len(labelled)),
        batch_size=4,
        depth=2,
        augmentation=Augmentation(flips=True, color_jitter=0.2, hed_jitter=0.05),
    )
    assert len(results) == len(labelled) and all(np.isfinite(r.loss) for r in results)
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_training_reads_views_through_the_disk_cache(dataset, small_model_config, tmp_path):
    rows = read_labels(dataset / "labels.csv", dataset).rows
    task = task_of(small_model_config)
    first, _ = load_slides(rows, small_model_config, task, print, False, cache_dir=tmp_path)
    assert len(list(tmp_path.glob("*.npz"))) == len(rows)
    again, _ = load_slides(rows, small_model_config, task, print, False, cache_dir=tmp_path)
    for a, b in zip(first, again, strict=True):
        np.testing.assert_array_equal(a.thumbnail, b.thumbnail)
