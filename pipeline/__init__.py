"""Attention sampling core: torch only (no readers, no Dask).

Public API (DESIGN section 3): ``sample``, ``expectation``, ``Expectation``,
``extract_patches``, ``SamplePatches``, ``attention_sampling``, ``SampleSoftmax``,
``MultinomialEntropy``; plus the ``PatchSource`` protocol that lazy slide levels
satisfy, the cell-to-patch mapping ``patch_offsets``, ``sample_patches`` (the
function behind ``SamplePatches``), ``mask_attention`` (restrict sampling to a mask),
``mask_on_grid`` (a mask pooled to the attention grid) and ``Draw`` (everything one
``AttentionSampling.draw`` produced); and the proposal distributions of DESIGN section
4b (``mix_uniform``, ``mix_prior``, ``explore``, ``linear_decay``) for
``sample(..., proposal=...)`` and the layers' ``exploration`` / ``prior_weight``.
"""

from .expectation import Expectation, expectation
from .layers import (
    AttentionSampling,
    Draw,
    Plan,
    SamplePatches,
    SampleSoftmax,
    attention_sampling,
    mask_on_grid,
    prior_on_grid,
    sample_patches,
)
from .patches import PatchSource, extract_patches, gather_patches, patch_offsets
from .proposals import explore, linear_decay, mix_prior, mix_uniform
from .regularizers import MultinomialEntropy
from .sampling import mask_attention, sample

__all__ = [
    "AttentionSampling",
    "Draw",
    "Plan",
    "Expectation",
    "MultinomialEntropy",
    "PatchSource",
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
    "prior_on_grid",
    "sample",
    "sample_patches",
]
