"""MiM's hierarchical masks: which sub-volume each level sees, and which of its patches are masked.

Level 1 sees the whole crop. Level l+1 sees K sub-volumes per level-l sample, each a cube of c^3
patches that was *masked* at level l ("masks inside masks"), cut again from the original crop (finer
scale, not a resize of the resized parent) and resized to the encoder input. Boxes are kept exactly,
in voxels of the level-1 crop, so tests can prove the nesting.

With levels=1 this is MAE's `random_masking`: the same draw of noise gives the same mask.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from core.errors import ConfigError, InputError


@dataclass
class MaskConfig:
    """MiM's hierarchical masking (built by `build_hierarchy`); part of `models.mim.MiMConfig`."""
    levels: int = 3          # L: masked levels (1 = plain MAE)
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


@dataclass
class Level:
    """One level's masked inputs; `models.mim.MiMModel` reads x, visible_idx, parent and parent_tokens."""
    x: Tensor                     # [B_l, C, I, I, I] encoder input
    mask: Tensor                  # [B_l, N] bool, True = masked
    visible_idx: Tensor           # [B_l, N_vis] long, ascending
    masked_idx: Tensor            # [B_l, N_mask] long, ascending
    boxes: Tensor                 # [B_l, 2, 3] float64: (start, size) in level-1 crop voxels, (d, h, w)
    root: Tensor                  # [B_l] long: the row of `crops` this sample was cut from
    parent: Tensor | None = None          # [B_l] long: row of the previous level (None at level 1)
    parent_tokens: Tensor | None = None   # [B_l, c^3] long: parent-grid tokens this child covers
    anchor: Tensor | None = None          # [B_l, 3] float64: lesion centre in level-1 crop voxels (NaN: none)
    target: Tensor | None = None          # [B_l, N, C p^3] float32: the loss target (models.mim.patch_targets),
    #                                       set with the levels (pretrain.batches.LevelBuilder);
    #                                       None = computed in the loss

    def to(self, device, non_blocking: bool = False) -> "Level":
        """The same level on `device` (for levels built on the CPU, e.g. held-out batches kept ready)."""
        moved = {k: v.to(device, non_blocking=non_blocking) if torch.is_tensor(v) else v
                 for k, v in self.__dict__.items()}
        return Level(**moved)


def _rand(shape: tuple[int, ...], gen: torch.Generator, device) -> Tensor:
    # Draw on the generator's device so one seeded generator gives the same masks for CPU or GPU data.
    return torch.rand(shape, generator=gen, device=gen.device).to(device)


def random_mask(forced: Tensor, n_mask: int, gen: torch.Generator) -> tuple[Tensor, Tensor, Tensor]:
    """MAE's random_masking with some patches forced to be masked.

    forced [R, N] bool. Returns mask [R, N] bool, visible_idx [R, N - n_mask], masked_idx [R, n_mask].
    """
    r, n = forced.shape
    noise = _rand((r, n), gen, forced.device)  # [R, N] in [0, 1)
    noise = noise.masked_fill(forced, 2.0)     # forced patches sort last, i.e. into the masked set
    ids_shuffle = torch.argsort(noise, dim=1)  # [R, N]
    visible_idx = ids_shuffle[:, : n - n_mask].sort(dim=1).values  # [R, N_vis]
    masked_idx = ids_shuffle[:, n - n_mask:].sort(dim=1).values    # [R, N_mask]
    mask = torch.ones(r, n, dtype=torch.bool, device=forced.device)
    mask.scatter_(1, visible_idx, False)  # [R, N]
    return mask, visible_idx, masked_idx


