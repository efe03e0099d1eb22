"""Metrics against scikit-learn / scikit-survival and against plain O(n^2) DeLong written here."""
import numpy as np
import pytest
from sklearn.metrics import brier_score_loss, roc_auc_score
from sksurv.compare import compare_survival
from sksurv.datasets import load_whas500
from sksurv.linear_model import CoxPHSurvivalAnalysis
from sksurv.metrics import (concordance_index_censored, concordance_index_ipcw, cumulative_dynamic_auc,
                            integrated_brier_score)
from sksurv.nonparametric import kaplan_meier_estimator
from sksurv.util import Surv

from core.errors import InputError
from finetune.metrics import (UndefinedMetric, auc_delong, auc_kernel, bootstrap_ci, breslow_survival, brier,
                              classification_report, delong_paired_test, harrell_c, harrell_kernel, integrated_brier,
                              kernel_values, km_by_risk_group, survival_report, time_dependent_auc, try_metric, uno_c,
                              youden_point)


def structural_components(y, score):
    """DeLong's V10 (per positive) and V01 (per negative), pair by pair."""
    pos, neg = score[y == 1], score[y == 0]
    psi = (pos[:, None] > neg[None, :]) + 0.5 * (pos[:, None] == neg[None, :])  # [m, n]
    return psi.mean(axis=1), psi.mean(axis=0)


def delong_cov_plain(y, scores):
    comps = [structural_components(y, s) for s in scores]
    v10 = np.array([c[0] for c in comps])
    v01 = np.array([c[1] for c in comps])
    m, n = v10.shape[1], v01.shape[1]
    return np.atleast_2d(np.cov(v10)) / m + np.atleast_2d(np.cov(v01)) / n


@pytest.fixture
def binary():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 300)
    score = np.round(y * 0.8 + rng.normal(size=300), 1)  # rounding makes many ties
    assert len(np.unique(score)) < 100
    return y, score


@pytest.fixture(scope="module")
def whas():
    x, y = load_whas500()
    cols = ["age", "bmi", "diasbp", "hr", "los", "sysbp"]
    order = np.random.default_rng(0).permutation(len(y))  # the file is sorted; slices must be mixed
    x = x[cols].to_numpy(float)[order]
    x = (x - x.mean(0)) / x.std(0)
    return x, y["lenfol"][order], y["fstat"][order].astype(int)


def test_delong_auc_and_variance(binary):
    y, score = binary
    out = auc_delong(y, score)
    assert out["auc"] == pytest.approx(roc_auc_score(y, score), abs=1e-14)
    assert out["var"] == pytest.approx(delong_cov_plain(y, [score])[0, 0], rel=1e-10)
    half = 1.959963984540054 * np.sqrt(out["var"])
    assert out["ci_low"] == pytest.approx(out["auc"] - half) and out["ci_high"] == pytest.approx(out["auc"] + half)


def test_delong_ci_agrees_with_bootstrap(binary):
    y, score = binary
    out = auc_delong(y, score)
    ci = bootstrap_ci(roc_auc_score, y, score, n_boot=400, seed=1, stratify=y)
    assert ci.n_used == 400
    ratio = (ci.high - ci.low) / (out["ci_high"] - out["ci_low"])
    assert 0.7 < ratio < 1.3
    assert ci.low < out["auc"] < ci.high


def test_paired_delong(binary):
    y, score = binary
    same = delong_paired_test(y, score, score)
    assert same["diff"] == 0 and same["p"] == pytest.approx(1.0)
    rng = np.random.default_rng(5)
    weak = y * 0.1 + rng.normal(size=len(y))
    out = delong_paired_test(y, score, weak)
    cov = delong_cov_plain(y, [score, weak])
    assert out["var_diff"] == pytest.approx(cov[0, 0] + cov[1, 1] - 2 * cov[0, 1], rel=1e-10)
    assert out["auc_a"] == pytest.approx(roc_auc_score(y, score))
    assert out["auc_b"] == pytest.approx(roc_auc_score(y, weak))
    assert out["diff"] > 0.1 and out["p"] < 1e-3


