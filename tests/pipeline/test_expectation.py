"""pipeline.expectation: exact expectations of the estimator by enumerating all draws."""

import pytest
import torch

from pipeline import Expectation, expectation, mix_prior, mix_uniform, sample
from tests.pipeline.exact_draws import ordered_draws

D = 3  # feature size


def _problem(n_positions, seed):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n_positions, generator=g, dtype=torch.float64)
    features = torch.randn(n_positions, D, generator=g, dtype=torch.float64)
    cotangent = torch.randn(D, generator=g, dtype=torch.float64)  # loss = <c, F>
    return logits, features, cotangent


def _expected_over_draws(
    logits,
    features,
    cotangent,
    n,
    replace,
    estimator,
    use_logits,
    probabilities=None,
    proposal=None,
):
    """E[F] and E[gradients] of ``<c, F>`` over every ordered draw sequence, exactly.

    The loss is ``sum_s P(s) <c, F_s>`` over all sequences ``s`` (weights detached),
    so one backward gives the probability-weighted mean of the per-sequence gradients.
    Returns ``(E[F], E[d/d leaf], E[d/d features])``; the leaf is the logits or the
    probabilities. The draws follow ``proposal [P]`` when given, else the attention.
    """
    leaf = (logits if use_logits else probabilities).clone().requires_grad_()
    f = features.clone().requires_grad_()
    a = torch.softmax(leaf, 0) if use_logits else leaf
    index, weight = ordered_draws(a if proposal is None else proposal, n, replace)
    estimate = expectation(
        f[index],
        a[index],
        replace=replace,
        estimator=estimator,
        sampled_proposal=None if proposal is None else proposal[index],
    )  # [S, D]
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


@pytest.mark.parametrize(
    ("replace", "estimator"), [(False, "unbiased"), (True, "unbiased"), (False, "linear")]
)
@pytest.mark.parametrize(("n_positions", "n"), [(5, 2), (5, 3), (6, 3), (6, 4)])
@pytest.mark.parametrize("use_logits", [False, True])
@pytest.mark.parametrize("with_proposal", [False, True])
def test_value_and_gradients_are_unbiased(
    replace, estimator, n_positions, n, use_logits, with_proposal
):
    logits, features, c = _problem(n_positions, seed=n_positions * 10 + n)
    probabilities = torch.softmax(logits, 0)
    proposal = None
    if with_proposal:  # a different distribution, positive everywhere
        proposal = torch.softmax(_problem(n_positions, seed=n_positions * 10 + n + 1)[0], 0)
    got = _expected_over_draws(
        logits, features, c, n, replace, estimator, use_logits, probabilities, proposal
    )
    exact = _exact(logits, features, c, use_logits, probabilities)
    for g, e in zip(got, exact, strict=True):
        torch.testing.assert_close(g, e, rtol=1e-10, atol=1e-12)


def _exact_variance(probabilities, features, n, estimator):
    """Var of ``F`` over every ordered draw sequence (summed over the feature axis)."""
    index, weight = ordered_draws(probabilities, n, replace=False)
    estimate = expectation(features[index], probabilities[index], estimator=estimator)
    mean = weight @ estimate
    return float(weight @ ((estimate - mean) ** 2).sum(1))


def test_linear_estimator_varies_less_for_a_peaked_attention_and_more_for_a_flat_one():
    _, features, _ = _problem(7, seed=5)
    peaked = torch.tensor([0.4, 0.3, 0.2, 0.04, 0.03, 0.02, 0.01], dtype=torch.float64)
    # Exact variances 0.076 (uniform mean) and 0.041 (linear).
    assert _exact_variance(peaked, features, 4, "linear") < 0.6 * _exact_variance(
        peaked, features, 4, "unbiased"
    )
    # Flat over many more positions than draws: 0.719 and 0.787.
    _, features, _ = _problem(20, seed=5)
    flat = torch.full((20,), 1 / 20, dtype=torch.float64)
    assert _exact_variance(flat, features, 3, "linear") > 1.05 * _exact_variance(
        flat, features, 3, "unbiased"
    )