def choose_cubes(rows: int, grid: int, c: int, k: int, gen: torch.Generator, device,
                 anchor: Tensor | None = None) -> Tensor:
    """K non-overlapping c^3 cubes per row, as origins [R, K, 3] (d, h, w) in patch units.

    Cubes sit on a lattice of c-aligned cells (shifted by a random per-row offset when c does not
    divide the grid): distinct cells never overlap, so no rejection sampling and no dead ends.
    `anchor` [R, 3] (patch units, NaN = none): the first cube of an anchored row is the cell that
    holds the anchor (the lesion), so the next level sees it; the draws are the same either way.
    """
    cells = grid // c
    noise = _rand((rows, cells**3), gen, device)  # [R, cells^3]
    slack = grid - cells * c
    offset = (_rand((rows, 1, 3), gen, device) * (slack + 1)).long().clamp(max=slack)  # [R, 1, 3]
    if anchor is not None:
        held = torch.isfinite(anchor).all(dim=1)                                         # [R]
        cell_of = ((anchor.nan_to_num(0).floor().long() - offset[:, 0]) // c).clamp(0, cells - 1)  # [R, 3]
        flat = (cell_of[:, 0] * cells + cell_of[:, 1]) * cells + cell_of[:, 2]           # [R]
        rows_held = torch.nonzero(held).flatten()
        noise[rows_held, flat[rows_held]] = -1.0  # sorts first: the anchored cell is cube 0
    pick = torch.argsort(noise, dim=1)[:, :k]  # [R, K] distinct cells
    cell = torch.stack([pick // cells**2, (pick // cells) % cells, pick % cells], dim=-1)  # [R, K, 3]
    return cell * c + offset  # [R, K, 3]


def cube_tokens(origins: Tensor, grid: int, c: int) -> Tensor:
    """Row-major token indices [R, K, c^3] of the cubes with origins [R, K, 3]."""
    a = torch.arange(c, device=origins.device)
    within = torch.stack(torch.meshgrid(a, a, a, indexing="ij"), dim=-1).reshape(-1, 3)  # [c^3, 3]
    dhw = origins[:, :, None, :] + within  # [R, K, c^3, 3]
    return (dhw[..., 0] * grid + dhw[..., 1]) * grid + dhw[..., 2]  # [R, K, c^3]


def _axis_taps(start: Tensor, size: Tensor, n_in: int, n_out: int, dtype) -> tuple[Tensor, Tensor, Tensor]:
    """Linear-interpolation taps that reproduce F.interpolate(align_corners=False) of the region
    [start, start + size) of an axis of n_in voxels, onto n_out samples; edges clamp inside the region.

    start, size [R] float64. Returns i0, i1 [R, n_out] long and w1 [R, n_out].
    """
    j = torch.arange(n_out, device=start.device, dtype=torch.float64) + 0.5  # [n_out]
    u = start[:, None] + j * (size[:, None] / n_out) - 0.5  # [R, n_out] sample centres, voxel-index coords
    u = torch.maximum(u, start[:, None])                    # region's first voxel
    u = torch.minimum(u, (start + size - 1)[:, None])       # region's last voxel
    u = u.clamp(0, n_in - 1)
    i0 = u.floor()
    w1 = (u - i0).to(dtype)                                 # [R, n_out]
    i0 = i0.long()
    return i0, (i0 + 1).clamp(max=n_in - 1), w1


def cut_and_resize(crops: Tensor, root: Tensor, boxes: Tensor, size: int) -> Tensor:
    """Trilinear resize of box `boxes[r]` of `crops[root[r]]` to size^3: [R, C, size, size, size].

    Equal to F.interpolate(crop[:, d0:d1, h0:h1, w0:w1], size, mode="trilinear", align_corners=False)
    for integer boxes, done separably for all rows at once (no per-box loop).
    """
    start, extent = boxes[:, 0], boxes[:, 1]  # [R, 3] each
    spatial_f = torch.tensor(crops.shape[2:], dtype=boxes.dtype, device=boxes.device)
    if bool((start == 0).all()) and bool((extent == spatial_f).all()):
        # Whole crops (level 1): the library kernel is the same arithmetic and ~10x faster on CPU.
        return F.interpolate(crops[root], size=(size,) * 3, mode="trilinear", align_corners=False)
    # First gather a fixed-length window of whole voxels around each box, so the interpolation passes
    # touch only the box, not the whole crop (children are small and many). One host sync per call.
    spatial = torch.tensor(crops.shape[2:], device=crops.device)                         # [3]
    span = torch.minimum(extent.max(dim=0).values.ceil().long() + 1, spatial)            # [3]
    lo = torch.minimum(start.floor().long(), spatial - span).clamp(min=0)                # [R, 3]
    idx = [lo[:, a, None] + torch.arange(n, device=crops.device) for a, n in enumerate(span.tolist())]
    t = crops[root[:, None, None, None], :, idx[0][:, :, None, None], idx[1][:, None, :, None],
              idx[2][:, None, None, :]]  # [R, sd, sh, sw, C]
    t = t.permute(0, 4, 1, 2, 3)       # [R, C, sd, sh, sw]
    start = start - lo                 # [R, 3] box start inside its window
    rows = torch.arange(root.shape[0], device=crops.device)[:, None]  # [R, 1]
    for axis in (2, 1, 0):  # w, then h, then d
        i0, i1, w1 = _axis_taps(start[:, axis], extent[:, axis], t.shape[-1], size, crops.dtype)
        # Indexing rows and the last axis moves the new axis to dim 1:
        # [R, C, sd, sh, sw] -> [R, I, C, sd, sh] -> [R, I, I, C, sd] -> [R, I, I, I, C]
        w1 = w1[:, :, None, None, None]  # [R, I, 1, 1, 1]
        t = t[rows, ..., i0] * (1 - w1) + t[rows, ..., i1] * w1
    return t.permute(0, 4, 1, 2, 3).contiguous()  # [R, C, I(d), I(h), I(w)]


def build_hierarchy(crops: Tensor, cfg: MaskConfig, patch_size: int, img_size: int,
                    generator: torch.Generator, anchors: Tensor | None = None) -> list[Level]:
    """Masked inputs for every level from level-1 crops [B, C, D, H, W] (voxels, any size >= 1 per box).

    Level l has B * K^(l-1) rows; the children of row b are rows b*K .. b*K + K - 1 of the next level.
    `anchors` [B, 3] (level-1 crop voxels, NaN = none), e.g. lesion centres: an anchored row's first
    child is the lattice cell holding its anchor, and that child carries the anchor on to its own
    first child, so every level has a sub-volume on the lesion.
    """
    if crops.ndim != 5:
        raise InputError(f"build_hierarchy: crops must be [B, C, D, H, W], got shape {tuple(crops.shape)}")
    if img_size % patch_size:
        raise ConfigError(f"encoder img_size {img_size} is not a multiple of patch_size {patch_size}")
    grid = img_size // patch_size
    n, c, k = grid**3, cfg.child_patches, cfg.children
    check_fits(cfg, grid)
    smallest = min(crops.shape[2:]) * (c / grid) ** (cfg.levels - 1)
    if smallest < 1:
        raise InputError(f"build_hierarchy: a {tuple(crops.shape[2:])} crop is too small for {cfg.levels} "
                         f"levels: the finest boxes would be {smallest:.3g} voxels wide")

    device, b = crops.device, crops.shape[0]
    boxes = torch.zeros(b, 2, 3, dtype=torch.float64, device=device)  # [B, 2, 3]
    boxes[:, 1] = torch.tensor(crops.shape[2:], dtype=torch.float64, device=device)
    root = torch.arange(b, device=device)  # [B]
    anchor = torch.full((b, 3), float("nan"), dtype=torch.float64, device=device) if anchors is None \
        else anchors.to(device=device, dtype=torch.float64).reshape(b, 3)  # [B, 3] level-1 crop voxels
    parent = parent_tokens = None
    levels = []
    for lvl, ratio in enumerate(cfg.ratios(), start=1):
        rows = root.shape[0]
        x = cut_and_resize(crops, root, boxes, img_size)  # [B_l, C, I, I, I]
        forced = torch.zeros(rows, n, dtype=torch.bool, device=device)  # [B_l, N]
        last = lvl == cfg.levels
        patch_vox = boxes[:, 1] / grid                                   # [B_l, 3]
        if not last:
            local = (anchor - boxes[:, 0]) / patch_vox                   # [B_l, 3] anchor in patch units
            inside = ((local >= 0) & (local < grid)).all(dim=1, keepdim=True)
            local = torch.where(inside, local, torch.full_like(local, float("nan")))
            anchor = torch.where(inside, anchor, torch.full_like(anchor, float("nan")))  # none outside the box
            origins = choose_cubes(rows, grid, c, k, generator, device, local)  # [B_l, K, 3]
            tokens = cube_tokens(origins, grid, c)                       # [B_l, K, c^3]
            forced.scatter_(1, tokens.reshape(rows, -1), True)
        mask, visible_idx, masked_idx = random_mask(forced, masked_count(ratio, n), generator)
        levels.append(Level(x, mask, visible_idx, masked_idx, boxes, root, parent, parent_tokens, anchor))
        if last:
            break
        # Children: box = the parent's box restricted to the cube, in level-1 crop voxels.
        start = boxes[:, None, 0] + origins * patch_vox[:, None]              # [B_l, K, 3]
        size = (c * patch_vox)[:, None].expand(rows, k, 3)                    # [B_l, K, 3]
        boxes = torch.stack([start, size], dim=2).reshape(rows * k, 2, 3)     # [B_l*K, 2, 3]
        parent = torch.arange(rows, device=device).repeat_interleave(k)       # [B_l*K]
        root = root[parent]                                                   # [B_l*K]
        parent_tokens = tokens.reshape(rows * k, c**3)                        # [B_l*K, c^3]
        # The anchored cube is cube 0; it holds the anchor unless the anchor fell in the lattice's slack.
        first = torch.arange(rows * k, device=device) % k == 0                # [B_l*K]
        held = first & ((anchor[parent] >= start.reshape(-1, 3)) & (anchor[parent] < (start + size).reshape(-1, 3))).all(1)
        anchor = torch.where(held[:, None], anchor[parent], torch.full_like(anchor[parent], float("nan")))
    return levels
