"""ViT3D: a plain Vision Transformer on 3D volumes, built from timm's Block.

Cubic patches are embedded by a strided Conv3d; tokens are ordered depth-major (as `flatten(2)` gives).
There is no class token: pretraining (MAE/MiM) and the fine-tuning heads pool the patch tokens.
The encoder can run on a subset of tokens (`visible_idx`) and take extra tokens (clinical fusion).
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from timm.models.vision_transformer import Block
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from core.config import from_dict, to_dict
from core.errors import ConfigError, InputError
from models.hf import load_hf_folder, load_state_dict_strict, model_card, save_hf_folder
from models.input_spec import InputSpec, load_input_spec
from models.pos_embed import resize_pos_embed, sincos_3d

MODEL_TYPE = "mimfm_vit3d"


@dataclass
class ViT3DConfig:
    in_channels: int = 1     # input channels (1: image; 2 for fine-tuning: image and lesion mask)
    img_size: int = 64  # cubic input edge in voxels
    patch_size: int = 16     # cubic patch edge in voxels; img_size / patch_size is the token grid
    dim: int = 192           # token width (divisible by 6 for the sin-cos embedding)
    depth: int = 12          # transformer blocks
    heads: int = 3           # attention heads
    mlp_ratio: float = 4.0   # MLP hidden width / dim
    drop_path: float = 0.0   # stochastic depth rate of the last block (linear from 0)
    pos_embed: Literal["sincos", "learned"] = "sincos"  # sincos: fixed, not trained
    grad_checkpointing: bool = False  # recompute block activations in backward (less memory, slower)

    def __post_init__(self):
        if self.pos_embed not in ("sincos", "learned"):
            raise ConfigError(f"pos_embed: {self.pos_embed!r} is not 'sincos' or 'learned'")
        if self.patch_size < 1 or self.img_size % self.patch_size:
            raise ConfigError(f"img_size {self.img_size} is not a multiple of patch_size {self.patch_size}")
        if self.heads < 1 or self.dim % self.heads:
            raise ConfigError(f"dim {self.dim} is not divisible by heads {self.heads}")
        if self.pos_embed == "sincos" and self.dim % 6:
            raise ConfigError(f"pos_embed 'sincos' needs dim divisible by 6, got {self.dim}; use 'learned'")
        if self.in_channels < 1 or self.depth < 1:
            raise ConfigError("in_channels and depth must be positive")

    @property
    def hidden_size(self) -> int:
        return self.dim

    @property
    def grid(self) -> int:
        return self.img_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid**3


PRESETS: dict[str, ViT3DConfig] = {
    "small": ViT3DConfig(dim=384, depth=12, heads=6, img_size=96, patch_size=16),
    "base": ViT3DConfig(dim=768, depth=12, heads=12, img_size=96, patch_size=16),
    # 1024 is not divisible by 6, so ViT-L cannot take the 3-axis sin-cos embedding.
    "large": ViT3DConfig(dim=1024, depth=24, heads=16, img_size=96, patch_size=16, pos_embed="learned"),
}


def vit3d_config(preset: str, **overrides) -> ViT3DConfig:
    if preset not in PRESETS:
        raise ConfigError(f"unknown ViT3D preset {preset!r}; known: {sorted(PRESETS)}")
    return dataclasses.replace(PRESETS[preset], **overrides)


# Keys that config.json carries besides the ViT3DConfig fields.
_META_KEYS = ("model_type", "architectures", "mimfm_version", "hidden_size", "torch_dtype")


def vit3d_config_from_dict(d: dict, where: str = "config") -> ViT3DConfig:
    """ViT3DConfig from a saved dict (encoder_config.json or an HF config.json); unknown keys are an error."""
    if d.get("model_type", MODEL_TYPE) != MODEL_TYPE:
        raise InputError(f"{where}: model_type is {d['model_type']!r}, expected {MODEL_TYPE!r}")
    return from_dict(ViT3DConfig, {k: v for k, v in d.items() if k not in _META_KEYS}, where)


def patchify(x: Tensor, p: int) -> Tensor:
    """[B, C, D, H, W] -> [B, N, C p^3]: tokens in Conv3d's flatten order (d, then h, then w), each patch
    laid out (C, pd, ph, pw) as the patch embedding's Conv3d weight is. The one patch layout of mimfm."""
    b, c, *spatial = x.shape
    if len(spatial) != 3 or any(s % p for s in spatial):
        raise InputError(f"patchify: need a [B, C, D, H, W] volume with sides divisible by {p}, got {tuple(x.shape)}")
    gd, gh, gw = (s // p for s in spatial)
    x = x.reshape(b, c, gd, p, gh, p, gw, p).permute(0, 2, 4, 6, 1, 3, 5, 7)  # [B, gd, gh, gw, C, p, p, p]
    return x.reshape(b, gd * gh * gw, c * p**3)  # [B, N, C p^3]


def visible_patches(x: Tensor, p: int, visible_idx: Tensor) -> Tensor:
    """patchify(x, p) at visible_idx [B, N_vis] only: [B, N_vis, C p^3], without copying the other patches."""
    b, c, *spatial = x.shape
    gd, gh, gw = (s // p for s in spatial)
    grid = x.reshape(b, c, gd, p, gh, p, gw, p).permute(0, 2, 4, 6, 1, 3, 5, 7)  # [B, gd, gh, gw, C, p, p, p] view
    d, h, w = visible_idx // (gh * gw), (visible_idx // gw) % gh, visible_idx % gw  # [B, N_vis] each
    rows = torch.arange(b, device=x.device)[:, None]                               # [B, 1]
    return grid[rows, d, h, w].reshape(b, visible_idx.shape[1], c * p**3)          # [B, N_vis, C p^3]


def unpatchify(patches: Tensor, p: int) -> Tensor:
    """[B, N, C p^3] -> [B, C, S, S, S] for a cubic grid; the exact inverse of `patchify`."""
    b, n, dim = patches.shape
    g = round(n ** (1 / 3))
    if g**3 != n or dim % p**3:
        raise InputError(f"unpatchify: {n} tokens of {dim} values are not a cubic grid of {p}^3 patches")
    c = dim // p**3
    x = patches.reshape(b, g, g, g, c, p, p, p).permute(0, 4, 1, 5, 2, 6, 3, 7)  # [B, C, g, p, g, p, g, p]
    return x.reshape(b, c, g * p, g * p, g * p)  # [B, C, S, S, S]


class ViT3D(nn.Module):
    def __init__(self, config: ViT3DConfig):
        super().__init__()
        self.config = config
        c = config
        self.patch_embed = nn.Conv3d(c.in_channels, c.dim, kernel_size=c.patch_size, stride=c.patch_size)
        if c.pos_embed == "sincos":
            # A frozen Parameter (as MAE and MONAI do) so it is saved, exported and moved with the model.
            self.pos_embed = nn.Parameter(sincos_3d(c.dim, c.grid), requires_grad=False)  # [1, N, D]
        else:
            self.pos_embed = nn.Parameter(torch.zeros(1, c.num_patches, c.dim))  # [1, N, D]
            nn.init.trunc_normal_(self.pos_embed, std=0.02)
        drop_rates = torch.linspace(0, c.drop_path, c.depth).tolist()
        self.blocks = nn.ModuleList([
            # nn.LayerNorm (eps 1e-5) rather than timm's default 1e-6, so MONAI's ViT computes the same.
            Block(c.dim, c.heads, c.mlp_ratio, qkv_bias=True, drop_path=r, norm_layer=nn.LayerNorm)
            for r in drop_rates
        ])
        self.norm = nn.LayerNorm(c.dim)
        self.grad_checkpointing = c.grad_checkpointing
        self.input_spec: InputSpec | None = None  # what the inputs must look like; travels with save/load
        self._init_weights()

    def _init_weights(self):
        # Module by module through `apply` (as timm's VisionTransformer and HF's `_init_weights`), which
        # DeepSpeed's zero.Init wraps to gather each module's weights while it is initialised: there a
        # child's weights are already empty placeholders when this parent's __init__ runs. apply visits
        # patch_embed first, then the blocks' Linear layers in the order `modules()` lists them, so the
        # draws (and the weights, for one seed) are those of a loop over the parameters.
        self.apply(self._init_module)

    def _init_module(self, m: nn.Module) -> None:
        if m is self.patch_embed:  # MAE: initialised like a Linear layer on the flattened patch
            nn.init.xavier_uniform_(m.weight.view(m.weight.shape[0], -1))  # [D, C p^3]
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):  # every Linear of ViT3D is in its blocks
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)

    # --- forward -----------------------------------------------------------------------------------------

    def embed(self, x: Tensor, visible_idx: Tensor | None = None) -> Tensor:
        """Patch tokens plus position embedding [B, N, D], resampled when the input is not img_size;
        with visible_idx [B, N_vis] only those tokens, [B, N_vis, D] (the masked ones are never embedded)."""
        c = self.config
        if x.ndim != 5 or x.shape[1] != c.in_channels:
            raise InputError(f"ViT3D expects [B, {c.in_channels}, D, H, W], got {tuple(x.shape)}")
        if min(x.shape[2:]) < c.patch_size:
            raise InputError(f"input {tuple(x.shape[2:])} is smaller than one {c.patch_size}^3 patch")
        # The Conv3d (kernel = stride = patch) is computed as one matmul over non-overlapping patches:
        # identical values, but its weight gradient is a GEMM instead of the strided-conv backward, the
        # slowest op of a CPU step (docs/BENCHMARKS.md). The Conv3d module keeps the weights, so
        # checkpoints and the MONAI export read them where they always were.
        p = c.patch_size
        grid = tuple(s // p for s in x.shape[2:])
        x = x[:, :, :grid[0] * p, :grid[1] * p, :grid[2] * p]  # Conv3d drops a remainder the same way
        pos = resize_pos_embed(self.pos_embed, c.grid, grid)  # [1, N, D]
        if visible_idx is None:
            x = patchify(x, p)  # [B, N, C p^3], token order = Conv3d flatten order
        else:
            # Only the visible patches are copied out and embedded: with MAE's 75% masking this is a
            # quarter of the patchify copy and of the embedding GEMM, forward and backward.
            x, pos = visible_patches(x, p, visible_idx), pos[0, visible_idx]  # [B, N_vis, C p^3], [B, N_vis, D]
        w = self.patch_embed.weight.reshape(self.patch_embed.weight.shape[0], -1)  # [D, C p^3]
        x = F.linear(x, w, self.patch_embed.bias)  # [B, N(_vis), D]
        return x + pos  # [B, N(_vis), D]

    def _tokens(self, x: Tensor, visible_idx: Tensor | None, extra_tokens: Tensor | None) -> Tensor:
        tokens = self.embed(x, visible_idx)  # [B, N_vis, D]
        if extra_tokens is not None:
            if extra_tokens.ndim != 3 or extra_tokens.shape[0] != tokens.shape[0] \
                    or extra_tokens.shape[2] != tokens.shape[2]:
                raise InputError(f"extra_tokens must be [B={tokens.shape[0]}, T, D={tokens.shape[2]}], "
                                 f"got {tuple(extra_tokens.shape)}")
            tokens = torch.cat([tokens, extra_tokens.to(tokens.dtype)], dim=1)  # [B, N_vis + T, D]
        return tokens

    def forward(self, x: Tensor, visible_idx: Tensor | None = None, extra_tokens: Tensor | None = None) -> Tensor:
        """x [B, C, D, H, W] -> normed tokens [B, N_vis (+T), D]; extra tokens come back last."""
        return self.forward_hidden(x, (), visible_idx, extra_tokens)[0]

    def forward_hidden(self, x: Tensor, keep: tuple[int, ...], visible_idx: Tensor | None = None,
                       extra_tokens: Tensor | None = None) -> tuple[Tensor, list[Tensor]]:
        """forward's normed tokens, plus the (un-normed) output [B, N, D] of each block index in `keep`,
        in that order: the intermediate features a UNETR-style decoder takes as skips."""
        tokens = self._tokens(x, visible_idx, extra_tokens)
        hidden = {}
        for i, blk in enumerate(self.blocks):
            if self.grad_checkpointing and torch.is_grad_enabled():
                tokens = checkpoint(blk, tokens, use_reentrant=False)
            else:
                tokens = blk(tokens)
            if i in keep:
                hidden[i] = tokens
        return self.norm(tokens), [hidden[i] for i in keep]

    def forward_with_attention(self, x: Tensor, extra_tokens: Tensor | None = None) -> tuple[Tensor, list[Tensor]]:
        """Same output as forward, on the explicit softmax(q k^T) path, plus every block's [B, heads, N, N] map."""
        tokens = self._tokens(x, None, extra_tokens)  # [B, N, D]
        maps = []
        for blk in self.blocks:
            attn_out, attn = _explicit_attention(blk.attn, blk.norm1(tokens))
            maps.append(attn)
            tokens = tokens + blk.drop_path1(blk.ls1(attn_out))
            tokens = tokens + blk.drop_path2(blk.ls2(blk.mlp(blk.norm2(tokens))))
        return self.norm(tokens), maps

    def attention_maps(self, x: Tensor, extra_tokens: Tensor | None = None) -> list[Tensor]:
        """Per block [B, heads, N, N] attention probabilities (for attention rollout)."""
        return self.forward_with_attention(x, extra_tokens)[1]

    # --- training hooks (timm conventions) -------------------------------------------------------------

    def group_matcher(self, coarse: bool = False) -> dict:
        return dict(
            stem=r"^pos_embed|patch_embed",
            blocks=r"^blocks\.(\d+)" if coarse else [(r"^blocks\.(\d+)", None), (r"^norm", (99999,))],
        )

    def no_weight_decay(self) -> set[str]:
        return {"pos_embed"}

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    # --- HF-format folders -----------------------------------------------------------------------------

    def hf_config(self) -> dict:
        return {"model_type": MODEL_TYPE, "architectures": ["ViT3D"], **to_dict(self.config),
                "hidden_size": self.config.hidden_size}

    def save_pretrained(self, folder: str | os.PathLike, *, input_spec: InputSpec | None = None,
                        card: dict | None = None, max_shard_size: int | str = "2GB") -> None:
        """Write an HF-format folder with the input contract (`input_spec`, else the model's own);
        `card` holds model_card's keyword arguments (title, training, metrics...)."""
        config = self.hf_config()
        spec = input_spec if input_spec is not None else self.input_spec
        card = {"title": "mimfm ViT3D encoder",
                "intended_use": "Research feature extractor for 3D medical volumes (CT/MRI), pretrained "
                                "self-supervised with MiM-style masked image modelling; fine-tune it for a task.",
                "training": {}, "metrics": {}, **(card or {})}
        save_hf_folder(folder, self.state_dict(), config, model_card(config, input_spec=spec, **card),
                       max_shard_size, input_spec=spec)

    @classmethod
    def from_pretrained(cls, folder: str | os.PathLike, *, in_channels: int | None = None,
                        inflate: str = "zero") -> "ViT3D":
        """Load strictly; with `in_channels` above the saved count, the patch embedding is inflated
        (see inflate_patch_embed; `inflate` is "zero" or "mean")."""
        config, state_dict = load_hf_folder(folder)
        saved = vit3d_config_from_dict(config, where=f"{folder}/config.json")
        model = cls(saved)
        load_state_dict_strict(model, state_dict, what=str(folder))
        if in_channels is not None and in_channels != saved.in_channels:
            state_dict = dict(state_dict)
            state_dict["patch_embed.weight"] = inflate_patch_embed(state_dict["patch_embed.weight"], in_channels,
                                                                   inflate)
            model = cls(dataclasses.replace(saved, in_channels=in_channels))
            model.load_state_dict(state_dict, strict=True)
        model.input_spec = load_input_spec(folder, required=False)
        return model


def _explicit_attention(attn: nn.Module, x: Tensor) -> tuple[Tensor, Tensor]:
    """timm Attention on its own weights, with the probabilities kept: (output [B, N, D], attn [B, h, N, N])."""
    if getattr(attn, "gate", None) is not None:
        raise NotImplementedError("gated attention has no explicit path here")
    B, N, _ = x.shape
    qkv = attn.qkv(x).reshape(B, N, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)  # [B, h, N, hd] each
    q, k = attn.q_norm(q), attn.k_norm(k)
    probs = ((q * attn.scale) @ k.transpose(-2, -1)).softmax(dim=-1)  # [B, h, N, N]
    out = attn.attn_drop(probs) @ v  # [B, h, N, hd]
    out = out.transpose(1, 2).reshape(B, N, attn.attn_dim)  # [B, N, D]
    out = attn.proj_drop(attn.proj(attn.norm(out)))
    return out, probs


def inflate_patch_embed(weight: Tensor, in_channels: int, mode: str = "zero", image_channels: int | None = None) -> Tensor:
    """[D, C_old, p, p, p] -> [D, in_channels, p, p, p]; the pretrained kernels stay as channels 0..C_old-1.

    New channels (e.g. the lesion mask) are zeros ("zero": the inflated encoder computes exactly what the
    pretrained one did on the original channels) or the mean of the old kernels ("mean").

    A 1-channel kernel pretrained on several sequences, one at a time, and `image_channels` > 1 images:
    each image channel gets the kernel / image_channels (I3D's inflation rule), so a volume repeated in
    every channel embeds exactly as pretraining embedded it, and fine-tuning tells the channels apart.
    """
    d, c_old, *kernel = weight.shape
    if in_channels < c_old:
        raise ConfigError(f"cannot shrink the patch embedding from {c_old} to {in_channels} channels")
    if mode not in ("zero", "mean"):
        raise ConfigError(f"inflate mode {mode!r} is not 'zero' or 'mean'")
    weight = weight.detach()
    extra = torch.zeros_like(weight[:, :1]) if mode == "zero" else weight.mean(1, keepdim=True)  # [D, 1, p, p, p]
    if image_channels and image_channels > c_old:
        if c_old != 1 or image_channels > in_channels:
            raise ConfigError(f"cannot spread a {c_old}-channel patch embedding over {image_channels} image channels")
        weight = (weight / image_channels).expand(d, image_channels, *kernel)  # [D, C_img, p, p, p]
        c_old = image_channels
    return torch.cat([weight, extra.expand(d, in_channels - c_old, *kernel)], dim=1)  # [D, in_channels, p, p, p]
