"""MiM pretraining model: a ViT3D encoder, one lightweight decoder shared by all levels, a projection head.

forward(levels) follows MAE: encode the visible tokens, decode them with mask tokens in place of the
masked ones, and predict every level's patches. For MiM's cross-level alignment it also returns, per
child level, each child's pooled decoder feature passed through the projection head, and the
stop-gradient target it is pulled toward: its real parent's decoder feature over the patches the child
covers. All levels are encoded together in as few passes as possible (one, when every level keeps the
same number of visible tokens) and decoded in one. The model returns tensors only: the losses are
`pretrain.losses.mim_losses` (models/ imports nothing from pretrain/). With one level it is exactly MAE.

`levels` is duck-typed: anything with the attributes of `pretrain.masks.Level` (see `LevelLike`).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol, Sequence

import torch
from timm.layers import Mlp
from timm.models.vision_transformer import Block
from torch import Tensor, nn

from data.errors import ConfigError
from models.pos_embed import sincos_1d
from models.vit3d import ViT3D, ViT3DConfig


@dataclass
class MaskConfig:
    """MiM's hierarchical masking (built by `pretrain.masks.build_hierarchy`); part of `MiMConfig`."""
    levels: int = 3
    mask_ratio: tuple[float, ...] = (0.75, 0.75, 0.75)  # per level; a single value applies to all
    children: int = 2        # K: sub-volumes per parent sample
    child_patches: int = 2   # c: a child covers c x c x c of its parent's patches

    def __post_init__(self):
        self.mask_ratio = tuple(float(r) for r in self.mask_ratio)
        if self.levels < 1:
            raise ConfigError(f"masks.levels must be >= 1, got {self.levels}")
        if len(self.mask_ratio) not in (1, self.levels):
            raise ConfigError(f"masks.mask_ratio needs 1 or {self.levels} (= levels) values, "
                              f"got {len(self.mask_ratio)}: {self.mask_ratio}")
        if not all(0.0 < r < 1.0 for r in self.mask_ratio):
            raise ConfigError(f"masks.mask_ratio values must lie in (0, 1), got {self.mask_ratio}")
        if self.children < 1 or self.child_patches < 1:
            raise ConfigError(f"masks.children and masks.child_patches must be >= 1, "
                              f"got {self.children} and {self.child_patches}")

    def ratios(self) -> tuple[float, ...]:
        return self.mask_ratio * self.levels if len(self.mask_ratio) == 1 else self.mask_ratio


def masked_count(ratio: float, num_patches: int) -> int:
    """How many of a sample's patches are masked: exactly round(ratio * N)."""
    return int(round(ratio * num_patches))


def check_fits(cfg: MaskConfig, grid: int) -> None:
    """K non-overlapping c^3 cubes must fit the grid and each non-final level's masked budget."""
    n = grid**3
    c, k = cfg.child_patches, cfg.children
    for lvl, ratio in enumerate(cfg.ratios(), start=1):
        n_mask = masked_count(ratio, n)
        if not 1 <= n_mask <= n - 1:
            raise ConfigError(f"masks.mask_ratio {ratio} at level {lvl} masks {n_mask} of {n} patches; "
                              "need at least one masked and one visible")
        if lvl < cfg.levels:
            if c > grid or k > (grid // c) ** 3:
                raise ConfigError(f"masks: {k} children of {c}^3 patches do not fit a {grid}^3 patch grid "
                                  f"(at most {(grid // c) ** 3 if c <= grid else 0})")
            if k * c**3 > n_mask:
                raise ConfigError(f"masks: {k} children of {c}^3 patches need {k * c**3} masked patches "
                                  f"but level {lvl} masks only {n_mask} of {n} (mask_ratio {ratio})")


class LevelLike(Protocol):
    """What the model reads from a level (pretrain.masks.Level has these and more)."""
    x: Tensor                     # [B_l, C, I, I, I] encoder input
    visible_idx: Tensor           # [B_l, N_vis] long, ascending
    parent: Tensor | None         # [B_l] long: row of the previous level (None at level 1)
    parent_tokens: Tensor | None  # [B_l, c^3] long: parent-grid tokens this child covers


@dataclass
class MiMConfig:
    encoder: ViT3DConfig = field(default_factory=ViT3DConfig)
    masks: MaskConfig = field(default_factory=MaskConfig)
    decoder_dim: int = 128
    decoder_depth: int = 2
    decoder_heads: int = 4
    proj_dim: int = 128      # hidden width of the projection head (decoder_dim -> proj_dim -> decoder_dim)
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
        if self.proj_dim < 1:
            raise ConfigError(f"proj_dim must be >= 1, got {self.proj_dim}")
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
        # Child side only: the target is the parent's own decoder feature, so the head cannot make both
        # sides constant. No head without a second level: unused parameters would break DDP, and L=1
        # must be plain MAE.
        self.projector = Mlp(dd, config.proj_dim, dd) if config.masks.levels > 1 else None
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

    def forward_encoder(self, levels: Sequence[LevelLike]) -> list[Tensor]:
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

    def forward_decoder(self, levels: Sequence[LevelLike], latents: list[Tensor]) -> tuple[list[Tensor], list[Tensor]]:
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

    def align_features(self, child: LevelLike, child_feats: Tensor, parent_feats: Tensor) -> tuple[Tensor, Tensor]:
        """(projected, target), both [B_c, Dd]: each child's pooled decoder feature through the projection
        head, and the stop-gradient mean of its real parent's decoder features over the patches it covers."""
        projected = self.projector(child_feats.float().mean(dim=1))  # [B_c, Dd]
        with torch.no_grad():  # stop-gradient target, not passed through the head
            region = parent_feats[child.parent[:, None], child.parent_tokens]  # [B_c, c^3, Dd]
            target = region.float().mean(dim=1)                                # [B_c, Dd]
            # Centred over this level's children: a direction all targets share (the decoder norm's
            # bias, "masked region" vs "visible") would otherwise grow until every cosine is 1.
            target = target - target.mean(dim=0, keepdim=True)                 # [B_c, Dd]
        return projected, target

    def forward(self, levels: Sequence[LevelLike]) -> dict[str, Tensor]:
        """Tensors only, for `pretrain.losses.mim_losses`:
        "pred_l{i}" [B_l, N, p^3 C] for every level, and for every child level i >= 2
        "align_pred_l{i}" [B_i, Dd] (projected child feature) and "align_target_l{i}" [B_i, Dd] (detached)."""
        latents = self.forward_encoder(levels)
        feats, preds = self.forward_decoder(levels, latents)
        out = {f"pred_l{i}": pred for i, pred in enumerate(preds, start=1)}
        for i in range(1, len(levels)):
            projected, target = self.align_features(levels[i], feats[i], feats[i - 1])
            out[f"align_pred_l{i + 1}"] = projected
            out[f"align_target_l{i + 1}"] = target
        return out
