"""3D position embeddings: fixed sin-cos (MAE-style, one 1D embedding per axis) and trilinear resizing.

Token order everywhere is that of `Conv3d(...).flatten(2)`: depth-major, then height, then width.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

Grid = tuple[int, int, int]


def as_grid(grid: int | tuple[int, ...]) -> Grid:
    if isinstance(grid, int):
        return (grid, grid, grid)
    if len(grid) != 3:
        raise ValueError(f"a 3D token grid needs 3 sizes, got {tuple(grid)}")
    return tuple(int(g) for g in grid)  # type: ignore[return-value]


def sincos_1d(dim: int, positions: Tensor) -> Tensor:
    """MAE's 1D embedding: [sin(p * w_k), cos(p * w_k)] with w_k = 10000^(-k / (dim/2))."""
    if dim % 2:
        raise ValueError(f"1D sin-cos embedding needs an even dim, got {dim}")
    omega = torch.arange(dim // 2, dtype=torch.float64) / (dim / 2.0)
    omega = 1.0 / 10000**omega  # [dim/2]
    angles = positions.to(torch.float64)[:, None] * omega[None, :]  # [P, dim/2]
    return torch.cat([angles.sin(), angles.cos()], dim=1)  # [P, dim]


def sincos_3d(dim: int, grid: int | tuple[int, int, int]) -> Tensor:
    """Fixed 3D embedding [1, gd*gh*gw, dim] for any even dim: one MAE 1D embedding per axis.

    The d and h axes take (dim // 6) * 2 dims each and w the rest, so dim % 6 == 0 splits in three
    equal parts (the encoder's case) and any even width works (the decoder's, e.g. 128).
    """
    if dim % 2:
        raise ValueError(f"3D sin-cos position embedding needs an even dim, got {dim}")
    gd, gh, gw = as_grid(grid)
    d, h, w = torch.meshgrid(torch.arange(gd), torch.arange(gh), torch.arange(gw), indexing="ij")
    axis = (dim // 6) * 2
    parts = [sincos_1d(n, a.flatten()) for n, a in ((axis, d), (axis, h), (dim - 2 * axis, w))]
    return torch.cat(parts, dim=1).float()[None]  # [1, N, dim]


def resize_pos_embed(pos_embed: Tensor, old_grid: int | tuple[int, int, int],
                     new_grid: int | tuple[int, int, int]) -> Tensor:
    """Trilinearly resample a grid embedding [1, N_old, D] to [1, N_new, D] (align_corners=False, as timm)."""
    old_grid, new_grid = as_grid(old_grid), as_grid(new_grid)
    if old_grid == new_grid:
        return pos_embed
    n, dim = pos_embed.shape[1], pos_embed.shape[2]
    if n != old_grid[0] * old_grid[1] * old_grid[2]:
        raise ValueError(f"position embedding has {n} tokens, not the {old_grid} grid's")
    vol = pos_embed.reshape(1, *old_grid, dim).permute(0, 4, 1, 2, 3)  # [1, D, gd, gh, gw]
    # Interpolate in float32 at least: bf16 trilinear is coarse and not implemented everywhere.
    vol = F.interpolate(vol.float(), size=new_grid, mode="trilinear", align_corners=False).to(pos_embed.dtype)
    return vol.flatten(2).transpose(1, 2)  # [1, N_new, D]
