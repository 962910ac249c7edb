"""Attention sampling core: torch only (no readers, no Dask).

Public API (DESIGN section 3): ``sample``, ``expectation``, ``Expectation``,
``extract_patches``, ``SamplePatches``, ``attention_sampling``, ``SampleSoftmax``,
``MultinomialEntropy``, and the ``PatchSource`` protocol that lazy slide levels satisfy.
"""

from .expectation import Expectation, expectation
from .sampling import mask_attention, sample

__all__ = ["Expectation", "expectation", "mask_attention", "sample"]
