"""pipeline.expectation: exact expectations of the estimator by enumerating all draws."""

import pytest
import torch

from pipeline import Expectation, expectation, sample
from tests.pipeline.exact_draws import ordered_draws

D = 3  # feature size


def _problem(n_positions, seed):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n_positions, generator=g, dtype=torch.float64)
    features = torch.randn(n_positions, D, generator=g, dtype=torch.float64)
    cotangent = torch.randn(D, generator=g, dtype=torch.float64)  # loss = <c, F>
    return logits, features, cotangent


def _expected_over_draws(
    logits, features, cotangent, n, replace, estimator, use_logits, probabilities=None
):
    """E[F] and E[gradients] of ``<c, F>`` over every ordered draw sequence, exactly.

    The loss is ``sum_s P(s) <c, F_s>`` over all sequences ``s`` (weights detached),
    so one backward gives the probability-weighted mean of the per-sequence gradients.
    Returns ``(E[F], E[d/d leaf], E[d/d features])``; the leaf is the logits or the
    probabilities.
    """
    leaf = (logits if use_logits else probabilities).clone().requires_grad_()
    f = features.clone().requires_grad_()
    a = torch.softmax(leaf, 0) if use_logits else leaf
    index, weight = ordered_draws(a, n, replace)
    estimate = expectation(f[index], a[index], replace=replace, estimator=estimator)  # [S, D]
    mean = weight @ estimate
    (mean @ cotangent).backward()
    return mean.detach(), leaf.grad, f.grad


def _exact(logits, features, cotangent, use_logits, probabilities=None):
    """``sum_k a_k f_k`` and the gradients of ``<c, sum_k a_k f_k>``."""
    leaf = (logits if use_logits else probabilities).clone().requires_grad_()
    f = features.clone().requires_grad_()
    a = torch.softmax(leaf, 0) if use_logits else leaf
    total = a @ f
    (total @ cotangent).backward()
    return total.detach(), leaf.grad, f.grad


@pytest.mark.parametrize("replace", [False, True])
@pytest.mark.parametrize(("n_positions", "n"), [(5, 2), (5, 3), (6, 3)])
@pytest.mark.parametrize("use_logits", [False, True])
def test_value_and_gradients_are_unbiased(replace, n_positions, n, use_logits):
    logits, features, c = _problem(n_positions, seed=n_positions * 10 + n)
    probabilities = torch.softmax(logits, 0)
    got = _expected_over_draws(
        logits, features, c, n, replace, "unbiased", use_logits, probabilities
    )
    exact = _exact(logits, features, c, use_logits, probabilities)
    for g, e in zip(got, exact, strict=True):
        torch.testing.assert_close(g, e, rtol=1e-10, atol=1e-12)


def test_reference_estimator_is_biased_for_the_attention_only():
    logits, features, c = _problem(6, seed=3)
    probabilities = torch.softmax(logits, 0)
    value, grad_a, grad_f = _expected_over_draws(
        logits, features, c, 3, False, "reference", False, probabilities
    )
    exact_value, exact_a, exact_f = _exact(logits, features, c, False, probabilities)
    torch.testing.assert_close(value, exact_value)
    torch.testing.assert_close(grad_f, exact_f)
    assert (grad_a - exact_a).abs().max() > 0.1 * exact_a.abs().max()


def test_reference_formula_by_hand():
    # Two draws, scalar features: dF/da_0 = f_0 / (2 a_0) and
    # dF/da_1 = (E_1 (1 - a_0) / a_1 + f_0 - f_1) / 2 with E_1 = a_0 f_0 + (1 - a_0) f_1.
    a = torch.tensor([[0.5, 0.2]], dtype=torch.float64, requires_grad=True)
    f = torch.tensor([[[2.0], [3.0]]], dtype=torch.float64)
    expectation(f, a, estimator="reference").sum().backward()
    e1 = 0.5 * 2.0 + 0.5 * 3.0
    expected = [2.0 / (2 * 0.5), (e1 * 0.5 / 0.2 + 2.0 - 3.0) / 2]
    torch.testing.assert_close(a.grad, torch.tensor([expected], dtype=torch.float64))
    a.grad = None
    expectation(f, a).sum().backward()  # unbiased: f_m (pm_m / a_m + N-1-m) / N
    unbiased = [2.0 * (1 / 0.5 + 1) / 2, 3.0 * (0.5 / 0.2) / 2]
    torch.testing.assert_close(a.grad, torch.tensor([unbiased], dtype=torch.float64))


