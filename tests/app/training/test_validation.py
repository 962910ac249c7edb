"""Validation during training: splits that do not leak, cross-validation, external
validation, best-epoch selection and early stopping, class balance, and the labels
hygiene messages, on the real synthetic TIFF slides of ``conftest.dataset``."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from pipeline.app import files
from pipeline.app.errors import UserError
from pipeline.app.model.checkpoint import LAST_MODEL_FILE, MODEL_FILE
from pipeline.app.tasks import Classification
from pipeline.app.tasks.classification import class_weights, point_metrics
from pipeline.app.training import loop
from pipeline.app.training.crossval import CV_SUMMARY_FILE, cross_validate
from pipeline.app.training.data import LabelledSlide
from pipeline.app.training.loop import METRICS_FILE, STATE_FILE, epoch_order, train
from pipeline.app.training.splits import SPLIT_FILE, assign_folds

NEG, POS = "negative", "positive"


def quiet(**kwargs):
    return {"device": "cpu", "progress": False, "log": lambda _: None, **kwargs}


def label_rows(n, **extra):
    """The dataset's labels: even slides negative, odd positive."""
    return [{"slide": f"slide_{i:03d}.tiff", "label": (NEG, POS)[i % 2], **extra} for i in range(n)]


@pytest.mark.parametrize("n_folds", [2, 3, 5])
def test_grouped_folds_never_split_a_case(n_folds):
    rng = np.random.default_rng(n_folds)
    for seed in range(5):
        cases = [f"p{c}" for c in rng.integers(0, 20, size=60)]
        labels = rng.integers(0, 2, size=60)
        folds = assign_folds(labels, cases, n_folds, seed)
        assert set(folds) == set(range(n_folds))
        for case in set(cases):
            assert len({f for f, c in zip(folds, cases, strict=True) if c == case}) == 1


def test_too_many_folds_is_a_user_error():
    with pytest.raises(UserError, match="3 folds need at least 3 cases"):
        assign_folds([0, 1, 0, 1], ["a", "a", "b", "b"], 3, seed=0)


def test_cross_validation_keeps_cases_together(
    dataset, tmp_path, small_model_config, quick_train_config, n_slides
):
    rows = [{**r, "case": f"patient{i // 2}"} for i, r in enumerate(label_rows(n_slides))]
    files.write_csv(tmp_path / "labels.csv", ["slide", "label", "case"], rows)
    config = replace(quick_train_config, epochs=1)
    cv = cross_validate(
        dataset, tmp_path / "labels.csv", tmp_path / "cv", 2, small_model_config, config, **quiet()
    )
    val_sets = []
    for k in (1, 2):
        split = files.read_csv(tmp_path / "cv" / f"fold_{k}" / SPLIT_FILE)
        assert len(split) == n_slides
        for case in {r["case"] for r in split}:
            assert len({r["set"] for r in split if r["case"] == case}) == 1, (k, case)
        val_sets.append({r["slide"] for r in split if r["set"] == "val"})
        assert (tmp_path / "cv" / f"fold_{k}" / MODEL_FILE).is_file()
    assert not val_sets[0] & val_sets[1] and len(val_sets[0] | val_sets[1]) == n_slides
    summary = files.read_csv(tmp_path / "cv" / CV_SUMMARY_FILE)
    assert [r["fold"] for r in summary] == ["1", "2", "mean", "sd"]
    losses = [float(r["val_loss"]) for r in summary[:2]]
    assert float(summary[2]["val_loss"]) == pytest.approx(np.mean(losses), abs=1e-6)
    assert float(summary[3]["val_loss"]) == pytest.approx(np.std(losses, ddof=1), abs=1e-6)
    assert [f.best_epoch for f in cv.folds] == [1, 1]


