"""The slide application: attention sampling on whole-slide images, end to end.

Sits above the torch-only estimator core (``pipeline``) and ``readers``::

    from pipeline.app import train, predict, load_model

    result = train("slides/", "labels.csv", "run/")                 # -> TrainResult
    cv = cross_validate("slides/", "labels.csv", "cv/", folds=5)    # -> CrossValidation
    summary = predict("run/", ["more_slides/"], "out/")             # -> PredictSummary
    model, config = load_model("run/")
    one = predict_slide(model, "slide.svs", seed=0)                 # -> SlideResult
    evaluate("out/predictions.csv", "truth.csv", "metrics/")       # -> Evaluation
    with connect(workers=4) as client:                              # a local Dask cluster
        predict(model, ["more_slides/"], "out/", runner=on_cluster(client))

Names are imported on first use, so ``import pipeline.app`` loads no more than the
``pipeline`` core (torch). The modules are named ``training`` and ``prediction`` so
that no submodule shadows the functions ``train`` and ``predict``.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "ModelConfig": "pipeline.app.config",
    "TrainConfig": "pipeline.app.config",
    "RunConfig": "pipeline.app.config",
    "PredictConfig": "pipeline.app.config",
    "ReportConfig": "pipeline.app.config",
    "InputConfig": "pipeline.app.config",
    "SlideClassifier": "pipeline.app.model.networks",
    "load_model": "pipeline.app.model.checkpoint",
    "save_model": "pipeline.app.model.checkpoint",
    "tissue_mask": "pipeline.app.slide.tissue",
    "open_view": "pipeline.app.slide.views",
    "train": "pipeline.app.training.loop",
    "TrainResult": "pipeline.app.training.loop",
    "cross_validate": "pipeline.app.training.crossval",
    "CrossValidation": "pipeline.app.training.crossval",
    "Task": "pipeline.app.tasks",
    "task_of": "pipeline.app.tasks",
    "evaluate": "pipeline.app.results.evaluation",
    "Evaluation": "pipeline.app.results.evaluation",
    "read_labels": "pipeline.app.slide.labels",
    "predict": "pipeline.app.prediction.batch",
    "predict_slide": "pipeline.app.prediction.inference",
    "slide_seed": "pipeline.app.slide.inputs",
    "SlideResult": "pipeline.app.prediction.inference",
    "PredictSummary": "pipeline.app.prediction.batch",
    "prepare_batch": "pipeline.app.prediction.batch",
    "write_dataset": "pipeline.app.synth",
    "run_demo": "pipeline.app.demo",
    "connect": "pipeline.app.prediction.cluster",
    "predict_on_client": "pipeline.app.prediction.cluster",
    "on_cluster": "pipeline.app.prediction.cluster",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'pipeline.app' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
