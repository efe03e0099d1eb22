"""Per-subject segmentation metrics and their summary: Dice, 95% Hausdorff distance and volume error.

Dice and HD95 are MONAI's (compute_dice, compute_hausdorff_distance with percentile 95 and the voxel
spacing in mm); the volume error is the predicted minus the true lesion volume in ml. The summary is the
mean over subjects with a percentile-bootstrap 95% CI over subjects, as the other reports are.

Empty masks follow the BraTS convention, so that a miss is counted rather than dropped:
- a lesion with nothing predicted (a miss), or a prediction where there is no lesion: Dice 0 and HD95 the
  diagonal of the grid in mm (voxel edge x sqrt(X^2 + Y^2 + Z^2)), the worst the grid can show; BraTS's
  373.13 mm is this diagonal of its 240 x 240 x 155 grid of 1 mm;
- no lesion and nothing predicted: Dice 1 and HD95 0, a correct "nothing here".
The report gives the mean HD95 over every subject with the number of misses beside it, and the mean over
the subjects where both masks have a lesion ("found"), which is the figure that drops the misses.
"""
from __future__ import annotations

import math
import warnings

import numpy as np
import torch
from torch import Tensor

SEG_METRICS = ("dice", "hd95_mm", "volume_error_ml", "true_volume_ml", "pred_volume_ml")


def binary(t: Tensor) -> Tensor:
    """Anything mask-like [B, 1, X, Y, Z] -> float {0, 1} (> 0.5)."""
    return (t > 0.5).to(torch.float32)


def dice_scores(pred: Tensor, target: Tensor) -> np.ndarray:
    """MONAI Dice of binary masks pred, target [B, 1, X, Y, Z] -> [B]; two empty masks score 1."""
    from monai.metrics import compute_dice
    return compute_dice(binary(pred), binary(target), include_background=True,
                        ignore_empty=False)[:, 0].numpy().astype(np.float64)


def segmentation_metrics(pred: Tensor, target: Tensor, voxel_mm) -> dict[str, np.ndarray]:
    """pred, target [B, 1, X, Y, Z] binary masks; voxel_mm: each subject's voxel in mm, either [B] (or one
    number: an isotropic edge) or [B, 3] (the edges along X, Y, Z of an anisotropic grid) -> each of
    SEG_METRICS as [B]. With one mask empty, Dice is 0 and HD95 the grid's diagonal in mm; with both empty,
    Dice is 1 and HD95 0 (the module's docstring says why)."""
    from monai.metrics import compute_hausdorff_distance
    pred, target = binary(pred), binary(target)
    b = pred.shape[0]
    voxel = np.asarray(voxel_mm, dtype=np.float64)
    voxel = voxel.reshape(b, 3) if voxel.ndim == 2 else np.repeat(np.broadcast_to(voxel, (b,))[:, None], 3, 1)  # [B, 3]
    dice = dice_scores(pred, target)  # [B]
    has_pred, has_true = pred.flatten(1).any(1).numpy(), target.flatten(1).any(1).numpy()  # [B], [B]
    # MONAI gives NaN where a mask has no surface, so those are set here
    diagonal = np.linalg.norm(voxel * np.asarray(pred.shape[2:], dtype=np.float64), axis=1)  # [B] mm
    hd = np.where(has_pred == has_true, 0.0, diagonal)  # [B]
    for i in np.flatnonzero(has_pred & has_true):
            with warnings.catch_warnings():  # MONAI 1.6 warns about its own internal always_return_as_numpy
                warnings.filterwarnings("ignore", message=".*always_return_as_numpy", category=FutureWarning)
                hd[i] = float(compute_hausdorff_distance(pred[i:i + 1], target[i:i + 1], include_background=True,
                                                         percentile=95, spacing=tuple(voxel[i]))[0, 0])
    voxel_ml = voxel.prod(axis=1) / 1000.0  # [B]
    true_ml = target.flatten(1).sum(1).double().numpy() * voxel_ml
    pred_ml = pred.flatten(1).sum(1).double().numpy() * voxel_ml
    return {"dice": dice, "hd95_mm": hd, "volume_error_ml": pred_ml - true_ml,
            "true_volume_ml": true_ml, "pred_volume_ml": pred_ml}


def _mean_ci(values: np.ndarray, n_boot: int, rng: np.random.Generator) -> dict:
    v = np.asarray(values, dtype=np.float64)
    if not len(v):
        return {"mean": None, "ci95": None, "n": 0}
    boots = [float(np.mean(v[rng.integers(0, len(v), len(v))])) for _ in range(n_boot)]
    lo, hi = np.percentile(boots, [2.5, 97.5]) if n_boot else (math.nan, math.nan)
    return {"mean": float(v.mean()), "ci95": [float(lo), float(hi)], "n": int(len(v))}


def segmentation_report(rows, n_boot: int = 1000, seed: int = 0) -> dict:
    """rows: a table with SEG_METRICS columns, one row per subject -> {metric: {mean, ci95, n}} over every
    subject (a miss in HD95 at the grid's diagonal), plus "hd95_found_mm" over the subjects where both masks
    have a lesion, "hd95_misses" (subjects with one mask empty: HD95 is the diagonal), "missed" (a lesion
    with nothing predicted), the median Dice and "n"."""
    rng = np.random.default_rng(seed)
    has_true, has_pred = rows["true_volume_ml"].to_numpy() > 0, rows["pred_volume_ml"].to_numpy() > 0
    out = {m: _mean_ci(rows[m].to_numpy(), n_boot, rng) for m in ("dice", "hd95_mm", "volume_error_ml")}
    out["abs_volume_error_ml"] = _mean_ci(np.abs(rows["volume_error_ml"].to_numpy()), n_boot, rng)
    out["hd95_found_mm"] = _mean_ci(rows["hd95_mm"].to_numpy()[has_true & has_pred], n_boot, rng)
    out["hd95_misses"] = int((has_true != has_pred).sum())
    out["median_dice"] = float(np.median(rows["dice"])) if len(rows) else None
    out["missed"] = int((has_true & ~has_pred).sum())
    out["n"] = int(len(rows))
    return out
