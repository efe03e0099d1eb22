"""The shape of a set of pooled feature vectors: how large, how one-directional, how many directions.

A small head on top of frozen or lightly tuned features sees them through these numbers: its learning
rate and weight decay suit features of a random encoder's scale, and features that all point one way
(high anisotropy) or live in few directions (low effective rank) leave a linear read-out less to use.
"""
from __future__ import annotations

import numpy as np

# The group fine-tuning's head reads: the last block after the final norm, mask-weighted (pool "mask").
GEOMETRY_GROUP = "last_mask"


def geometry(X: np.ndarray) -> dict[str, float]:
    """[N, D] features (N >= 2) ->
    - median_sd: median over dimensions of the per-dimension SD (the scale a head's weights meet);
    - mean_norm: mean L2 norm of a vector;
    - anisotropy: mean cosine similarity between two different samples' (uncentred) vectors: 0 for
      directions spread evenly, 1 when every vector points the same way;
    - effective_rank: exp of the entropy of the centred features' variance spectrum (1: one direction,
      D: all directions alike);
    - top_pc_share: the share of variance along the first principal direction.
    """
    X = np.asarray(X, dtype=float)
    n = len(X)
    if n < 2:
        raise ValueError(f"geometry needs at least 2 feature vectors, got {n}")
    norms = np.linalg.norm(X, axis=1)  # [N]
    unit = X / np.maximum(norms, 1e-12)[:, None]  # [N, D]
    cos = unit @ unit.T  # [N, N]
    anisotropy = (cos.sum() - np.trace(cos)) / (n * (n - 1))
    var = np.linalg.svd(X - X.mean(0), compute_uv=False) ** 2  # [min(N, D)]
    share = var / var.sum() if var.sum() > 0 else np.full_like(var, 1.0 / len(var))
    nz = share[share > 0]
    return {"median_sd": float(np.median(X.std(0, ddof=1))), "mean_norm": float(norms.mean()),
            "anisotropy": float(anisotropy), "effective_rank": float(np.exp(-(nz * np.log(nz)).sum())),
            "top_pc_share": float(share[0])}


def summarise(values: list[dict[str, float]]) -> dict[str, list[float]]:
    """Per statistic, [mean, SD] over several encoders (e.g. the random-init seeds)."""
    ddof = 1 if len(values) > 1 else 0
    return {k: [float(np.mean([v[k] for v in values])), float(np.std([v[k] for v in values], ddof=ddof))]
            for k in values[0]}
