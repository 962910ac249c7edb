"""The survival task: Cox partial likelihood (Breslow ties) and C-indices against
values computed by hand and by lifelines / scikit-survival."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from pipeline.app.config import ModelConfig
from pipeline.app.errors import UserError
from pipeline.app.tasks import Survival, task_of
from pipeline.app.tasks.survival import cox_terms, survival_metrics

TASK = Survival()


def cox(risk, time, event) -> float:
    """The task's loss as the training step computes it: the mean of the terms."""
    terms = cox_terms(
        torch.tensor(risk, dtype=torch.float64),
        torch.tensor(time, dtype=torch.float64),
        torch.tensor(event, dtype=torch.float64),
    )
    return float(terms.mean())


def test_cox_loss_by_hand_with_a_censored_slide():
    r, t, e = [0.5, -0.2, 0.1, 0.3], [1.0, 2.0, 2.0, 4.0], [1.0, 1.0, 0.0, 1.0]
    l0 = math.log(sum(math.exp(x) for x in r))  # t = 1: every slide at risk
    l1 = math.log(sum(math.exp(x) for x in r[1:]))  # t = 2: slides 1, 2, 3
    l3 = r[3]  # t = 4: slide 3 alone
    expected = -((r[0] - l0) + (r[1] - l1) + (r[3] - l3)) / 3
    assert cox(r, t, e) == pytest.approx(expected, rel=1e-12)


def test_cox_loss_breslow_ties_share_the_whole_risk_set():
    r, t, e = [0.4, -0.1, 0.7], [3.0, 3.0, 5.0], [1.0, 1.0, 1.0]
    both = math.log(sum(math.exp(x) for x in r))  # Breslow: both tied events see all three
    expected = -((r[0] - both) + (r[1] - both) + 0.0) / 3
    assert cox(r, t, e) == pytest.approx(expected, rel=1e-12)


def test_cox_loss_equals_lifelines_partial_likelihood_without_ties():
    lifelines = pytest.importorskip("lifelines")
    import pandas as pd

    rng = np.random.default_rng(0)
    n = 40
    x = rng.normal(size=n)
    time = rng.exponential(1 / np.exp(0.8 * x)) + rng.uniform(0, 1e-3, n)  # no ties
    event = (rng.random(n) < 0.7).astype(float)
    frame = pd.DataFrame({"x": x, "time": time, "event": event})
    fit = lifelines.CoxPHFitter().fit(frame, "time", "event")
    beta = float(fit.params_["x"])
    loss = cox((beta * x).tolist(), time.tolist(), event.tolist())
    assert -loss * event.sum() == pytest.approx(fit.log_likelihood_, rel=1e-6)


def test_all_censored_batch_gives_zero_loss_and_finite_gradients():
    risk = torch.tensor([0.3, -1.0, 2.0], requires_grad=True)
    terms = cox_terms(risk, torch.tensor([1.0, 2.0, 3.0]), torch.zeros(3))
    terms.mean().backward()
    assert float(terms.detach().abs().sum()) == 0.0
    assert torch.isfinite(risk.grad).all()
    # a batch of one slide: its own risk set, zero as well
    assert float(cox_terms(torch.tensor([5.0]), torch.tensor([1.0]), torch.ones(1))[0]) == 0.0


def test_harrell_c_index_by_hand_and_against_lifelines():
    times = np.array([1.0, 2.0, 3.0, 4.0])
    events = np.array([True, True, False, True])
    assert survival_metrics(times, events, np.array([4.0, 3.0, 1.0, 2.0]))["c_index"] == 1.0
    # pairs (event i, later j): (0,1) (0,2) (0,3) concordant, (1,2) (1,3) discordant
    assert survival_metrics(times, events, np.array([4.0, 1.0, 3.0, 2.0]))["c_index"] == 0.6
    utils = pytest.importorskip("lifelines.utils")
    rng = np.random.default_rng(1)
    t, e, r = rng.exponential(size=30), rng.random(30) < 0.6, rng.normal(size=30)
    expected = utils.concordance_index(t, -r, e)  # lifelines scores survival times
    assert survival_metrics(t, e, r)["c_index"] == pytest.approx(expected, rel=1e-12)


def test_metrics_are_none_where_undefined():
    m = survival_metrics(np.array([1.0, 2.0]), np.array([False, False]), np.array([0.0, 1.0]))
    assert m == {"c_index": None, "c_index_uno": None, "td_auc": None}


def test_parse_and_check_errors_name_the_row():
    assert TASK.parse(("12.5", "1"), "row 2") == (12.5, 1.0)
    assert TASK.parse(("3", "false"), "row 3") == (3.0, 0.0)
    with pytest.raises(UserError, match="labels.csv line 4: time 'soon' is not a time"):
        TASK.parse(("soon", "1"), "labels.csv line 4")
    with pytest.raises(UserError, match="line 5: event '2' is not an event indicator"):
        TASK.parse(("3", "2"), "line 5")
    with pytest.raises(UserError, match="all censored"):
        TASK.check([(1.0, 0.0), (2.0, 0.0)], "labels.csv")
    np.testing.assert_array_equal(TASK.strata([(1.0, 0.0), (2.0, 1.0)]), [0, 1])


def test_config_columns_and_scores():
    task = task_of(ModelConfig(task="survival", targets=("os_months", "died")))
    assert task.target_columns == ("os_months", "died") and task.n_outputs == 1
    assert task.score_columns == ("risk",)
    outputs = torch.tensor([[0.7], [-0.2]])
    torch.testing.assert_close(task.scores(outputs), outputs)
