"""A contrastive objective inside MiM, VoCo-style: which cell of its parent is this child?

VoCo (Wu et al., 2024) learns volume features by predicting where a random crop lies among a volume's
base crops. MiM's hierarchy gives that question exactly: a child sub-volume is one cell of a lattice of
c^3-patch cells over its parent's token grid. Each child's projected pooled decoder feature is
compared (cosine over a temperature) with the pooled decoder features of every cell of its own parent,
and cross-entropy asks it to pick its own cell. The parent's cells are stop-gradient keys, as MiM's
alignment target is; the negatives are the other places of the same volume, VoCo's hard negatives.

With `MiMConfig.contrast_weight = 0` (the default) none of this runs: plain MiM.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def parent_cells(parent_tokens: Tensor, grid: int, c: int) -> tuple[Tensor, Tensor]:
    """For each child, the token indices of every c^3 cell of its parent's lattice, and which one is its own.

    parent_tokens [B_c, c^3]: the parent tokens the child covers (a lattice cell, shifted by its row's offset
    when c does not divide the grid). Returns (cells [B_c, M, c^3] long, own [B_c] long), M = (grid // c)^3.
    """
    b = parent_tokens.shape[0]
    coords = torch.stack([parent_tokens // grid**2, (parent_tokens // grid) % grid, parent_tokens % grid], -1)
    origin = coords.min(dim=1).values                 # [B_c, 3] the child's cell corner
    offset = origin % c                                # [B_c, 3] its row's lattice offset
    n = grid // c
    corners = torch.stack(torch.meshgrid(*[torch.arange(n, device=parent_tokens.device) * c] * 3,
                                         indexing="ij"), -1).reshape(-1, 3)     # [M, 3]
    local = torch.stack(torch.meshgrid(*[torch.arange(c, device=parent_tokens.device)] * 3,
                                       indexing="ij"), -1).reshape(-1, 3)       # [c^3, 3]
    cell_xyz = offset[:, None, None, :] + corners[None, :, None, :] + local[None, None, :, :]  # [B_c, M, c^3, 3]
    cells = (cell_xyz[..., 0] * grid + cell_xyz[..., 1]) * grid + cell_xyz[..., 2]            # [B_c, M, c^3]
    own = ((origin - offset) // c)                                               # [B_c, 3]
    own = (own[:, 0] * n + own[:, 1]) * n + own[:, 2]                             # [B_c]
    assert cells.shape[:2] == (b, n**3)
    return cells, own


def position_contrast_loss(query: Tensor, parent_feats: Tensor, parent_rows: Tensor, parent_tokens: Tensor,
                           grid: int, c: int, temperature: float) -> tuple[Tensor, Tensor]:
    """(loss, accuracy): cross-entropy of each child picking its own cell among its parent's cells.

    query [B_c, D]: the child's projected pooled feature; parent_feats [B_p, N, D]: the parent level's decoder
    features; parent_rows [B_c]: each child's parent row; parent_tokens [B_c, c^3].
    """
    cells, own = parent_cells(parent_tokens, grid, c)                      # [B_c, M, c^3], [B_c]
    with torch.no_grad():  # stop-gradient keys, as MiM's alignment target
        rows = parent_feats[parent_rows]                                   # [B_c, N, D]
        keys = torch.gather(rows[:, None].expand(-1, cells.shape[1], -1, -1), 2,
                            cells[..., None].expand(-1, -1, -1, rows.shape[-1])).float().mean(2)  # [B_c, M, D]
        keys = F.normalize(keys - keys.mean(dim=1, keepdim=True), dim=-1)  # centred over the parent's cells
    logits = torch.einsum("bd,bmd->bm", F.normalize(query.float(), dim=-1), keys) / temperature  # [B_c, M]
    loss = F.cross_entropy(logits, own)
    return loss, (logits.argmax(dim=1) == own).float().mean().detach()
