"""Frozen-encoder features and the two feature baselines (pixels, hand-made).

Encoder groups, per probed block b in {middle = depth // 2 (1-based: the output of that many blocks),
last}: the mean token and the mask-weighted mean token (each patch weighted by its share of lesion
voxels). encoder.norm is applied to the last block only, so its features are pooled `encoder(x)`; the
middle block is the raw residual stream, which the probe's StandardScaler puts on one scale anyway.
The image channel alone enters the encoder; the mask enters only through the pooling weights.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from models.pooling import mask_token_weights
from models.vit3d import ViT3D

HIST_RANGE = (-3.0, 5.0)  # z-scored MRI intensity units (data.prepare): background to strong enhancement
HIST_BINS = 16
PIXEL_GRID = 8


def probe_blocks(depth: int) -> dict[str, int]:
    """Probed block -> how many blocks run before it (the middle one, at least one block deep)."""
    return {"mid": max(1, depth // 2), "last": depth}


def group_names(depth: int) -> list[str]:
    return [f"{b}_{pool}" for b in probe_blocks(depth) for pool in ("mean", "mask")]


def lesion_weights(mask: torch.Tensor, patch_size: int) -> torch.Tensor:
    """mask [B, 1, S, S, S] -> [B, N]: each patch's share of the lesion's voxels, in token order (sums to 1)."""
    weight = mask_token_weights(mask[:, 0], patch_size)  # [B, N]
    return weight / weight.sum(1, keepdim=True).clamp_min(1e-6)


@torch.no_grad()
def _batch_features(encoder: ViT3D, x: torch.Tensor, blocks: dict[str, int]) -> dict[str, torch.Tensor]:
    """x [B, 2, S, S, S] (image, mask) -> {group: [B, D]}."""
    weight = lesion_weights(x[:, -1:], encoder.config.patch_size)  # [B, N]: the mask is the last channel
    tokens = encoder.embed(x[:, :-1])  # [B, N, D]: the image channel(s)
    out, done = {}, 0
    for name, depth in sorted(blocks.items(), key=lambda kv: kv[1]):
        for blk in encoder.blocks[done:depth]:
            tokens = blk(tokens)  # [B, N, D]
        done = depth
        t = encoder.norm(tokens) if depth == len(encoder.blocks) else tokens  # [B, N, D]
        out[f"{name}_mean"] = t.mean(1)  # [B, D]
        out[f"{name}_mask"] = (weight[..., None] * t).sum(1)  # [B, D]
    return out


def encoder_features(encoder: ViT3D, crops: np.ndarray, batch_size: int = 16, desc: str = "features",
                     progress: bool = True, device: str = "cpu") -> dict[str, np.ndarray]:
    """{group: [N, D]} float64 for crops [N, 2, S, S, S], plus "all": the four groups side by side [N, 4D]."""
    encoder.eval()
    blocks = probe_blocks(len(encoder.blocks))
    parts: dict[str, list[np.ndarray]] = {}
    for i in tqdm(range(0, len(crops), batch_size), desc=desc, unit="batch", disable=not progress, leave=False):
        x = torch.from_numpy(np.ascontiguousarray(crops[i:i + batch_size])).to(device)  # [B, 2, S, S, S]
        for k, v in _batch_features(encoder, x, blocks).items():
            parts.setdefault(k, []).append(v.double().cpu().numpy())
    feats = {k: np.concatenate(v) for k, v in parts.items()}
    feats["all"] = np.concatenate([feats[k] for k in group_names(len(encoder.blocks))], axis=1)  # [N, 4D]
    return feats


def pixel_features(crops: np.ndarray) -> np.ndarray:
    """[N, 8^3 + 16]: the image crop average-pooled to 8^3, and the intensity histogram inside the mask
    (fractions of lesion voxels): what a linear model gets from raw pixels at the same view."""
    x = torch.from_numpy(np.ascontiguousarray(crops))  # [N, 2, S, S, S]
    small = F.adaptive_avg_pool3d(x[:, :1], PIXEL_GRID).flatten(1).double().numpy()  # [N, 512]
    edges = np.linspace(*HIST_RANGE, HIST_BINS + 1)
    hist = []
    for img, msk in zip(crops[:, 0], crops[:, 1]):
        inside = np.clip(img[msk > 0.5], *HIST_RANGE)
        hist.append(np.histogram(inside, edges)[0] / max(inside.size, 1))
    return np.concatenate([small, np.asarray(hist)], axis=1)  # [N, 512 + 16]


def handmade_features(regions, spacing) -> np.ndarray:
    """[N, F] finetune.baselines.radiomics features (lesion shape, first-order statistics and GLCM of the lesion and
    a 5 mm peritumoral ring) per (image, mask) region; undefined values (NaN) are left to the imputer."""
    from finetune.baselines.radiomics import extract_features
    rows = [extract_features(img, msk, spacing) for img, msk in regions]
    names = list(rows[0])
    return np.asarray([[r[n] for n in names] for r in rows], dtype=float)  # [N, F]
