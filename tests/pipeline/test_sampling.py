"""pipeline.sample and pipeline.mask_attention: distributions, shapes, errors."""

import pytest
import torch

from pipeline import mask_attention, sample
from tests.pipeline.exact_draws import inclusion, ordered_draws, sigma_bound

TRIALS = 100_000  # batch items drawn at once; each is an independent trial


def _map(shape, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(shape, generator=g, dtype=dtype)
    return torch.softmax(logits.flatten(1), 1).view(shape)


def _seeded(seed):
    return torch.Generator().manual_seed(seed)


def _check_pair_frequencies(flat, distribution, replace):
    """Frequencies of the ordered pairs ``flat [TRIALS, 2]`` (flat position indices of
    the first and second draw) within 5 sigma of exact enumeration from ``distribution [P]``.
    """
    p = len(distribution)
    index, weight = ordered_draws(distribution, 2, replace)
    exact = torch.zeros(p * p, dtype=torch.float64)
    exact[index[:, 0] * p + index[:, 1]] = weight
    frequency = torch.bincount(flat[:, 0] * p + flat[:, 1], minlength=p * p).double() / TRIALS
    assert (frequency - exact).abs().le(sigma_bound(exact, TRIALS)).all()


@pytest.mark.parametrize("space", [(7,), (3, 5), (2, 3, 4)])
@pytest.mark.parametrize("replace", [False, True])
def test_sampled_probabilities_are_the_map_at_the_samples(space, replace):
    attention = _map((3, *space))
    samples, sampled = sample(6, attention, replace=replace, generator=_seeded(1))
    assert samples.shape == (3, 6, len(space)) and samples.dtype == torch.long
    batch = torch.arange(3).view(3, 1)
    picked = attention[(batch, *samples.unbind(-1))]
    torch.testing.assert_close(sampled, picked, rtol=0, atol=0)
    assert (samples >= 0).all() and (samples < torch.tensor(space)).all()


def test_logits_give_softmax_probabilities():
    logits = torch.randn(2, 4, 5, generator=_seeded(2), dtype=torch.float64)
    samples, sampled = sample(5, logits, use_logits=True, generator=_seeded(3))
    probabilities = torch.softmax(logits.flatten(1), 1).view_as(logits)
    batch = torch.arange(2).view(2, 1)
    torch.testing.assert_close(sampled, probabilities[(batch, *samples.unbind(-1))])


@pytest.mark.parametrize("use_logits", [False, True])
def test_ordered_pairs_without_replacement_match_enumeration(use_logits):
    # Every ordered pair (first draw, second draw) of a 2x3 map, against its exact
    # probability a_i * a_j / (1 - a_i).
    probabilities = _map((1, 2, 3), seed=4)[0]
    attention = probabilities.expand(TRIALS, 2, 3)
    if use_logits:
        attention = probabilities.log().expand(TRIALS, 2, 3) + 1.5  # shifted logits
    samples, _ = sample(2, attention, use_logits=use_logits, generator=_seeded(5))
    flat = samples[..., 0] * 3 + samples[..., 1]  # [TRIALS, 2]
    _check_pair_frequencies(flat, probabilities.flatten(), replace=False)
    assert (flat[:, 0] != flat[:, 1]).all()  # never the same position twice


@pytest.mark.parametrize("n", [2, 3])
def test_inclusion_and_first_draw_frequencies_without_replacement(n):
    probabilities = torch.tensor([0.4, 0.25, 0.15, 0.1, 0.06, 0.04], dtype=torch.float64)
    samples, _ = sample(n, probabilities.expand(TRIALS, 6), generator=_seeded(6 + n))
    drawn = samples[..., 0]  # [TRIALS, n]
    index, weight = ordered_draws(probabilities, n, replace=False)
    exact_inclusion = inclusion(index, weight, 6)
    hit = torch.zeros(TRIALS, 6, dtype=torch.float64).scatter_(1, drawn, 1.0)
    assert (hit.mean(0) - exact_inclusion).abs().le(sigma_bound(exact_inclusion, TRIALS)).all()
    first = torch.bincount(drawn[:, 0], minlength=6).double() / TRIALS
    assert (first - probabilities).abs().le(sigma_bound(probabilities, TRIALS)).all()
    # Inclusion is not proportional to a: that is what the estimator must correct for.
    assert (exact_inclusion / probabilities).std() > 0.1


def test_draws_with_replacement_are_independent_categoricals():
    probabilities = _map((1, 6), seed=7)[0]
    samples, _ = sample(2, probabilities.expand(TRIALS, 6), replace=True, generator=_seeded(8))
    _check_pair_frequencies(samples[..., 0], probabilities, replace=True)


@pytest.mark.parametrize("replace", [False, True])
def test_one_hot_map(replace):
    attention = torch.zeros(2, 4, 4)
    attention[0, 1, 2] = 1
    attention[1, 3, 0] = 1
    n = 5
    samples, sampled = sample(n, attention, replace=replace, generator=_seeded(9))
    assert samples[0, 0].tolist() == [1, 2] and samples[1, 0].tolist() == [3, 0]
    if replace:
        assert (samples[0] == torch.tensor([1, 2])).all() and (sampled == 1).all()
    else:
        # The rest are zero-probability positions, distinct, after the only positive one.
        assert sampled[:, 0].tolist() == [1, 1] and (sampled[:, 1:] == 0).all()
        flat = samples[..., 0] * 4 + samples[..., 1]
        assert all(len(set(row)) == n for row in flat.tolist())


def test_zero_probability_positions_are_never_drawn_while_mass_remains():
    attention = torch.tensor([[0.5, 0.0, 0.3, 0.0, 0.2, 0.0]]).expand(2000, 6)
    samples, sampled = sample(3, attention, generator=_seeded(10))
    assert set(samples.flatten().tolist()) == {0, 2, 4}
    assert (sampled > 0).all()


def test_as_many_samples_as_positions_is_a_permutation():
    attention = _map((4, 3, 3), seed=11)
    samples, sampled = sample(9, attention, generator=_seeded(12))
    flat = samples[..., 0] * 3 + samples[..., 1]
    assert (flat.sort(1).values == torch.arange(9)).all()
    torch.testing.assert_close(sampled.sum(1), torch.ones(4, dtype=sampled.dtype))


def test_generator_makes_runs_repeatable():
    attention = _map((2, 16, 16), seed=13)
    for replace in (False, True):
        first = sample(10, attention, replace=replace, generator=_seeded(14))[0]
        again = sample(10, attention, replace=replace, generator=_seeded(14))[0]
        other = sample(10, attention, replace=replace, generator=_seeded(15))[0]
        assert torch.equal(first, again) and not torch.equal(first, other)


@pytest.mark.parametrize("use_logits", [False, True])
def test_gradient_is_a_gather_without_dense_buffers(use_logits):
    # Every tensor autograd keeps for the backward is at most map-sized: no [B, N, P].
    batch, n, side = 2, 50, 64
    attention = _map((batch, side, side), seed=16, dtype=torch.float32)
    if use_logits:
        attention = attention.log()
    attention.requires_grad_()
    saved = []

    def pack(t):
        saved.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        samples, sampled = sample(n, attention, use_logits=use_logits, generator=_seeded(17))
    weights = torch.randn(batch, n)
    (sampled * weights).sum().backward()
    assert max(saved) <= batch * side * side
    # Same gradient as plain indexing of the (softmax of the) map.
    probabilities = (
        torch.softmax(attention.flatten(1), 1).view_as(attention) if use_logits else attention
    )
    indexed = probabilities[(torch.arange(batch).view(-1, 1), *samples.unbind(-1))]
    expected = torch.autograd.grad((indexed * weights).sum(), attention)[0]
    torch.testing.assert_close(attention.grad, expected)


def test_gradcheck_through_logits():
    logits = torch.randn(2, 3, 4, dtype=torch.float64, requires_grad=True)
    torch.autograd.gradcheck(
        lambda x: sample(4, x, use_logits=True, generator=_seeded(18))[1], (logits,)
    )


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ([0.5, 0.7, -0.2], "negative"),
        ([0.5, float("nan"), 0.5], "NaN"),
        ([0.2, 0.2, 0.2], "sum to 1"),
    ],
)
def test_invalid_probabilities_are_rejected(values, message):
    with pytest.raises(ValueError, match=message):
        sample(1, torch.tensor([values]))