def test_resume_with_changed_labels_refuses(
    dataset, tmp_path, small_model_config, quick_train_config, n_slides
):
    labels = tmp_path / "labels.csv"
    files.write_csv(labels, ["slide", "label"], label_rows(n_slides))
    one = replace(quick_train_config, epochs=1)
    train(dataset, labels, tmp_path / "run", small_model_config, one, **quiet())
    split_before = (tmp_path / "run" / SPLIT_FILE).read_text()
    rows = label_rows(n_slides)
    rows[3]["label"] = NEG
    files.write_csv(labels, ["slide", "label"], rows)
    with pytest.raises(UserError, match="labels changed since .* slide_003.*--resplit"):
        train(dataset, labels, tmp_path / "run", small_model_config, quick_train_config, **quiet())
    assert (tmp_path / "run" / SPLIT_FILE).read_text() == split_before  # nothing touched
    # Unchanged labels resume; --resplit starts over from epoch 1 with the new labels.
    files.write_csv(labels, ["slide", "label"], label_rows(n_slides))
    resumed = train(
        dataset, labels, tmp_path / "run", small_model_config, quick_train_config, **quiet()
    )
    assert [h["epoch"] for h in resumed.history] == [1, 2]
    files.write_csv(labels, ["slide", "label"], rows)
    lines = []
    again = train(
        dataset,
        labels,
        tmp_path / "run",
        small_model_config,
        one,
        **quiet(log=lines.append, resplit=True),
    )
    assert [h["epoch"] for h in again.history] == [1] and not any("resuming" in x for x in lines)
    split = files.read_csv(tmp_path / "run" / SPLIT_FILE)
    assert next(r["label"] for r in split if r["slide"] == "slide_003") == NEG


def scripted_auc(monkeypatch, values):
    """Injected: the validation AUC of epoch k is ``values[k-1]`` (the real metrics
    otherwise), so that which epoch is best is known in advance."""
    calls = iter(values)

    def fake(task, targets, scores):
        real = point_metrics(np.asarray(targets), np.asarray(scores))
        return {**real, "roc_auc": next(calls)}

    monkeypatch.setattr(Classification, "metrics", fake)


def test_best_epoch_weights_are_kept(
    dataset, tmp_path, small_model_config, quick_train_config, monkeypatch
):
    labels = dataset / "labels.csv"
    scripted_auc(monkeypatch, [0.6, 0.9, 0.7])
    three = train(
        dataset,
        labels,
        tmp_path / "a",
        small_model_config,
        replace(quick_train_config, epochs=3),
        **quiet(),
    )
    assert three.best_epoch == 2
    assert json.loads((tmp_path / "a" / STATE_FILE).read_text())["best_epoch"] == 2
    scripted_auc(monkeypatch, [0.6, 0.9])
    two = train(
        dataset,
        labels,
        tmp_path / "b",
        small_model_config,
        replace(quick_train_config, epochs=2),
        **quiet(),
    )
    best, last = load_file(tmp_path / "a" / MODEL_FILE), load_file(tmp_path / "a" / LAST_MODEL_FILE)
    epoch_2 = load_file(tmp_path / "b" / LAST_MODEL_FILE)
    assert best.keys() == epoch_2.keys()
    for name in best:
        torch.testing.assert_close(best[name], epoch_2[name], rtol=0, atol=0)
        torch.testing.assert_close(three.model.state_dict()[name], best[name], rtol=0, atol=0)
    assert any(not torch.equal(best[n], last[n]) for n in best)
    metrics = files.read_csv(tmp_path / "a" / METRICS_FILE)
    assert [r["val_roc_auc"] for r in metrics] == ["0.6", "0.9", "0.7"]
    assert two.best_epoch == 2


def test_patience_stops_early(
    dataset, tmp_path, small_model_config, quick_train_config, monkeypatch
):
    scripted_auc(monkeypatch, [0.9, 0.5, 0.5, 0.5, 0.5])
    lines = []
    config = replace(quick_train_config, epochs=5, patience=2)
    result = train(
        dataset,
        dataset / "labels.csv",
        tmp_path / "run",
        small_model_config,
        config,
        **quiet(log=lines.append),
    )
    assert [h["epoch"] for h in result.history] == [1, 2, 3] and result.best_epoch == 1
    assert any("early stop after epoch 3" in line for line in lines)


