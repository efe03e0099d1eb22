"""Evaluation metrics: AUC with DeLong and bootstrap CIs, paired DeLong, Brier, Youden; Harrell and
Uno C-index, time-dependent AUC, integrated Brier score, Kaplan-Meier by risk group with log-rank.

Everything scikit-learn or scikit-survival computes is delegated to them. DeLong is written here
because no maintained library provides it (fast midrank algorithm of Sun & Xu 2014).

A metric that does not exist for the data (one class, no events, too few samples) raises
`UndefinedMetric(reason)`; `try_metric`, `bootstrap_ci` and the two reports turn that into None
plus the reason, so evaluation never crashes and never reports a made-up number.
"""
from __future__ import annotations

import math
from typing import Callable

import numpy as np
from scipy.stats import norm, rankdata
from sklearn.metrics import brier_score_loss, roc_auc_score, roc_curve
from sksurv.compare import compare_survival
from sksurv.linear_model.coxph import BreslowEstimator
from sksurv.metrics import (concordance_index_censored, concordance_index_ipcw, cumulative_dynamic_auc,
                            integrated_brier_score)
from sksurv.nonparametric import kaplan_meier_estimator
from sksurv.util import Surv

from core.errors import InputError, first_line


class UndefinedMetric(ValueError):
    """The metric does not exist for these data; the message is the reason (e.g. 'no events')."""


def try_metric(fn: Callable, *args, **kwargs) -> tuple[object | None, str | None]:
    """(value, None) when `fn` is defined on the data, else (None, reason)."""
    try:
        return fn(*args, **kwargs), None
    except UndefinedMetric as e:
        return None, str(e)


# ---------------------------------------------------------------- input checks

def labels_and_scores(y, score) -> tuple[np.ndarray, np.ndarray]:
    """Validated 0/1 labels [n] and finite float scores [n]; InputError otherwise."""
    y, score = np.asarray(y), np.asarray(score, dtype=float)
    if y.shape != score.shape or y.ndim != 1:
        raise InputError(f"labels and scores must be 1-D of equal length, got {y.shape} and {score.shape}")
    if not np.isin(y, (0, 1)).all():
        raise InputError(f"labels must be 0 or 1, got values {sorted(set(np.unique(y).tolist()) - {0, 1})[:5]}")
    if not np.isfinite(score).all():
        raise InputError(f"scores must be finite; {int((~np.isfinite(score)).sum())} are NaN or infinite")
    return y.astype(int), score


def _require_both_classes(y: np.ndarray, at_least: int = 1) -> None:
    n_pos, n_neg = int(y.sum()), int(len(y) - y.sum())
    if len(y) == 0:
        raise UndefinedMetric("no samples")
    if n_pos == 0 or n_neg == 0:
        raise UndefinedMetric("only one class present")
    if min(n_pos, n_neg) < at_least:
        raise UndefinedMetric(f"too few samples: {n_pos} positive, {n_neg} negative (need {at_least} of each)")


def survival_arrays(time, event, risk=None) -> tuple[np.ndarray, ...]:
    """Validated times (> 0), boolean events and, if given, finite risks; InputError otherwise."""
    time, event = np.asarray(time, dtype=float), np.asarray(event)
    if time.shape != event.shape or time.ndim != 1:
        raise InputError(f"time and event must be 1-D of equal length, got {time.shape} and {event.shape}")
    if not (np.isfinite(time).all() and (time > 0).all()):
        raise InputError("survival times must be finite and > 0")
    if not np.isin(event, (0, 1)).all():
        raise InputError("event must be 0 (censored) or 1 (event)")
    if risk is None:
        return time, event.astype(bool)
    risk = np.asarray(risk, dtype=float)
    if risk.shape != time.shape:
        raise InputError(f"risk must have the same length as time, got {risk.shape} and {time.shape}")
    if not np.isfinite(risk).all():
        raise InputError(f"risk scores must be finite; {int((~np.isfinite(risk)).sum())} are NaN or infinite")
    return time, event.astype(bool), risk


def _require_events(event: np.ndarray) -> None:
    if len(event) < 2:
        raise UndefinedMetric("too few samples (need at least 2)")
    if not event.any():
        raise UndefinedMetric("no events")