def test_invalid_arguments_are_rejected():
    attention = _map((1, 2, 2))
    with pytest.raises(ValueError, match="n_samples=5.*4 positions"):
        sample(5, attention)
    with pytest.raises(ValueError, match="NaN"):
        sample(1, torch.tensor([[0.0, float("nan")]]), use_logits=True)
    with pytest.raises(ValueError, match="-inf"):
        sample(1, torch.full((1, 3), float("-inf")), use_logits=True)
    with pytest.raises(TypeError, match="n_samples"):
        sample(2.0, attention)
    with pytest.raises(ValueError, match="n_samples must be >= 1"):
        sample(0, attention)
    with pytest.raises(ValueError, match="at least 2 dimensions"):
        sample(1, torch.tensor([1.0]))
    with pytest.raises(TypeError, match="floating-point"):
        sample(1, torch.tensor([[0, 1]]))
    # With replacement, more samples than positions is fine.
    assert sample(5, attention, replace=True)[0].shape == (1, 5, 2)


def test_mask_restricts_and_renormalises():
    attention = _map((2, 3, 3), seed=19).requires_grad_()
    mask = torch.zeros(2, 3, 3, dtype=torch.bool)
    mask[0, 0] = True
    mask[1, :, 2] = True
    restricted = mask_attention(attention, mask)
    torch.testing.assert_close(restricted.sum((1, 2)), torch.ones(2, dtype=torch.float64))
    assert (restricted[~mask] == 0).all()
    torch.testing.assert_close(restricted[0, 0], attention[0, 0] / attention[0, 0].sum())
    samples, sampled = sample(3, restricted, generator=_seeded(20))
    assert mask[torch.arange(2).view(2, 1), samples[..., 0], samples[..., 1]].all()
    sampled.sum().backward()  # differentiable through the renormalisation
    assert attention.grad is not None and attention.grad[~mask].abs().sum() == 0
    logits = mask_attention(attention.detach().log(), mask, use_logits=True)
    _, from_logits = sample(3, logits, use_logits=True, generator=_seeded(20))
    torch.testing.assert_close(from_logits, sampled.detach())