def test_linear_formula_by_hand():
    # Two draws, scalar features: F = (E_0 + 2 E_1) / 3, so dF/da_0 = f_0 (pm_0 / a_0 + 2) / 3,
    # dF/da_1 = 2 f_1 pm_1 / (3 a_1), and dF/df_0 = (pm_0 + 2 a_0) / 3, dF/df_1 = 2 pm_1 / 3.
    a = torch.tensor([[0.5, 0.2]], dtype=torch.float64, requires_grad=True)
    f = torch.tensor([[[2.0], [3.0]]], dtype=torch.float64, requires_grad=True)
    value = expectation(f, a, estimator="linear")
    e0, e1 = 2.0, 0.5 * 2.0 + 0.5 * 3.0
    torch.testing.assert_close(value, torch.tensor([[(e0 + 2 * e1) / 3]], dtype=torch.float64))
    value.sum().backward()
    expected_a = [2.0 * (1 / 0.5 + 2) / 3, 2 * 3.0 * 0.5 / (3 * 0.2)]
    torch.testing.assert_close(a.grad, torch.tensor([expected_a], dtype=torch.float64))
    expected_f = [[(1 + 2 * 0.5) / 3], [2 * 0.5 / 3]]
    torch.testing.assert_close(f.grad, torch.tensor([expected_f], dtype=torch.float64))


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


@pytest.mark.parametrize(
    ("estimator", "proposal"),
    [
        ("unbiased", None),
        ("reference", None),
        ("linear", None),
        # Positive on the attention's support and one more position: used up by draw 5.
        ("unbiased", torch.tensor([0.2, 0.3, 0.1, 0.0, 0.4, 0.0], dtype=torch.float64)),
        ("linear", torch.tensor([0.2, 0.3, 0.1, 0.0, 0.4, 0.0], dtype=torch.float64)),
    ],
    ids=["unbiased", "reference", "linear", "proposal", "linear-proposal"],
)
def test_exhausted_support_gives_the_exact_sum_and_finite_gradients(estimator, proposal):
    # Three positions carry all the mass; with five draws the last ones have probability 0
    # under the distribution drawn from.
    probabilities = torch.tensor([0.5, 0.0, 0.3, 0.0, 0.2, 0.0], dtype=torch.float64)
    drawn_from = probabilities if proposal is None else proposal
    _, features, c = _problem(6, seed=4)
    a = probabilities.clone().requires_grad_()
    f = features.clone().requires_grad_()
    index, weight = ordered_draws(drawn_from, 5, replace=False)
    assert (drawn_from[index[:, 4]] == 0).all()
    sampled_proposal = None if proposal is None else proposal[index]
    estimate = expectation(
        f[index], a[index], estimator=estimator, sampled_proposal=sampled_proposal
    )
    torch.testing.assert_close(estimate, (probabilities @ features).expand_as(estimate))
    (weight @ estimate @ c).backward()
    assert torch.isfinite(a.grad).all() and torch.isfinite(f.grad).all()
    # The exact gradients, in every draw sequence (so also in expectation).
    torch.testing.assert_close(f.grad, torch.outer(probabilities, c))
    drawable = drawn_from > 0
    torch.testing.assert_close(a.grad[drawable], (features @ c)[drawable])


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
@pytest.mark.parametrize("with_proposal", [False, True])
def test_sample_then_expectation_is_unbiased_by_monte_carlo(replace, use_logits, with_proposal):
    # Each of R batch items is an independent draw; the per-item gradients are rows of
    # the leaf's gradient. Means must lie within 5 standard errors of the exact values.
    rows, n_positions, n = 40_000, 12, 4
    logits, features, c = _problem(n_positions, seed=5)
    leaf = logits.expand(rows, -1).clone().requires_grad_()
    a = torch.softmax(leaf, 1)
    proposal = None
    if with_proposal:
        proposal = torch.softmax(_problem(n_positions, seed=7)[0], 0).expand(rows, -1)
    samples, sampled, *proposed = sample(
        n,
        leaf if use_logits else a,
        replace=replace,
        use_logits=use_logits,
        generator=torch.Generator().manual_seed(6),
        proposal=proposal,
    )
    estimate = expectation(
        features[samples[..., 0]],
        sampled,
        replace=replace,
        sampled_proposal=proposed[0] if proposed else None,
    )  # [R, D]
    (estimate @ c).sum().backward()
    _, exact_grad, _ = _exact(logits, features, c, use_logits=True)
    values = estimate @ c
    exact_value = torch.softmax(logits, 0) @ features @ c
    for draws, exact in [(values, exact_value), (leaf.grad, exact_grad)]:
        error = (draws.mean(0) - exact).abs()
        assert (error <= 5 * draws.std(0) / rows**0.5 + 1e-12).all()


