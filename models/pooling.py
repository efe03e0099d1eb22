"""How image tokens become one feature vector for the task heads.

- mean: the plain mean over image tokens (timm's global average pool).
- mask: the mean weighted by each token's lesion-mask share, so a small lesion is not diluted by the
  background around it. A sample whose mask is empty falls back to the plain mean.
- attention: a learned query attends over the image tokens (timm's AttentionPoolLatent, as in SigLIP
  and ViT-`map` heads); it can learn where to look, with or without the mask channel's help.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.layers import AttentionPoolLatent
from torch import Tensor, nn

POOLS = ("mean", "mask", "attention")


def mask_token_weights(mask: Tensor, patch_size: int) -> Tensor:
    """[B, S, S, S] lesion mask in [0, 1] -> [B, N] share of each token's patch inside the lesion, in the
    token order of the patch embedding (Conv3d flatten order: depth, then height, then width)."""
    share = F.avg_pool3d(mask[:, None].float(), kernel_size=patch_size, stride=patch_size)  # [B, 1, g, g, g]
    return share.flatten(1)  # [B, N]


def masked_mean(tokens: Tensor, weights: Tensor) -> Tensor:
    """[B, N, D] tokens, [B, N] weights >= 0 -> [B, D] weighted mean; the plain mean where a row's
    weights sum to zero (no lesion voxel in view)."""
    total = weights.sum(1, keepdim=True)  # [B, 1]
    empty = total <= 0
    w = torch.where(empty, torch.ones_like(weights), weights)  # [B, N]
    w = w / w.sum(1, keepdim=True)
    return torch.einsum("bn,bnd->bd", w.to(tokens.dtype), tokens)  # [B, D]


class TokenPool(nn.Module):
    def __init__(self, kind: str, dim: int, heads: int, patch_size: int):
        super().__init__()
        if kind not in POOLS:
            raise ValueError(f"pool {kind!r}: expected one of {POOLS}")
        self.kind, self.patch_size = kind, patch_size
        # pre-logits attention pool (no output MLP): the task heads stay plain linear layers
        self.attn = AttentionPoolLatent(dim, num_heads=heads, out_features=0) if kind == "attention" else None

    def forward(self, tokens: Tensor, mask: Tensor | None = None) -> Tensor:
        """[B, N, D] image tokens (+ [B, S, S, S] lesion mask for kind 'mask') -> [B, D]."""
        if self.kind == "mean":
            return tokens.mean(1)
        if self.kind == "attention":
            return self.attn(tokens)
        if mask is None:
            raise ValueError("pool 'mask' needs the lesion-mask channel")
        weights = mask_token_weights(mask, self.patch_size)  # [B, N]
        if weights.shape[1] != tokens.shape[1]:
            raise ValueError(f"pool 'mask': {weights.shape[1]} mask cells for {tokens.shape[1]} tokens")
        return masked_mean(tokens, weights)
