"""Attention sampling core: torch only (no readers, no Dask).

Public API (docs/core.md): ``sample``, ``expectation``, ``Expectation``,
``extract_patches``, ``SamplePatches``, ``attention_sampling``, ``SampleSoftmax``,
``MultinomialEntropy``; plus the ``PatchSource`` protocol that lazy slide levels
satisfy, the cell-to-patch mapping ``patch_offsets``, ``sample_patches`` (the
function behind ``SamplePatches``), ``mask_attention`` (restrict sampling to a mask),
``mask_on_grid`` / ``prior_on_grid`` (a mask or prior pooled to the attention grid),
``Draw`` (everything one ``AttentionSampling.draw`` produced) and ``Plan`` (its
positions, for loops that read patches ahead); and the proposal distributions of
docs/estimator.md (``mix_uniform``, ``mix_prior``, ``explore``, ``linear_decay``) for
``sample(..., proposal=...)`` and the layers' ``exploration`` / ``prior_weight``, with
``prior_cross_entropy`` to fit an attention to a content prior.

Names are imported on first use (PEP 562), so ``import pipeline`` (and the ``ats-wsi``
command's ``--help``) does not load torch until a name is used.
"""

from __future__ import annotations

import importlib
import sys
import types

_EXPORTS = {
    "Expectation": "expectation",
    "expectation": "expectation",
    "AttentionSampling": "layers",
    "Draw": "layers",
    "Plan": "layers",
    "SamplePatches": "layers",
    "SampleSoftmax": "layers",
    "attention_sampling": "layers",
    "mask_on_grid": "layers",
    "prior_on_grid": "layers",
    "sample_patches": "layers",
    "PatchSource": "patches",
    "extract_patches": "patches",
    "gather_patches": "patches",
    "patch_offsets": "patches",
    "explore": "proposals",
    "linear_decay": "proposals",
    "mix_prior": "proposals",
    "mix_uniform": "proposals",
    "prior_cross_entropy": "proposals",
    "MultinomialEntropy": "regularizers",
    "mask_attention": "sampling",
    "sample": "sampling",
}

__all__ = [
    "AttentionSampling",
    "Draw",
    "Expectation",
    "MultinomialEntropy",
    "PatchSource",
    "Plan",
    "SamplePatches",
    "SampleSoftmax",
    "attention_sampling",
    "expectation",
    "explore",
    "extract_patches",
    "gather_patches",
    "linear_decay",
    "mask_attention",
    "mask_on_grid",
    "mix_prior",
    "mix_uniform",
    "patch_offsets",
    "prior_cross_entropy",
    "prior_on_grid",
    "sample",
    "sample_patches",
]


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'pipeline' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"pipeline.{_EXPORTS[name]}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})


class _Package(types.ModuleType):
    """Keeps a submodule from shadowing the function it is named after: importing
    ``pipeline.expectation`` (as ``pipeline.layers`` does) binds the package attribute
    ``expectation`` to the module; the public name is the function."""

    def __setattr__(self, name: str, value: object) -> None:
        if isinstance(value, types.ModuleType) and name in _EXPORTS:
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
