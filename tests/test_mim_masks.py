"""MiM hierarchical mask geometry, checked in voxel space against independent computations."""
import itertools

import pytest
import torch
import torch.nn.functional as F

from core.config import from_dict
from core.errors import ConfigError, InputError
from models.mim_masks import MaskConfig, build_hierarchy, cut_and_resize

# (crop edge S, encoder img_size I, patch p, children K, child_patches c, ratios)
GEOMETRIES = [
    (32, 16, 4, 2, 2, (0.75, 0.75, 0.75)),   # g=4: boxes 32 -> 16 -> 8 voxels
    (50, 20, 4, 3, 2, (0.8, 0.6, 0.5)),      # g=5: boxes 50 -> 20 -> 8; cube lattice shifted at random
]


def make_levels(S, I, p, K, c, ratios, batch=3, seed=0):
    crops = torch.randn(batch, 1, S, S, S, generator=torch.Generator().manual_seed(100 + seed))
    cfg = MaskConfig(levels=len(ratios), mask_ratio=ratios, children=K, child_patches=c)
    return crops, build_hierarchy(crops, cfg, p, I, torch.Generator().manual_seed(seed))


def box_overlap(a, b):
    """Volume of the intersection of two (start, size) boxes [2, 3]."""
    lo = torch.maximum(a[0], b[0])
    hi = torch.minimum(a[0] + a[1], b[0] + b[1])
    return (hi - lo).clamp(min=0).prod().item()


def patch_boxes(box, g):
    """The g^3 patch boxes [N, 2, 3] of a level's box, in row-major (d, h, w) order."""
    size = box[1] / g
    out = []
    for d, h, w in itertools.product(range(g), repeat=3):
        out.append(torch.stack([box[0] + torch.tensor([d, h, w], dtype=box.dtype) * size, size]))
    return torch.stack(out)


