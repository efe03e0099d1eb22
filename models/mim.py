"""MiM pretraining model: a ViT3D encoder, one lightweight decoder shared by all levels, a projection head.

forward(levels) follows MAE: encode the visible tokens, decode them with mask tokens in place of the
masked ones, reconstruct every level's masked patches; add MiM's cross-level alignment of each child
with the part of its real parent that the child covers. All levels are encoded together in as few
passes as possible (one, when every level keeps the same number of visible tokens) and decoded in one.
With one level it is exactly MAE.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from timm.layers import Mlp
from timm.models.vision_transformer import Block
from torch import Tensor, nn

from data.errors import ConfigError
from models.pos_embed import sincos_1d
from models.vit3d import ViT3D, ViT3DConfig
from pretrain.losses import alignment_loss, masked_reconstruction_loss, patch_stats, patchify, unpatchify, NORM_EPS
from pretrain.masks import Level, MaskConfig, check_fits


@dataclass
class MiMConfig:
    encoder: ViT3DConfig = field(default_factory=ViT3DConfig)
    masks: MaskConfig = field(default_factory=MaskConfig)
    decoder_dim: int = 128
    decoder_depth: int = 2
    decoder_heads: int = 4
    proj_dim: int = 128
    norm_pix_loss: bool = True
    align_weight: float = 1.0
    level_weights: tuple[float, ...] = (1.0, 1.0, 1.0)  # reconstruction weight per level; one value = all

    def __post_init__(self):
        self.level_weights = tuple(float(w) for w in self.level_weights)
        if len(self.level_weights) not in (1, self.masks.levels):
            raise ConfigError(f"level_weights needs 1 or {self.masks.levels} (= masks.levels) values, "
                              f"got {self.level_weights}")
        if self.decoder_dim % 2 or self.decoder_heads < 1 or self.decoder_dim % self.decoder_heads:
            raise ConfigError(f"decoder_dim {self.decoder_dim} must be even and divisible by "
                              f"decoder_heads {self.decoder_heads}")
        check_fits(self.masks, self.encoder.grid)

    def weights(self) -> tuple[float, ...]:
        return self.level_weights * self.masks.levels if len(self.level_weights) == 1 else self.level_weights


def grid_sincos(dim: int, grid: int) -> Tensor:
    """3D sin-cos embedding [1, grid^3, dim] for any even dim (models.pos_embed.sincos_3d when dim % 6 == 0)."""
    axis = (dim // 6) * 2  # even share per axis; the w axis takes the remainder
    d, h, w = torch.meshgrid(*[torch.arange(grid)] * 3, indexing="ij")
    parts = [sincos_1d(n, a.flatten()) for n, a in ((axis, d), (axis, h), (dim - 2 * axis, w))]
    return torch.cat(parts, dim=1).float()[None]  # [1, N, dim]


class MiMModel(nn.Module):
    def __init__(self, config: MiMConfig):
        super().__init__()
        self.config = config
        enc, dd = config.encoder, config.decoder_dim
        self.encoder = ViT3D(enc)
        self.decoder_embed = nn.Linear(enc.dim, dd)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dd))
        self.decoder_pos_embed = nn.Parameter(grid_sincos(dd, enc.grid), requires_grad=False)  # [1, N, Dd]
        self.decoder_blocks = nn.ModuleList([
            Block(dd, config.decoder_heads, enc.mlp_ratio, qkv_bias=True, norm_layer=nn.LayerNorm)
            for _ in range(config.decoder_depth)
        ])
        self.decoder_norm = nn.LayerNorm(dd)
        self.decoder_pred = nn.Linear(dd, enc.patch_size**3 * enc.in_channels)
        # No head without a second level: unused parameters would break DDP, and L=1 must be plain MAE.
        self.projector = Mlp(dd, dd, config.proj_dim) if config.masks.levels > 1 else None
        self._init_decoder()

    def _init_decoder(self):
        nn.init.normal_(self.mask_token, std=0.02)
        for name, m in self.named_modules():
            if name.startswith("encoder"):
                continue  # the encoder initialises itself
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)

    def no_weight_decay(self) -> set[str]:
        return {"encoder.pos_embed", "decoder_pos_embed", "mask_token"}

    # --- forward ------------------------------------------------------------------------------------------

    def forward_encoder(self, levels: list[Level]) -> list[Tensor]:
        """Visible-token latents per level, [B_l, N_vis_l, D]; levels with equal N_vis share one pass."""
        groups: dict[int, list[int]] = {}
        for i, lvl in enumerate(levels):
            groups.setdefault(lvl.visible_idx.shape[1], []).append(i)
        latents: list[Tensor] = [None] * len(levels)  # type: ignore[list-item]
        for ids in groups.values():
            x = torch.cat([levels[i].x for i in ids])              # [R, C, I, I, I]
            vis = torch.cat([levels[i].visible_idx for i in ids])  # [R, N_vis]
            out = self.encoder(x, vis)                             # [R, N_vis, D]
            for i, part in zip(ids, out.split([levels[i].x.shape[0] for i in ids])):
                latents[i] = part                                  # [B_l, N_vis, D]
        return latents

    def forward_decoder(self, levels: list[Level], latents: list[Tensor]) -> tuple[list[Tensor], list[Tensor]]:
        """One pass over all levels' rows: (features [B_l, N, Dd] before the prediction layer, pred [B_l, N, P])."""
        n = self.decoder_pos_embed.shape[1]
        rows = []
        for lvl, latent in zip(levels, latents):
            tokens = self.decoder_embed(latent)  # [B_l, N_vis, Dd]
            b, _, dd = tokens.shape
            full = self.mask_token.to(tokens.dtype).expand(b, n, dd)  # [B_l, N, Dd]
            idx = lvl.visible_idx[..., None].expand(-1, -1, dd)        # [B_l, N_vis, Dd]
            rows.append(full.scatter(1, idx, tokens))                  # visible tokens back in their slots
        x = torch.cat(rows) + self.decoder_pos_embed  # [sum B_l, N, Dd]
        for blk in self.decoder_blocks:
            x = blk(x)
        feats = self.decoder_norm(x)      # [sum B_l, N, Dd]
        pred = self.decoder_pred(feats)   # [sum B_l, N, P]
        sizes = [lvl.x.shape[0] for lvl in levels]
        return list(feats.split(sizes)), list(pred.split(sizes))

    def forward_loss(self, levels: list[Level], feats: list[Tensor], preds: list[Tensor]) -> dict[str, Tensor]:
        cfg = self.config
        p = cfg.encoder.patch_size
        out: dict[str, Tensor] = {}
        total = 0.0
        for i, (lvl, pred, w) in enumerate(zip(levels, preds, cfg.weights()), start=1):
            rec = masked_reconstruction_loss(pred, patchify(lvl.x, p), lvl.mask, cfg.norm_pix_loss)
            out[f"rec_l{i}"] = rec
            total = total + w * rec
        for i in range(1, len(levels)):
            out[f"align_l{i + 1}"] = align = self.cross_level_loss(levels[i], feats[i], feats[i - 1])
            total = total + cfg.align_weight * align
        out["loss"] = total
        for i, pred in enumerate(preds, start=1):
            out[f"pred_l{i}"] = pred
        return out

    def cross_level_loss(self, child: Level, child_feats: Tensor, parent_feats: Tensor) -> Tensor:
        """Each child's pooled feature vs. its real parent's features over the patches the child covers."""
        pooled = self.projector(child_feats.float().mean(dim=1))  # [B_c, proj]
        with torch.no_grad():  # stop-gradient target
            region = parent_feats[child.parent[:, None], child.parent_tokens]  # [B_c, c^3, Dd]
            target = self.projector(region.float().mean(dim=1))                # [B_c, proj]
        return alignment_loss(pooled, target)

    def forward(self, levels: list[Level]) -> dict[str, Tensor]:
        """Scalar losses "loss", "rec_l{i}", "align_l{i}" (i >= 2), and "pred_l{i}" [B_l, N, p^3 C]."""
        latents = self.forward_encoder(levels)
        feats, preds = self.forward_decoder(levels, latents)
        return self.forward_loss(levels, feats, preds)


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
