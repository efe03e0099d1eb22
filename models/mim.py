"""MiM pretraining model: a ViT3D encoder, one lightweight decoder shared by all levels, a projection head,
and its losses. The hierarchical masks that make its input are `models.mim_masks.build_hierarchy`.

forward(levels) follows MAE's models_mae.py: forward_encoder (visible tokens only), forward_decoder
(mask tokens in place of the masked ones, every level's patches predicted) and forward_loss. For MiM's
cross-level alignment it also pools, per child level, each child's decoder feature through the
projection head, and the stop-gradient target it is pulled toward: its real parent's decoder feature
over the patches the child covers, centred by a running mean over optimizer steps and ranks. All levels
are encoded together in as few passes as possible (one, when every level keeps the same number of
visible tokens) and decoded in one. With one level it is exactly MAE.

Losses: per level, MSE on masked patches against each patch normalised by its own mean and variance
(MAE's norm_pix_loss); per child level, 2 - 2 cos(projected child, parent target). Patches are
flattened as the encoder's patch embedding reads them (`models.vit3d.patchify`).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple, Sequence

import torch
import torch.nn.functional as F
from timm.layers import Mlp
from timm.models.vision_transformer import Block
from torch import Tensor, nn

from core.errors import ConfigError, InputError
from models.distill import CentreSums, DistillConfig, Distiller
from models.mim_masks import Level, MaskConfig, check_fits
from models.pos_embed import sincos_3d
from models.vit3d import ViT3D, ViT3DConfig, patchify, unpatchify

NORM_EPS = 1e-6  # MAE's epsilon in the per-patch normalisation


class MiMOutput(NamedTuple):
    """What MiMModel.forward returns. Lists run over levels, level 1 first; the alignment lists over the child
    levels 2..L (entry i belongs to level i + 2). A NamedTuple, not a dataclass: DeepSpeed ZeRO-3 and DDP
    find the tensors of a forward's output (to hook backward) in tuples, lists and dicts only."""
    preds: list[Tensor]                  # [B_l, N, C p^3] every level's patches, as patchify lays them out
    aligned: list[Tensor]                # [B_l, Dd] each child's pooled decoder feature through the head
    align_targets: list[Tensor]          # [B_l, Dd] its parent region's feature minus the centre, detached
    losses: dict[str, Tensor]            # "loss" and its terms "rec_l1", "align_l2", ...


@dataclass
class MiMConfig:
    encoder: ViT3DConfig = field(default_factory=ViT3DConfig)
    masks: MaskConfig = field(default_factory=MaskConfig)
    decoder_dim: int = 128   # decoder token width
    decoder_depth: int = 2   # decoder blocks (MAE: deeper decoders give better linear probes)
    decoder_heads: int = 4   # decoder attention heads
    proj_dim: int = 128      # hidden width of the projection head (decoder_dim -> proj_dim -> decoder_dim)
    norm_pix_loss: bool = True  # targets are patches normalised by their own mean and variance (MAE)
    align_weight: float = 1.0  # weight of the cross-level alignment terms
    # EMA momentum, per optimizer step, of the alignment centre (the global batch's mean parent-region feature).
    # Lower than DINO's 0.9: a centre that lags the moving features leaves an offset all targets share, and
    # the head can score by pointing at it (tests/test_mim.py: 0.9 collapsed there, 0.5 did not)
    align_center_momentum: float = 0.5
    level_weights: tuple[float, ...] = (1.0,)  # reconstruction weight per level; one value applies to all
    # VoCo-style position contrast (models/contrast.py): each child picks its own cell among its parent's;
    # 0: off. contrast_temperature: the cosine logits' temperature
    contrast_weight: float = 0.0
    contrast_temperature: float = 0.1
    # self-distillation from an EMA teacher beside reconstruction (models/distill.py); weight 0: plain MiM
    distill: DistillConfig = field(default_factory=DistillConfig)

    def __post_init__(self):
        self.level_weights = tuple(float(w) for w in self.level_weights)
        if len(self.level_weights) not in (1, self.masks.levels):
            raise ConfigError(f"level_weights needs 1 or {self.masks.levels} (= masks.levels) values, "
                              f"got {self.level_weights}")
        if self.decoder_dim % 2 or self.decoder_heads < 1 or self.decoder_dim % self.decoder_heads:
            raise ConfigError(f"decoder_dim {self.decoder_dim} must be even and divisible by "
                              f"decoder_heads {self.decoder_heads}")
        if not 0 <= self.align_center_momentum < 1:
            raise ConfigError(f"align_center_momentum must be in [0, 1), got {self.align_center_momentum}")
        if self.proj_dim < 1:
            raise ConfigError(f"proj_dim must be >= 1, got {self.proj_dim}")
        if self.contrast_weight < 0 or self.contrast_temperature <= 0:
            raise ConfigError("contrast_weight must be >= 0 and contrast_temperature > 0")
        if self.contrast_weight > 0 and self.masks.levels < 2:
            raise ConfigError("contrast_weight > 0 needs masks.levels >= 2: a child contrasts its parent's cells")
        check_fits(self.masks, self.encoder.grid)

    def weights(self) -> tuple[float, ...]:
        return self.level_weights * self.masks.levels if len(self.level_weights) == 1 else self.level_weights


