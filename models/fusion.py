"""Fusion blocks that bring the clinical vector into the image model.

Each block maps an encoded clinical vector `[B, F]` into the form one fusion mode needs:
an embedding to concatenate (`ClinicalEmbedding`), per-channel gamma/beta that modulate the
image tokens (`FiLM`), or tokens that join the transformer sequence (`ClinicalTokens`); and the survival
hazard whose clinical part stays linear beside the image term (`LinearClinicalHazard`).
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from core.errors import InputError


def clinical_mlp(in_dim: int, hidden: int, out_dim: int) -> nn.Sequential:
    """Linear -> GELU -> Linear; a single Linear when hidden == 0 (keeps a purely linear path available)."""
    if hidden == 0:
        return nn.Sequential(nn.Linear(in_dim, out_dim))
    return nn.Sequential(nn.Linear(in_dim, hidden), nn.GELU(), nn.Linear(hidden, out_dim))


class ClinicalEmbedding(nn.Module):
    """Late fusion: an embedding of the clinical vector, concatenated with the pooled image features.

    With hidden == 0 the raw clinical vector is passed through unchanged, so the head sees it linearly.
    """

    def __init__(self, in_dim: int, hidden: int):
        super().__init__()
        self.out_dim = hidden if hidden > 0 else in_dim
        self.net = nn.Sequential(nn.Linear(in_dim, hidden), nn.GELU()) if hidden > 0 else nn.Identity()

    def forward(self, clinical: Tensor) -> Tensor:  # [B, F] -> [B, out_dim]
        return self.net(clinical)


class FiLM(nn.Module):
    """Feature-wise linear modulation of image tokens by the clinical vector: tokens * (1 + gamma) + beta.

    The last layer is zero-initialised so the block starts as the identity: fine-tuning begins from
    the pretrained image features and learns how much the clinical data should bend them.
    """

    def __init__(self, in_dim: int, hidden: int, dim: int):
        super().__init__()
        self.net = clinical_mlp(in_dim, hidden, 2 * dim)
        nn.init.zeros_(self.net[-1].weight)
        nn.init.zeros_(self.net[-1].bias)

    def forward(self, tokens: Tensor, clinical: Tensor) -> Tensor:
        gamma, beta = self.net(clinical).chunk(2, dim=-1)  # [B, D] each
        return tokens * (1 + gamma[:, None]) + beta[:, None]  # [B, N, D]


class ClinicalTokens(nn.Module):
    """The clinical vector as `n_tokens` tokens that join the transformer sequence.

    Each token is a learned projection of the whole vector; a shared type embedding marks them as
    clinical (they get no position embedding, since they have no place in the volume).
    """

    def __init__(self, in_dim: int, hidden: int, dim: int, n_tokens: int):
        super().__init__()
        self.n_tokens, self.dim = n_tokens, dim
        self.proj = clinical_mlp(in_dim, hidden, n_tokens * dim)
        self.type_embed = nn.Parameter(torch.zeros(1, 1, dim))
        nn.init.trunc_normal_(self.type_embed, std=0.02)

    def forward(self, clinical: Tensor) -> Tensor:
        tokens = self.proj(clinical).view(clinical.shape[0], self.n_tokens, self.dim)  # [B, T, D]
        return tokens + self.type_embed  # [B, T, D]


class LinearClinicalHazard(nn.Module):
    """The survival hazard eta = beta . clinical + g(features): a Cox model's linear clinical part beside an image
    term g, so an image that carries nothing costs nothing (survival_design "linear_clinical").

    beta [F] can start from the clinical Cox fit on the training fold (finetune/baselines/cox_init.py); g is one
    linear layer over the fused features (and what else the model feeds it) that starts at zero, so the untrained
    model ranks exactly as the Cox fit, and its output is penalised towards 0 by the task's loss ("image_hazard").
    n_out: 1 (a Cox risk; no bias, the partial likelihood ignores a constant) or T discrete-time bins, which get
    one learned baseline logit each that the penalty does not touch.
    """

    def __init__(self, clinical_dim: int, in_dim: int, n_out: int, baseline: bool):
        super().__init__()
        self.clinical = nn.Linear(clinical_dim, 1, bias=False) if clinical_dim > 0 else None  # beta
        if self.clinical is not None:  # no prior: zero until set from the Cox fit, or learned
            nn.init.zeros_(self.clinical.weight)
        self.image = nn.Linear(in_dim, n_out, bias=False)  # g
        nn.init.zeros_(self.image.weight)
        self.baseline = nn.Parameter(torch.zeros(n_out)) if baseline else None

    def forward(self, features: Tensor, clinical: Tensor | None) -> tuple[Tensor, Tensor]:
        """features [B, D_in], clinical [B, F] -> (eta [B, n_out], the image term g [B, n_out])."""
        image = self.image(features)  # [B, n_out]
        eta = image if self.clinical is None else image + self.clinical(clinical)  # [B, n_out]
        return (eta if self.baseline is None else eta + self.baseline), image


def lesion_log_ml(mask: Tensor, scale: Tensor | None, voxel_mm: float) -> Tensor:
    """log of the lesion's volume in mL [B]: mask [B, S, S, S] of a crop, scale [B] prepared voxels per crop voxel,
    voxel_mm per prepared voxel. 1e-3 mL (a 1 mm cube) keeps an empty mask finite."""
    if scale is None:
        raise InputError("model.hazard_lesion_volume: forward needs the crops' scale (batch['scale'])")
    voxels = mask.flatten(1).sum(1)  # [B] crop voxels in the lesion
    return torch.log(voxels * (scale.to(mask.dtype) * voxel_mm) ** 3 / 1000.0 + 1e-3)  # [B]
