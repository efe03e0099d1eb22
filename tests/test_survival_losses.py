"""Survival losses against independent by-hand formulas and against scikit-survival's Cox fit."""
import numpy as np
import pytest
import torch
from sksurv.datasets import load_whas500
from sksurv.linear_model import CoxPHSurvivalAnalysis
from sksurv.linear_model.coxph import CoxPHOptimizer
from torchsurv.loss.cox import neg_partial_log_likelihood

from core.errors import InputError
from finetune.cohort import time_bins, to_bin
from models.survival_losses import cox_efron_loss, discrete_time_nll, survival_from_hazards, survival_risk_from_hazards


def efron_neg_loglik_numpy(risk, time, event):
    """Efron's partial likelihood written plainly from its textbook definition."""
    total = 0.0
    for t in np.unique(time[event == 1]):
        dead = (time == t) & (event == 1)
        at_risk = time >= t
        d = dead.sum()
        s_risk = np.exp(risk[at_risk]).sum()
        s_dead = np.exp(risk[dead]).sum()
        total += risk[dead].sum()
        for l in range(d):
            total -= np.log(s_risk - l / d * s_dead)
    return -total


def breslow_neg_loglik_numpy(risk, time, event):
    return -sum(risk[i] - np.log(np.exp(risk[time >= time[i]]).sum()) for i in np.flatnonzero(event))


TIME = np.array([2.0, 5.0, 5.0, 5.0, 7.0, 7.0, 9.0, 3.0, 5.0, 11.0])
EVENT = np.array([1, 1, 1, 0, 1, 1, 0, 1, 1, 0])
RISK = np.array([0.3, -1.2, 0.8, 0.1, 2.0, -0.5, 0.7, -0.1, 1.5, -2.0])


def test_efron_equals_by_hand_with_ties():
    loss = cox_efron_loss(torch.tensor(RISK), torch.tensor(TIME), torch.tensor(EVENT), reduction="sum")
    assert loss.item() == pytest.approx(efron_neg_loglik_numpy(RISK, TIME, EVENT), rel=1e-12)
    mean = cox_efron_loss(torch.tensor(RISK), torch.tensor(TIME), torch.tensor(EVENT))
    assert mean.item() == pytest.approx(loss.item() / EVENT.sum(), rel=1e-12)
    # Efron differs from Breslow when there are ties: the test data really exercise the correction.
    assert abs(loss.item() - breslow_neg_loglik_numpy(RISK, TIME, EVENT)) > 1e-3


def random_cohort_with_ties(seed: int, n: int = 40):
    """Risks, times on a coarse grid (many ties, some mixing events and censorings) and events."""
    rng = np.random.default_rng(seed)
    return rng.normal(size=n) * 1.5, rng.integers(1, 9, n).astype(float), rng.integers(0, 2, n)


@pytest.mark.filterwarnings("ignore:Ties in `time` detected")
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_efron_equals_torchsurv_with_ties(seed):
    risk, time, event = random_cohort_with_ties(seed)
    assert len(np.unique(time[event == 1])) < event.sum()  # tied events, so Efron matters
    ours = cox_efron_loss(torch.tensor(risk), torch.tensor(time), torch.tensor(event))  # mean over events
    # torchsurv sums the negative log-likelihood over event times like ours; its "mean" is over event times, not
    # events, so the sum is divided here. Its input checks cast to float32: the per-event mean (about 3) keeps
    # float32's rounding under 1e-6, a sum of 80 would not.
    ref = neg_partial_log_likelihood(torch.tensor(risk)[:, None], torch.tensor(event).bool(), torch.tensor(time),
                                     ties_method="efron", reduction="sum") / event.sum()
    assert ours.item() == pytest.approx(ref.item(), abs=1e-6)


@pytest.mark.filterwarnings("ignore:Ties in `time` detected")
def test_torchsurv_overflows_at_large_risks_where_ours_does_not():
    """Why models/survival_losses.py keeps its own Efron loss: torchsurv sums exp(risk) without a shift. If this
    fails, torchsurv has become stable and the hand-written loss should give way to it."""
    risk, time, event = random_cohort_with_ties(0)
    big = torch.tensor(risk * 100.0)  # float32's exp overflows past 88
    ref = neg_partial_log_likelihood(big[:, None], torch.tensor(event).bool(), torch.tensor(time), ties_method="efron")
    assert not torch.isfinite(ref)
    assert torch.isfinite(cox_efron_loss(big, torch.tensor(time), torch.tensor(event)))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_efron_equals_sksurv_at_fixed_coefficients(seed):
    """sksurv's own Efron negative log-likelihood of a linear predictor X w, at a w nobody fitted."""
    _, time, event = random_cohort_with_ties(seed)
    rng = np.random.default_rng(seed + 10)
    x, w = rng.normal(size=(len(time), 3)), rng.normal(size=3)
    opt = CoxPHOptimizer(x, event.astype(bool), time, alpha=np.zeros(3), ties="efron")
    ref_sum = opt.nlog_likelihood(w) * len(time)  # sksurv averages over samples (not events)
    ours = cox_efron_loss(torch.tensor(x @ w), torch.tensor(time), torch.tensor(event), reduction="sum")
    assert ours.item() == pytest.approx(ref_sum, abs=1e-6)
    assert ours.item() == pytest.approx(efron_neg_loglik_numpy(x @ w, time, event), abs=1e-6)