class MiMModel(nn.Module):
    def __init__(self, config: MiMConfig):
        super().__init__()
        self.config = config
        enc, dd = config.encoder, config.decoder_dim
        self.encoder = ViT3D(enc)
        self.decoder_embed = nn.Linear(enc.dim, dd)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dd))
        self.decoder_pos_embed = nn.Parameter(sincos_3d(dd, enc.grid), requires_grad=False)  # [1, N, Dd]
        self.decoder_blocks = nn.ModuleList([
            Block(dd, config.decoder_heads, enc.mlp_ratio, qkv_bias=True, norm_layer=nn.LayerNorm)
            for _ in range(config.decoder_depth)
        ])
        self.decoder_norm = nn.LayerNorm(dd)
        self.decoder_pred = nn.Linear(dd, enc.in_channels * enc.patch_size**3)  # one patch, as patchify lays it out
        # Child side only: the target is the parent's own decoder feature, so the head cannot make both
        # sides constant. No head without a second level: unused parameters would break DDP, and L=1
        # must be plain MAE.
        self.projector = Mlp(dd, config.proj_dim, dd) if config.masks.levels > 1 else None
        if config.masks.levels > 1:
            # The alignment targets' centre, one row per child level (2..L): a buffer, so it rides in checkpoints;
            # zero until the first step taken (see training_step_done). Not "encoder.*": export leaves it.
            self.register_buffer("align_center", torch.zeros(config.masks.levels - 1, dd))  # [L-1, Dd]
            self.align_sums = CentreSums(config.masks.levels - 1, dd)
        self._init_decoder()
        # Built last, so plain MiM draws the same initial weights; its teacher starts as the student's copy.
        self.distiller = (Distiller(self.encoder, self.decoder_modules(), self.decoder_pos_embed, config.distill)
                          if config.distill.weight > 0 else None)

    def decoder_modules(self) -> dict[str, nn.Module]:
        """The decoder's trainable modules by name, for the distillation teacher's copy of them."""
        return {"embed": self.decoder_embed, "blocks": self.decoder_blocks, "norm": self.decoder_norm}

    def _init_decoder(self):
        # The mask token is this module's own parameter, still whole here under zero.Init (a module's own
        # parameters are partitioned when its __init__ returns); drawn first, as before.
        nn.init.normal_(self.mask_token, std=0.02)
        # The children's Linear layers module by module through `apply`, which zero.Init wraps to gather
        # each one while it is initialised (its weights are already placeholders). Not self.apply: the
        # encoder initialises itself and would be gathered for nothing. Children in registration order,
        # so the draws are those of a loop over the non-encoder Linear layers in `named_modules` order.
        for child in self.children():
            if child is not self.encoder:
                child.apply(_init_linear)

    def no_weight_decay(self) -> set[str]:
        return {"encoder.pos_embed", "decoder_pos_embed", "mask_token"}

    # --- forward ------------------------------------------------------------------------------------------

    def forward_encoder(self, levels: Sequence[Level]) -> list[Tensor]:
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

    def forward_decoder(self, levels: Sequence[Level], latents: list[Tensor]) -> tuple[list[Tensor], list[Tensor]]:
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

    def align_features(self, child: Level, child_feats: Tensor, parent_feats: Tensor,
                       level: int) -> tuple[Tensor, Tensor]:
        """(projected, target), both [B_c, Dd], for the child level `level` (2..L): each child's pooled decoder
        feature through the projection head, and the stop-gradient mean of its real parent's decoder
        features over the patches it covers, minus the level's running centre."""
        projected = self.projector(child_feats.float().mean(dim=1))  # [B_c, Dd]
        with torch.no_grad():  # stop-gradient target, not passed through the head
            region = parent_feats[child.parent[:, None], child.parent_tokens]  # [B_c, c^3, Dd]
            target = region.float().mean(dim=1)                                # [B_c, Dd]
            if self.training:
                self.align_sums.add(level - 2, target)
            # Centred: a direction all targets share (the decoder norm's bias, "masked region" vs "visible")
            # would otherwise grow until every cosine is 1. By a running mean over steps and ranks, not over
            # this batch: a batch's own mean ties each target to its batch-mates (one crop with two children
            # got two opposite targets), so the loss would change with the per-GPU batch.
            target = target - self.align_center[level - 2].float()            # [B_c, Dd]
        return projected, target

    def forward_loss(self, levels: Sequence[Level], out: MiMOutput, feats: list[Tensor]) -> MiMOutput:
        losses = mim_losses(out, levels, self.config)
        if self.config.contrast_weight > 0:
            terms = self.position_contrast(levels, out, feats)
            losses["loss"] = losses["loss"] + self.config.contrast_weight * terms.pop("contrast")
            losses |= terms
        if self.distiller is not None:
            terms = self.distiller(levels, feats)
            losses["loss"] = losses["loss"] + self.config.distill.weight * terms["distill"]
            losses |= terms
        return out._replace(losses=losses)

    def forward(self, levels: Sequence[Level]) -> MiMOutput:
        """The reconstructions, the alignment pairs and the losses of one hierarchy (see MiMOutput)."""
        latents = self.forward_encoder(levels)
        feats, preds = self.forward_decoder(levels, latents)
        pairs = [self.align_features(levels[i], feats[i], feats[i - 1], i + 1) for i in range(1, len(levels))]
        out = MiMOutput(preds=preds, aligned=[p for p, _ in pairs], align_targets=[t for _, t in pairs], losses={})
        return self.forward_loss(levels, out, feats)

    def position_contrast(self, levels: Sequence[Level], out: MiMOutput, feats: list[Tensor]) -> dict[str, Tensor]:
        """The VoCo-style terms: per child level, cross-entropy of each child picking its own parent cell, and
        how often it does; "contrast" is their mean over the child levels."""
        from models.contrast import position_contrast_loss
        c, grid, terms, losses = self.config.masks.child_patches, self.config.encoder.grid, {}, []
        for i in range(1, len(levels)):
            loss, acc = position_contrast_loss(out.aligned[i - 1], feats[i - 1], levels[i].parent,
                                               levels[i].parent_tokens, grid, c, self.config.contrast_temperature)
            terms[f"contrast_l{i + 1}"], terms[f"contrast_acc_l{i + 1}"] = loss, acc
            losses.append(loss)
        terms["contrast"] = torch.stack(losses).mean()
        return terms

    def training_step_started(self, step: int) -> None:
        """Before an optimizer step: the step's schedules (the teacher's temperature), and the centres' sums
        start empty, so the forwards of a skipped step (never followed by training_step_done) move nothing."""
        if self.projector is not None:
            self.align_sums.reset()
        if self.distiller is not None:
            self.distiller.set_step(step)
            self.distiller.center_sums.reset()

    def training_step_done(self, step: int, max_steps: int) -> None:
        """After an optimizer step taken: each centre moves once toward the mean of the step's micro-batches
        over every rank (collectives: every rank calls this), and the teacher follows the student by EMA.
        A no-op with one level and no distillation (plain MAE)."""
        if self.projector is not None:
            # First-batch init: the first step taken sets the centre to its mean; step 0 itself is uncentred
            # (a zero centre), as a centre from step 0's own batch would tie its targets to that batch.
            self.align_sums.apply(self.align_center, self.config.align_center_momentum, first_sets=True)
        if self.distiller is not None:
            self.distiller.update_center()
            self.distiller.update_teacher(self.encoder, self.decoder_modules(),
                                          self.config.distill.ema_momentum(step, max_steps))