# --- draws from a proposal (docs/estimator.md, sampling from a proposal) ---


ATTENTION_WITH_ZEROS = torch.tensor([0.45, 0.0, 0.3, 0.05, 0.2, 0.0], dtype=torch.float64)
PROPOSALS = {
    # Positive everywhere: the attention's zeros get their exact gradient f_k too.
    "covers_everything": torch.tensor([0.1, 0.2, 0.15, 0.25, 0.1, 0.2], dtype=torch.float64),
    "mix_uniform": mix_uniform(ATTENTION_WITH_ZEROS.view(1, 6), 0.3).view(6),
    # Zero at a position where the attention is zero as well.
    "zero_outside_support": torch.tensor([0.1, 0.25, 0.2, 0.15, 0.3, 0.0], dtype=torch.float64),
    # Only the attention's support: exhausted within N = 5 draws without replacement.
    "support_only": torch.tensor([0.2, 0.0, 0.5, 0.1, 0.2, 0.0], dtype=torch.float64),
}


@pytest.mark.parametrize(
    ("replace", "estimator"), [(False, "unbiased"), (True, "unbiased"), (False, "linear")]
)
@pytest.mark.parametrize("n", [2, 3, 4, 5])
@pytest.mark.parametrize("proposal_name", sorted(PROPOSALS))
def test_unbiased_under_a_proposal_with_zeros(replace, estimator, n, proposal_name):
    proposal = PROPOSALS[proposal_name]
    _, features, c = _problem(6, seed=8)
    value, grad_a, grad_f = _expected_over_draws(
        None, features, c, n, replace, estimator, False, ATTENTION_WITH_ZEROS, proposal
    )
    exact_value, exact_a, exact_f = _exact(None, features, c, False, ATTENTION_WITH_ZEROS)
    torch.testing.assert_close(value, exact_value, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(grad_f, exact_f, rtol=1e-10, atol=1e-12)
    # Unbiased wherever the proposal can draw; never drawn (q = 0) means no estimate.
    drawable = proposal > 0
    torch.testing.assert_close(grad_a[drawable], exact_a[drawable], rtol=1e-10, atol=1e-12)
    assert torch.isfinite(grad_a).all()


def test_proposal_formulas_by_hand():
    # a = (0.5, 0.2), q = (0.25, 0.4), scalar features (2, 3), two draws.
    a = torch.tensor([[0.5, 0.2]], dtype=torch.float64, requires_grad=True)
    f = torch.tensor([[[2.0], [3.0]]], dtype=torch.float64, requires_grad=True)
    q = torch.tensor([[0.25, 0.4]], dtype=torch.float64)
    # Without replacement: Q = (1, 0.75); w_m = (Q_m a_m / q_m + (N-1-m) a_m) / N.
    out = expectation(f, a, sampled_proposal=q)
    out.sum().backward()
    w = [(1 * 0.5 / 0.25 + 0.5) / 2, (0.75 * 0.2 / 0.4) / 2]
    torch.testing.assert_close(out, torch.tensor([[w[0] * 2 + w[1] * 3]], dtype=torch.float64))
    torch.testing.assert_close(f.grad, torch.tensor([[[w[0]], [w[1]]]], dtype=torch.float64))
    grad_a = [2 * (1 / 0.25 + 1) / 2, 3 * (0.75 / 0.4) / 2]  # f_m (Q_m / q_m + N-1-m) / N
    torch.testing.assert_close(a.grad, torch.tensor([grad_a], dtype=torch.float64))
    # With replacement: F = mean_m (a_m / q_m) f_m.
    a.grad = f.grad = None
    out = expectation(f, a, replace=True, sampled_proposal=q)
    out.sum().backward()
    torch.testing.assert_close(out, torch.tensor([[(2 * 2 + 0.5 * 3) / 2]], dtype=torch.float64))
    torch.testing.assert_close(f.grad, torch.tensor([[[1.0], [0.25]]], dtype=torch.float64))
    torch.testing.assert_close(a.grad, torch.tensor([[4.0, 3.75]], dtype=torch.float64))


EQUAL_PROPOSALS = {
    "clone": lambda a: a.clone(),
    "mix_uniform_0": lambda a: mix_uniform(a, 0.0),
    "mix_prior_0": lambda a: mix_prior(a, torch.arange(a.numel()).view(a.shape) % 3 + 1, 0.0),
}


@pytest.mark.parametrize("replace", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("make_proposal", sorted(EQUAL_PROPOSALS))
def test_proposal_equal_to_the_attention_reproduces_the_estimator_bit_for_bit(
    replace, dtype, make_proposal
):
    # Item 1 has a support of 3 positions < N = 5: the exhausted case too.
    attention = torch.softmax(torch.randn(2, 12, generator=torch.Generator().manual_seed(10)), 1)
    attention[1] = 0
    attention[1, [2, 7, 9]] = torch.tensor([0.5, 0.3, 0.2])
    attention = attention.to(dtype)
    features = torch.randn(2, 12, D, dtype=dtype, generator=torch.Generator().manual_seed(11))
    cotangent = torch.randn(2, D, dtype=dtype, generator=torch.Generator().manual_seed(12))

    def run(proposal):
        a = attention.clone().requires_grad_()
        f = features.clone().requires_grad_()
        samples, sampled, *proposed = sample(
            5, a, replace, generator=torch.Generator().manual_seed(13), proposal=proposal
        )
        out = expectation(
            f.gather(1, samples.expand(-1, -1, D)),
            sampled,
            replace,
            sampled_proposal=proposed[0] if proposed else None,
        )
        (out * cotangent).sum().backward()
        return out, a.grad, f.grad

    proposal = EQUAL_PROPOSALS[make_proposal](attention)
    for today, with_q in zip(run(None), run(proposal), strict=True):
        assert torch.equal(today, with_q)


@pytest.mark.parametrize("replace", [False, True])
def test_gradcheck_under_a_proposal(replace):
    # With q constant the estimate is linear in the attention, so its analytic gradient
    # is the true derivative. Item 1: the proposal's support is exhausted at draw 3.
    a = torch.tensor([[0.4, 0.3, 0.1], [0.6, 0.4, 0.0]], dtype=torch.float64, requires_grad=True)
    q = torch.tensor([[0.2, 0.5, 0.25], [0.3, 0.7, 0.0]], dtype=torch.float64)
    f = torch.randn(2, 3, 2, 2, dtype=torch.float64, requires_grad=True)
    torch.autograd.gradcheck(
        lambda x, y: expectation(x, y, replace=replace, sampled_proposal=q), (f, a)
    )


def test_proposal_arguments_are_checked():
    f = torch.randn(2, 3, 4)
    a = torch.rand(2, 3)
    with pytest.raises(ValueError, match="'reference' is not defined for draws from a proposal"):
        expectation(f, a, estimator="reference", sampled_proposal=a)
    with pytest.raises(ValueError, match=r"sampled_proposal has shape \(2, 4\)"):
        expectation(f, a, sampled_proposal=torch.rand(2, 4))
    with pytest.raises(TypeError, match="sampled_proposal must be a floating-point"):
        expectation(f, a, sampled_proposal=torch.ones(2, 3, dtype=torch.long))
    q = torch.rand(2, 3)
    for replace in (False, True):
        torch.testing.assert_close(
            Expectation(replace=replace)(f, a, sampled_proposal=q),
            expectation(f, a, replace, sampled_proposal=q),
        )


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
    with pytest.raises(ValueError, match="linear.*without replacement"):
        expectation(f, torch.rand(2, 3), replace=True, estimator="linear")
    with pytest.raises(ValueError, match="linear.*without replacement"):
        Expectation(replace=True, estimator="linear")
    with pytest.raises(TypeError, match="floating-point"):
        expectation(f.long(), torch.rand(2, 3))
