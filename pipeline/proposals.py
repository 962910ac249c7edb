"""Proposal distributions to sample from instead of the attention.

The maths, and why the estimate stays unbiased: docs/estimator.md, sampling from a
proposal.

``sample(..., proposal=q)`` draws the positions from ``q`` and
``expectation(..., sampled_proposal=...)`` reweights them, so the estimate of
``sum_k a_k f_k`` and its gradients stay unbiased for any ``q`` that is positive
wherever the attention ``a`` is. Early in training the attention is uninformative:
mixing it with a uniform distribution (exploration) or a content prior (e.g. tissue
darkness, a previous model's heatmap) shows the feature network informative patches
and gives every position of the proposal's support an unbiased attention gradient,
including positions where ``a`` is zero. A mixture ``q = (1 - w) a + w p`` keeps the
importance weights ``a / q`` at most ``1 / (1 - w)``, so the variance stays bounded.

All functions take probabilities ``attention (Tensor[B, *S])`` (not logits); the
mixtures return a ``Tensor[B, *S]`` in ``attention``'s dtype and device that sums to 1
per item. ``prior_cross_entropy`` is the loss that fits an attention to a content prior
instead (a cold-start remedy that changes the initial weights, not the estimator).
"""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor

from . import _checks


def mix_uniform(attention: Tensor, epsilon: float, mask: Tensor | None = None) -> Tensor:
    """``(1 - epsilon) * attention + epsilon * u``, ``u`` uniform over the allowed positions.

    Args:
        attention (Tensor[B, *S]): probabilities per batch item.
        epsilon: the weight of the uniform part, in ``[0, 1]``. ``0`` returns values
            equal to ``attention`` (so sampling and the estimate are bit for bit those
            without a proposal); ``1`` the uniform distribution alone.
        mask (BoolTensor[B, *S] | None): True where sampling is allowed (e.g. tissue);
            ``u`` is uniform over those positions, over all positions when ``None``.
            An item with no allowed position is a ``ValueError``.

    Example: 256 tissue positions in a map of 1024 and ``epsilon = 0.2``: every tissue
    position has ``q >= 0.2 / 256 ~ 7.8e-4`` and the importance weights ``a / q`` are at
    most ``1 / 0.8 = 1.25``. With ``epsilon = 1`` and attention outside the mask, the
    proposal misses positive attention and ``sample`` refuses it.
    """
    _checks.tensor(attention, "attention", min_dim=2)
    _checks.floating(attention, "attention")
    epsilon = _checks.unit_interval(epsilon, "epsilon")
    if mask is None:
        allowed = attention.new_ones(attention.shape)
    else:
        allowed = _checks.bool_mask(mask, attention, "attention").to(attention.dtype)
    return _mix(attention, _normalised(allowed, "mask"), epsilon)


def mix_prior(attention: Tensor, prior: Tensor, weight: float) -> Tensor:
    """``(1 - weight) * attention + weight * prior / sum(prior)``, per batch item.

    Args:
        attention (Tensor[B, *S]): probabilities per batch item.
        prior (Tensor[B, *S]): non-negative, finite weights per position (any scale,
            e.g. a tissue or stain score of the low-resolution view), normalised here
            over the positions of each item; an item whose prior is zero everywhere is
            a ``ValueError``.
        weight: the weight of the prior, in ``[0, 1]``; ``0`` returns values equal to
            ``attention``. Below 1, the result is positive wherever ``attention`` is.
    """
    _checks.tensor(attention, "attention", min_dim=2)
    _checks.floating(attention, "attention")
    _checks.tensor(prior, "prior")
    _checks.same_shape(prior, attention, "prior", "attention")
    weight = _checks.unit_interval(weight, "weight")
    prior = prior.to(device=attention.device, dtype=attention.dtype)
    return _mix(attention, _normalised(prior, "prior"), weight)


