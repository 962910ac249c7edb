"""Regularizers on the attention distribution."""

from __future__ import annotations

from torch import Tensor, nn

from . import _checks


class MultinomialEntropy(nn.Module):
    """``strength * mean_b sum_k p_k log(p_k + eps)``: minus ``strength`` times the entropy.

    Added to a loss that is minimised, a positive ``strength`` raises the entropy of
    the attention (spreads it out), a negative one lowers it (sharpens it). This is the
    reference library's ``ats.utils.regularizers.MultinomialEntropy``, sign included.

    ``forward(attention [B, *S])`` (probabilities) -> a scalar tensor.
    """

    def __init__(self, strength: float = 1.0, eps: float = 1e-6) -> None:
        super().__init__()
        if eps <= 0:
            raise ValueError(f"eps must be > 0, got {eps}")
        self.strength = strength
        self.eps = eps

    def forward(self, attention: Tensor) -> Tensor:
        _checks.tensor(attention, "attention", min_dim=2)
        p = attention.flatten(1)  # [B, P]
        return self.strength * (p * (p + self.eps).log()).sum(1).mean()

    def extra_repr(self) -> str:
        return f"strength={self.strength}, eps={self.eps}"
