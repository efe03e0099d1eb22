"""Evaluation figures as PNG: ROC with bootstrap bands, Kaplan-Meier by risk group, reliability diagram,
and segmentation overlays (predicted and given lesion outlines on the image).

Each is written atomically. Where a figure is undefined (one class, no events) a figure saying why
is written instead, so a run directory always has the file and the reader knows the reason. A fine-tuning
run with --figures false calls none of them (finetune.evaluate), and its metrics.json lists no figure.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

# Figure objects (not pyplot) render with Agg and touch no global backend or figure registry.
from matplotlib import transforms
from matplotlib.figure import Figure
from sklearn.metrics import roc_curve

from core.atomic import write_png
from finetune.metrics import auc_delong, km_by_risk_group, labels_and_scores, try_metric

FPR_GRID = np.linspace(0, 1, 101)


def _subplots(*args, **kwargs):
    fig = Figure(figsize=kwargs.pop("figsize"))
    return fig, fig.subplots(*args, **kwargs)


def _save(fig, path) -> None:
    write_png(path, fig)


def write_message(path, title: str, message: str) -> None:
    fig, ax = _subplots(figsize=(5, 4))
    ax.axis("off")
    ax.set_title(title)
    ax.text(0.5, 0.5, message, ha="center", va="center", wrap=True, fontsize=11)
    _save(fig, path)


def _roc_band(y, score, n_boot: int, seed: int, alpha: float = 0.05):
    """Pointwise percentile band of TPR on a fixed FPR grid, from class-stratified resamples."""
    rng = np.random.default_rng(seed)
    pos, neg = np.flatnonzero(y == 1), np.flatnonzero(y == 0)
    tprs = []
    for _ in range(n_boot):
        idx = np.concatenate([rng.choice(pos, len(pos)), rng.choice(neg, len(neg))])
        fpr, tpr, _ = roc_curve(y[idx], score[idx])
        tprs.append(np.interp(FPR_GRID, fpr, tpr))
    return np.quantile(tprs, [alpha / 2, 1 - alpha / 2], axis=0)


def plot_roc(curves: dict, path, ci_band: bool = True, n_boot: int = 200, seed: int = 0, title: str = "ROC") -> None:
    """ROC of several models on one axis: curves = {name: (y, score)}; legend gives AUC [DeLong 95% CI]."""
    fig, ax = _subplots(figsize=(5.5, 5))
    drawn = 0
    for i, (name, (y, score)) in enumerate(curves.items()):
        y, score = labels_and_scores(y, score)
        delong, reason = try_metric(auc_delong, y, score)
        if delong is None:
            ax.plot([], [], " ", label=f"{name}: undefined ({reason})")
            continue
        colour = f"C{i}"
        fpr, tpr, _ = roc_curve(y, score)
        ci = "" if delong["var"] is None else f" [{delong['ci_low']:.2f}, {delong['ci_high']:.2f}]"
        ax.plot(fpr, tpr, color=colour, lw=2, label=f"{name}: AUC {delong['auc']:.3f}{ci} (n={len(y)})")
        if ci_band and n_boot > 0:
            low, high = _roc_band(y, score, n_boot, seed)
            ax.fill_between(FPR_GRID, low, high, color=colour, alpha=0.2, lw=0)
        drawn += 1
    if drawn == 0:
        reasons = "; ".join(f"{n}: {try_metric(auc_delong, *labels_and_scores(*c))[1]}" for n, c in curves.items())
        write_message(path, title, f"ROC undefined\n{reasons}")
        return
    ax.plot([0, 1], [0, 1], color="grey", ls="--", lw=1, label="chance")
    band = " (shaded: bootstrap 95% band)" if ci_band and n_boot > 0 else ""
    ax.set(xlim=(0, 1), ylim=(0, 1.01), xlabel="False positive rate (1 - specificity)",
           ylabel="True positive rate (sensitivity)", title=title + band)
    ax.set_aspect("equal")
    ax.legend(loc="lower right", fontsize=8)
    _save(fig, path)


def _n_at_risk(time: np.ndarray, ticks: np.ndarray) -> list[int]:
    return [int((time >= t).sum()) for t in ticks]


def _draw_at_risk(ax, time, groups, names, colours) -> None:
    """Number-at-risk rows under the x axis, one number under each tick."""
    ticks = [t for t in ax.get_xticks() if 0 <= t <= ax.get_xlim()[1]]
    below = transforms.blended_transform_factory(ax.transData, ax.transAxes)
    ax.text(0, -0.2, "Number at risk", transform=ax.transAxes, fontsize=8, fontweight="bold")
    for row, name in enumerate(names):
        y = -0.27 - 0.07 * row
        ax.text(-0.06, y, name, transform=ax.transAxes, ha="right", fontsize=8, color=colours[name])
        for t, n in zip(ticks, _n_at_risk(time[groups == name], ticks)):
            ax.text(t, y, str(n), transform=below, ha="center", fontsize=8, color=colours[name])


def _censor_marks(ax, curve: dict, time, event, colour) -> None:
    """'+' on the curve at each censoring time: where a subject left follow-up without an event."""
    censored = np.sort(time[~event])
    if len(censored) == 0:
        return
    t, s = np.asarray(curve["time"]), np.asarray(curve["survival"])
    idx = np.searchsorted(t, censored, side="right") - 1  # the step in force at each censoring time
    ax.plot(censored, np.where(idx >= 0, s[np.maximum(idx, 0)], 1.0), "+", color=colour, ms=8, mew=1.5)


def _km_axes(ax, km: dict, time, event, unit: str, title: str, source: str) -> dict:
    colours = {"low": "C0", "high": "C3"}
    groups = np.asarray(km["groups"])
    for name, curve in km["curves"].items():
        t = np.concatenate([[0.0], curve["time"]])
        s = np.concatenate([[1.0], curve["survival"]])
        ax.step(t, s, where="post", color=colours[name], lw=2,
                label=f"{name} risk (n={curve['n']}, events={curve['events']})")
        _censor_marks(ax, curve, time[groups == name], event[groups == name], colours[name])
    ax.plot([], [], "+", color="grey", ms=8, mew=1.5, label="censored")
    p = km["logrank_p"]
    subtitle = f"log-rank p = {p:.3g}" if p is not None else f"log-rank undefined: {km.get('note')}"
    ax.set(ylim=(0, 1.02), xlim=(0, None), xlabel=f"Time{f' ({unit})' if unit else ''}",
           ylabel="Survival probability",
           title=f"{title}\n{subtitle}; high risk: > {km['threshold']:.3g} ({source})")
    ax.legend(loc="lower left", fontsize=8)
    return colours


def plot_km(time, event, risk, path, cut="median", at_risk: bool = True, title: str = "Kaplan-Meier by predicted risk",
            time_unit: str = "months", threshold: float | None = None) -> None:
    """Kaplan-Meier curves of the low/high predicted-risk groups ('+': censored) with the log-rank p.

    `threshold` cuts the groups (high: risk > threshold). Fix it on training data (e.g. the median
    training risk) for a test set: its own median would guarantee two equal groups and peek at the
    test risks. Default: `cut` ("median" of these risks, or a number; kept for older callers).
    """
    time, event, risk = np.asarray(time, float), np.asarray(event).astype(bool), np.asarray(risk, float)
    if len(time) == 0:
        write_message(path, title, "Kaplan-Meier undefined\nno samples")
        return
    cut = cut if threshold is None else float(threshold)
    km = km_by_risk_group(time, event, risk, cut=cut)
    if km["logrank_p"] is None and not event.any():
        write_message(path, title, f"Kaplan-Meier undefined\n{km.get('note', 'no events')}")
        return
    fig, ax = _subplots(figsize=(6, 4.8))
    source = "median of these risks" if isinstance(cut, str) else "fixed threshold"
    colours = _km_axes(ax, km, time, event, time_unit, title, source)
    if at_risk:
        _draw_at_risk(ax, time, np.asarray(km["groups"]), list(km["curves"]), colours)
    _save(fig, path)


def calibration_bins(n: int) -> int:
    """Quantile bins for n samples: about sqrt(n)/2, 2..10, so a bin holds enough patients to mean
    something (2 bins of 6 for 12 patients, 5 of 20 for 100; 10 bins only from 400)."""
    return int(np.clip(round(np.sqrt(n) / 2), 2, 10))


def _wilson(k: np.ndarray, m: np.ndarray, z: float = 1.96) -> tuple[np.ndarray, np.ndarray]:
    """Wilson 95% interval of a binomial fraction k/m (sensible at m of a few, unlike the normal one)."""
    p = k / m
    centre = (p + z**2 / (2 * m)) / (1 + z**2 / m)
    half = z * np.sqrt(p * (1 - p) / m + z**2 / (4 * m**2)) / (1 + z**2 / m)
    # At k = 0 or k = m the bound equals p exactly, but rounding can put it a hair past p.
    return np.clip(np.minimum(centre - half, p), 0, 1), np.clip(np.maximum(centre + half, p), 0, 1)


def _quantile_bins(y, prob, n_bins: int) -> dict:
    """Per non-empty quantile bin: mean predicted, observed fraction, count, Wilson interval."""
    edges = np.quantile(prob, np.linspace(0, 1, n_bins + 1))
    ids = np.searchsorted(edges[1:-1], prob)  # as sklearn's calibration_curve(strategy="quantile")
    used = [b for b in range(n_bins) if (ids == b).any()]
    m = np.array([(ids == b).sum() for b in used], float)
    k = np.array([y[ids == b].sum() for b in used], float)
    low, high = _wilson(k, m)
    return {"predicted": np.array([prob[ids == b].mean() for b in used]), "observed": k / m,
            "count": m.astype(int), "low": low, "high": high}


def plot_calibration(y, prob, path, n_bins: int | None = None, title: str = "Calibration") -> None:
    """Reliability diagram above a histogram of the predicted probabilities.

    Quantile bins, `n_bins` of them (default: `calibration_bins(n)`), each with its Wilson 95%
    interval, so a few patients per bin show as wide bars rather than a zig-zag that looks precise.
    """
    y, prob = labels_and_scores(y, prob)
    if len(y) == 0:
        write_message(path, title, "Calibration undefined\nno samples")
        return
    if (prob < 0).any() or (prob > 1).any():
        write_message(path, title, "Calibration undefined\nscores are not probabilities in [0, 1]")
        return
    b = _quantile_bins(y, prob, min(n_bins or calibration_bins(len(y)), len(y)))
    fig, (ax, hist) = _subplots(2, 1, figsize=(5.5, 6), sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    ax.plot([0, 1], [0, 1], color="grey", ls="--", lw=1, label="perfect calibration")
    per_bin = f"~{int(round(b['count'].mean()))}" if len(set(b["count"])) > 1 else str(b["count"][0])
    ax.errorbar(b["predicted"], b["observed"], yerr=[b["observed"] - b["low"], b["high"] - b["observed"]],
                fmt="o-", color="C0", capsize=3,
                label=f"model: {len(b['count'])} quantile bins of {per_bin} (bars: Wilson 95% CI)")
    ax.set(xlim=(0, 1), ylim=(-0.02, 1.02), ylabel="Observed fraction positive",
           title=f"{title} (n={len(y)}, {int(y.sum())} positive)")
    ax.legend(loc="upper left", fontsize=8)
    hist.hist(prob[y == 0], bins=20, range=(0, 1), alpha=0.6, color="C0", label="negative")
    hist.hist(prob[y == 1], bins=20, range=(0, 1), alpha=0.6, color="C3", label="positive")
    hist.set(xlabel="Predicted probability", ylabel="Count")
    hist.legend(fontsize=8)
    _save(fig, path)


def save_overlay(path: Path, image: np.ndarray, true_mask: np.ndarray | None, pred_mask: np.ndarray,
                 title: str = "") -> None:
    """Three orthogonal slices through the lesion's centre: the image in grey, the true mask's outline in
    green (when given) and the predicted one in red. image, masks [X, Y, Z] on one grid."""
    ref = true_mask if true_mask is not None and true_mask.any() else pred_mask
    centre = np.round(np.argwhere(ref > 0.5).mean(0)).astype(int) if ref.any() else np.array(image.shape) // 2
    fig, axes = _subplots(1, 3, figsize=(9, 3.3))
    for axis, ax in enumerate(axes):
        def take(a, axis=axis):  # the slice through the centre, rows = the second remaining axis
            return np.take(a, centre[axis], axis=axis).T
        ax.imshow(take(image), cmap="gray", origin="lower")
        if true_mask is not None and take(true_mask).any():
            ax.contour(take(true_mask.astype(float)), levels=[0.5], colors="lime", linewidths=1.2)
        if take(pred_mask).any():
            ax.contour(take(pred_mask.astype(float)), levels=[0.5], colors="red", linewidths=1.2)
        ax.set_title(["sagittal", "coronal", "axial"][axis], fontsize=9)
        ax.axis("off")
    fig.suptitle(f"{title}  green: given mask, red: predicted" if true_mask is not None
                 else f"{title}  red: predicted", fontsize=9)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    _save(fig, path)
