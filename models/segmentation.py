"""The segmentation head: a decoder from ViT3D's token grid back to voxels, and its loss.

Two decoders, both built from MONAI's blocks where MONAI has one (the default is "unetr": at 20 labelled
patients its validation Dice was 0.60 against Primus-style's 0.26, docs/EXPERIMENT_LOG.md "Segmentation"):
- "primus": nnssl Primus's light head. The final token grid [B, D, g, g, g] is upsampled by transposed
  convolutions, one stage per prime factor of the patch size, with no skip connection.
- "unetr": UNETR's decoder generalised to any patch size. Each stage (MONAI UnetrUpBlock) upsamples by its
  factor and joins a skip: the output of an intermediate transformer block, brought to that stage's
  resolution in one transposed convolution (MONAI UnetrPrUpBlock), and at full resolution the image
  itself (MONAI UnetrBasicBlock). MONAI's own UNETR fixes four x2 stages and blocks 3/6/9 of a 12-block
  ViT, so it fits only 16^3 patches and depth 12; this one takes any depth and patch size.

The segmentation pass reads the image alone: the mask channel is zeroed (models.multimodal), so the
head learns to find the lesion, not to copy the mask it is given.
"""
from __future__ import annotations

from typing import Literal

import torch
from monai.losses import DiceCELoss
from monai.networks.blocks import UnetOutBlock, UnetrBasicBlock, UnetrPrUpBlock, UnetrUpBlock
from torch import Tensor, nn

from core.errors import ConfigError
from models.vit3d import ViT3DConfig

SEG_HEADS = ("primus", "unetr")
NORM = "instance"  # nnU-Net's and UNETR's choice: batch statistics of a few 3D crops are too noisy


def upsample_factors(patch_size: int) -> list[int]:
    """The prime factors of the patch size, largest first, so the widest stride runs at the lowest
    resolution (cheapest): 16 -> [2, 2, 2, 2], 12 -> [3, 2, 2]."""
    n, factors, f = int(patch_size), [], 2
    while n > 1:
        while n % f == 0:
            factors.append(f)
            n //= f
        f += 1
    return sorted(factors, reverse=True) or [1]