def test_efron_equals_breslow_without_ties():
    rng = np.random.default_rng(0)
    time = rng.permutation(np.arange(1.0, 31.0))
    event = rng.integers(0, 2, 30)
    risk = rng.normal(size=30)
    loss = cox_efron_loss(torch.tensor(risk), torch.tensor(time), torch.tensor(event), reduction="sum")
    assert loss.item() == pytest.approx(breslow_neg_loglik_numpy(risk, time, event), rel=1e-12)


def test_efron_is_shift_invariant_and_stable_for_large_risks():
    base = cox_efron_loss(torch.tensor(RISK), torch.tensor(TIME), torch.tensor(EVENT))
    shifted = cox_efron_loss(torch.tensor(RISK + 800.0), torch.tensor(TIME), torch.tensor(EVENT))
    assert torch.isfinite(shifted) and shifted.item() == pytest.approx(base.item(), rel=1e-9)
    spread = torch.tensor(RISK * 500.0, requires_grad=True)
    loss = cox_efron_loss(spread, torch.tensor(TIME), torch.tensor(EVENT))
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(spread.grad).all()


def test_efron_gradient_matches_finite_differences():
    risk = torch.tensor(RISK, requires_grad=True)
    assert torch.autograd.gradcheck(lambda r: cox_efron_loss(r, torch.tensor(TIME), torch.tensor(EVENT)), (risk,))


def test_no_event_batch_is_zero_with_zero_grad():
    risk = torch.tensor([0.5, -0.3, 1.0], requires_grad=True)
    loss = cox_efron_loss(risk, torch.tensor([1.0, 2.0, 3.0]), torch.tensor([0, 0, 0]))
    assert loss.grad_fn is not None and loss.item() == 0.0
    loss.backward()
    assert torch.equal(risk.grad, torch.zeros(3))


def test_linear_cox_fit_matches_sksurv_efron():
    x_df, y = load_whas500()
    cols = ["age", "bmi", "diasbp", "hr", "los", "sysbp"]
    x = x_df[cols].to_numpy(float)
    x = (x - x.mean(0)) / x.std(0)
    event, time = y["fstat"], y["lenfol"]
    assert len(np.unique(time[event])) < event.sum()  # real ties, so Efron matters

    ref = CoxPHSurvivalAnalysis(ties="efron", alpha=0).fit(x, y).coef_

    torch.manual_seed(0)
    model = torch.nn.Linear(len(cols), 1, bias=False).double()
    torch.nn.init.zeros_(model.weight)
    xt = torch.tensor(x)
    tt, et = time, event  # strided structured-array fields, as a user would pass them
    opt = torch.optim.LBFGS(model.parameters(), lr=1, max_iter=200, tolerance_grad=1e-12, tolerance_change=1e-14,
                            line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = cox_efron_loss(model(xt).squeeze(1), tt, et, reduction="sum")
        loss.backward()
        return loss

    opt.step(closure)
    coef = model.weight.detach().numpy().ravel()
    np.testing.assert_allclose(coef, ref, rtol=1e-5)  # Breslow ties would be off by ~2%


def discrete_nll_numpy(logits, bins, events):
    h = 1 / (1 + np.exp(-logits))
    total = 0.0
    for i, (b, e) in enumerate(zip(bins, events)):
        total += np.log(1 - h[i, :b]).sum()
        total += np.log(h[i, b]) if e else np.log(1 - h[i, b])
    return -total / len(bins)


def test_discrete_time_nll_equals_by_hand():
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(6, 4))
    bins = np.array([0, 3, 1, 2, 3, 0])
    events = np.array([1, 0, 1, 0, 1, 0])
    loss = discrete_time_nll(torch.tensor(logits), torch.tensor(bins), torch.tensor(events))
    assert loss.item() == pytest.approx(discrete_nll_numpy(logits, bins, events), rel=1e-10)


def test_time_bins_and_to_bin():
    times = np.array([1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 20.0])
    events = np.array([1, 1, 1, 1, 1, 1, 1, 1, 0])
    edges = time_bins(times, events, 4)
    assert len(edges) == 5 and edges[0] == 0 and edges[-1] == 20.0
    np.testing.assert_allclose(edges[1:-1], np.quantile(times[:8], [0.25, 0.5, 0.75]))
    idx = to_bin([0.5, edges[1], edges[1] + 1e-9, 19.0, 50.0], edges)
    np.testing.assert_array_equal(idx, [0, 0, 1, 3, 3])
    with pytest.raises(InputError, match="no events"):
        time_bins(times, np.zeros(9), 3)


def test_risk_from_hazards_orders_by_hazard():
    logits = torch.tensor([[-3.0, -3.0, -3.0], [0.0, 0.0, 0.0], [2.0, 2.0, 2.0]])
    risk = survival_risk_from_hazards(logits)
    assert risk[0] < risk[1] < risk[2]
    h = torch.sigmoid(logits[1])
    expected_surv = torch.cumprod(1 - h, 0)
    torch.testing.assert_close(survival_from_hazards(logits)[1], expected_surv)
    assert risk[1].item() == pytest.approx(-expected_surv.sum().item())
    widths_risk = survival_risk_from_hazards(logits, edges=[0.0, 1.0, 3.0, 6.0])
    assert widths_risk[1].item() == pytest.approx(-(expected_surv * torch.tensor([1.0, 2.0, 3.0])).sum().item())