def linear_decay(start: float, stop_step: int) -> Callable[[int], float]:
    """A mixing weight falling linearly from ``start`` at step 0 to 0 at ``stop_step``.

    Returns ``weight(step)`` (``step`` an int >= 0): ``start * (1 - step / stop_step)``
    until ``stop_step``, exactly ``0.0`` from there on, so the end of training samples
    from the attention itself (``mix_uniform(attention, 0.0)`` is the attention).

    Example: ``schedule = linear_decay(0.5, 1000)``: ``schedule(0) == 0.5``,
    ``schedule(250) == 0.375``, ``schedule(1000) == schedule(5000) == 0.0``; each
    training step uses ``mix_uniform(attention, schedule(step))``.
    """
    start = _checks.unit_interval(start, "start")
    _checks.positive_int(stop_step, "stop_step")

    def weight(step: int) -> float:
        _checks.non_negative_int(step, "step")
        return start * max(0.0, 1 - step / stop_step)

    return weight


def prior_cross_entropy(attention: Tensor, prior: Tensor) -> Tensor:
    """``-mean_b sum_k p_k log a_k``, ``p`` the prior normalised per batch item.

    Args:
        attention (Tensor[B, *S]): probabilities per batch item (with gradient).
        prior (Tensor[B, *S]): non-negative, finite weights per position, any scale, not
            zero everywhere in an item (as for ``mix_prior``).

    Returns:
        Tensor[]: the mean cross-entropy; minimising it over the attention network's
        weights moves the attention towards the prior (``log a`` is floored at
        ``log 1e-12`` where the attention is 0, e.g. off a mask).
    """
    _checks.tensor(attention, "attention", min_dim=2)
    _checks.floating(attention, "attention")
    _checks.tensor(prior, "prior")
    _checks.same_shape(prior, attention, "prior", "attention")
    target = _normalised(prior.to(device=attention.device, dtype=attention.dtype), "prior")
    return -(target * attention.clamp_min(1e-12).log()).flatten(1).sum(1).mean()


def _normalised(weights: Tensor, name: str) -> Tensor:
    """``weights [B, *S]`` divided by their sum over the positions of each item."""
    flat = weights.flatten(1)  # [B, P]
    _checks.weights(flat, name)
    return (flat / flat.sum(dim=1, keepdim=True)).view_as(weights)


def _mix(attention: Tensor, other: Tensor, weight: float) -> Tensor:
    # At weight 0 this is 1 * a + 0 * other: attention's values exactly.
    return (1 - weight) * attention + weight * other


Weight = float | Callable[[int], float]
"""A mixing weight: a constant, or a schedule ``weight(step)`` such as ``linear_decay``."""


def weight_at(weight: Weight, step: int | None, name: str) -> float:
    """The value of ``weight`` at training step ``step`` (needed for a schedule)."""
    if not callable(weight):
        return _checks.unit_interval(weight, name)
    if step is None:
        raise ValueError(f"{name} is a schedule: pass the training step (step=...)")
    return _checks.unit_interval(weight(_checks.non_negative_int(step, "step")), name)


def explore(
    attention: Tensor,
    epsilon: float = 0.0,
    mask: Tensor | None = None,
    prior: Tensor | None = None,
    prior_weight: float = 0.0,
) -> Tensor | None:
    """The proposal ``(1 - w) * ((1 - e) * a + e * u) + w * prior``, or ``None`` when
    both weights are 0 (sample from the attention itself).

    Args:
        attention (Tensor[B, *S]): probabilities; only its values are used (the
            proposal is a constant for the gradients).
        epsilon: ``e``, weight of ``u``, uniform over ``mask`` (all positions if None).
        mask (BoolTensor[B, *S] | None): allowed positions; the prior is restricted
            to them too.
        prior (Tensor[B, *S] | None): non-negative content prior, any scale.
        prior_weight: ``w``, in ``[0, 1)`` so the proposal covers the attention.
    """
    if epsilon == 0 and (prior is None or prior_weight == 0):
        return None
    proposal = mix_uniform(attention.detach(), epsilon, mask)
    if prior is not None and prior_weight > 0:
        if prior_weight >= 1:  # the prior alone may miss cells of positive attention
            raise ValueError(f"prior_weight must be < 1, got {prior_weight}")
        if mask is not None:
            prior = prior * _checks.bool_mask(mask, attention, "attention")
        proposal = mix_prior(proposal, prior, prior_weight)
    return proposal