def test_undefined_classification_gives_none_and_reason():
    y, prob = np.zeros(8, int), np.linspace(0.1, 0.8, 8)
    with pytest.raises(UndefinedMetric, match="only one class"):
        auc_delong(y, prob)
    assert try_metric(auc_delong, y, prob) == (None, "only one class present")
    rep = classification_report(y, prob, n_boot=20)
    assert rep["auc"] is None and rep["auc_ci"] is None and rep["notes"]["auc"] == "only one class present"
    assert rep["brier"] == pytest.approx(brier_score_loss(y, prob, labels=[0, 1]))  # Brier exists with one class
    single_pos = auc_delong([0, 0, 0, 1], [0.1, 0.2, 0.3, 0.9])
    assert single_pos["auc"] == 1.0 and single_pos["var"] is None and "2 positives" in single_pos["note"]
    with pytest.raises(InputError, match="0 or 1"):
        auc_delong([0, 2], [0.1, 0.2])
    with pytest.raises(InputError, match="finite"):
        auc_delong([0, 1], [0.1, np.nan])


def test_youden_and_brier(binary):
    y, score = binary
    prob = 1 / (1 + np.exp(-score))
    point = youden_point(y, score)
    # Brute force over every observed score as a "predict positive if >= t" threshold.
    best = max(np.unique(score), key=lambda t: (score[y == 1] >= t).mean() - (score[y == 0] >= t).mean())
    assert point["threshold"] == best
    assert point["sensitivity"] == (score[y == 1] >= best).mean()
    assert point["specificity"] == (score[y == 0] < best).mean()
    assert brier(y, prob) == pytest.approx(brier_score_loss(y, prob))


def test_classification_report_values(binary):
    y, score = binary
    prob = 1 / (1 + np.exp(-score))
    rep = classification_report(y, prob, n_boot=50, seed=3)
    assert rep["auc"] == pytest.approx(roc_auc_score(y, prob))
    assert rep["auc_ci"] == pytest.approx([auc_delong(y, prob)["ci_low"], auc_delong(y, prob)["ci_high"]])
    lo, hi = bootstrap_ci(roc_auc_score, y, prob, n_boot=50, seed=3, stratify=y)
    assert rep["auc_ci_bootstrap"] == [lo, hi]
    assert rep["brier"] == pytest.approx(brier_score_loss(y, prob))
    assert rep["brier_ci"][0] < rep["brier"] < rep["brier_ci"][1]
    assert rep["n"] == 300 and rep["n_positive"] == int(y.sum()) and rep["notes"] == {}


def test_bootstrap_skips_undefined_and_resamples_groups():
    y = np.array([0] * 19 + [1])

    def needs_positive(labels):
        if labels.sum() == 0:
            raise UndefinedMetric("only one class present")
        return labels.mean()

    ci = bootstrap_ci(needs_positive, y, n_boot=200, seed=0)
    # P(no positive in a resample) = (19/20)^20 ~ 0.36: those resamples are skipped, not zero.
    assert 100 < ci.n_used < 160 and ci.low >= 0.05
    assert bootstrap_ci(lambda a: a.mean(), y, n_boot=50, stratify=y).low == pytest.approx(0.05)
    # Whole groups are drawn: rows of a patient always come together.
    groups = np.repeat(np.arange(10), 3)
    rows = np.arange(30)

    def whole_groups_only(r):
        counts = np.bincount(groups[r], minlength=10)
        assert set(counts[counts > 0] % 3) == {0}
        return float(len(r))

    ci = bootstrap_ci(whole_groups_only, rows, n_boot=20, groups=groups)
    assert ci.n_used == 20 and ci.low == ci.high == 30.0
    all_bad = bootstrap_ci(lambda a: None, y, n_boot=10)
    assert tuple(all_bad) == (None, None) and all_bad.n_used == 0