def _sksurv(fn: Callable, *args, **kwargs):
    # sksurv signals data it cannot score (no comparable pairs, zero censoring survival, times
    # outside follow-up) with ValueError: that is an undefined metric here, with sksurv's reason.
    try:
        return fn(*args, **kwargs)
    except ValueError as e:
        raise UndefinedMetric(first_line(e)) from None


# ---------------------------------------------------------------- classification

def _delong_components(y: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """AUCs [k] and their DeLong covariance [k, k] for k score rows [k, n] (Sun & Xu 2014)."""
    pos, neg = scores[:, y == 1], scores[:, y == 0]  # [k, m], [k, n]
    m, n = pos.shape[1], neg.shape[1]
    # Midranks: rank within positives, within negatives, and over all; ties count half.
    tx, ty = rankdata(pos, axis=1), rankdata(neg, axis=1)
    tz = rankdata(np.concatenate([pos, neg], axis=1), axis=1)
    aucs = (tz[:, :m].sum(axis=1) / m - (m + 1) / 2) / n
    v01 = (tz[:, :m] - tx) / n  # [k, m] structural components: share of negatives below each positive
    v10 = 1 - (tz[:, m:] - ty) / m  # [k, n] share of positives above each negative
    cov = np.atleast_2d(np.cov(v01)) / m + np.atleast_2d(np.cov(v10)) / n
    return aucs, cov


def auc_delong(y, score, alpha: float = 0.05) -> dict:
    """ROC AUC with DeLong (1988) variance and a normal (1 - alpha) CI clipped to [0, 1].

    Needs both classes; the variance needs at least 2 of each (else var and CI are None + "note").
    """
    y, score = labels_and_scores(y, score)
    _require_both_classes(y)
    if min(y.sum(), len(y) - y.sum()) < 2:
        auc = float(roc_auc_score(y, score))
        return {"auc": auc, "var": None, "ci_low": None, "ci_high": None,
                "note": "DeLong variance needs at least 2 positives and 2 negatives"}
    aucs, cov = _delong_components(y, score[None, :])
    auc, var = float(aucs[0]), float(cov[0, 0])
    half = norm.ppf(1 - alpha / 2) * math.sqrt(var)
    return {"auc": auc, "var": var, "ci_low": max(0.0, auc - half), "ci_high": min(1.0, auc + half)}


def delong_paired_test(y, score_a, score_b) -> dict:
    """Two-sided DeLong test of AUC(a) = AUC(b) for two models scored on the same subjects."""
    y, score_a = labels_and_scores(y, score_a)
    _, score_b = labels_and_scores(y, score_b)
    _require_both_classes(y, at_least=2)
    aucs, cov = _delong_components(y, np.stack([score_a, score_b]))
    diff = float(aucs[0] - aucs[1])
    var = float(cov[0, 0] + cov[1, 1] - 2 * cov[0, 1])
    if var <= 1e-15:  # identical rankings: no difference and no variance
        z, p = 0.0, 1.0
    else:
        z = diff / math.sqrt(var)
        p = float(2 * norm.sf(abs(z)))
    return {"auc_a": float(aucs[0]), "auc_b": float(aucs[1]), "diff": diff, "var_diff": max(var, 0.0),
            "z": z, "p": p, "n": int(len(y))}


def youden_point(y, score) -> dict:
    """Threshold maximising sensitivity + specificity - 1, with both at that threshold."""
    y, score = labels_and_scores(y, score)
    _require_both_classes(y)
    fpr, tpr, thresholds = roc_curve(y, score)
    finite = np.isfinite(thresholds)  # sklearn's first threshold is +inf (classify nobody positive)
    best = np.flatnonzero(finite)[np.argmax((tpr - fpr)[finite])]
    return {"threshold": float(thresholds[best]), "sensitivity": float(tpr[best]), "specificity": float(1 - fpr[best])}


def brier(y, prob) -> float:
    """Brier score: mean squared error of predicted probabilities (defined with one class too)."""
    y, prob = labels_and_scores(y, prob)
    if len(y) == 0:
        raise UndefinedMetric("no samples")
    if (prob < 0).any() or (prob > 1).any():
        raise UndefinedMetric("probabilities outside [0, 1]")
    return float(brier_score_loss(y, prob, labels=[0, 1]))


def _auc(y, score) -> float:
    y, score = labels_and_scores(y, score)
    _require_both_classes(y)
    return float(roc_auc_score(y, score))


# ---------------------------------------------------------------- bootstrap

class BootstrapCI(tuple):
    """(low, high), None where undefined; `.n_used` of `.n_boot` resamples gave a defined metric."""

    def __new__(cls, low, high, n_used: int, n_boot: int):
        self = super().__new__(cls, (low, high))
        self.n_used, self.n_boot = n_used, n_boot
        return self

    @property
    def low(self):
        return self[0]

    @property
    def high(self):
        return self[1]


def bootstrap_ci(metric_fn: Callable, *arrays, n_boot: int = 1000, seed: int = 0, alpha: float = 0.05,
                 stratify=None, groups=None) -> BootstrapCI:
    """Percentile bootstrap CI of `metric_fn(*arrays)`, resampling rows (or whole `groups`, e.g. patients).

    `stratify` (per row) keeps each stratum's size fixed, e.g. the class balance. Resamples where
    the metric is undefined are skipped; if more than half are, the CI itself is undefined (None),
    because the defined ones are no longer a fair sample.
    """
    arrays = [np.asarray(a) for a in arrays]
    n = len(arrays[0])
    rng = np.random.default_rng(seed)
    units = _resampling_units(n, groups)  # list of row-index arrays
    strata = np.zeros(len(units), dtype=int) if stratify is None else \
        np.unique(np.asarray(stratify)[[u[0] for u in units]], return_inverse=True)[1]
    by_stratum = [np.flatnonzero(strata == s) for s in np.unique(strata)]
    values = []
    for _ in range(n_boot):
        chosen = np.concatenate([rng.choice(members, size=len(members)) for members in by_stratum])
        idx = np.concatenate([units[u] for u in chosen])
        try:
            value = metric_fn(*(a[idx] for a in arrays))
        except UndefinedMetric:
            continue
        if value is not None and np.isfinite(value):
            values.append(float(value))
    if len(values) < max(2, math.ceil(n_boot / 2)):
        return BootstrapCI(None, None, len(values), n_boot)
    low, high = np.quantile(values, [alpha / 2, 1 - alpha / 2])
    return BootstrapCI(float(low), float(high), len(values), n_boot)


def _resampling_units(n: int, groups) -> list[np.ndarray]:
    if groups is None:
        return [np.array([i]) for i in range(n)]
    _, inverse = np.unique(np.asarray(groups), return_inverse=True)
    order = np.argsort(inverse, kind="stable")
    return np.split(order, np.flatnonzero(np.diff(inverse[order])) + 1)


# ---------------------------------------------------------------- survival

def harrell_c(time, event, risk) -> float:
    """Harrell's C-index (sksurv concordance_index_censored); higher risk should mean earlier events."""
    time, event, risk = survival_arrays(time, event, risk)
    _require_events(event)
    return float(_sksurv(concordance_index_censored, event, time, risk)[0])


def uno_c(train_time, train_event, time, event, risk, tau=None) -> float:
    """Uno's C-index (sksurv concordance_index_ipcw); the censoring distribution comes from the train data."""
    train_time, train_event = survival_arrays(train_time, train_event)
    time, event, risk = survival_arrays(time, event, risk)
    _require_events(event)
    train = Surv.from_arrays(train_event, train_time)
    return float(_sksurv(concordance_index_ipcw, train, Surv.from_arrays(event, time), risk, tau=tau)[0])


def default_times(time, event, ref_time, quantiles=(0.25, 0.5, 0.75)) -> np.ndarray:
    """Evaluation times at quantiles of the event times, inside both follow-ups (as sksurv requires)."""
    time, event = np.asarray(time, float), np.asarray(event).astype(bool)
    if not event.any():
        raise UndefinedMetric("no events")
    times = np.unique(np.quantile(time[event], quantiles))
    times = times[(times >= time.min()) & (times < min(time.max(), np.max(ref_time)))]
    if len(times) == 0:
        raise UndefinedMetric("no event-time quantile lies inside the follow-up")
    return times


def time_dependent_auc(train_time, train_event, time, event, risk, times=None) -> dict:
    """Cumulative/dynamic AUC(t) at `times` (default: quartiles of event times) and its mean."""
    train_time, train_event = survival_arrays(train_time, train_event)
    time, event, risk = survival_arrays(time, event, risk)
    _require_events(event)
    times = default_times(time, event, train_time) if times is None else np.asarray(times, float)
    # Events after the last evaluation time only ever act as controls (T > t), so censoring them
    # there changes no AUC(t), and spares sksurv censoring weights past the reference follow-up.
    event = event & (time <= times.max())
    aucs, mean_auc = _sksurv(cumulative_dynamic_auc, Surv.from_arrays(train_event, train_time),
                             Surv.from_arrays(event, time), risk, times)
    return {"times": times.tolist(), "auc": [float(a) for a in aucs], "mean_auc": float(mean_auc)}


def breslow_survival(train_risk, train_time, train_event, risk, times) -> np.ndarray:
    """Survival S(t | risk) [n, len(times)] from a Breslow baseline hazard fitted on the train data.

    `risk` must be on the log-hazard scale (a Cox head's output). After the last train time the
    baseline is carried forward.
    """
    train_time, train_event, train_risk = survival_arrays(train_time, train_event, train_risk)
    risk = np.asarray(risk, dtype=float)
    if not train_event.any():
        raise UndefinedMetric("no events in the reference data for the Breslow baseline")
    # Centring both by the same constant leaves S unchanged and keeps exp() from overflowing.
    centre = train_risk.mean()
    baseline = BreslowEstimator().fit(train_risk - centre, train_event, train_time).baseline_survival_
    times = np.clip(np.asarray(times, dtype=float), 0, baseline.x[-1])
    s0 = np.where(times < baseline.x[0], 1.0, baseline(times))  # [T]; S0 = 1 before the first event
    return s0[None, :] ** np.exp(risk - centre)[:, None]  # [n, T]


def ibs_times(time, ref_time, n: int = 50) -> np.ndarray:
    """Grid for the integrated Brier score: 10th to 90th percentile of follow-up, inside the reference."""
    lo, hi = np.quantile(time, [0.1, 0.9])
    hi = min(hi, np.max(ref_time) * (1 - 1e-9), np.max(time) * (1 - 1e-9))
    if not hi > lo:
        raise UndefinedMetric("follow-up too short for an integrated Brier score time grid")
    return np.linspace(lo, hi, n)


def integrated_brier(train_time, train_event, train_risk, time, event, risk, times=None) -> float:
    """Integrated Brier score (sksurv) of Breslow survival curves built from the risk scores."""
    train_time, train_event, train_risk = survival_arrays(train_time, train_event, train_risk)
    time, event, risk = survival_arrays(time, event, risk)
    _require_events(event)
    times = ibs_times(time, train_time) if times is None else np.asarray(times, float)
    surv = breslow_survival(train_risk, train_time, train_event, risk, times)
    return _ibs_from_survival(train_time, train_event, time, event, surv, times)


def _ibs_from_survival(train_time, train_event, time, event, surv, times) -> float:
    if not np.asarray(event).any():
        raise UndefinedMetric("no events")
    # A subject followed past the last grid time only counts as "still alive" there, weighted by
    # G(t); its own time is never used. Pulling such times in below the reference's last follow-up
    # changes no Brier score, and lets sksurv's censoring estimator evaluate every row.
    late = time > times.max()
    if late.any():
        time = np.where(late, (times.max() + min(train_time.max(), time.max())) / 2, time)
    return float(_sksurv(integrated_brier_score, Surv.from_arrays(train_event, train_time),
                         Surv.from_arrays(event, time), surv, times))


def km_by_risk_group(time, event, risk, cut="median") -> dict:
    """Kaplan-Meier curves of low/high predicted risk and their log-rank test (sksurv).

    cut: "median" of these risks, or a number (e.g. the training median, to avoid peeking).
    High risk means risk > cut.
    """
    time, event, risk = survival_arrays(time, event, risk)
    threshold = float(np.median(risk)) if cut == "median" else float(cut)
    high = risk > threshold
    groups = np.where(high, "high", "low")
    curves = {}
    for name in ("low", "high"):
        sel = groups == name
        if sel.any():
            t, s = kaplan_meier_estimator(event[sel], time[sel])
            curves[name] = {"time": t.tolist(), "survival": s.tolist(), "n": int(sel.sum()),
                            "events": int(event[sel].sum())}
    out = {"threshold": threshold, "groups": groups.tolist(), "curves": curves,
           "logrank_chi2": None, "logrank_p": None}
    if len(curves) < 2:
        out["note"] = "all subjects fall in one risk group"
    elif not event.any():
        out["note"] = "no events"
    else:
        try:
            chi2, p = compare_survival(Surv.from_arrays(event, time), groups)
            out["logrank_chi2"], out["logrank_p"] = float(chi2), float(p)
        except np.linalg.LinAlgError:  # no event time with both groups at risk: the test statistic has no variance
            out["note"] = "log-rank undefined: no event time with both risk groups at risk"
    return out


# ---------------------------------------------------------------- reports

def _put(report: dict, name: str, fn: Callable, *args, **kwargs):
    value, reason = try_metric(fn, *args, **kwargs)
    report[name] = value
    if reason is not None:
        report["notes"][name] = reason
    return value


def _boot_ci(report: dict, name: str, fn: Callable, arrays, n_boot: int, seed: int, key=None, **kwargs):
    """Bootstrap CI of a defined metric, as [low, high] or None; records resamples used and why not."""
    key = key or f"{name}_ci"
    if report.get(name) is None or n_boot <= 0:
        return None
    ci = bootstrap_ci(fn, *arrays, n_boot=n_boot, seed=seed, **kwargs)
    report["bootstrap_used"][name] = ci.n_used
    if ci.low is None:
        report["notes"][key] = f"metric defined in only {ci.n_used} of {ci.n_boot} bootstrap resamples"
        return None
    return [ci.low, ci.high]


def classification_report(y, prob, n_boot: int = 1000, seed: int = 0, groups=None) -> dict:
    """AUC (DeLong and bootstrap CIs), Brier (bootstrap CI) and the Youden point for predicted probabilities.

    Bootstrap resamples are stratified by class and, with `groups`, resample whole patients.
    The Youden threshold is chosen on these same rows, so its sensitivity/specificity are optimistic.
    """
    y, prob = labels_and_scores(y, prob)
    report = {"n": int(len(y)), "n_positive": int(y.sum()), "notes": {}, "bootstrap_used": {}, "n_boot": n_boot}
    boot = dict(stratify=y, groups=groups)

    delong = _put(report, "auc", auc_delong, y, prob)
    report["auc"] = None if delong is None else delong["auc"]
    report["auc_ci"] = None if delong is None or delong["var"] is None else [delong["ci_low"], delong["ci_high"]]
    if delong is not None and "note" in delong:
        report["notes"]["auc_ci"] = delong["note"]
    report["auc_ci_bootstrap"] = _boot_ci(report, "auc", _auc, (y, prob), n_boot, seed, key="auc_ci_bootstrap", **boot)

    _put(report, "brier", brier, y, prob)
    report["brier_ci"] = _boot_ci(report, "brier", brier, (y, prob), n_boot, seed, **boot)
    _put(report, "youden", youden_point, y, prob)
    return report


def survival_report(time, event, risk, train=None, n_boot: int = 1000, seed: int = 0, groups=None,
                    km_cut="median") -> dict:
    """Harrell and Uno C (bootstrap CIs), time-dependent AUC, integrated Brier score and KM log-rank.

    train=(time, event, risk) is the reference for the censoring distribution (Uno C, AUC(t), IBS)
    and the Breslow baseline (IBS); without it the evaluated rows serve as their own reference.
    Uno C is truncated at the last reference follow-up time, where censoring weights still exist.
    """
    time, event, risk = survival_arrays(time, event, risk)
    report = {"n": int(len(time)), "n_events": int(event.sum()), "notes": {}, "bootstrap_used": {}, "n_boot": n_boot}
    if train is None:
        ref_time, ref_event, ref_risk = time, event, risk
        report["reference"] = "evaluated rows (no training rows given)"
    else:
        ref_time, ref_event, ref_risk = survival_arrays(*train)
        report["reference"] = "training rows"
    boot = dict(stratify=event, groups=groups)

    _put(report, "harrell_c", harrell_c, time, event, risk)
    report["harrell_c_ci"] = _boot_ci(report, "harrell_c", harrell_c, (time, event, risk), n_boot, seed, **boot)

    tau = float(ref_time.max())
    report["uno_c_tau"] = tau
    uno = lambda t, e, r: uno_c(ref_time, ref_event, t, e, r, tau=tau)  # noqa: E731
    _put(report, "uno_c", uno, time, event, risk)
    report["uno_c_ci"] = _boot_ci(report, "uno_c", uno, (time, event, risk), n_boot, seed, **boot)

    td = _put(report, "td_auc", time_dependent_auc, ref_time, ref_event, time, event, risk)
    report["mean_td_auc"] = None if td is None else td["mean_auc"]

    grid, reason = try_metric(ibs_times, time, ref_time)
    surv = None
    if grid is not None:
        surv, reason = try_metric(breslow_survival, ref_risk, ref_time, ref_event, risk, grid)
    if surv is None:
        report["ibs"], report["ibs_ci"] = None, None
        report["notes"]["ibs"] = reason
    else:
        ibs = lambda t, e, s: _ibs_from_survival(ref_time, ref_event, t, e, s, grid)  # noqa: E731
        _put(report, "ibs", ibs, time, event, surv)
        report["ibs_ci"] = _boot_ci(report, "ibs", ibs, (time, event, surv), n_boot, seed, **boot)
        report["ibs_times"] = [float(grid[0]), float(grid[-1])]

    km = km_by_risk_group(time, event, risk, cut=km_cut)
    report["km"] = {"threshold": km["threshold"], "logrank_chi2": km["logrank_chi2"], "logrank_p": km["logrank_p"],
                    "groups": {g: {"n": c["n"], "events": c["events"]} for g, c in km["curves"].items()}}
    if "note" in km:
        report["notes"]["logrank"] = km["note"]
    return report


# ---------------------------------------------------------------- paired bootstrap through pair kernels

# ROC AUC and Harrell's C are pair statistics: value = w'Nw / w'Dw for row weights w (a resample's draw
# counts; all ones: the plain value). Scoring all resamples of a set is then two matrix products, not
# one sklearn / sksurv call per resample: 500 resamples x 1000 patients x seeds x models would take
# minutes on 2 cores. tests/test_metrics.py checks both kernels against sklearn / sksurv per resample.

def auc_kernel(y, score) -> tuple[np.ndarray, np.ndarray]:
    """(N, D) [n, n]: D_ij = 1 for positive i and negative j; N_ij = D_ij * (1 if s_i > s_j, 1/2 if tied)."""
    y, score = labels_and_scores(y, score)
    d = np.outer(y == 1, y == 0).astype(float)
    return d * (np.sign(score[:, None] - score[None, :]) + 1) / 2, d


def harrell_kernel(time, event, risk, tied_tol: float = 1e-8) -> tuple[np.ndarray, np.ndarray]:
    """(N, D) [n, n] of Harrell's C as sksurv counts it: i, j comparable when i has an event and j is later
    or censored at the same time; concordant when risk_i > risk_j, risks within tied_tol count 1/2."""
    time, event, risk = survival_arrays(time, event, risk)
    same_censored = (time[None, :] == time[:, None]) & ~event[None, :]
    d = (event[:, None] & ((time[None, :] > time[:, None]) | same_censored)).astype(float)
    diff = risk[:, None] - risk[None, :]
    return d * np.where(np.abs(diff) <= tied_tol, 0.5, (diff > 0).astype(float)), d


def kernel_values(kernel: tuple[np.ndarray, np.ndarray], counts) -> np.ndarray:
    """The statistic under each resample: counts [B, n] -> [B]; NaN where no pair counts (e.g. one class)."""
    num, den = kernel
    w = np.atleast_2d(np.asarray(counts, dtype=float))  # [B, n]
    top, bottom = ((w @ num) * w).sum(axis=1), ((w @ den) * w).sum(axis=1)
    return np.divide(top, bottom, out=np.full(len(w), np.nan), where=bottom > 0)

