"""Command lines of ``ats-wsi`` that the application's tests run (argv lists for
``cli.main`` or a subprocess)."""

from __future__ import annotations

import os


def train_argv(slides: os.PathLike, labels: os.PathLike, out: os.PathLike, *extra: str) -> list:
    """``train --slides SLIDES --labels LABELS --out OUT`` and ``extra`` options."""
    return ["train", "--slides", str(slides), "--labels", str(labels), "--out", str(out), *extra]


def predict_argv(model: os.PathLike, slides: os.PathLike, out: os.PathLike, *extra: str) -> list:
    """``predict --model MODEL --slides SLIDES --out OUT`` and ``extra`` options."""
    return ["predict", "--model", str(model), "--slides", str(slides), "--out", str(out), *extra]
