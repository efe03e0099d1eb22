"""MiM losses: per-level masked reconstruction (MAE's normalised-pixel MSE) and cross-level alignment.

`mim_step(model, levels)` is one training forward: `MiMModel` returns tensors only, `mim_losses` turns
them into the weighted total and its terms. Patches are flattened as MAE does: tokens in row-major
(d, h, w) grid order, the same order as `Conv3d(...).flatten(2).transpose(1, 2)`, and each patch's
voxels as (pd, ph, pw, C).
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from data.errors import InputError
from models.mim import MiMConfig
from pretrain.masks import Level

NORM_EPS = 1e-6  # MAE's epsilon in the per-patch normalisation


def patchify(x: Tensor, p: int) -> Tensor:
    """[B, C, S, S, S] -> [B, N, p^3 * C] with N = (S / p)^3."""
    b, c, *spatial = x.shape
    if len(spatial) != 3 or len(set(spatial)) != 1 or spatial[0] % p:
        raise InputError(f"patchify: need a cubic [B, C, S, S, S] volume with S divisible by {p}, "
                         f"got {tuple(x.shape)}")
    g = spatial[0] // p
    x = x.reshape(b, c, g, p, g, p, g, p)
    x = x.permute(0, 2, 4, 6, 3, 5, 7, 1)  # [B, g, g, g, p, p, p, C]
    return x.reshape(b, g**3, p**3 * c)    # [B, N, p^3 C]


def unpatchify(patches: Tensor, p: int) -> Tensor:
    """[B, N, p^3 * C] -> [B, C, S, S, S]; the exact inverse of `patchify`."""
    b, n, dim = patches.shape
    g = round(n ** (1 / 3))
    if g**3 != n or dim % p**3:
        raise InputError(f"unpatchify: {n} tokens of {dim} values are not a cubic grid of {p}^3 patches")
    c = dim // p**3
    x = patches.reshape(b, g, g, g, p, p, p, c)
    x = x.permute(0, 7, 1, 4, 2, 5, 3, 6)      # [B, C, g, p, g, p, g, p]
    return x.reshape(b, c, g * p, g * p, g * p)  # [B, C, S, S, S]


def patch_stats(patches: Tensor) -> tuple[Tensor, Tensor]:
    """Per-patch mean and (unbiased, as MAE) variance of [B, N, P]: two [B, N, 1] tensors."""
    return patches.mean(dim=-1, keepdim=True), patches.var(dim=-1, keepdim=True)


def masked_reconstruction_loss(pred: Tensor, target_patches: Tensor, mask: Tensor, norm_pix: bool = True) -> Tensor:
    """MSE per patch, averaged over masked tokens only. pred, target [B, N, P]; mask [B, N] bool."""
    target = target_patches.float()
    if norm_pix:
        mean, var = patch_stats(target)
        target = (target - mean) / (var + NORM_EPS) ** 0.5  # [B, N, P]
    per_patch = ((pred.float() - target) ** 2).mean(dim=-1)  # [B, N]
    m = mask.float()                                          # [B, N]
    return (per_patch * m).sum() / m.sum()


def alignment_loss(child_feat: Tensor, parent_feat: Tensor) -> Tensor:
    """2 - 2 cos(child, parent), mean over pairs; the parent side is a stop-gradient target. [M, D] each."""
    child = F.normalize(child_feat.float(), dim=-1)              # [M, D]
    parent = F.normalize(parent_feat.detach().float(), dim=-1)   # [M, D]
    return (2 - 2 * (child * parent).sum(dim=-1)).mean()


def mim_losses(outputs: dict[str, Tensor], levels: Sequence[Level], config: MiMConfig) -> dict[str, Tensor]:
    """MiMModel's outputs -> "loss" = sum_l w_l rec_l + align_weight * sum_{l>=2} align_l, the scalar terms
    "rec_l{i}" and "align_l{i}" (i >= 2), and "pred_l{i}" [B_l, N, p^3 C] passed through for previews."""
    if len(levels) != config.masks.levels:
        raise InputError(f"mim_losses: got {len(levels)} levels, the config has masks.levels = {config.masks.levels}")
    p = config.encoder.patch_size
    out: dict[str, Tensor] = {}
    total = 0.0
    for i, (lvl, w) in enumerate(zip(levels, config.weights()), start=1):
        rec = masked_reconstruction_loss(outputs[f"pred_l{i}"], patchify(lvl.x, p), lvl.mask, config.norm_pix_loss)
        out[f"rec_l{i}"] = rec
        total = total + w * rec
    for i in range(2, len(levels) + 1):
        align = alignment_loss(outputs[f"align_pred_l{i}"], outputs[f"align_target_l{i}"])
        out[f"align_l{i}"] = align
        total = total + config.align_weight * align
    out["loss"] = total
    for i in range(1, len(levels) + 1):
        out[f"pred_l{i}"] = outputs[f"pred_l{i}"]
    return out


def unwrap(model: nn.Module) -> nn.Module:
    """The MiMModel inside DDP (`.module`) or torch.compile (`._orig_mod`) wrappers."""
    while True:
        for name in ("module", "_orig_mod"):
            inner = getattr(model, name, None)
            if isinstance(inner, nn.Module):
                model = inner
                break
        else:
            return model


def mim_step(model: nn.Module, levels: Sequence[Level]) -> dict[str, Tensor]:
    """One MiM forward with its losses; `model` is a MiMModel, possibly wrapped (DDP, accelerate)."""
    return mim_losses(model(levels), levels, unwrap(model).config)


@torch.no_grad()
def reconstruct_volumes(level: Level, pred: Tensor, patch_size: int, norm_pix: bool = True) -> Tensor:
    """Preview volume [B_l, C, I, I, I]: visible patches from the input, masked ones from pred [B_l, N, P].

    With norm_pix, pred is in per-patch normalised units and is mapped back with the true patch's own
    mean and variance (as MAE's visualisation): the preview shows structure, not absolute intensity.
    """
    target = patchify(level.x.float(), patch_size)  # [B_l, N, P]
    pred = pred.float()
    if norm_pix:
        mean, var = patch_stats(target)            # [B_l, N, 1] each
        pred = pred * (var + NORM_EPS) ** 0.5 + mean
    patches = torch.where(level.mask[..., None], pred, target)  # [B_l, N, P]
    return unpatchify(patches, patch_size)
