"""pipeline.proposals: mixtures, exactness at weight 0, the prior cross-entropy, errors."""

import math

import pytest
import torch

from pipeline import linear_decay, mix_prior, mix_uniform, prior_cross_entropy, sample


def _map(shape, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return torch.softmax(torch.randn(shape, generator=g, dtype=dtype).flatten(1), 1).view(shape)


def test_mix_uniform_values():
    attention = _map((2, 3, 4))
    q = mix_uniform(attention, 0.25)
    torch.testing.assert_close(q, 0.75 * attention + 0.25 / 12, rtol=0, atol=1e-15)
    torch.testing.assert_close(q.sum((1, 2)), torch.ones(2, dtype=torch.float64))
    assert q.dtype == attention.dtype and (q >= 0.25 / 12).all()
    assert (attention / q).max() <= 1 / 0.75  # the importance weights stay bounded


def test_mix_uniform_over_a_mask():
    attention = torch.zeros(2, 2, 3)
    attention[0, 0, 0] = 1
    attention[1, 1] = torch.tensor([0.2, 0.3, 0.5])
    mask = torch.zeros(2, 2, 3, dtype=torch.bool)
    mask[0, 0, :2] = True  # 2 allowed positions
    mask[1, 1] = True  # 3
    q = mix_uniform(attention, 0.4, mask)
    assert (q[~mask] == 0).all()
    torch.testing.assert_close(q[0, 0, :2], torch.tensor([0.6 + 0.2, 0.2]))
    torch.testing.assert_close(q[1, 1], 0.6 * attention[1, 1] + 0.4 / 3)
    samples, _, _ = sample(4, attention, replace=True, proposal=q)
    assert mask[torch.arange(2).view(2, 1), samples[..., 0], samples[..., 1]].all()


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32, torch.float64])
def test_weight_zero_gives_the_attention_exactly(dtype):
    attention = _map((3, 5, 7), seed=1).to(dtype)
    attention[0, 0] = 0
    mask = torch.rand(3, 5, 7, generator=torch.Generator().manual_seed(2)) > 0.5
    prior = torch.rand(3, 5, 7, generator=torch.Generator().manual_seed(3))
    assert torch.equal(mix_uniform(attention, 0.0), attention)
    assert torch.equal(mix_uniform(attention, 0, mask), attention)
    assert torch.equal(mix_prior(attention, prior, 0.0), attention)


def test_weight_one_gives_the_other_distribution_exactly():
    attention = _map((2, 6), seed=4)
    assert torch.equal(mix_uniform(attention, 1.0), torch.full((2, 6), 1 / 6, dtype=torch.float64))
    prior = torch.tensor([[0.0, 1, 2, 3, 4, 0], [1, 1, 1, 1, 0, 0]], dtype=torch.float64)
    torch.testing.assert_close(mix_prior(attention, prior, 1.0), prior / prior.sum(1, True))


def test_mix_prior_normalises_any_scale():
    attention = _map((2, 4, 4), seed=5, dtype=torch.float32)
    prior = torch.randint(0, 5, (2, 4, 4), generator=torch.Generator().manual_seed(6))
    prior[:, 0, 0] = 1  # never zero everywhere
    q = mix_prior(attention, prior, 0.3)
    assert q.dtype == torch.float32
    normalised = prior / prior.sum((1, 2), keepdim=True)
    torch.testing.assert_close(q, 0.7 * attention + 0.3 * normalised)
    torch.testing.assert_close(mix_prior(attention, 7.5 * prior.double(), 0.3), q)
    assert ((q > 0) | (attention == 0)).all()


def test_linear_decay():
    schedule = linear_decay(0.5, 1000)
    assert schedule(0) == 0.5 and schedule(250) == 0.375 and schedule(999) > 0
    assert schedule(1000) == 0.0 and schedule(5000) == 0.0
    assert math.copysign(1, schedule(5000)) == 1  # +0.0: mix_uniform gives a back
    with pytest.raises(ValueError, match="step must be >= 0, got -1"):
        schedule(-1)
    with pytest.raises(TypeError, match="step must be an int"):
        schedule(2.5)
    with pytest.raises(ValueError, match=r"start must be in \[0, 1\], got 1.5"):
        linear_decay(1.5, 10)
    with pytest.raises(ValueError, match="stop_step must be >= 1, got 0"):
        linear_decay(0.5, 0)


