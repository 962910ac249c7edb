"""Argument validation shared by the estimator core.

Each helper raises ``ValueError`` (wrong value or shape) or ``TypeError`` (wrong kind)
naming the argument, what was expected and what was given. Checks that need the
values of a tensor synchronise once per call, not once per condition.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Sequence
from numbers import Real

import torch
from torch import Tensor


def positive_int(value: object, name: str) -> int:
    """``value`` as an ``int`` >= 1 (see ``_int_at_least``)."""
    return _int_at_least(value, name, 1)


def non_negative_int(value: object, name: str) -> int:
    """``value`` as an ``int`` >= 0 (see ``_int_at_least``)."""
    return _int_at_least(value, name, 0)


def _int_at_least(value: object, name: str, minimum: int) -> int:
    """Any integer type (``numpy.int64``, a 0-d integer tensor) through
    ``operator.index``; bools and floats are rejected."""
    if isinstance(value, bool):
        raise TypeError(f"{name} must be an int, got bool")
    try:
        value = operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be an int, got {type(value).__name__}") from None
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


def unit_interval(value: object, name: str) -> float:
    """``value`` as a ``float`` in ``[0, 1]`` (bools are rejected)."""
    if isinstance(value, bool) or not isinstance(value, Real):
        raise TypeError(f"{name} must be a real number in [0, 1], got {type(value).__name__}")
    if not 0 <= value <= 1:
        raise ValueError(f"{name} must be in [0, 1], got {value}")
    return float(value)


def size_tuple(size: int | Sequence[int], ndim: int, name: str) -> tuple[int, ...]:
    """A size per spatial axis; a single integer is used for every axis."""
    sizes = tuple(size) if isinstance(size, Sequence | Tensor) else (size,) * ndim
    if len(sizes) != ndim:
        raise ValueError(f"{name} must have {ndim} entries (one per spatial axis), got {size!r}")
    return tuple(positive_int(s, name) for s in sizes)


def fits(patch_size: Sequence[int], image_size: Sequence[int], name: str) -> None:
    """A patch may not be larger than the image it is cut from, on any axis."""
    if any(p > s for p, s in zip(patch_size, image_size, strict=True)):
        raise ValueError(
            f"patch size {tuple(patch_size)} is larger than {name} {tuple(image_size)}"
        )


def same_batch(expected: int, actual: int, name: str) -> None:
    if expected != actual:
        raise ValueError(f"{name} has batch size {actual}, expected {expected}")


def same_shape(value: Tensor, like: Tensor, name: str, like_name: str) -> None:
    if value.shape != like.shape:
        raise ValueError(
            f"{name} has shape {tuple(value.shape)}, expected {like_name}'s {tuple(like.shape)}"
        )


def bool_mask(mask: object, like: Tensor, like_name: str) -> Tensor:
    """``mask`` as a bool tensor of ``like``'s shape, moved to ``like``'s device."""
    tensor(mask, "mask")
    if mask.dtype != torch.bool:
        raise TypeError(f"mask must be a bool tensor, got {mask.dtype}")
    same_shape(mask, like, "mask", like_name)
    return mask.to(like.device)


def tensor(value: object, name: str, min_dim: int = 0) -> Tensor:
    if not isinstance(value, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if value.dim() < min_dim:
        raise ValueError(
            f"{name} must have at least {min_dim} dimensions, got shape {tuple(value.shape)}"
        )
    return value


def floating(value: Tensor, name: str) -> None:
    if not value.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {value.dtype}")


def integer(value: Tensor, name: str) -> None:
    if value.is_floating_point() or value.is_complex() or value.dtype == torch.bool:
        raise TypeError(f"{name} must be an integer tensor, got {value.dtype}")


def probabilities(flat: Tensor, name: str, logits_hint: bool = True) -> None:
    """``flat [B, P]`` must hold a probability distribution per row.

    The tolerance on the row sums covers float32 rounding over maps of millions of
    positions (and the coarser half-precision types through their epsilon).
    ``logits_hint`` suggests ``use_logits=True`` when the sums are off (for arguments
    that may hold logits).
    """
    floating(flat, name)
    tolerance = max(1e-3, 10 * torch.finfo(flat.dtype).eps)
    with torch.no_grad():
        lowest = flat.amin(dim=1)  # NaN if the row holds a NaN
        sums = flat.sum(dim=1)
        _first_failure(
            (lowest.isnan().any(), lambda: f"{name} contains NaN"),
            (
                (lowest < 0).any(),
                lambda: f"{name} contains negative probabilities (min {lowest.min().item():g})",
            ),
            (
                ((sums - 1).abs() > tolerance).any(),
                lambda: (
                    f"{name} must sum to 1 over its positions (tolerance {tolerance:g}), "
                    f"got sums {[round(s, 6) for s in sums.tolist()]}"
                    + ("; pass use_logits=True for logits" if logits_hint else "")
                ),
            ),
        )


def weights(flat: Tensor, name: str) -> None:
    """``flat [B, P]`` must hold finite, non-negative weights, not all zero in a row."""
    floating(flat, name)
    with torch.no_grad():
        lowest = flat.amin(dim=1)
        empty = flat.amax(dim=1) <= 0
        _first_failure(
            (~flat.isfinite().all(), lambda: f"{name} contains NaN or inf"),
            (
                (lowest < 0).any(),
                lambda: f"{name} contains negative weights (min {lowest.min().item():g})",
            ),
            (
                empty.any(),
                lambda: (
                    f"{name} is zero everywhere for batch item(s) "
                    f"{empty.nonzero().flatten().tolist()}"
                ),
            ),
        )


def logits(flat: Tensor, name: str) -> None:
    """``flat [B, P]`` must be usable as logits: no NaN, no +inf, not all -inf in a row."""
    floating(flat, name)
    with torch.no_grad():
        highest = flat.amax(dim=1)  # NaN if the row holds a NaN
        _first_failure(
            (highest.isnan().any(), lambda: f"{name} (logits) contains NaN"),
            ((highest == float("inf")).any(), lambda: f"{name} (logits) contains +inf"),
            (
                (highest == float("-inf")).any(),
                lambda: f"{name} (logits) has a batch item where every logit is -inf",
            ),
        )


def _first_failure(*checks: tuple[Tensor, Callable[[], str]]) -> None:
    """Raise ``ValueError`` for the first true flag; one device sync for all flags."""
    flags = torch.stack([flag for flag, _ in checks]).tolist()
    for failed, (_, message) in zip(flags, checks, strict=True):
        if failed:
            raise ValueError(message())
