"""Draw positions from an attention distribution over an N-D map, or from a proposal.

Only the drawn positions are gathered from the map, so the forward and the backward
cost ``O(B * (P + N))`` for ``P`` positions and ``N`` draws: no ``[B, N, P]`` buffer.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import _checks


def sample(
    n_samples: int,
    attention: Tensor,
    replace: bool = False,
    use_logits: bool = False,
    generator: torch.Generator | None = None,
    *,
    proposal: Tensor | None = None,
) -> tuple[Tensor, Tensor] | tuple[Tensor, Tensor, Tensor]:
    """Sample ``n_samples`` positions per batch item from an attention map.

    Args:
        n_samples: ``N``, the number of positions drawn per batch item.
        attention (Tensor[B, *S]): a distribution over the positions of the map ``S``
            (any number of axes), or unnormalised log-probabilities when
            ``use_logits``. Probabilities must be non-negative and sum to 1 per item.
        replace: draw with replacement (i.i.d. categorical draws) or without (Gumbel
            top-k; the draws come in draw order, most likely first in expectation).
        use_logits: ``attention`` holds logits; the returned probabilities are then
            the softmax over all positions of the item.
        generator: a ``torch.Generator`` on ``attention``'s device, to repeat a run.
        proposal (Tensor[B, *S] | None): probabilities ``q`` to draw the positions from
            instead of the attention (docs/estimator.md, sampling from a proposal), e.g.
            ``mix_uniform(attention, 0.1)``; a constant (detached), moved to
            ``attention``'s device. Every position of positive attention must have
            ``q > 0``, otherwise the estimate would be biased (``ValueError`` with the
            number of such positions). With replacement the draws are i.i.d. from ``q``;
            without, each draw picks a position not drawn yet with probability
            proportional to ``q`` (Gumbel top-k on ``log q``), in draw order.

    Returns:
        samples (LongTensor[B, N, len(S)]): the drawn positions, one index per map axis.
        sampled_attention (Tensor[B, N]): their probabilities, gathered from the map, so
            differentiable w.r.t. ``attention``.
        sampled_proposal (Tensor[B, N]): only when ``proposal`` is given: ``q`` at the
            samples, in ``proposal``'s dtype, without gradient; ``expectation`` needs it
            (``sampled_proposal=``). Without a proposal the result is the pair
            ``(samples, sampled_attention)``, with one the triple.

    Without replacement, positions of probability zero (under the distribution drawn
    from) are only drawn once every positive-probability position has been; they come
    last, with probability 0 (``expectation`` then returns the exact sum). More samples
    than positions without replacement is a ``ValueError``.
    """
    _checks.tensor(attention, "attention", min_dim=2)
    n_samples = _checks.positive_int(n_samples, "n_samples")
    space = attention.shape[1:]
    flat = attention.flatten(1)  # [B, P]
    if not replace and n_samples > flat.shape[1]:
        raise ValueError(
            f"cannot draw n_samples={n_samples} positions without replacement from a map "
            f"of {flat.shape[1]} positions {tuple(space)}"
        )
    if use_logits:
        _checks.logits(flat, "attention")
        probabilities = torch.softmax(flat, dim=1)
    else:
        _checks.probabilities(flat, "attention")
        probabilities = flat
    if proposal is None:
        drawn_from = probabilities
    else:
        drawn_from = _covering_proposal(proposal, attention, probabilities)  # [B, P]
    with torch.no_grad():
        # Sampling in at least float32: half-precision Gumbel keys tie too often.
        work_dtype = torch.promote_types(drawn_from.dtype, torch.float32)
        if replace:
            index = torch.multinomial(
                drawn_from.to(work_dtype), n_samples, replacement=True, generator=generator
            )
        else:
            if use_logits and proposal is None:
                keys = flat.to(work_dtype)
            else:
                keys = drawn_from.to(work_dtype).log()
            index = _gumbel_top_k(keys, n_samples, generator)  # [B, N]
    sampled_attention = probabilities.gather(1, index)  # [B, N]
    samples = torch.stack(torch.unravel_index(index, space), dim=-1)  # [B, N, len(S)]
    if proposal is None:
        return samples, sampled_attention
    return samples, sampled_attention, drawn_from.gather(1, index)


def _covering_proposal(proposal: Tensor, attention: Tensor, probabilities: Tensor) -> Tensor:
    """``proposal`` detached and flattened to ``[B, P]``, checked to cover the attention.

    ``probabilities [B, P]`` is the attention as probabilities (the softmax of logits).
    """
    _checks.tensor(proposal, "proposal")
    _checks.same_shape(proposal, attention, "proposal", "attention")
    flat = proposal.detach().to(attention.device).flatten(1)  # [B, P]
    _checks.probabilities(flat, "proposal", logits_hint=False)
    uncovered = ((probabilities.detach() > 0) & (flat <= 0)).sum(dim=1)  # [B]
    if uncovered.any():
        items = uncovered.nonzero().flatten().tolist()
        shown = ", ".join(map(str, items[:5])) + (", ..." if len(items) > 5 else "")
        raise ValueError(
            f"proposal is 0 at {uncovered.sum().item()} position(s) where the attention is "
            f"positive (batch item(s) {shown}); draws from it never reach them, which would "
            "bias the estimate: every position with attention > 0 needs proposal > 0"
        )
    return flat


def _gumbel_top_k(logits: Tensor, k: int, generator: torch.Generator | None) -> Tensor:
    """Indices ``[B, k]`` of ``k`` draws without replacement, in draw order.

    The Gumbel noise is ``-log(E)`` with ``E = -log(1 - U) ~ Exp(1)`` (``U`` uniform in
    ``[0, 1)``; several times faster than ``Tensor.exponential_`` on CPU). ``E`` is kept
    above the smallest normal float so that the noise is finite and ``-inf`` logits
    (zero probability) stay ``-inf`` instead of turning into NaN.
    """
    uniform = torch.rand(
        logits.shape, dtype=logits.dtype, device=logits.device, generator=generator
    )
    exponential = uniform.neg_().log1p_().neg_()
    keys = logits - exponential.clamp_min_(torch.finfo(logits.dtype).tiny).log_()
    return keys.topk(k, dim=1, sorted=True).indices


def mask_attention(attention: Tensor, mask: Tensor, use_logits: bool = False) -> Tensor:
    """Restrict an attention map to the positions where ``mask`` is True.

    Args:
        attention (Tensor[B, *S]): probabilities (renormalised over the allowed
            positions, differentiably) or logits when ``use_logits`` (disallowed
            positions set to ``-inf``).
        mask (BoolTensor[B, *S]): True where sampling is allowed (e.g. tissue).

    A batch item with no allowed position (or no attention mass on them) is a
    ``ValueError``.
    """
    mask = _checks.bool_mask(mask, attention, "the attention map")
    if use_logits:
        restricted = attention.masked_fill(~mask, float("-inf"))
        empty = ~mask.flatten(1).any(1)
    else:
        restricted = attention * mask
        total = restricted.flatten(1).sum(1)  # [B]
        empty = total <= 0
        restricted = restricted / total.clamp_min(torch.finfo(total.dtype).tiny).view(
            -1, *([1] * (attention.dim() - 1))
        )
    if empty.any():
        raise ValueError(
            f"mask leaves no attention mass for batch item(s) {empty.nonzero().flatten().tolist()}"
        )
    return restricted