def test_mask_errors():
    attention = _map((2, 3, 3))
    with pytest.raises(ValueError, match="no attention mass for batch item"):
        mask_attention(attention, torch.zeros(2, 3, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="shape"):
        mask_attention(attention, torch.ones(2, 9, dtype=torch.bool))
    with pytest.raises(TypeError, match="bool"):
        mask_attention(attention, torch.ones(2, 3, 3))


# --- sampling from a proposal (docs/estimator.md, sampling from a proposal) ---

# Attention with zeros, and a proposal that differs from it: positive wherever the
# attention is, also on some (not all) of its zeros.
ATTENTION_6 = torch.tensor([0.45, 0.0, 0.3, 0.05, 0.2, 0.0], dtype=torch.float64)
PROPOSAL_6 = torch.tensor([0.1, 0.25, 0.2, 0.15, 0.3, 0.0], dtype=torch.float64)


@pytest.mark.parametrize("use_logits", [False, True])
def test_ordered_pairs_from_a_proposal_match_enumeration(use_logits):
    # Draws follow q, not a: every ordered pair against its exact probability
    # q_i * q_j / (1 - q_i); the probabilities returned are a's and q's at the draws.
    attention = ATTENTION_6.view(1, 2, 3).expand(TRIALS, 2, 3)
    if use_logits:
        attention = ATTENTION_6.log().view(1, 2, 3).expand(TRIALS, 2, 3) + 1.5
    proposal = PROPOSAL_6.view(1, 2, 3).expand(TRIALS, 2, 3)
    samples, sampled, sampled_proposal = sample(
        2, attention, use_logits=use_logits, generator=_seeded(22), proposal=proposal
    )
    flat = samples[..., 0] * 3 + samples[..., 1]  # [TRIALS, 2]
    _check_pair_frequencies(flat, PROPOSAL_6, replace=False)
    probabilities = torch.softmax(attention.flatten(1), 1) if use_logits else attention.flatten(1)
    torch.testing.assert_close(sampled, probabilities.gather(1, flat), rtol=0, atol=0)
    torch.testing.assert_close(sampled_proposal, PROPOSAL_6[flat], rtol=0, atol=0)
    assert not sampled_proposal.requires_grad


def test_draws_with_replacement_from_a_proposal_are_independent_categoricals():
    samples, _, _ = sample(
        2,
        ATTENTION_6.expand(TRIALS, 6),
        replace=True,
        generator=_seeded(23),
        proposal=PROPOSAL_6.expand(TRIALS, 6),
    )
    _check_pair_frequencies(samples[..., 0], PROPOSAL_6, replace=True)


@pytest.mark.parametrize("replace", [False, True])
def test_proposal_equal_to_the_attention_gives_the_same_draws(replace):
    attention = _map((3, 4, 5), seed=24, dtype=torch.float32)
    samples, sampled = sample(6, attention, replace=replace, generator=_seeded(25))
    again, sampled_again, sampled_proposal = sample(
        6, attention, replace=replace, generator=_seeded(25), proposal=attention.clone()
    )
    assert torch.equal(samples, again) and torch.equal(sampled, sampled_again)
    assert torch.equal(sampled_proposal, sampled)


def test_draws_beyond_the_support_of_the_proposal_come_last_with_probability_zero():
    attention = torch.tensor([[0.0, 0.7, 0.0, 0.3, 0.0]]).expand(500, 5)
    proposal = torch.tensor([[0.0, 0.4, 0.0, 0.6, 0.0]]).expand(500, 5)
    samples, sampled, sampled_proposal = sample(
        4, attention, generator=_seeded(26), proposal=proposal
    )
    assert (samples[:, :2, 0].sort(1).values == torch.tensor([1, 3])).all()
    assert (sampled_proposal[:, :2] > 0).all() and (sampled_proposal[:, 2:] == 0).all()
    assert (sampled[:, 2:] == 0).all()
    assert all(len(set(row)) == 4 for row in samples[..., 0].tolist())


def test_gradient_flows_to_the_attention_not_the_proposal():
    attention = ATTENTION_6.view(1, 6).clone().requires_grad_()
    proposal = PROPOSAL_6.view(1, 6).clone().requires_grad_()
    samples, sampled, sampled_proposal = sample(
        3, attention, generator=_seeded(27), proposal=proposal
    )
    assert sampled_proposal.grad_fn is None
    sampled.sum().backward()
    expected = torch.zeros(1, 6, dtype=torch.float64)
    expected[0, samples[0, :, 0]] = 1
    assert torch.equal(attention.grad, expected) and proposal.grad is None


def test_proposal_missing_positive_attention_is_rejected():
    attention = torch.tensor([[0.5, 0.5, 0.0, 0.0], [0.25, 0.25, 0.25, 0.25]])
    proposal = torch.tensor([[1.0, 0.0, 0.0, 0.0], [0.5, 0.5, 0.0, 0.0]])
    with pytest.raises(ValueError, match=r"proposal is 0 at 3 position.*item\(s\) 0, 1\)"):
        sample(1, attention, proposal=proposal)
    # Finite logits give every position positive attention.
    with pytest.raises(ValueError, match="proposal is 0 at 1 position"):
        sample(1, torch.zeros(1, 3), use_logits=True, proposal=torch.tensor([[0.5, 0.5, 0.0]]))
    with pytest.raises(ValueError, match=r"at 21 position.*item\(s\) 0, 1, 2, 3, 4, \.\.\.\)"):
        sample(1, attention[1:].expand(7, 4), proposal=proposal[:1].expand(7, 4))
    # Zeros of the proposal where the attention is zero are fine.
    assert len(sample(1, attention[:1], proposal=torch.tensor([[0.5, 0.5, 0.0, 0.0]]))) == 3


def test_invalid_proposals_are_rejected():
    attention = _map((2, 3, 3))
    with pytest.raises(ValueError, match=r"proposal has shape \(2, 9\), expected attention's"):
        sample(1, attention, proposal=attention.flatten(1))
    with pytest.raises(ValueError, match="proposal must sum to 1") as error:
        sample(1, attention, proposal=attention * 2)
    assert "use_logits" not in str(error.value)
    with pytest.raises(ValueError, match="proposal contains negative"):
        sample(1, attention, proposal=attention - 0.5)
    with pytest.raises(TypeError, match="proposal must be a torch.Tensor"):
        sample(1, attention, proposal=attention.tolist())