@pytest.mark.parametrize("estimator", ["unbiased", "reference"])
def test_exhausted_support_gives_the_exact_sum_and_finite_gradients(estimator):
    # Three positions carry all the mass; with five draws the last two have probability 0.
    probabilities = torch.tensor([0.5, 0.0, 0.3, 0.0, 0.2, 0.0], dtype=torch.float64)
    _, features, c = _problem(6, seed=4)
    a = probabilities.clone().requires_grad_()
    f = features.clone().requires_grad_()
    index, weight = ordered_draws(probabilities, 5, replace=False)
    estimate = expectation(f[index], a[index], estimator=estimator)
    torch.testing.assert_close(estimate, (probabilities @ features).expand_as(estimate))
    (weight @ estimate @ c).backward()
    assert torch.isfinite(a.grad).all() and torch.isfinite(f.grad).all()
    # The exact gradients, in every draw sequence (so also in expectation).
    torch.testing.assert_close(f.grad, torch.outer(probabilities, c))
    support = probabilities > 0
    torch.testing.assert_close(a.grad[support], (features @ c)[support])


def test_one_hot_map_through_sample():
    attention = torch.zeros(1, 3, 3)
    attention[0, 2, 1] = 1
    attention.requires_grad_()
    features = torch.randn(1, 4, D, requires_grad=True)
    _, sampled = sample(4, attention, generator=torch.Generator().manual_seed(0))
    out = expectation(features, sampled)
    torch.testing.assert_close(out, features[:, 0])
    out.sum().backward()
    assert torch.isfinite(attention.grad).all() and torch.isfinite(features.grad).all()


@pytest.mark.parametrize("replace", [False, True])
@pytest.mark.parametrize("use_logits", [False, True])
def test_sample_then_expectation_is_unbiased_by_monte_carlo(replace, use_logits):
    # Each of R batch items is an independent draw; the per-item gradients are rows of
    # the leaf's gradient. Means must lie within 5 standard errors of the exact values.
    rows, n_positions, n = 40_000, 12, 4
    logits, features, c = _problem(n_positions, seed=5)
    leaf = logits.expand(rows, -1).clone().requires_grad_()
    a = torch.softmax(leaf, 1)
    samples, sampled = sample(
        n,
        leaf if use_logits else a,
        replace=replace,
        use_logits=use_logits,
        generator=torch.Generator().manual_seed(6),
    )
    estimate = expectation(features[samples[..., 0]], sampled, replace=replace)  # [R, D]
    (estimate @ c).sum().backward()
    _, exact_grad, _ = _exact(logits, features, c, use_logits=True)
    values = estimate @ c
    exact_value = torch.softmax(logits, 0) @ features @ c
    for draws, exact in [(values, exact_value), (leaf.grad, exact_grad)]:
        error = (draws.mean(0) - exact).abs()
        assert (error <= 5 * draws.std(0) / rows**0.5 + 1e-12).all()


@pytest.mark.parametrize("replace", [False, True])
def test_gradcheck_features(replace):
    a = torch.tensor([[0.4, 0.3, 0.1], [0.2, 0.5, 0.25]], dtype=torch.float64)
    f = torch.randn(2, 3, 2, 2, dtype=torch.float64, requires_grad=True)
    torch.autograd.gradcheck(lambda x: expectation(x, a, replace=replace), (f,))


def test_trailing_feature_shape_and_module():
    a = torch.tensor([[0.4, 0.3], [0.2, 0.5]])
    f = torch.randn(2, 2, 4, 5)
    out = Expectation(replace=False)(f, a)
    assert out.shape == (2, 4, 5)
    torch.testing.assert_close(out, expectation(f, a))
    weights = torch.tensor([[1 + 0.4, 0.6], [1 + 0.2, 0.8]]) / 2  # (pm + (N-1-m) a) / N
    torch.testing.assert_close(out, (weights.view(2, 2, 1, 1) * f).sum(1))
    torch.testing.assert_close(Expectation(replace=True)(f, a), f.mean(1))


def test_invalid_arguments_are_rejected():
    f = torch.randn(2, 3, 4)
    with pytest.raises(ValueError, match=r"shape \[B, N\] = \(2, 3\)"):
        expectation(f, torch.rand(2, 4))
    with pytest.raises(ValueError, match="estimator"):
        expectation(f, torch.rand(2, 3), estimator="biased")
    with pytest.raises(ValueError, match="estimator"):
        Expectation(estimator="nope")
    with pytest.raises(TypeError, match="floating-point"):
        expectation(f.long(), torch.rand(2, 3))
