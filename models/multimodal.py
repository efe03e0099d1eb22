"""The fine-tuning model: a two-channel ViT3D ([image, lesion mask]) fused with clinical data, plus task heads.

    x [B, 2, S, S, S] -> ViT3D (patch embed inflated 1 -> 2 ch) -> tokens [B, N, D]
    clinical [B, F]   -> fusion (none | concat | film | tokens | clinical_only)
    fused features [B, D_fused] -> dropout -> heads: "logit" [B] and/or "risk" [B] / "hazard_logits" [B, T]
    survival (linear_clinical): eta = beta . clinical + g(features [, logit, log lesion mL]), g from zero

The segmentation head (--task segmentation, or any task with --seg_weight > 0: DeepMTS's hard sharing)
reads a second pass of the same encoder over the image with the mask channel zeroed:
    [image, 0] -> ViT3D -> tokens + intermediate blocks -> SegDecoder -> "seg_logits" [B, 1, S, S, S]

Losses live in the training loop; this module only returns raw scores.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from timm.optim import param_groups_layer_decay
from torch import Tensor, nn

from core.config import from_dict, to_dict
from core.errors import ClinicalError, ConfigError, InputError
from models.fusion import ClinicalEmbedding, ClinicalTokens, FiLM, LinearClinicalHazard, lesion_log_ml
from models.hf import load_model_folder, load_state_dict_strict, save_model_folder
from models.input_spec import InputSpec
from models.pooling import POOLS, TokenPool
from models.segmentation import MASK_FEATURES, SEG_HEADS, SegDecoder, image_only, mask_shape_features
from models.tasks import CLASSIFICATION, TASK_NAMES, TASKS, get_task
from models.vit3d import ViT3D, ViT3DConfig, inflate_patch_embed

FUSIONS = ("none", "concat", "film", "tokens", "clinical_only")
SURVIVAL_DESIGNS = ("linear_clinical", "deep")
HEAD_NORMS = ("none", "batchnorm", "layernorm")
MODEL_TYPE = "mimfm-multimodal"
# Encoder settings that only affect training, not the weights: they may differ from the pretrained folder.
TRAINING_ONLY_KEYS = ("in_channels", "drop_path", "grad_checkpointing")


@dataclass
class MultimodalConfig:
    encoder: ViT3DConfig = field(default_factory=lambda: ViT3DConfig(in_channels=2))  # [image, lesion mask]
    # what the model learns (models/tasks.py: its heads, loss, scores, metrics); --task on the command line
    task: Literal[TASK_NAMES] = field(default=CLASSIFICATION.name, metadata={"flag": "task"})
    # how clinical data joins the image (clinical_only trains no image model); --fusion on the command line
    fusion: Literal["none", "concat", "film", "tokens", "clinical_only"] = field(default="concat",
                                                                                metadata={"flag": "fusion"})
    clinical_dim: int = 0  # clinical features after encoding (one-hot, indicators); 0 only for fusion none
    clinical_hidden: int = 64  # 0 = no hidden layer (linear clinical path)
    n_clinical_tokens: int = 4  # fusion tokens: clinical tokens added to the transformer sequence
    head_dropout: float = 0.1  # dropout before the task heads
    survival_head: Literal["cox", "discrete"] = "cox"  # cox: one risk score; discrete: hazards over n_time_bins
    # the survival hazard: linear_clinical (eta = beta . clinical + g(image), g starting at 0 and penalised by
    # hazard_l2, beta set from the training fold's clinical Cox fit: models.fusion.LinearClinicalHazard), or deep
    # (one linear layer over the fused features, the clinical part inside them)
    survival_design: Literal["linear_clinical", "deep"] = field(default="linear_clinical",
                                                                metadata={"flag": "survival_design"})
    # linear_clinical: weight of mean(g^2), the image term's pull towards 0. On noise crops (which a ViT memorises)
    # the toy cohort of tests/test_survival_hazard.py reaches test C 0.687 at 3, 0.677 at 1, 0.567 at 0, and the
    # deep head 0.536, against the clinical Cox fit's 0.686
    hazard_l2: float = 3.0
    hazard_from_logit: bool = True  # linear_clinical with a label head (multitask): g also reads the label's logit
    # linear_clinical: g also reads log(lesion volume in mL) from the mask channel; needs the crops' scale in
    # forward and voxel_mm (the prepared voxel edge, set by fine-tuning from the input contract)
    hazard_lesion_volume: bool = False
    voxel_mm: float = 1.0
    n_time_bins: int = 0  # discrete-time bins (set by fine-tuning from n_time_bins)
    mask_channel_init: Literal["zero", "mean"] = "zero"  # the mask kernel when a 1-channel patch embedding is inflated
    # image tokens -> one vector: mean; mask (weighted by each token's lesion share); attention (a learned
    # query over the tokens, timm AttentionPoolLatent)
    pool: Literal["mean", "mask", "attention"] = "mean"
    # normalisation of the pooled image vector before fusion and heads: none; batchnorm (MAE's linear
    # probe: BatchNorm without affine parameters, since pretrained features are scaled unlike a random
    # or supervised encoder's); layernorm (per sample, no affine parameters)
    head_norm: Literal["none", "batchnorm", "layernorm"] = "none"
    # weight of the auxiliary segmentation loss (Dice + CE of the lesion mask from the image alone) beside
    # the task's own; 0 = none, and no segmentation head. --task segmentation trains it alone, at weight 1.
    seg_weight: float = field(default=0.0, metadata={"flag": "seg_weight"})
    # the segmentation decoder (models/segmentation.py): unetr (skips from intermediate blocks and the
    # image) or primus (light, no skips). unetr by validation Dice, scratch, 20 patients: 0.599 against
    # 0.255 (docs/EXPERIMENT_LOG.md "Segmentation"); primus costs about a third of its compute.
    seg_head: Literal["primus", "unetr"] = "unetr"
    seg_width: int = 16  # channels of the decoder's finest stage (doubling per coarser stage)
    # DeepMTS's cascade: the outcome heads also see what the predicted mask shows (its size, surface to
    # volume and extent; models.segmentation.mask_shape_features); needs --seg_weight > 0
    seg_cascade: bool = False
    # the mask channel the outcome path reads: the given mask, or the predicted one (thresholded, no
    # gradient), so training sees what predict without a drawn mask will; needs --seg_weight > 0
    outcome_mask: Literal["given", "predicted"] = "given"
    # crops of each lesion in the input, stacked on the channel axis: 1, or 2 (the lesion crop, then the
    # wide peritumoral one; set from the input contract's view.peritumoral_mm by fine-tuning)
    scales: int = 1

    def __post_init__(self):
        if isinstance(self.encoder, dict):
            self.encoder = from_dict(ViT3DConfig, self.encoder, "encoder")
        choices = {"task": tuple(TASKS), "fusion": FUSIONS, "survival_head": ("cox", "discrete"),
                   "mask_channel_init": ("zero", "mean"), "pool": POOLS, "head_norm": HEAD_NORMS,
                   "seg_head": SEG_HEADS, "outcome_mask": ("given", "predicted"),
                   "survival_design": SURVIVAL_DESIGNS}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ConfigError(f"{name}={getattr(self, name)!r} is not one of {list(allowed)}")
        if self.clinical_dim < 0 or self.clinical_hidden < 0:
            raise ConfigError("clinical_dim and clinical_hidden must be >= 0")
        if self.fusion == "tokens" and self.n_clinical_tokens < 1:
            raise ConfigError(f"fusion='tokens' needs n_clinical_tokens >= 1, got {self.n_clinical_tokens}")
        if self.pool == "mask" and self.encoder.in_channels < 2:
            raise ConfigError("pool='mask' needs the lesion-mask channel (encoder in_channels >= 2)")
        if self.seg_weight < 0 or self.seg_width < 1:
            raise ConfigError(f"--seg_weight must be >= 0 and seg_width >= 1, got {self.seg_weight}, {self.seg_width}")
        if self.segments and self.encoder.in_channels < 2:
            raise ConfigError("segmentation needs the [images..., lesion mask] input (encoder in_channels >= 2): "
                              "the mask is its target")
        if (self.seg_cascade or self.outcome_mask == "predicted") and not (self.seg_weight > 0 and self.predicts_outcome):
            raise ConfigError("model.seg_cascade and model.outcome_mask predicted need an outcome task with "
                              "--seg_weight > 0 (they read the segmentation head's mask)")
        if get_task(self.task).segment and self.fusion not in ("none", "concat"):
            raise ConfigError(f"--task segmentation reads no clinical data; --fusion {self.fusion} does not apply")
        if self.scales not in (1, 2):
            raise ConfigError(f"model.scales must be 1 or 2, got {self.scales}")
        if self.scales == 2 and (self.segments or self.fusion == "tokens"):
            raise ConfigError("--peritumoral_mm (two scales) works with an outcome task and --fusion none, concat "
                              "or film; not with segmentation or --fusion tokens")
        self._check_hazard()
        if not 0.0 <= self.head_dropout < 1.0:
            raise ConfigError(f"head_dropout must be in [0, 1), got {self.head_dropout}")

    def _check_hazard(self) -> None:
        if self.hazard_l2 < 0 or self.voxel_mm <= 0:
            raise ConfigError(f"model.hazard_l2 must be >= 0 and model.voxel_mm > 0, "
                              f"got {self.hazard_l2}, {self.voxel_mm}")
        if self.hazard_lesion_volume and (not self.linear_clinical_hazard or self.encoder.in_channels < 2):
            raise ConfigError("model.hazard_lesion_volume needs survival_design linear_clinical, an image model and "
                              "the lesion-mask channel")

    def check_buildable(self) -> None:
        """Sizes that come from the data (clinical width, time bins) must be set before building a model.

        Kept out of __post_init__ so a YAML preset can name a fusion mode before the data is seen.
        """
        if self.uses_clinical and self.clinical_dim < 1:
            raise ConfigError(f"fusion={self.fusion!r} needs clinical_dim >= 1, got {self.clinical_dim}")
        if get_task(self.task).survival and self.survival_head == "discrete" and self.n_time_bins < 1:
            raise ConfigError(f"survival_head='discrete' needs n_time_bins >= 1, got {self.n_time_bins}")

    @property
    def linear_clinical_hazard(self) -> bool:
        """Whether the survival hazard is beta . clinical + g(image): survival_design linear_clinical, in a model
        that reads an image (the clinical_only baseline keeps its one head, exactly linear at clinical_hidden 0)."""
        return self.survival_design == "linear_clinical" and self.uses_image

    @property
    def uses_image(self) -> bool:
        return self.fusion != "clinical_only"

    @property
    def uses_clinical(self) -> bool:
        return self.fusion != "none" and not get_task(self.task).segment

    @property
    def segments(self) -> bool:
        """Whether the model grows the segmentation head."""
        return get_task(self.task).segment or self.seg_weight > 0

    @property
    def predicts_outcome(self) -> bool:
        return not get_task(self.task).segment


def head_norm(kind: str, dim: int) -> nn.Module | None:
    """The normalisation of the pooled image vector [B, D] that MultimodalConfig.head_norm names (no affine
    parameters: the head that follows is linear, so they would add nothing)."""
    if kind == "batchnorm":
        return nn.BatchNorm1d(dim, affine=False, eps=1e-6)
    if kind == "layernorm":
        return nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
    return None


class MultimodalModel(nn.Module):
    def __init__(self, config: MultimodalConfig):
        super().__init__()
        config.check_buildable()
        self.config = config
        c = config
        self.encoder = ViT3D(c.encoder) if c.uses_image else None
        self.seg_decoder = SegDecoder(c.encoder, c.seg_head, c.seg_width) if c.segments else None
        self.pool = self.image_norm = self.clinical_embed = self.film = self.clinical_tokens = None
        self.cls_head = self.surv_head = None
        self.feature_dim = 0
        if c.predicts_outcome:
            self._build_outcome_path(c)

    def _build_outcome_path(self, c: MultimodalConfig) -> None:
        """Pooling, fusion and the task heads: everything that turns tokens (+ clinical) into outcome scores."""
        self.pool = TokenPool(c.pool, c.encoder.dim, c.encoder.heads, c.encoder.patch_size) if c.uses_image else None
        d = c.encoder.hidden_size
        self.image_norm = head_norm(c.head_norm, d) if c.uses_image else None
        if c.fusion == "none":
            self.feature_dim = d
        elif c.fusion == "concat":
            self.clinical_embed = ClinicalEmbedding(c.clinical_dim, c.clinical_hidden)
            self.feature_dim = d + self.clinical_embed.out_dim
        elif c.fusion == "film":
            self.film = FiLM(c.clinical_dim, c.clinical_hidden, d)
            self.feature_dim = d
        elif c.fusion == "tokens":
            self.clinical_tokens = ClinicalTokens(c.clinical_dim, c.clinical_hidden, d, c.n_clinical_tokens)
            self.feature_dim = 2 * d  # pooled image tokens ++ mean of clinical tokens
        else:  # clinical_only
            self.clinical_embed = ClinicalEmbedding(c.clinical_dim, c.clinical_hidden)
            self.feature_dim = self.clinical_embed.out_dim
        if c.seg_cascade:
            self.feature_dim += len(MASK_FEATURES)
        # The clinical-only linear path must be exactly a linear model (compared with a linear Cox fit).
        linear_baseline = c.fusion == "clinical_only" and c.clinical_hidden == 0
        self.head_drop = nn.Identity() if linear_baseline else nn.Dropout(c.head_dropout)
        task = get_task(c.task)
        self.cls_head = nn.Linear(self.feature_dim, 1) if task.label else None
        self.surv_head = self._survival_head(c) if task.survival else None

    def _survival_head(self, c: MultimodalConfig) -> nn.Module:
        n_out = 1 if c.survival_head == "cox" else c.n_time_bins
        if not c.linear_clinical_hazard:
            # Cox partial likelihood is invariant to an additive constant, so the risk has no bias.
            return nn.Linear(self.feature_dim, n_out, bias=c.survival_head != "cox")
        extra = int(get_task(c.task).label and c.hazard_from_logit) + int(c.hazard_lesion_volume)
        return LinearClinicalHazard(c.clinical_dim if c.uses_clinical else 0, self.feature_dim + extra, n_out,
                                    baseline=c.survival_head == "discrete")

    # ---- forward -------------------------------------------------------------------------------

    def forward(self, x: Tensor | None, clinical: Tensor | None, scale: Tensor | None = None) -> dict[str, Tensor]:
        """x [B, scales x (C + 1), S, S, S], clinical [B, F], scale [B] (prepared voxels per crop voxel: only
        read for hazard_lesion_volume) -> the heads' outputs."""
        c = self.config
        clinical = self._check_clinical(clinical) if c.uses_clinical else None
        if c.uses_image:
            if x is None or x.ndim != 5 or x.shape[1] != c.scales * c.encoder.in_channels:
                got = None if x is None else tuple(x.shape)
                raise InputError(f"image input: expected [B, {c.scales * c.encoder.in_channels}, S, S, S], got {got}")
        out = {"seg_logits": self.segment(x)} if self.seg_decoder is not None else {}
        if not c.predicts_outcome:
            return out
        if c.outcome_mask == "predicted":
            x = torch.cat([x[:, :-1], (out["seg_logits"].detach() > 0).to(x.dtype)], dim=1)  # p > 0.5
        return out | self._outcome(x, clinical, out.get("seg_logits"), scale)

    def segment(self, x: Tensor) -> Tensor:
        """x [B, C + 1, S, S, S] -> lesion logits [B, 1, S, S, S], from the images alone (the mask channel is
        zeroed, so the given mask never leaks into the segmentation)."""
        x_img = image_only(x)  # [B, C + 1, S, S, S]
        tokens, hidden = self.encoder.forward_hidden(x_img, tuple(self.seg_decoder.skip_blocks))  # [B, N, D]
        return self.seg_decoder(tokens, hidden, x_img[:, :-1])

    def _outcome(self, x: Tensor | None, clinical: Tensor | None, seg_logits: Tensor | None = None,
                 scale: Tensor | None = None) -> dict[str, Tensor]:
        """The outcome path: [image, mask] (+ clinical) -> features [B, D_fused] and the task heads' outputs;
        with seg_cascade the predicted mask's shape features join the fused features."""
        c = self.config
        if c.fusion == "clinical_only":
            features = self.clinical_embed(clinical)  # [B, F_hidden]
        elif c.fusion == "tokens":
            extra = self.extra_tokens(clinical)  # [B, T, D]
            tokens = self.encoder(x, extra_tokens=extra)  # [B, N + T, D]
            n = tokens.shape[1] - extra.shape[1]  # N follows the input size, not necessarily img_size
            features = torch.cat([self.pool_image(tokens[:, :n], x), tokens[:, n:].mean(1)], dim=-1)  # [B, 2D]
        else:
            tokens = self.image_tokens(x)  # [B, N, D] ([B, 2N, D] with two scales)
            if c.fusion == "film":
                tokens = self.film(tokens, clinical)  # [B, N, D]
            features = self.pool_image(tokens, x)  # [B, D]
            if c.fusion == "concat":
                features = torch.cat([features, self.clinical_embed(clinical)], dim=-1)  # [B, D + H]
        if c.seg_cascade:
            features = torch.cat([features, mask_shape_features(seg_logits)], dim=-1)  # [B, D_fused + 3]
        out = {"features": features}
        h = self.head_drop(features)  # [B, D_fused]
        if self.cls_head is not None:
            out["logit"] = self.cls_head(h).squeeze(-1)  # [B]
        if self.surv_head is not None:
            out |= self._hazard(h, clinical, out.get("logit"), x, scale)
        return out

    def _hazard(self, h: Tensor, clinical: Tensor | None, logit: Tensor | None, x: Tensor | None,
                scale: Tensor | None) -> dict[str, Tensor]:
        """Fused features h [B, D_fused] (+ clinical [B, F], the label's logit [B], the crop) -> "risk" [B] or
        "hazard_logits" [B, T]; linear_clinical also returns its image term g as "image_hazard" ([B] or [B, T])."""
        c = self.config
        cox = c.survival_head == "cox"
        if not c.linear_clinical_hazard:
            eta = self.surv_head(h)  # [B, 1] or [B, T]
            return {"risk": eta.squeeze(-1)} if cox else {"hazard_logits": eta}
        inputs = [h]
        if logit is not None and c.hazard_from_logit:
            inputs.append(logit.detach()[:, None])  # what the image says of the label; BCE alone trains the logit
        if c.hazard_lesion_volume:
            inputs.append(self.lesion_log_ml(x, scale)[:, None])
        eta, image = self.surv_head(torch.cat(inputs, dim=-1), clinical)  # [B, 1] or [B, T] each
        return {"risk": eta.squeeze(-1), "image_hazard": image.squeeze(-1)} if cox else \
            {"hazard_logits": eta, "image_hazard": image}

    def lesion_log_ml(self, x: Tensor, scale: Tensor | None) -> Tensor:
        """log of the lesion's volume in mL [B] from the lesion crop's mask channel (models.fusion.lesion_log_ml)."""
        return lesion_log_ml(x[:, self.config.encoder.in_channels - 1], scale, self.config.voxel_mm)

    def set_clinical_hazard(self, beta) -> None:
        """beta [F]: the clinical part of a linear_clinical hazard, e.g. the training fold's Cox coefficients
        (finetune.baselines.cox_init) on the clinical encoding this model reads. Call before wrapping the model."""
        head = self.surv_head
        if not isinstance(head, LinearClinicalHazard) or head.clinical is None:
            raise ConfigError("set_clinical_hazard: the model has no linear clinical hazard (needs a survival task, "
                              "survival_design linear_clinical and clinical data)")
        beta = torch.as_tensor(beta, dtype=head.clinical.weight.dtype).reshape(1, -1)  # [1, F]
        if beta.shape != head.clinical.weight.shape:
            raise ClinicalError(f"set_clinical_hazard: {beta.shape[1]} coefficients for {self.config.clinical_dim} "
                                "clinical features")
        with torch.no_grad():
            head.clinical.weight.copy_(beta)

    def image_tokens(self, x: Tensor) -> Tensor:
        """x [B, scales x (C + 1), S, S, S] -> tokens [B, scales x N, D]: with two scales, both crops go through
        the encoder in one batch and their tokens are fused into one sequence (lesion crop first)."""
        if self.config.scales == 1:
            return self.encoder(x)  # [B, N, D]
        b, c = x.shape[0], self.config.encoder.in_channels
        tokens = self.encoder(torch.cat([x[:, :c], x[:, c:]]))  # [2B, N, D]
        return torch.cat([tokens[:b], tokens[b:]], dim=1)  # [B, 2N, D]

    def pool_image(self, tokens: Tensor, x: Tensor) -> Tensor:
        """[B, N, D] image tokens -> [B, D], then head_norm; the mask pool reads the lesion-mask channel of
        x [B, C + 1, S, S, S], the last. With two scales each crop's mask channel weighs its own tokens:
        the masks are stacked along depth, which is the patch embedding's outermost token order."""
        mask = None
        if x.shape[1] > 1:
            c = self.config.encoder.in_channels
            mask = torch.cat([x[:, k * c + c - 1] for k in range(self.config.scales)], dim=1)  # [B, scales S, S, S]
        pooled = self.pool(tokens, mask=mask)  # [B, D]
        return pooled if self.image_norm is None else self.image_norm(pooled)

    def extra_tokens(self, clinical: Tensor | None) -> Tensor | None:
        """The tokens this model appends to the encoder sequence: clinical tokens [B, T, D] for fusion
        'tokens', else None (also used by attention rollout, so it sees the same sequence)."""
        if self.clinical_tokens is None:
            return None
        return self.clinical_tokens(self._check_clinical(clinical))  # [B, T, D]

    def _check_clinical(self, clinical: Tensor | None) -> Tensor:
        want = self.config.clinical_dim
        if clinical is None or clinical.ndim != 2 or clinical.shape[1] != want:
            got = None if clinical is None else tuple(clinical.shape)
            raise ClinicalError(f"clinical input: expected [B, {want}] for fusion={self.config.fusion!r}, got {got}")
        return clinical

    # ---- optimisation --------------------------------------------------------------------------

    def encoder_parameters(self) -> list[nn.Parameter]:
        return [] if self.encoder is None else list(self.encoder.parameters())

    def head_parameters(self) -> list[nn.Parameter]:
        """Everything outside the encoder: fusion blocks and task heads."""
        return [p for n, p in self.named_parameters() if not n.startswith("encoder.")]

    def group_matcher(self, coarse: bool = False) -> dict:
        """timm layer groups: the encoder's, under "encoder."; fusion and heads fall in the last group."""
        return dict(stem=r"^encoder\.(?:pos_embed|patch_embed)",
                    blocks=r"^encoder\.blocks\.(\d+)" if coarse
                    else [(r"^encoder\.blocks\.(\d+)", None), (r"^encoder\.norm", (99999,))])

    def no_weight_decay(self) -> set[str]:
        # beta is the Cox fit's, whose ridge is its own
        names = {"clinical_tokens.type_embed", "surv_head.clinical.weight"}
        if self.encoder is not None:
            names |= {f"encoder.{n}" for n in self.encoder.no_weight_decay()}
        return names

    def param_groups(self, lr: float, weight_decay: float, layer_decay: float = 1.0) -> list[dict]:
        """Optimizer groups with layer-wise lr decay over the encoder (timm.optim.param_groups_layer_decay).

        As for a timm ViT, fusion and heads form the top layer (full lr), the last block and final norm
        get lr * layer_decay, and the patch embedding lr * layer_decay ** (depth + 1). Each group carries
        its final "lr" (lr * lr_scale) and its "lr_scale", so it works with a plain torch optimizer and with
        schedulers that rescale by lr_scale. 1-D parameters and no_weight_decay() names get no weight decay;
        frozen parameters are left out.
        """
        if self.encoder is None:  # one layer only: layer decay has nothing to act on
            params = [(n, p) for n, p in self.named_parameters() if p.requires_grad]
            no_decay = [p for n, p in params if p.ndim <= 1 or n in self.no_weight_decay()]
            decay = [p for n, p in params if not (p.ndim <= 1 or n in self.no_weight_decay())]
            return [{"params": ps, "lr": lr, "lr_scale": 1.0, "weight_decay": wd}
                    for ps, wd in ((decay, weight_decay), (no_decay, 0.0)) if ps]
        groups = param_groups_layer_decay(self, weight_decay=weight_decay,
                                          no_weight_decay_list=self.no_weight_decay(), layer_decay=layer_decay)
        return [{**g, "lr": lr * g["lr_scale"]} for g in groups]

    def freeze_encoder(self, linear_probe: bool = True) -> None:
        """linear_probe=True: the encoder is frozen (no grads, kept in eval mode so drop-path is off);
        only fusion and heads train. linear_probe=False: everything trains (full fine-tuning).

        With a frozen encoder and mask_channel_init="zero" the mask channel has no effect on the
        image features; use "mean" if a probe should see the mask.
        """
        self._encoder_frozen = bool(linear_probe) and self.encoder is not None
        for p in self.encoder_parameters():
            p.requires_grad = not linear_probe
        self.train(self.training)

    def hold_encoder(self, hold: bool) -> None:
        """LP-FT's probe phase. hold=True: the encoder runs in eval mode (no drop-path) and its gradients
        are replaced by zeros, so gradient clipping and Adam see the head alone; with the encoder's rate at
        0 (finetune.recipe) its weights stay exactly as they are. Unlike freeze_encoder, requires_grad is
        untouched, so a DDP-wrapped model keeps reducing the same parameters. hold=False undoes it."""
        for handle in getattr(self, "_hold_hooks", []):
            handle.remove()
        self._hold_hooks = [p.register_hook(torch.zeros_like) for p in self.encoder_parameters()
                            if p.requires_grad] if hold else []
        self._encoder_held = bool(hold) and self.encoder is not None
        self.train(self.training)

    def train(self, mode: bool = True):
        super().train(mode)
        if getattr(self, "_encoder_frozen", False) or getattr(self, "_encoder_held", False):
            self.encoder.eval()
        return self

    # ---- save / load ---------------------------------------------------------------------------

    @classmethod
    def from_pretrained_encoder(cls, config: MultimodalConfig, folder: str | Path | None) -> "MultimodalModel":
        """A fresh model whose encoder holds the pretrained ViT3D in `folder` (None: random init).

        The 1-channel patch embedding is inflated to config.encoder.in_channels (image channels, then the
        mask: models.vit3d.inflate_patch_embed); any other difference
        between the folder and config.encoder (dim, depth, heads, patch size, image size, ...) is an
        InputError naming the mismatched keys, never a silent partial load.
        """
        model = cls(config)
        if folder is None:
            return model
        if not config.uses_image:
            raise InputError(f"{folder}: fusion='clinical_only' has no image encoder; do not pass a pretrained encoder")
        pretrained = ViT3D.from_pretrained(folder)
        mine, theirs = to_dict(config.encoder), to_dict(pretrained.config)
        diff = [f"{k}: folder {theirs.get(k)!r} vs config {mine.get(k)!r}"
                for k in sorted(set(mine) | set(theirs))
                if k not in TRAINING_ONLY_KEYS and mine.get(k) != theirs.get(k)]
        if diff:
            raise InputError(f"{folder}: pretrained encoder does not match the fine-tuning encoder config: "
                             + "; ".join(diff))
        state = pretrained.state_dict()
        key = "patch_embed.weight"
        state[key] = inflate_patch_embed(state[key], config.encoder.in_channels, config.mask_channel_init,
                                         image_channels=config.encoder.in_channels - 1)
        load_state_dict_strict(model.encoder, state, f"{folder} (pretrained encoder)")
        model.encoder.input_spec = pretrained.input_spec  # what pretraining inputs looked like
        return model

    def save_pretrained(self, folder: str | Path, *, extra_config: dict, card: dict,
                        input_spec: InputSpec) -> None:
        """An HF-format folder: config.json = {"model_type", "architectures", "multimodal": MultimodalConfig,
        **extra_config}, and the input contract (input_spec.json) that predict reads.

        `card` holds model_card's keyword arguments (title, intended_use, training, metrics).
        """
        channels = ", ".join(input_spec.channels)
        use = (f"Research model: lesion crops of [{channels}] and clinical data to "
               f"{self.config.task} scores (fusion: {self.config.fusion}).")
        if self.config.segments:
            use += (f" Its segmentation head ({self.config.seg_head}, models/segmentation.py) predicts the lesion "
                    "mask from the image channels alone. It is mimfm's own decoder, not MONAI's UNETR, which fixes "
                    "16^3 patches, 12 blocks and its own decoder layout, so the folder loads with "
                    "MultimodalModel.from_pretrained (strict), not into monai.networks.nets.UNETR.")
        card = {"title": "mimfm multimodal model", "intended_use": use, **card}
        # The card lists the encoder's shape, which model_card reads from top-level keys.
        save_model_folder(folder, self, model_type=MODEL_TYPE, architecture="MultimodalModel", section="multimodal",
                          section_config=to_dict(self.config), extra_config=extra_config, card=card,
                          card_shape=to_dict(self.config.encoder), input_spec=input_spec)

    @classmethod
    def from_pretrained(cls, folder: str | Path) -> tuple["MultimodalModel", dict]:
        """Load a folder written by save_pretrained, with strict key and shape matching."""
        def build(multimodal: dict, where: str) -> "MultimodalModel":  # folders saved before survival_design: deep
            return cls(from_dict(MultimodalConfig, {"survival_design": "deep", **multimodal}, where))
        return load_model_folder(folder, model_type=MODEL_TYPE, section="multimodal", build=build)