def test_harrell_and_uno_match_sksurv(whas):
    x, time, event = whas
    risk = x @ np.array([0.8, -0.2, -0.3, 0.3, 0.04, 0.04])
    y = Surv.from_arrays(event, time)
    assert harrell_c(time, event, risk) == concordance_index_censored(event.astype(bool), time, risk)[0]
    tr, te = slice(0, 300), slice(300, None)
    for tau in (1000.0, time[tr].max()):
        expected = concordance_index_ipcw(y[tr], y[te], risk[te], tau=tau)[0]
        assert uno_c(time[tr], event[tr], time[te], event[te], risk[te], tau=tau) == expected


def test_no_events_gives_none_and_reason():
    time, event, risk = np.arange(1.0, 9.0), np.zeros(8), np.linspace(0, 1, 8)
    assert try_metric(harrell_c, time, event, risk) == (None, "no events")
    rep = survival_report(time, event, risk, n_boot=10)
    for name in ("harrell_c", "uno_c", "td_auc", "ibs"):
        assert rep[name] is None and "no events" in rep["notes"][name]
    assert rep["km"]["logrank_p"] is None and rep["notes"]["logrank"] == "no events"


def test_breslow_survival_and_ibs_match_sksurv_cox(whas):
    x, time, event = whas
    y = Surv.from_arrays(event, time)
    # sksurv's own IBS needs every test time inside the training follow-up: keep the longest in train.
    longest = np.argmax(time)
    tr = np.r_[np.arange(350), longest] if longest >= 350 else np.arange(350)
    te = np.setdiff1d(np.arange(len(time)), tr)
    cox = CoxPHSurvivalAnalysis(ties="breslow").fit(x[tr], y[tr])
    times = np.linspace(30, 1000, 25)  # many test times lie past 1000: exercises the late-row handling
    assert (time[te] > times.max()).sum() > 20
    expected = np.array([f(times) for f in cox.predict_survival_function(x[te])])
    got = breslow_survival(cox.predict(x[tr]), time[tr], event[tr], cox.predict(x[te]), times)
    np.testing.assert_allclose(got, expected, rtol=1e-8)
    ibs = integrated_brier(time[tr], event[tr], cox.predict(x[tr]), time[te], event[te], cox.predict(x[te]), times)
    assert ibs == pytest.approx(integrated_brier_score(y[tr], y[te], expected, times), rel=1e-10)
    assert 0.05 < ibs < 0.25  # a fitted Cox model beats the 0.25 of coin-flip survival
    # Test follow-up beyond the training follow-up: sksurv alone refuses, the IBS here stays defined.
    short = time[tr] < 1500
    assert time[te].max() > time[tr][short].max()
    assert integrated_brier(time[tr][short], event[tr][short], cox.predict(x[tr][short]), time[te], event[te],
                            cox.predict(x[te]), times) > 0


def test_time_dependent_auc_matches_sksurv(whas):
    x, time, event = whas
    y = Surv.from_arrays(event, time)
    risk = x[:, 0]
    times = [100.0, 365.0, 730.0]
    out = time_dependent_auc(time, event, time, event, risk, times=times)
    aucs, mean_auc = cumulative_dynamic_auc(y, y, risk, times)
    np.testing.assert_allclose(out["auc"], aucs, rtol=1e-12)
    assert out["mean_auc"] == pytest.approx(mean_auc)


def test_km_by_risk_group_matches_sksurv(whas):
    x, time, event = whas
    risk = x[:, 0]
    out = km_by_risk_group(time, event, risk)
    high = risk > np.median(risk)
    groups = np.where(high, "high", "low")
    chi2, p = compare_survival(Surv.from_arrays(event, time), groups)
    assert out["logrank_p"] == p and out["logrank_chi2"] == chi2 and out["logrank_p"] < 1e-6
    t, s = kaplan_meier_estimator(event[high].astype(bool), time[high])
    np.testing.assert_array_equal(out["curves"]["high"]["time"], t)
    np.testing.assert_array_equal(out["curves"]["high"]["survival"], s)
    assert out["curves"]["high"]["n"] == high.sum()
    flat = km_by_risk_group(time, event, np.zeros_like(risk))
    assert flat["logrank_p"] is None and flat["note"] == "all subjects fall in one risk group"