def test_external_validation_set(
    dataset, tmp_path, small_model_config, quick_train_config, n_slides
):
    rows = label_rows(n_slides)
    files.write_csv(tmp_path / "train.csv", ["slide", "label"], rows[:6])
    files.write_csv(tmp_path / "val.csv", ["slide", "label"], rows[6:])
    result = train(
        dataset,
        tmp_path / "train.csv",
        tmp_path / "run",
        small_model_config,
        replace(quick_train_config, epochs=1),
        **quiet(val_labels=tmp_path / "val.csv"),
    )
    state = json.loads((tmp_path / "run" / STATE_FILE).read_text())
    assert sorted(state["val_slides"]) == [str(dataset / r["slide"]) for r in rows[6:]]
    assert len(state["train_slides"]) == 6 and result.history[0]["val_loss"] is not None
    files.write_csv(tmp_path / "val.csv", ["slide", "label"], rows[5:])
    with pytest.raises(UserError, match="val.csv: 1 validation slides are also in .*slide_005"):
        train(
            dataset,
            tmp_path / "train.csv",
            tmp_path / "run2",
            small_model_config,
            quick_train_config,
            **quiet(val_labels=tmp_path / "val.csv"),
        )


def test_hygiene_messages_before_training(
    dataset, tmp_path, small_model_config, quick_train_config
):
    slides = tmp_path / "slides"
    slides.mkdir()
    for i in range(4):
        shutil.copy(dataset / f"slide_{i:03d}.tiff", slides)
    rows = [
        {"slide": "slide_000.tiff", "label": NEG},
        {"slide": "slide_001", "label": POS},
        {"slide": "slide_002.tiff", "label": "  "},
        {"slide": "slide_003.tiff", "label": POS},
        {"slide": "slide_003.tiff", "label": POS},
        {"slide": "slide_002.tiff", "label": NEG},
        {"slide": "slide_002.tiff", "label": POS},
        {"slide": "gone.tiff", "label": "other"},
    ]
    files.write_csv(slides / "labels.csv", ["slide", "label"], rows)
    config = small_model_config.__class__(
        **{**small_model_config.__dict__, "class_names": (NEG, "other", POS)}
    )
    lines = []
    result = train(
        slides,
        slides / "labels.csv",
        tmp_path / "run",
        config,
        replace(quick_train_config, epochs=1, val_fraction=0.0),
        **quiet(log=lines.append),
    )
    log = "\n".join(lines)
    expected = [
        "line 4: slide_002.tiff: empty label; row left out",
        "slide slide_002 listed on lines 7, 8 with conflicting labels",
        "slide slide_003 listed on lines 5, 6 with the same label; counted once",
        "line 3: slide_001 listed without its extension; using",
        "gone.tiff: FileNotFoundError",
        "class 'other' has no readable slide to train on",
        "no validation slides: no model selection or early stopping",
    ]
    for message in expected:
        assert message in log, message
    assert log.index("class 'other'") < log.index("epoch 1:")  # said before training
    assert len(result.skipped) == 3  # empty label, conflicting slide, missing file
    (row,) = files.read_csv(tmp_path / "run" / METRICS_FILE)
    assert [row[c] for c in loop.val_metric_columns(result.model.task)] == [""] * 4  # not "nan"
    assert "nan" not in log


def test_fewer_than_two_readable_classes_refuses(dataset, tmp_path, small_model_config):
    rows = [
        {"slide": "slide_000.tiff", "label": NEG},
        {"slide": "slide_002.tiff", "label": NEG},
        {"slide": "missing.tiff", "label": POS},
    ]
    files.write_csv(tmp_path / "labels.csv", ["slide", "label"], rows)
    with pytest.raises(UserError, match="fewer than two classes .*'negative'"):
        train(dataset, tmp_path / "labels.csv", tmp_path / "run", small_model_config, **quiet())
    assert not (tmp_path / "run" / MODEL_FILE).exists()


def fake_slides(labels):
    """LabelledSlides that are never read (only their labels matter here)."""
    empty = np.zeros((1, 1, 3), np.uint8)
    return [
        LabelledSlide(None, y, empty, empty[..., 0] > 0, f"s{i}", f"s{i}")
        for i, y in enumerate(labels)
    ]


def test_balance_weights_and_sampling(quick_train_config):
    slides = fake_slides([0] * 6 + [1] * 2)
    np.testing.assert_allclose(class_weights([s.target for s in slides], 2), [8 / 12, 8 / 4])
    task = Classification(("a", "b"))
    config = replace(quick_train_config, balance="sampling")
    drawn = np.concatenate([epoch_order(slides, config, e, task) for e in range(1, 201)])
    share = np.mean([slides[i].target for i in drawn])
    assert abs(share - 0.5) < 0.03  # 1600 draws: sd 0.0125
    plain = epoch_order(slides, quick_train_config, 1, task)
    assert sorted(plain) == list(range(8))