@pytest.mark.parametrize("S,I,p,K,c,ratios", GEOMETRIES)
def test_mask_counts_are_exact_per_row(S, I, p, K, c, ratios):
    _, levels = make_levels(S, I, p, K, c, ratios)
    n = (I // p) ** 3
    assert [lvl.x.shape[0] for lvl in levels] == [3 * K**i for i in range(len(ratios))]
    for lvl, r in zip(levels, ratios):
        n_mask = round(r * n)
        assert lvl.x.shape[1:] == (1, I, I, I)
        assert (lvl.mask.sum(1) == n_mask).all()
        assert lvl.visible_idx.shape[1] == n - n_mask and lvl.masked_idx.shape[1] == n_mask
        for row in range(lvl.mask.shape[0]):
            assert not lvl.mask[row, lvl.visible_idx[row]].any()
            assert lvl.mask[row, lvl.masked_idx[row]].all()
            assert sorted(lvl.visible_idx[row].tolist() + lvl.masked_idx[row].tolist()) == list(range(n))


@pytest.mark.parametrize("S,I,p,K,c,ratios", GEOMETRIES)
def test_child_box_lies_in_parents_masked_patches(S, I, p, K, c, ratios):
    _, levels = make_levels(S, I, p, K, c, ratios)
    g = I // p
    for prev, lvl in zip(levels, levels[1:]):
        for i in range(lvl.x.shape[0]):
            child, par = lvl.boxes[i], int(lvl.parent[i])
            patches = patch_boxes(prev.boxes[par], g)  # [N, 2, 3]
            inter = torch.tensor([box_overlap(child, pb) for pb in patches])  # [N]
            child_vol = child[1].prod().item()
            assert child_vol > 0
            assert box_overlap(child, prev.boxes[par]) == pytest.approx(child_vol)
            # Patches are disjoint: the child is inside the masked union iff masked overlaps sum to its volume.
            assert inter[prev.mask[par]].sum().item() == pytest.approx(child_vol)
            assert set(torch.nonzero(inter > 1e-9).flatten().tolist()) == set(lvl.parent_tokens[i].tolist())
            assert torch.allclose(child[1], prev.boxes[par][1] * c / g)


@pytest.mark.parametrize("S,I,p,K,c,ratios", GEOMETRIES)
def test_children_of_one_parent_do_not_overlap(S, I, p, K, c, ratios):
    _, levels = make_levels(S, I, p, K, c, ratios)
    for lvl in levels[1:]:
        for par in lvl.parent.unique():
            kids = torch.nonzero(lvl.parent == par).flatten().tolist()
            for a, b in itertools.combinations(kids, 2):
                assert box_overlap(lvl.boxes[a], lvl.boxes[b]) == 0
                assert not set(lvl.parent_tokens[a].tolist()) & set(lvl.parent_tokens[b].tolist())


@pytest.mark.parametrize("S,I,p,K,c,ratios", GEOMETRIES)
def test_parent_is_the_unique_containing_box_and_has_k_children(S, I, p, K, c, ratios):
    _, levels = make_levels(S, I, p, K, c, ratios)
    assert levels[0].parent is None and levels[0].parent_tokens is None
    for prev, lvl in zip(levels, levels[1:]):
        assert torch.bincount(lvl.parent, minlength=prev.x.shape[0]).tolist() == [K] * prev.x.shape[0]
        for i in range(lvl.x.shape[0]):
            vol = lvl.boxes[i][1].prod().item()
            containing = [j for j in range(prev.x.shape[0]) if prev.root[j] == lvl.root[i]
                          and box_overlap(lvl.boxes[i], prev.boxes[j]) == pytest.approx(vol)]
            assert containing == [int(lvl.parent[i])]
            assert lvl.root[i] == prev.root[lvl.parent[i]]


@pytest.mark.parametrize("S,I,p,K,c,ratios", GEOMETRIES)
def test_child_pixels_are_a_resize_of_exactly_its_crop_region(S, I, p, K, c, ratios):
    crops, levels = make_levels(S, I, p, K, c, ratios)
    root = torch.arange(crops.shape[0])
    for lvl in levels:
        if lvl.parent is not None:
            root = root[lvl.parent]  # chase parents back to the crop, independently of lvl.root
        assert torch.equal(root, lvl.root)
        for i in range(lvl.x.shape[0]):
            (d, h, w), (sd, sh, sw) = lvl.boxes[i].long().tolist()
            assert torch.equal(lvl.boxes[i], lvl.boxes[i].round())  # these geometries give integer boxes
            region = crops[root[i], :, d:d + sd, h:h + sh, w:w + sw]
            expected = F.interpolate(region[None], size=(I, I, I), mode="trilinear", align_corners=False)[0]
            torch.testing.assert_close(lvl.x[i], expected, atol=1e-5, rtol=1e-5)


def test_fractional_boxes_stay_nested():
    # 18 voxels -> 9 -> 4.5: level-3 boxes start and end between voxels.
    _, levels = make_levels(18, 8, 2, 2, 2, (0.75, 0.75, 0.75), batch=2)
    assert levels[2].boxes[:, 1].unique().tolist() == [4.5]
    g = 4
    for prev, lvl in zip(levels, levels[1:]):
        for i in range(lvl.x.shape[0]):
            par = int(lvl.parent[i])
            inter = torch.tensor([box_overlap(lvl.boxes[i], pb) for pb in patch_boxes(prev.boxes[par], g)])
            assert inter[prev.mask[par]].sum().item() == pytest.approx(lvl.boxes[i][1].prod().item())
    assert torch.isfinite(levels[2].x).all()


def test_cut_and_resize_of_the_whole_crop_at_its_own_size_is_the_crop():
    crops = torch.randn(2, 3, 8, 8, 8)
    boxes = torch.tensor([[[0.0] * 3, [8.0] * 3]] * 2, dtype=torch.float64)
    assert torch.equal(cut_and_resize(crops, torch.tensor([1, 0]), boxes, 8), crops.flip(0))


def test_single_level_is_mae_random_masking():
    crops = torch.randn(4, 1, 32, 32, 32)
    cfg = MaskConfig(levels=1, mask_ratio=(0.75,))
    (lvl,) = build_hierarchy(crops, cfg, 4, 16, torch.Generator().manual_seed(7))
    # MAE's random_masking (models_mae.py) on the same noise.
    n = 64
    noise = torch.rand(4, n, generator=torch.Generator().manual_seed(7))
    len_keep = int(n * (1 - 0.75))
    ids_shuffle = torch.argsort(noise, dim=1)
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    mae_mask = torch.ones(4, n)
    mae_mask[:, :len_keep] = 0
    mae_mask = torch.gather(mae_mask, 1, ids_restore)
    assert torch.equal(lvl.mask, mae_mask.bool())
    assert torch.equal(lvl.visible_idx, ids_shuffle[:, :len_keep].sort(1).values)
    assert lvl.parent is None and lvl.parent_tokens is None
    expected = F.interpolate(crops, size=(16, 16, 16), mode="trilinear", align_corners=False)
    torch.testing.assert_close(lvl.x, expected, atol=1e-5, rtol=1e-5)


def test_same_seed_same_hierarchy_other_seed_other_cubes():
    a = make_levels(32, 16, 4, 2, 2, (0.75,) * 3, batch=8, seed=1)[1]
    b = make_levels(32, 16, 4, 2, 2, (0.75,) * 3, batch=8, seed=1)[1]
    c = make_levels(32, 16, 4, 2, 2, (0.75,) * 3, batch=8, seed=2)[1]
    for la, lb in zip(a, b):
        assert torch.equal(la.mask, lb.mask) and torch.equal(la.boxes, lb.boxes) and torch.equal(la.x, lb.x)
    assert not torch.equal(a[1].boxes, c[1].boxes)
    # Cubes are drawn per row: 16 parents at level 2 do not all pick the same pair of cells.
    assert len({tuple(t) for t in a[2].parent_tokens.view(16, -1).tolist()}) > 1


def test_cubes_use_every_lattice_offset_when_c_does_not_divide_the_grid():
    _, levels = make_levels(50, 20, 4, 3, 2, (0.8, 0.6, 0.5), batch=8)
    g, c = 5, 2
    prev, kids = levels[0], levels[1]
    patch_vox = prev.boxes[kids.parent, 1] / g                              # [B_2, 3]
    origin = (kids.boxes[:, 0] - prev.boxes[kids.parent, 0]) / patch_vox    # [B_2, 3] in parent patches
    assert torch.equal(origin, origin.round())
    assert origin.min() >= 0 and origin.max() <= g - c
    assert {0, 1} <= set((origin % c).long().flatten().tolist())  # offset 0 and offset 1 both drawn


@pytest.mark.parametrize("kwargs", [
    dict(mask_ratio=(0.0, 0.75, 0.75)),
    dict(mask_ratio=(0.75, 1.0, 0.75)),
    dict(mask_ratio=(0.75, 0.75)),       # neither 1 nor `levels` values
    dict(levels=0),
    dict(children=0),
])
def test_bad_mask_config_is_a_config_error(kwargs):
    with pytest.raises(ConfigError):
        MaskConfig(**kwargs)
    with pytest.raises(ConfigError):
        from_dict(MaskConfig, {k: list(v) if isinstance(v, tuple) else v for k, v in kwargs.items()})


@pytest.mark.parametrize("cfg", [
    MaskConfig(children=9),                       # 9 cubes of 2^3 in a 4^3 grid: only 8 aligned cells
    MaskConfig(child_patches=5),                  # a cube wider than the grid
    MaskConfig(mask_ratio=(0.2,)),                # 13 masked < 2 * 8 forced
    MaskConfig(levels=1, mask_ratio=(0.999,)),    # round(63.9) = 64: nothing left visible
])
def test_geometry_that_does_not_fit_is_a_config_error(cfg):
    with pytest.raises(ConfigError):
        build_hierarchy(torch.zeros(1, 1, 32, 32, 32), cfg, 4, 16, torch.Generator())


def test_crop_too_small_and_bad_shape_are_input_errors():
    with pytest.raises(InputError, match="too small"):
        build_hierarchy(torch.zeros(1, 1, 3, 3, 3), MaskConfig(), 4, 16, torch.Generator())
    with pytest.raises(InputError):
        build_hierarchy(torch.zeros(1, 32, 32, 32), MaskConfig(), 4, 16, torch.Generator())


def test_single_ratio_applies_to_every_level():
    assert MaskConfig(levels=3, mask_ratio=(0.6,)).ratios() == (0.6, 0.6, 0.6)


def test_mask_config_is_the_one_mim_config_holds():
    # It lives in models.mim (MiMConfig embeds it; models/ imports nothing from pretrain/), re-exported here.
    from models.mim import MaskConfig as ModelsMaskConfig
    assert MaskConfig is ModelsMaskConfig


@pytest.mark.parametrize("S, I, p, K, c, ratios", GEOMETRIES)
def test_anchored_rows_keep_a_child_on_the_anchor_at_every_level(S, I, p, K, c, ratios):
    """A lesion anchor: child 0 of an anchored row is the lattice cell holding it, nested down every
    level, and still lies in its parent's masked patches (the general nesting tests cover the rest)."""
    crops = torch.randn(4, 1, S, S, S, generator=torch.Generator().manual_seed(5))
    anchors = torch.rand(4, 3, generator=torch.Generator().manual_seed(6)) * (S - 1)  # [B, 3] crop voxels
    anchors[3] = float("nan")  # a view without a lesion
    cfg = MaskConfig(levels=len(ratios), mask_ratio=ratios, children=K, child_patches=c)
    levels = build_hierarchy(crops, cfg, p, I, torch.Generator().manual_seed(0), anchors=anchors)
    g = I // p
    for lvl, child in zip(levels[:-1], levels[1:]):
        for r in range(child.x.shape[0]):
            a = child.anchor[r]
            if r % K or not torch.isfinite(lvl.anchor[child.parent[r]]).all():
                assert torch.isnan(a).all()  # only child 0 of an anchored parent carries the anchor
                continue
            if g % c:  # a lattice with slack: the anchor may lie outside every cell, then it is dropped
                if torch.isnan(a).all():
                    continue
            else:
                assert torch.equal(a, lvl.anchor[child.parent[r]])
            start, size = child.boxes[r]
            assert ((a >= start) & (a < start + size)).all(), (r, a, child.boxes[r])  # the lesion is in it
            par = lvl.boxes[child.parent[r]]
            patches = patch_boxes(par, g)
            covered = [j for j in range(g**3) if box_overlap(child.boxes[r], patches[j]) > 1e-9]
            assert lvl.mask[child.parent[r], covered].all()
    assert torch.isnan(levels[0].anchor[3]).all() and torch.isfinite(levels[0].anchor[:3]).all()


def test_no_anchor_draws_the_same_hierarchy_as_before():
    crops = torch.randn(3, 1, 32, 32, 32, generator=torch.Generator().manual_seed(1))
    cfg = MaskConfig(levels=3, mask_ratio=(0.75,), children=2, child_patches=2)
    plain = build_hierarchy(crops, cfg, 4, 16, torch.Generator().manual_seed(2))
    nan = build_hierarchy(crops, cfg, 4, 16, torch.Generator().manual_seed(2), anchors=torch.full((3, 3), float("nan")))
    for a, b in zip(plain, nan):
        assert torch.equal(a.mask, b.mask) and torch.equal(a.boxes, b.boxes) and torch.equal(a.x, b.x)
