"""Linear read-outs of frozen features under patient-grouped, repeated K-fold CV, and their bootstrap.

- label: L2 logistic regression, C chosen per outer training fold by an inner patient-grouped CV
  (LogisticRegressionCV on precomputed inner splits, scored by log-loss);
- latents: ridge regression, alpha chosen per latent on the outer training fold by RidgeCV's efficient
  leave-one-out (exact, and ~100x cheaper than an inner K-fold; it is not grouped, which matters only for
  the ~10% of patients with two lesions and only for the choice of alpha).

Features are standardised inside the pipeline (fit on the training fold); NaNs (hand-made features of an
empty ring) are imputed with the training median. Out-of-fold predictions are pooled per repeat, and
every score is computed on the pooled predictions, then averaged over repeats.
"""
from __future__ import annotations

import warnings

import numpy as np
from sklearn.exceptions import ConvergenceWarning
from sklearn.impute import SimpleImputer
from sklearn.linear_model import LogisticRegressionCV, RidgeCV
from sklearn.metrics import r2_score, roc_auc_score
from sklearn.model_selection import StratifiedGroupKFold
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from core.errors import InputError

CS = np.logspace(-4, 1, 6)       # logistic inverse penalty; standardised features, so small C = strong L2
ALPHAS = np.logspace(-1, 5, 13)  # ridge penalty, from nearly none to "predict the mean"
INNER_FOLDS = 3

Splits = list[list[tuple[np.ndarray, np.ndarray]]]  # [repeat][fold] -> (train idx, test idx)


def cv_splits(label: np.ndarray, patients: np.ndarray, folds: int, repeats: int, seed: int) -> Splits:
    """Patient-grouped, label-stratified K-fold, `repeats` times with different shuffles; shared by every
    model of a run, so differences between models are paired."""
    n_pat = len(np.unique(patients))
    if n_pat < folds or min(np.bincount(label, minlength=2)) < folds:
        raise InputError(f"{n_pat} patients with label counts {np.bincount(label, minlength=2).tolist()} "
                         f"are too few for {folds}-fold CV; use more --n_lesions or fewer --folds")
    return [list(StratifiedGroupKFold(folds, shuffle=True, random_state=seed + r).split(label, label, patients))
            for r in range(repeats)]