def test_survival_report_values(whas):
    x, time, event = whas
    risk = x @ np.array([0.8, -0.2, -0.3, 0.3, 0.04, 0.04])
    tr, te = slice(0, 300), slice(300, None)
    rep = survival_report(time[te], event[te], risk[te], train=(time[tr], event[tr], risk[tr]), n_boot=20, seed=0)
    y = Surv.from_arrays(event, time)
    assert rep["harrell_c"] == concordance_index_censored(event[te].astype(bool), time[te], risk[te])[0]
    assert rep["uno_c"] == concordance_index_ipcw(y[tr], y[te], risk[te], tau=time[tr].max())[0]
    assert rep["reference"] == "training rows"
    assert rep["harrell_c_ci"][0] < rep["harrell_c"] < rep["harrell_c_ci"][1]
    assert rep["bootstrap_used"]["harrell_c"] == 20
    assert rep["ibs"] is not None and rep["td_auc"] is not None and rep["km"]["logrank_p"] < 0.05
    alone = survival_report(time[te], event[te], risk[te], n_boot=0)
    assert alone["reference"].startswith("evaluated rows") and alone["harrell_c_ci"] is None


# ---------------------------------------------------------------- pair kernels (the paired bootstrap's scorer)

def _resample_counts(n: int, n_boot: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.stack([np.bincount(rng.integers(0, n, n), minlength=n) for _ in range(n_boot)])  # [B, n]


def test_auc_kernel_is_sklearn_auc_on_every_resample(binary):
    y, score = binary  # many tied scores
    kernel = auc_kernel(y, score)
    assert kernel_values(kernel, np.ones(len(y)))[0] == pytest.approx(roc_auc_score(y, score), abs=1e-12)
    counts = _resample_counts(len(y), 20, seed=1)
    got = kernel_values(kernel, counts)
    for c, value in zip(counts, got):
        idx = np.repeat(np.arange(len(y)), c)  # the resample as rows
        assert value == pytest.approx(roc_auc_score(y[idx], score[idx]), abs=1e-12)


def test_auc_kernel_undefined_when_a_resample_holds_one_class():
    y, score = np.array([0, 0, 1]), np.array([0.1, 0.4, 0.3])
    got = kernel_values(auc_kernel(y, score), np.array([[3, 0, 0], [1, 1, 1], [0, 2, 1]]))
    assert np.isnan(got[0]) and got[1] == pytest.approx(0.5) and got[2] == pytest.approx(0.0)


def test_harrell_kernel_is_sksurv_c_on_every_resample():
    rng = np.random.default_rng(3)
    n = 150
    time = np.round(rng.exponential(10, n)) + 1  # tied times, some with and some without events
    event = rng.random(n) < 0.6
    risk = np.round(rng.normal(size=n) - 0.05 * time, 1)  # tied risks
    kernel = harrell_kernel(time, event, risk)
    assert kernel_values(kernel, np.ones(n))[0] == pytest.approx(concordance_index_censored(event, time, risk)[0],
                                                                 abs=1e-12)
    counts = _resample_counts(n, 20, seed=4)
    for c, value in zip(counts, kernel_values(kernel, counts)):
        idx = np.repeat(np.arange(n), c)
        assert value == pytest.approx(concordance_index_censored(event[idx], time[idx], risk[idx])[0], abs=1e-12)


def test_logrank_without_a_shared_event_time_is_a_note_not_a_crash():
    # the high-risk pair is censored before the first event: the log-rank variance is zero
    km = km_by_risk_group([1.0, 2.0, 0.5, 0.6], [1, 1, 0, 0], [0.0, 0.0, 1.0, 1.0])
    assert km["logrank_p"] is None and "log-rank undefined" in km["note"]
    assert km["curves"]["low"]["events"] == 2
