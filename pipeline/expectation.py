"""Monte-Carlo estimate of ``sum_k a_k f_k`` from sampled features, with unbiased gradients.

Notation (docs/estimator.md, which also derives why each formula is unbiased): draws
``i_0 .. i_{N-1}``, ``a_m`` the probability of draw ``m`` and ``f_m`` its feature;
without replacement ``pm_m = 1 - sum_{j<m} a_j`` is the mass still available at draw
``m``.

- With replacement: ``F = mean_m f_m``; ``dF/df_m = 1/N``, ``dF/da_m = f_m / (N a_m)``.
- Without replacement: ``E_m = sum_{j<m} a_j f_j + pm_m f_m`` is unbiased for every
  ``m``; ``F = mean_m E_m = sum_m w_m f_m`` with ``w_m = (pm_m + (N-1-m) a_m) / N``, so
  ``dF/df_m = w_m``. The default (``"unbiased"``) attention gradient is
  ``dF/da_m = f_m (pm_m / a_m + N-1-m) / N``: its expectation over the draws is ``f_k``
  at every position of positive probability. ``"reference"`` selects the formula of
  the original TensorFlow library (``ats/core/expectation.py``),
  ``dF/da_m = (E_m pm_m / a_m + sum_{j<m} f_j - m f_m) / N``, which is biased; it is
  kept for comparison.

Draws from a proposal ``q`` (docs/estimator.md, sampling from a proposal; ``q_m`` its
probability at draw ``m``, a constant, as is ``Q_m = 1 - sum_{j<m} q_j`` without
replacement):

- With replacement: ``F = mean_m (a_m / q_m) f_m``; ``dF/df_m = a_m / (N q_m)``,
  ``dF/da_m = f_m / (N q_m)``.
- Without replacement: ``E_m = sum_{j<m} a_j f_j + (Q_m a_m / q_m) f_m``, so
  ``w_m = (Q_m a_m / q_m + (N-1-m) a_m) / N`` and ``dF/da_m = f_m (Q_m / q_m + N-1-m) / N``.

With ``q = a`` these are the formulas above, bit for bit (``a_m / q_m`` is then exactly
1). ``"reference"`` is not defined for a proposal.

``"linear"`` (without replacement only) weighs the ``E_m`` instead of averaging them:
``F = sum_m c_m E_m / Z`` with ``c_m = m + 1`` and ``Z = sum_m c_m``. Every ``E_m`` is
unbiased, so any fixed weights summing to 1 keep ``F`` and both gradients unbiased;
later draws hold more of the sum exactly (``sum_{j<m} a_j f_j``) and leave less to the
one sampled term, so when the attention is peaked they vary less, and weighing them
more lowers the variance of ``F``. (With a flat attention over many more positions
than draws the ``E_m`` are nearly independent one-sample estimates and the uniform mean
is better: with ``N = 10`` the linear weights' ``sum_m (c_m / Z)^2`` is 0.127 against
0.1.) With ``t_m = sum_{m'>m} c_m'``
(``N-1-m`` for the uniform ``c_m = 1``): ``w_m = (c_m Q_m a_m / q_m + t_m a_m) / Z`` and
``dF/da_m = f_m (c_m Q_m / q_m + t_m) / Z``.

Exhausted support: a draw of probability zero under the distribution drawn from
(``a``, or ``q``) means every position of positive probability was drawn before it
(Gumbel top-k draws them last), and from there on every ``E_m`` is the exact sum
(``a > 0`` implies ``q > 0``). Such a batch item returns the exact sum
``sum_m a_m f_m`` outright, with its exact gradients (``a_m`` for the features,
``f_m`` for the attention), for both estimators; ``Q_m / q_m`` is never formed as
``0/0``. Whether this happens depends only on that distribution (its support has at
most ``N`` positions), so the estimator stays unbiased.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.autograd.function import FunctionCtx, once_differentiable

from . import _checks

ESTIMATORS = ("unbiased", "reference", "linear")


def expectation(
    features: Tensor,
    sampled_attention: Tensor,
    replace: bool = False,
    estimator: str = "unbiased",
    *,
    sampled_proposal: Tensor | None = None,
) -> Tensor:
    """Estimate the attention-weighted mean of all features from ``N`` sampled ones.

    Args:
        features (Tensor[B, N, ...]): features of the sampled positions, in draw order;
            any trailing shape.
        sampled_attention (Tensor[B, N]): the probabilities of those positions (the
            second output of ``sample``).
        replace: whether the positions were drawn with replacement.
        estimator: ``"unbiased"`` (default) or ``"reference"``, the attention gradient
            used without replacement (see the module docstring); with replacement both
            are the same. ``"reference"`` with ``sampled_proposal`` is a ``ValueError``:
            the reference library defines no estimator for draws from a proposal.
            ``"linear"``: unbiased, the draws' estimates ``E_m`` weighted in proportion
            to ``m + 1`` (lower variance for a peaked attention; without replacement
            only, a ``ValueError`` with ``replace=True``).
        sampled_proposal (Tensor[B, N] | None): when the positions were drawn from a
            proposal ``q`` (``sample(..., proposal=q)``, its third output), ``q`` at
            those positions; a constant (no gradient). ``None``: drawn from the
            attention itself.

    Returns:
        Tensor[B, ...]: the estimate. Its gradient w.r.t. ``features`` and
        ``sampled_attention`` is, in expectation over the draws, the gradient of the
        exact ``sum_k a_k f_k``.
    """
    _checks.tensor(features, "features", min_dim=2)
    _checks.tensor(sampled_attention, "sampled_attention", min_dim=2)
    _checks.floating(features, "features")
    _checks.floating(sampled_attention, "sampled_attention")
    if sampled_attention.dim() != 2 or sampled_attention.shape != features.shape[:2]:
        raise ValueError(
            f"sampled_attention must have shape [B, N] = {tuple(features.shape[:2])} "
            f"(the first two axes of features), got {tuple(sampled_attention.shape)}"
        )
    _check_estimator(estimator, replace)
    if sampled_proposal is not None:
        _checks.tensor(sampled_proposal, "sampled_proposal")
        _checks.floating(sampled_proposal, "sampled_proposal")
        _checks.same_shape(
            sampled_proposal, sampled_attention, "sampled_proposal", "sampled_attention"
        )
        if estimator == "reference":
            raise ValueError(
                "estimator='reference' is not defined for draws from a proposal "
                "(sampled_proposal given); use estimator='unbiased'"
            )
        sampled_proposal = sampled_proposal.detach()
    if replace:
        return _WithReplacement.apply(features, sampled_attention, sampled_proposal)
    return _WithoutReplacement.apply(features, sampled_attention, sampled_proposal, estimator)


def _check_estimator(estimator: str, replace: bool) -> None:
    if estimator not in ESTIMATORS:
        raise ValueError(f"estimator must be one of {ESTIMATORS}, got {estimator!r}")
    if estimator == "linear" and replace:
        raise ValueError(
            "estimator='linear' weighs draws made without replacement; with replacement "
            "the draws are exchangeable and the uniform mean ('unbiased') is best"
        )


class Expectation(nn.Module):
    """Module form of :func:`expectation`.

    ``forward(features, sampled_attention, *, sampled_proposal=None)``.
    """

    def __init__(self, replace: bool = False, estimator: str = "unbiased") -> None:
        super().__init__()
        _check_estimator(estimator, replace)
        self.replace = replace
        self.estimator = estimator

    def forward(
        self, features: Tensor, sampled_attention: Tensor, *, sampled_proposal: Tensor | None = None
    ) -> Tensor:
        return expectation(
            features,
            sampled_attention,
            self.replace,
            self.estimator,
            sampled_proposal=sampled_proposal,
        )

    def extra_repr(self) -> str:
        return f"replace={self.replace}, estimator={self.estimator!r}"


def _per_draw(values: Tensor, like: Tensor) -> Tensor:
    """``values [B, N]`` viewed to broadcast against ``like [B, N, ...]``."""
    return values.view(*values.shape, *([1] * (like.dim() - 2)))


def _dot(grad: Tensor, features: Tensor) -> Tensor:
    """``<grad, f_m>`` for every draw: ``grad [B, ...]``, ``features [B, N, ...]`` -> ``[B, N]``."""
    return (grad.unsqueeze(1) * features).flatten(2).sum(-1)


def _divide(numerator: Tensor | float, probability: Tensor) -> Tensor:
    """``numerator / probability`` where ``probability > 0``, 0 where a zero-probability
    position was drawn (never ``0/0``)."""
    positive = probability > 0
    return torch.where(positive, numerator / torch.where(positive, probability, 1), 0)


class _WithReplacement(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: FunctionCtx, features: Tensor, attention: Tensor, proposal: Tensor | None
    ) -> Tensor:
        ctx.attention_dtype = attention.dtype
        if proposal is None:
            ctx.save_for_backward(features, attention, None)
            return features.mean(dim=1)
        # Importance weights a_m / q_m, exactly 1 where q = a.
        importance = _divide(attention.detach().to(features.dtype), proposal.to(features.dtype))
        ctx.save_for_backward(features, proposal, importance)
        return (_per_draw(importance, features) * features).mean(dim=1)

    @staticmethod
    @once_differentiable
    def backward(ctx: FunctionCtx, grad: Tensor) -> tuple[Tensor | None, Tensor | None, None]:
        features, drawn_from, importance = ctx.saved_tensors
        n = features.shape[1]
        grad_features = grad_attention = None
        if ctx.needs_input_grad[0]:
            grad_features = (grad.unsqueeze(1) / n).expand_as(features)
            if importance is not None:
                grad_features = grad_features * _per_draw(importance, features)
        if ctx.needs_input_grad[1]:
            inverse = _divide(1, drawn_from.to(features.dtype))
            grad_attention = (_dot(grad, features) * inverse / n).to(ctx.attention_dtype)
        return grad_features, grad_attention, None


class _WithoutReplacement(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: FunctionCtx,
        features: Tensor,
        attention: Tensor,
        proposal: Tensor | None,
        estimator: str,
    ) -> Tensor:
        n = features.shape[1]
        # The remaining mass 1 - cumsum is computed in float64: late draws of a peaked
        # map leave little mass and float32 cancellation would distort Q / q.
        a = attention.detach().to(torch.float64)
        q = a if proposal is None else proposal.to(torch.float64)
        positive = q > 0
        remaining = 1 - (q.cumsum(dim=1) - q)  # Q_m (pm_m when q = a)
        # Q_m >= q_m always holds exactly; rounding must not break it, and after the
        # support is exhausted the remaining mass is exactly 0.
        remaining = torch.where(positive, torch.maximum(remaining, q), 0)
        own, later, total = _draw_weights(n, estimator, a)
        exhausted = (~positive).any(dim=1, keepdim=True)  # [B, 1]
        # Q_m a_m / q_m, with a_m / q_m exactly 1 where q = a: pm_m bit for bit.
        current = remaining * _divide(a, q)
        weights = torch.where(exhausted, a, (own * current + later * a) / total)  # [B, N]
        ctx.estimator = estimator
        ctx.attention_dtype = attention.dtype
        ctx.save_for_backward(features, a, q, remaining, weights, exhausted)
        weights = weights.to(features.dtype)
        return (_per_draw(weights, features) * features).sum(dim=1)

    @staticmethod
    @once_differentiable
    def backward(ctx: FunctionCtx, grad: Tensor) -> tuple[Tensor | None, Tensor | None, None, None]:
        features, a, q, remaining, weights, exhausted = ctx.saved_tensors
        n = features.shape[1]
        grad_features = grad_attention = None
        if ctx.needs_input_grad[0]:
            grad_features = _per_draw(weights.to(features.dtype), features) * grad.unsqueeze(1)
        if ctx.needs_input_grad[1]:
            g_f = _dot(grad, features).to(torch.float64)  # <grad, f_m>, [B, N]
            ratio = remaining * _divide(1, q)  # Q_m / q_m, 0 for zero-probability draws
            own, later, total = _draw_weights(n, ctx.estimator, a)
            if ctx.estimator == "reference":
                # <grad, E_m> = sum_{j<m} a_j <grad, f_j> + pm_m <grad, f_m>
                g_estimate = _exclusive_cumsum(a * g_f) + remaining * g_f
                m = torch.arange(n, device=a.device, dtype=a.dtype)
                per_draw = g_estimate * ratio + _exclusive_cumsum(g_f) - m * g_f
            else:
                per_draw = g_f * (own * ratio + later)
            grad_attention = torch.where(exhausted, g_f, per_draw / total)
            grad_attention = grad_attention.to(ctx.attention_dtype)
        return grad_features, grad_attention, None, None


def _draw_weights(n: int, estimator: str, like: Tensor) -> tuple[Tensor, Tensor, float]:
    """``(c [N], t [N], Z)``: ``F = sum_m c_m E_m / Z`` and ``t_m = sum_{m'>m} c_m'``.

    ``c_m = 1`` (``t_m = N-1-m``, ``Z = N``: the mean) except for ``"linear"``
    (``c_m = m + 1``); small integers, so the uniform case rounds exactly as before.
    """
    m = torch.arange(n, device=like.device, dtype=like.dtype)
    own = m + 1 if estimator == "linear" else torch.ones_like(m)
    later = own.sum() - own.cumsum(0)
    return own, later, float(own.sum())


def _exclusive_cumsum(x: Tensor) -> Tensor:
    return x.cumsum(dim=1) - x