def skip_blocks(depth: int, n_stages: int) -> list[int]:
    """The transformer block whose output feeds each inner stage's skip, coarsest stage first: evenly
    spaced from the top, as UNETR's 9, 6, 3 of 12 blocks for its four stages."""
    return [max(0, min(depth - 1, depth * (n_stages - k) // n_stages)) for k in range(1, n_stages)]


class SegDecoder(nn.Module):
    def __init__(self, encoder: ViT3DConfig, kind: Literal["primus", "unetr"] = "unetr", width: int = 16,
                 out_channels: int = 1):
        super().__init__()
        if kind not in SEG_HEADS:
            raise ConfigError(f"seg_head {kind!r}: expected one of {list(SEG_HEADS)}")
        self.kind, self.grid = kind, encoder.grid
        self.factors = upsample_factors(encoder.patch_size)
        k = len(self.factors)
        widths = [width * 2 ** (k - 1 - i) for i in range(k)]  # stage channels, coarsest first
        d = encoder.dim
        if kind == "primus":
            self.stages = nn.ModuleList(
                nn.Sequential(nn.ConvTranspose3d(c_in, c_out, f, stride=f), nn.InstanceNorm3d(c_out, affine=True),
                              nn.LeakyReLU(0.01, inplace=True), nn.Conv3d(c_out, c_out, 3, padding=1),
                              nn.InstanceNorm3d(c_out, affine=True), nn.LeakyReLU(0.01, inplace=True))
                for c_in, c_out, f in zip([d] + widths[:-1], widths, self.factors))
            self.skip_blocks: list[int] = []
        else:
            self.skip_blocks = skip_blocks(encoder.depth, k)
            scale = 1
            skips = []
            for i in range(k - 1):  # intermediate tokens -> stage i's resolution in one transposed conv
                scale *= self.factors[i]
                skips.append(UnetrPrUpBlock(3, d, widths[i], num_layer=0, kernel_size=3, stride=1,
                                            upsample_kernel_size=scale, norm_name=NORM, res_block=True))
            # full resolution: the image channels (every input channel but the mask, which is last)
            skips.append(UnetrBasicBlock(3, max(1, encoder.in_channels - 1), widths[-1], kernel_size=3, stride=1,
                                         norm_name=NORM, res_block=True))
            self.skips = nn.ModuleList(skips)
            self.stages = nn.ModuleList(
                UnetrUpBlock(3, c_in, c_out, kernel_size=3, upsample_kernel_size=f, norm_name=NORM, res_block=True)
                for c_in, c_out, f in zip([d] + widths[:-1], widths, self.factors))
        self.out = UnetOutBlock(3, widths[-1], out_channels)

    def to_grid(self, tokens: Tensor) -> Tensor:
        """[B, N, D] -> [B, D, g, g, g] (the patch embedding's Conv3d flatten order)."""
        b, n, d = tokens.shape
        g = round(n ** (1 / 3))
        if g ** 3 != n:
            raise ValueError(f"segmentation head: {n} tokens are not a cubic grid")
        return tokens.transpose(1, 2).reshape(b, d, g, g, g)

    def forward(self, tokens: Tensor, hidden: list[Tensor], image: Tensor) -> Tensor:
        """tokens [B, N, D] (final, normed), hidden: the outputs of blocks `skip_blocks`, image [B, C, S, S, S]
        -> logits [B, out_channels, S, S, S]."""
        h = self.to_grid(tokens)  # [B, D, g, g, g]
        if self.kind == "primus":
            for stage in self.stages:
                h = stage(h)  # [B, C_k, g * f_1..f_k, ...]
            return self.out(h)
        skips = [skip(self.to_grid(t)) for skip, t in zip(self.skips, hidden)] + [self.skips[-1](image)]
        for stage, skip in zip(self.stages, skips):
            h = stage(h, skip)  # [B, C_k, g * f_1..f_k, ...]
        return self.out(h)  # [B, out, S, S, S]


def segmentation_loss() -> nn.Module:
    """Dice + cross-entropy on one foreground logit (MONAI DiceCELoss with a sigmoid). Dice is summed over
    the batch (batch=True): a crop whose mask is nearly empty then does not dominate the mean."""
    return DiceCELoss(sigmoid=True, batch=True)


def seg_target(x: Tensor) -> Tensor:
    """The lesion mask of an [images..., mask] input x [B, C + 1, S, S, S] as the target [B, 1, S, S, S] in {0, 1}."""
    return (x[:, -1:] > 0.5).to(torch.float32)


def image_only(x: Tensor) -> Tensor:
    """x [B, C + 1, S, S, S] with the mask channel (the last) zeroed: what the segmentation pass sees."""
    return torch.cat([x[:, :-1], torch.zeros_like(x[:, -1:])], dim=1)


MASK_FEATURES = ("log_volume_fraction", "surface_to_volume", "radius_of_gyration")


def mask_shape_features(seg_logits: Tensor) -> Tensor:
    """DeepMTS's cascade, as features: what the predicted mask shows, from its soft probabilities p
    [B, 1, S, S, S] (differentiable, so the outcome loss also trains the segmentation) -> [B, 3]:
    - log of the lesion's share of the crop (size);
    - soft surface over soft volume, sum |grad p| / sum p (shape: irregular or small is high);
    - the radius of gyration of p over the crop edge (extent: how spread the lesion is)."""
    p = torch.sigmoid(seg_logits.float())[:, 0]  # [B, S, S, S]
    s = p.shape[-1]
    volume = p.flatten(1).sum(1)  # [B] voxels
    grads = [p.diff(dim=d).abs().flatten(1).sum(1) for d in (1, 2, 3)]  # 3 x [B]
    surface = torch.stack(grads).sum(0)  # [B] voxel faces
    axes = torch.arange(s, dtype=p.dtype, device=p.device)
    w = p / (volume[:, None, None, None] + 1e-6)  # [B, S, S, S], sums to 1
    spread = 0.0
    for d in (1, 2, 3):
        coord = axes.view([-1 if i == d else 1 for i in range(4)])  # broadcast along axis d
        mean = (w * coord).flatten(1).sum(1)  # [B]
        spread = spread + (w * coord ** 2).flatten(1).sum(1) - mean ** 2  # [B]
    return torch.stack([torch.log(volume / s ** 3 + 1e-4), surface / (volume + 1.0),
                        spread.clamp_min(0).sqrt() / s], dim=1)  # [B, 3]