@pytest.mark.parametrize("epsilon", [-0.1, 1.5, float("nan")])
def test_epsilon_outside_the_unit_interval_is_rejected(epsilon):
    with pytest.raises(ValueError, match=r"epsilon must be in \[0, 1\]"):
        mix_uniform(_map((1, 4)), epsilon)


def test_invalid_arguments_are_rejected():
    attention = _map((2, 3, 3))
    with pytest.raises(TypeError, match="epsilon must be a real number"):
        mix_uniform(attention, True)
    with pytest.raises(ValueError, match=r"weight must be in \[0, 1\], got 2"):
        mix_prior(attention, torch.ones(2, 3, 3), 2)
    with pytest.raises(ValueError, match=r"mask has shape \(2, 9\), expected attention's"):
        mix_uniform(attention, 0.1, torch.ones(2, 9, dtype=torch.bool))
    with pytest.raises(TypeError, match="mask must be a bool tensor"):
        mix_uniform(attention, 0.1, torch.ones(2, 3, 3))
    empty = torch.ones(2, 3, 3, dtype=torch.bool)
    empty[1] = False
    with pytest.raises(ValueError, match=r"mask is zero everywhere for batch item\(s\) \[1\]"):
        mix_uniform(attention, 0.1, empty)
    with pytest.raises(ValueError, match=r"prior has shape \(3, 3\), expected attention's"):
        mix_prior(attention, torch.ones(3, 3), 0.1)
    with pytest.raises(ValueError, match="at least 2 dimensions"):
        mix_uniform(torch.ones(4) / 4, 0.1)
    with pytest.raises(TypeError, match="attention must be a floating-point"):
        mix_uniform(torch.ones(1, 4, dtype=torch.long), 0.1)


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (-1.0, "prior contains negative weights"),
        (float("nan"), "prior contains NaN or inf"),
        (float("inf"), "prior contains NaN or inf"),
    ],
)
def test_invalid_priors_are_rejected(value, message):
    prior = torch.ones(2, 5)
    prior[1, 3] = value
    with pytest.raises(ValueError, match=message):
        mix_prior(_map((2, 5)), prior, 0.5)


def test_prior_zero_everywhere_is_rejected():
    prior = torch.ones(3, 5)
    prior[0] = 0
    prior[2] = 0
    with pytest.raises(ValueError, match=r"prior is zero everywhere for batch item\(s\) \[0, 2\]"):
        mix_prior(_map((3, 5)), prior, 0.5)


def test_prior_cross_entropy_by_hand_and_its_minimum_at_the_prior():
    prior = torch.tensor([[1.0, 3.0, 0.0], [2.0, 2.0, 4.0]], dtype=torch.float64)
    logits = torch.zeros(2, 3, dtype=torch.float64, requires_grad=True)
    loss = prior_cross_entropy(torch.softmax(logits, 1), prior)
    # Uniform attention: -sum_k p_k log(1/3) = log 3 for every item.
    torch.testing.assert_close(loss, torch.tensor(3.0, dtype=torch.float64).log())
    loss.backward()
    # d/dlogits of -sum p log softmax = (a - p) / B.
    p = prior / prior.sum(1, keepdim=True)
    torch.testing.assert_close(logits.grad, (torch.full((2, 3), 1 / 3.0).double() - p) / 2)
    # At a = p the loss is the prior's entropy, its minimum (0 log 0 counted as 0).
    at_prior = prior_cross_entropy(p, prior * 10)
    entropy = -(p * p.clamp_min(1e-300).log()).sum(1).mean()
    torch.testing.assert_close(at_prior, entropy)
    with pytest.raises(ValueError, match="prior is zero everywhere"):
        prior_cross_entropy(torch.softmax(logits, 1), torch.zeros(2, 3))