def _init_linear(m: nn.Module) -> None:
    """MAE's decoder init, one module at a time (for Module.apply): xavier-uniform Linear weights, zero biases."""
    if isinstance(m, nn.Linear):
        nn.init.xavier_uniform_(m.weight)
        nn.init.zeros_(m.bias)


# --- losses ---------------------------------------------------------------------------------------------------

def patch_stats(patches: Tensor) -> tuple[Tensor, Tensor]:
    """Per-patch mean and (unbiased, as MAE) variance of [B, N, P]: two [B, N, 1] tensors."""
    return patches.mean(dim=-1, keepdim=True), patches.var(dim=-1, keepdim=True)


def normalised_patches(patches: Tensor, norm_pix: bool = True) -> Tensor:
    """The reconstruction target from patches [B, N, P]: float32, each patch normalised by its own mean and
    variance with norm_pix (MAE's norm_pix_loss)."""
    target = patches.float()
    if norm_pix:
        mean, var = patch_stats(target)
        target = (target - mean) / (var + NORM_EPS) ** 0.5  # [B, N, P]
    return target


def patch_targets(x: Tensor, patch_size: int, norm_pix: bool = True) -> Tensor:
    """A level's reconstruction target [B, N, C p^3] from its input x [B, C, I, I, I]. Built with the levels on
    the step's device, before the forward pass (pretrain.batches.LevelBuilder)."""
    return normalised_patches(patchify(x, patch_size), norm_pix)


