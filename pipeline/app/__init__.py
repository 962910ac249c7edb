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
    "SlideClassifier": "pipeline.app.models",
    "load_model": "pipeline.app.checkpoint",
    "save_model": "pipeline.app.checkpoint",
    "tissue_mask": "pipeline.app.tissue",
    "open_view": "pipeline.app.slides",
    "train": "pipeline.app.training",
    "TrainResult": "pipeline.app.training",
    "cross_validate": "pipeline.app.training",
    "CrossValidation": "pipeline.app.training",
    "evaluate": "pipeline.app.evaluation",
    "Evaluation": "pipeline.app.evaluation",
    "read_labels": "pipeline.app.labels",
    "predict": "pipeline.app.prediction",
    "predict_slide": "pipeline.app.inference",
    "slide_seed": "pipeline.app.inference",
    "SlideResult": "pipeline.app.inference",
    "PredictSummary": "pipeline.app.prediction",
    "prepare_batch": "pipeline.app.prediction",
    "write_dataset": "pipeline.app.demo_dataset",
    "run_demo": "pipeline.app.demo",
    "connect": "pipeline.app.cluster",
    "predict_on_client": "pipeline.app.cluster",
    "on_cluster": "pipeline.app.cluster",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'pipeline.app' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
