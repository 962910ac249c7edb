"""Exploration and priors in the layers (docs/estimator.md, exploration and priors):
draws from a proposal, estimates still unbiased, off in eval mode, exactly today's
results at weight 0."""

import pytest
import torch
from torch import nn

from pipeline import SamplePatches, attention_sampling, extract_patches, linear_decay, patch_offsets


class FixedAttention(nn.Module):
    """A constant attention map [B, 4, 4] with a parameter, so gradients exist."""

    def __init__(self, probabilities: torch.Tensor):
        super().__init__()
        self.logits = nn.Parameter(probabilities.log())

    def forward(self, x_low):
        return torch.softmax(self.logits.flatten(), 0).view(1, 4, 4).expand(len(x_low), 4, 4)


def _mean_feature(patches):
    return patches.flatten(1).mean(1, keepdim=True)  # [M, 1]


def _setup(**kwargs):
    torch.manual_seed(0)
    a = torch.rand(16, dtype=torch.float64) ** 4  # peaked: most cells rarely drawn
    a[3] = 0.0  # a cell without attention, which exploration may still draw
    a = (a / a.sum()).view(4, 4)
    model = attention_sampling(FixedAttention(a), _mean_feature, (5, 5), n_patches=2, **kwargs)
    x_low = torch.zeros(1, 1, 4, 4, dtype=torch.float64)
    x_high = torch.rand(1, 1, 20, 20, dtype=torch.float64)
    return model.double(), a, x_low, x_high


def _exact(a, x_low, x_high):
    """sum_k a_k f_k by enumerating every cell's patch."""
    cells = torch.stack(torch.meshgrid(torch.arange(4), torch.arange(4), indexing="ij"), -1)
    offsets = patch_offsets(cells.view(1, 16, 2), (4, 4), (4, 4), (20, 20), (5, 5))
    features = _mean_feature(extract_patches(x_high, offsets, (5, 5))[0])[:, 0]  # [16]
    return (a.flatten() * features).sum()


@pytest.mark.parametrize("replace", [False, True])
def test_estimate_under_exploration_is_unbiased(replace):
    model, a, x_low, x_high = _setup(exploration=0.5, replace=replace)
    model.train()
    generator = torch.Generator().manual_seed(1)
    draws = torch.stack(
        [model.draw(x_low, x_high, generator=generator).features[0, 0] for _ in range(4000)]
    )
    exact = _exact(a, x_low, x_high)
    # 5 standard errors of the Monte-Carlo mean: fails on a biased estimator.
    assert abs(draws.mean() - exact) < 5 * draws.std() / len(draws) ** 0.5
    # The draws did explore: cells of tiny attention were drawn far more than a says.
    cells = torch.cat(
        [model.draw(x_low, x_high, generator=generator).offsets[0] for _ in range(300)]
    )
    assert (cells == torch.tensor([0, 15])).all(1).any()  # the zero-attention cell (0, 3)


def test_attention_gradient_under_exploration_is_unbiased():
    # d/dlogits of sum_k a_k f_k, against the mean of the estimator's gradients.
    model, a, x_low, x_high = _setup(exploration=0.3)
    a = a.clone()
    a[0, 3] = 1e-3  # positive everywhere: the softmax parameterisation needs it
    a /= a.sum()
    model.attention.logits.data = a.log()
    model.train()
    generator = torch.Generator().manual_seed(2)
    logits = model.attention.logits
    exact_value = _exact(torch.softmax(logits.flatten(), 0), x_low, x_high)
    (exact,) = torch.autograd.grad(exact_value, logits)
    grads = []
    for _ in range(3000):
        estimate = model.draw(x_low, x_high, generator=generator).features.sum()
        grads.append(torch.autograd.grad(estimate, logits)[0])
    grads = torch.stack(grads)
    error = (grads.mean(0) - exact).abs()
    assert (error < 5 * grads.std(0) / len(grads) ** 0.5 + 1e-12).all()


def test_weight_zero_is_bit_for_bit_no_exploration():
    outs = []
    for kwargs in ({}, {"exploration": 0.0, "prior_weight": 0.0}):
        model, _, x_low, x_high = _setup(**kwargs)
        model.train()
        out = model.draw(x_low, x_high, generator=torch.Generator().manual_seed(3))
        (grad,) = torch.autograd.grad(out.features.sum(), model.attention.logits)
        outs.append((out.features, out.offsets, grad))
    for first, second in zip(*outs, strict=True):
        assert torch.equal(first, second)


def test_eval_mode_samples_from_the_attention():
    model, _, x_low, x_high = _setup(exploration=0.9)
    model.eval()
    assert model.draw(x_low, x_high).sampled_proposal is None
    model.train()
    assert model.draw(x_low, x_high).sampled_proposal is not None


