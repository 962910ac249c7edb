"""Exact distributions of ordered draws, by enumeration, for small attention maps.

Statistical tests compare against these; estimator tests weight every possible draw
sequence by its probability, which gives exact expectations (no Monte Carlo).
"""

from __future__ import annotations

import itertools

import torch


def ordered_draws(probabilities: torch.Tensor, n: int, replace: bool):
    """All ordered sequences of ``n`` draws from ``probabilities [P]`` with their probability.

    Returns ``(index LongTensor[S, n], weight float64 Tensor[S])``; the weights sum to 1.
    Without replacement, a draw picks ``k`` with probability ``a_k / pm`` among the
    positions not drawn yet; once no mass is left (zero-probability positions only),
    the remaining positions are taken uniformly.
    """
    a = probabilities.detach().to(torch.float64).tolist()
    positions = range(len(a))
    if replace:
        sequences = list(itertools.product(positions, repeat=n))
    else:
        sequences = list(itertools.permutations(positions, n))
    kept, weights = [], []
    for seq in sequences:
        weight, taken = 1.0, []
        for k in seq:
            if replace:
                weight *= a[k]
            else:
                left = [j for j in positions if j not in taken]
                mass = sum(a[j] for j in left)
                weight *= a[k] / mass if mass > 0 else 1 / len(left)
                taken.append(k)
        if weight > 0:
            kept.append(seq)
            weights.append(weight)
    return torch.tensor(kept, dtype=torch.long), torch.tensor(weights, dtype=torch.float64)


def inclusion(index: torch.Tensor, weight: torch.Tensor, n_positions: int) -> torch.Tensor:
    """P(position k is among the draws), ``[P]``, from ``ordered_draws``' output."""
    hit = torch.zeros(len(weight), n_positions, dtype=torch.float64)
    hit.scatter_(1, index, 1.0)
    return weight @ hit


def sigma_bound(p: torch.Tensor, trials: int, sigmas: float = 5.0) -> torch.Tensor:
    """Half-width of a ``sigmas``-sigma interval for a frequency of probability ``p``."""
    return sigmas * (p * (1 - p) / trials).sqrt() + 1.0 / trials