def masked_mse(pred: Tensor, target: Tensor, mask: Tensor) -> Tensor:
    """The reconstruction loss: MSE per patch against a ready target (patch_targets), averaged over masked
    tokens only. pred, target [B, N, P]; mask [B, N]."""
    per_patch = ((pred.float() - target) ** 2).mean(dim=-1)  # [B, N]
    m = mask.float()                                          # [B, N]
    return (per_patch * m).sum() / m.sum()


def alignment_loss(child_feat: Tensor, parent_feat: Tensor) -> Tensor:
    """2 - 2 cos(child, parent), mean over pairs; the parent side is a stop-gradient target. [M, D] each."""
    child = F.normalize(child_feat.float(), dim=-1)              # [M, D]
    parent = F.normalize(parent_feat.detach().float(), dim=-1)   # [M, D]
    return (2 - 2 * (child * parent).sum(dim=-1)).mean()


def mim_losses(out: MiMOutput, levels: Sequence[Level], config: MiMConfig) -> dict[str, Tensor]:
    """"loss" = sum_l w_l rec_l + align_weight * sum_{l>=2} align_l, and its scalar terms under the names the
    run logs: "rec_l{l}" and "align_l{l}" (l >= 2)."""
    if len(levels) != config.masks.levels:
        raise InputError(f"mim_losses: got {len(levels)} levels, the config has masks.levels = {config.masks.levels}")
    p = config.encoder.patch_size
    terms: dict[str, Tensor] = {}
    total = 0.0
    for i, (lvl, w) in enumerate(zip(levels, config.weights()), start=1):
        # LevelBuilder builds the target with the levels; a level built elsewhere gets the same one here.
        target = lvl.target if lvl.target is not None else patch_targets(lvl.x, p, config.norm_pix_loss)
        rec = masked_mse(out.preds[i - 1], target, lvl.mask)
        terms[f"rec_l{i}"] = rec
        total = total + w * rec
    for i, (projected, target) in enumerate(zip(out.aligned, out.align_targets), start=2):
        align = alignment_loss(projected, target)
        terms[f"align_l{i}"] = align
        total = total + config.align_weight * align
    terms["loss"] = total
    return terms


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