def test_prior_restricted_to_the_mask_and_schedules():
    model, _, x_low, x_high = _setup(prior_weight=linear_decay(0.9, 10))
    model.train()
    prior = torch.zeros(1, 8, 8, dtype=torch.float64)
    prior[0, 6:8, 0:2] = 1.0  # on a finer grid: all in attention cell (3, 0)
    prior[0, 0:2, 6:8] = 5.0  # cell (0, 3), outside the mask below
    mask = torch.ones(1, 4, 4, dtype=torch.bool)
    mask[0, 0, 3] = False
    with pytest.raises(ValueError, match="schedule: pass the training step"):
        model.draw(x_low, x_high, mask=mask, prior=prior)
    generator = torch.Generator().manual_seed(4)
    first = [model.draw(x_low, x_high, mask, generator, prior, step=0) for _ in range(200)]
    hits = sum(int((d.offsets[0] == torch.tensor([15, 0])).all(1).any()) for d in first)
    assert hits > 150  # q >= 0.9 on cell (3, 0): drawn in almost every draw of 2
    assert not any((d.offsets[0] == torch.tensor([0, 15])).all(1).any() for d in first)
    # The schedule reaches 0 at step 10: from there on, plain sampling from the attention.
    assert model.draw(x_low, x_high, mask, generator, prior, step=10).sampled_proposal is None


def test_sample_patches_module_returns_the_proposal_and_checks():
    sampler = SamplePatches(2, (5, 5), exploration=0.5).train()
    attention = torch.full((1, 4, 4), 1 / 16)
    out = sampler(torch.zeros(1, 1, 4, 4), torch.rand(1, 1, 20, 20), attention)
    assert len(out) == 3 and out[2].shape == (1, 2)
    torch.testing.assert_close(out[2], torch.full((1, 2), 1 / 16))  # q = a when a is uniform
    assert (
        len(SamplePatches(2, (5, 5))(torch.zeros(1, 1, 4, 4), torch.rand(1, 1, 20, 20), attention))
        == 2
    )
    with pytest.raises(ValueError, match="not defined under a proposal"):
        attention_sampling(nn.Identity(), nn.Identity(), estimator="reference", exploration=0.1)
    with pytest.raises(ValueError, match="prior_weight must be < 1"):
        model, _, x_low, x_high = _setup(prior_weight=1.0)
        model.train().draw(x_low, x_high, prior=torch.ones(1, 4, 4, dtype=torch.float64))


def test_plan_read_estimate_is_draw():
    model, _, x_low, x_high = _setup(exploration=0.4)
    model.train()
    whole = model.draw(x_low, x_high, generator=torch.Generator().manual_seed(5))
    plan = model.plan(x_low, generator=torch.Generator().manual_seed(5))
    patches, offsets = model.read(x_low, x_high, plan.samples, plan.attention_size)
    parts = model.estimate(x_low, patches, offsets, plan)
    for a, b in zip(whole, parts, strict=True):
        assert torch.equal(a, b)
    logits = model.attention.logits
    grads = [torch.autograd.grad(d.features.sum(), logits)[0] for d in (whole, parts)]
    assert torch.equal(*grads)


def test_a_stale_plan_is_a_proposal_and_stays_unbiased():
    # Plan with the old weights, then change them (an optimizer step), then estimate:
    # the draws came from the old attention q, and a / q reweighting keeps the
    # estimate of the new sum_k a_k f_k unbiased. Without stale=True it is biased.
    model, a_old, x_low, x_high = _setup()
    model.train()
    a_new = torch.softmax(torch.linspace(-3, 3, 16, dtype=torch.float64), 0)
    a_new[3] = 0.0
    a_new = (a_new / a_new.sum()).view(4, 4)
    generator = torch.Generator().manual_seed(6)
    estimates = {True: [], False: []}
    for _ in range(3000):
        model.attention.logits.data = a_old.log()
        plan = model.plan(x_low, generator=generator)
        patches, offsets = model.read(x_low, x_high, plan.samples, plan.attention_size)
        model.attention.logits.data = a_new.log()
        for stale in (True, False):
            estimates[stale].append(
                model.estimate(x_low, patches, offsets, plan, stale=stale).features[0, 0].detach()
            )
    exact = _exact(a_new, x_low, x_high)
    for stale, unbiased in ((True, True), (False, False)):
        values = torch.stack(estimates[stale])
        within = abs(values.mean() - exact) < 5 * values.std() / len(values) ** 0.5
        assert bool(within) == unbiased, stale