def _inner_splits(label: np.ndarray, patients: np.ndarray, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    return list(StratifiedGroupKFold(INNER_FOLDS, shuffle=True, random_state=seed).split(label, label, patients))


def _prep():
    return [SimpleImputer(strategy="median", keep_empty_features=True), StandardScaler()]


def oof_label(X: np.ndarray, label: np.ndarray, patients: np.ndarray, splits: Splits, seed: int) -> np.ndarray:
    """[R, N] out-of-fold decision values of the label, one row per repeat."""
    out = np.zeros((len(splits), len(label)))
    for r, folds in enumerate(splits):
        for k, (tr, te) in enumerate(folds):
            inner = _inner_splits(label[tr], patients[tr], seed + 1000 * r + k)
            clf = LogisticRegressionCV(Cs=CS, l1_ratios=(0.0,), cv=inner, scoring="neg_log_loss", max_iter=500,
                                       tol=1e-3, use_legacy_attributes=False)
            model = make_pipeline(*_prep(), clf)
            with warnings.catch_warnings():  # a weak C on few lesions may stop at max_iter; the fit is still used
                warnings.simplefilter("ignore", ConvergenceWarning)
                model.fit(X[tr], label[tr])
            out[r, te] = model.decision_function(X[te])
    return out


def oof_latents(X: np.ndarray, Z: np.ndarray, splits: Splits) -> np.ndarray:
    """[R, N, K] out-of-fold ridge predictions of the K latents."""
    out = np.zeros((len(splits), *Z.shape))
    for r, folds in enumerate(splits):
        for tr, te in folds:
            model = make_pipeline(*_prep(), RidgeCV(alphas=ALPHAS, alpha_per_target=True)).fit(X[tr], Z[tr])
            out[r, te] = model.predict(X[te]).reshape(len(te), -1)  # RidgeCV drops K = 1
    return out


def score(label: np.ndarray, Z: np.ndarray, s_label: np.ndarray, p_latents: np.ndarray) -> dict:
    """Per-repeat pooled-OOF AUC and R² per latent, and their means over repeats."""
    auc = [float(roc_auc_score(label, s)) for s in s_label]
    r2 = np.array([r2_score(Z, p, multioutput="raw_values") for p in p_latents])  # [R, K]
    return {"auc": float(np.mean(auc)), "auc_repeats": auc, "r2_mean": float(r2.mean()),
            "r2_mean_repeats": r2.mean(1).tolist(), "r2": r2.mean(0).tolist()}


# --- paired bootstrap over patients --------------------------------------------------------------------

def bootstrap_weights(patients: np.ndarray, n_boot: int, seed: int) -> np.ndarray:
    """[B, N]: how often each lesion's patient is drawn in each resample (patients with replacement)."""
    _, idx = np.unique(patients, return_inverse=True)  # [N] patient index per lesion
    n_pat = idx.max() + 1
    draws = np.random.default_rng(seed).integers(0, n_pat, size=(n_boot, n_pat))  # [B, P]
    counts = np.stack([np.bincount(d, minlength=n_pat) for d in draws])  # [B, P]
    return counts[:, idx].astype(float)  # [B, N]


def weighted_auc(W: np.ndarray, label: np.ndarray, s: np.ndarray) -> np.ndarray:
    """[B] Mann-Whitney AUC of scores s [N] with integer case weights W [B, N] (ties count one half),
    i.e. roc_auc_score on each resample, for all resamples in one matrix product."""
    values, inv = np.unique(s, return_inverse=True)
    onehot = np.zeros((len(s), len(values)))  # [N, U]
    onehot[np.arange(len(s)), inv] = 1.0
    pos, neg = (W * (label == 1)) @ onehot, (W * (label == 0)) @ onehot  # [B, U] weight per score value
    below = np.cumsum(neg, axis=1) - neg  # [B, U] negative weight strictly below each value
    wins = (pos * (below + 0.5 * neg)).sum(1)  # [B]
    return wins / np.maximum(pos.sum(1) * neg.sum(1), 1e-12)


def weighted_r2(W: np.ndarray, Z: np.ndarray, P: np.ndarray) -> np.ndarray:
    """[B, K] R² of predictions P [N, K] for Z [N, K] with case weights W [B, N]."""
    w = W / W.sum(1, keepdims=True)  # [B, N]
    mean = w @ Z  # [B, K]
    sse = w @ (Z - P) ** 2  # [B, K]
    sst = w @ Z**2 - mean**2  # [B, K]
    return 1.0 - sse / np.maximum(sst, 1e-12)


def boot_metrics(W: np.ndarray, label: np.ndarray, Z: np.ndarray, s_label: np.ndarray,
                 p_latents: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """([B] AUC, [B] mean R²) of one model on every resample, each averaged over the CV repeats."""
    auc = np.mean([weighted_auc(W, label, s) for s in s_label], axis=0)  # [B]
    r2 = np.mean([weighted_r2(W, Z, p).mean(1) for p in p_latents], axis=0)  # [B]
    return auc, r2


def paired_delta(W: np.ndarray, label: np.ndarray, Z: np.ndarray, model: dict, controls: list[dict]) -> dict:
    """Bootstrap 95% CIs of (model − mean of the controls) for AUC and mean R², on the same resamples.
    `model` and each control hold out-of-fold "s_label" [R, N] and "p_latents" [R, N, K]."""
    m_auc, m_r2 = boot_metrics(W, label, Z, model["s_label"], model["p_latents"])
    c = [boot_metrics(W, label, Z, ctl["s_label"], ctl["p_latents"]) for ctl in controls]
    d_auc, d_r2 = m_auc - np.mean([a for a, _ in c], axis=0), m_r2 - np.mean([r for _, r in c], axis=0)
    return {"auc_ci": np.percentile(d_auc, [2.5, 97.5]).tolist(),
            "r2_mean_ci": np.percentile(d_r2, [2.5, 97.5]).tolist()}
