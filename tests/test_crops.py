"""Crops and datasets: bounds, padding, lesion boxes containing mask + margin, exact geometry, determinism."""
import json

import numpy as np
import pandas as pd
import pytest
import torch
from monai.data import DataLoader

from core.errors import InputError
from data.cache import CacheEntry
from data.crops import crop_with_pad, lesion_box, lesion_crop, lesion_crop_with_affine, random_crop_boxes
from data.datasets import LesionCrops
from data.views import PretrainCrops


def _reference_crop(a, start, size, pad):
    """Independent reference: pad the whole array generously, then slice."""
    p = max(size) + max(abs(s) for s in start) + max(a.shape)
    big = np.pad(a, [(0, 0)] + [(p, p)] * 3, constant_values=pad)
    return big[(slice(None), *[slice(s + p, s + p + z) for s, z in zip(start, size)])]


def test_random_boxes_stay_in_bounds_and_cover_all_positions():
    rng = np.random.default_rng(0)
    boxes = random_crop_boxes((10, 6, 8), (4, 6, 11), 400, rng)
    starts = np.array([b[0] for b in boxes])
    assert all(b[1] == (4, 6, 11) for b in boxes)
    # Larger axis: inside the volume and every start reached; equal: 0; smaller: the volume inside the crop.
    assert starts[:, 0].min() == 0 and starts[:, 0].max() == 6 and len(set(starts[:, 0])) == 7
    assert np.all(starts[:, 1] == 0)
    assert starts[:, 2].min() == -3 and starts[:, 2].max() == 0


def test_crop_with_pad_matches_reference_numpy_and_torch():
    rng = np.random.default_rng(1)
    a = rng.normal(size=(2, 7, 5, 6)).astype(np.float32)
    for start, size in [((0, 0, 0), (7, 5, 6)), ((-3, 2, 4), (5, 5, 5)), ((5, -2, -1), (6, 9, 3)), ((9, 0, 0), (2, 2, 2))]:
        ref = _reference_crop(a, start, size, -7.0)
        np.testing.assert_array_equal(crop_with_pad(a, start, size, -7.0), ref)
        np.testing.assert_array_equal(crop_with_pad(torch.from_numpy(a), start, size, -7.0).numpy(), ref)


def test_lesion_box_contains_mask_plus_margin_and_is_centred():
    rng = np.random.default_rng(2)
    for _ in range(50):
        m = np.zeros((20, 18, 16), np.uint8)
        lo = rng.integers(0, 10, 3)
        hi = lo + rng.integers(1, 8, 3)
        m[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]] = 1
        margin, min_size = int(rng.integers(0, 4)), int(rng.integers(1, 16))
        start, size = lesion_box(m, margin, min_size)
        start, size = np.array(start), np.array(size)
        assert size[0] == size[1] == size[2] >= min_size
        assert np.all(start <= lo - margin) and np.all(start + size >= hi + margin)
        grown_centre = (lo - margin + hi + margin - 1) / 2
        assert np.all(np.abs(start + (size - 1) / 2 - grown_centre) <= 0.5)
        assert size[0] == max(min_size, int((hi - lo + 2 * margin).max()))  # as small as allowed
    with pytest.raises(InputError, match="empty"):
        lesion_box(np.zeros((4, 4, 4)), 1, 4)


def test_lesion_crop_without_resize_is_the_exact_box():
    rng = np.random.default_rng(3)
    image = rng.normal(size=(1, 20, 18, 16)).astype(np.float32)
    mask = np.zeros((1, 20, 18, 16), np.uint8)
    mask[0, 1:4, 14:17, 5:8] = 1  # near two edges: the crop pads there
    x = lesion_crop(image, mask, 10, margin_vox=2, pad_value=-5.0)
    assert x.shape == (2, 10, 10, 10) and x.dtype == np.float32
    assert x[1].sum() == mask.sum()  # the whole lesion is inside
    start, size = lesion_box(mask[0], 2, 10)
    np.testing.assert_array_equal(x[0], _reference_crop(image, start, size, -5.0)[0])
    np.testing.assert_array_equal(x[1], _reference_crop(mask.astype(np.float32), start, size, 0)[0])


@pytest.mark.parametrize("axis", [0, 1, 2])
def test_lesion_crop_resize_geometry_is_exact(axis):
    # A linear ramp is reproduced exactly by trilinear interpolation, so output voxel j must hold the
    # input coordinate of its centre: start + (j + 0.5) * side / out - 0.5 (align_corners=False).
    shape = (40, 40, 40)
    ramp = np.broadcast_to(np.arange(40, dtype=np.float32).reshape([-1 if k == axis else 1 for k in range(3)]), shape)
    mask = np.zeros(shape, np.uint8)
    mask[12:27, 14:25, 13:26] = 1  # 15 x 11 x 13 voxels; + margin 3 -> a cube of side 21
    out = 8
    x = lesion_crop(ramp[None].copy(), mask[None], out, margin_vox=3, min_size=1)
    start, size = lesion_box(mask, 3, 1)
    assert size == (21, 21, 21)
    j = np.arange(out)
    expected = start[axis] + (j + 0.5) * size[axis] / out - 0.5
    profile = x[0].transpose([axis] + [k for k in range(3) if k != axis])[:, 0, 0]
    np.testing.assert_allclose(profile, expected, atol=1e-4)
    # The resized mask: its centroid maps back onto the lesion centre within one output voxel.
    centroid = np.argwhere(x[1] > 0).mean(0)
    back = np.array(start) + (centroid + 0.5) * np.array(size) / out - 0.5
    assert np.all(np.abs(back - np.array([19.0, 19.0, 19.0])) <= size[0] / out)
    assert set(np.unique(x[1])) == {0.0, 1.0}
    # The crop's affine sends output voxel j to the world point of the input position it sampled.
    affine = np.array([[0, 0, 1.5, -20], [-2, 0, 0, 33], [0, 1.2, 0, 7], [0, 0, 0, 1.0]])
    same, crop_affine = lesion_crop_with_affine(ramp[None].copy(), mask[None], out, 3, affine, min_size=1)
    np.testing.assert_array_equal(same, x)
    for jj in ([0, 0, 0], [7, 3, 5], [2, 6, 1]):
        sampled = np.array(start) + (np.array(jj) + 0.5) * np.array(size) / out - 0.5
        np.testing.assert_allclose(crop_affine @ np.r_[jj, 1.0], affine @ np.r_[sampled, 1.0], atol=1e-9)


def _write_entry(root, name, image, mask=None, pad=None):
    d = root / name
    d.mkdir(parents=True)
    np.save(d / "image.npy", image)
    if mask is not None:
        np.save(d / "mask.npy", mask)
    (d / "meta.json").write_text(json.dumps({"has_mask": mask is not None, "pad_value": pad}))
    return CacheEntry.open(d)


def test_pretrain_crops_are_real_subvolumes_and_deterministic(tmp_path):
    # Every voxel holds its own flat index, so a crop reveals exactly where it came from.
    shapes = [(12, 10, 9), (5, 14, 6)]
    entries = [_write_entry(tmp_path, f"v{k}", np.arange(np.prod(s), dtype=np.float32).reshape(1, *s), pad=-1.0)
               for k, s in enumerate(shapes)]
    ds = PretrainCrops(entries, crop_size=6, crops_per_volume=3, seed=7)
    for i, s in enumerate(shapes):
        crops = ds[i]["crops"]
        assert torch.isnan(ds[i]["anchors"]).all()  # uniform views have no lesion anchor
        assert crops.shape == (3, 1, 6, 6, 6) and crops.dtype == torch.float32
        vol = np.arange(np.prod(s), dtype=np.float32).reshape(1, *s)
        for c in crops.numpy():
            inside = c[c >= 0]
            first = np.unravel_index(int(inside.min()), s)  # the in-bounds corner of the crop
            start = [f if n >= 6 else f - int(np.argmax((c[0] >= 0).any(axis=tuple(a for a in range(3) if a != k))))
                     for k, (f, n) in enumerate(zip(first, s))]
            np.testing.assert_array_equal(c, _reference_crop(vol, start, (6, 6, 6), -1.0))
    again = PretrainCrops([e.image_path for e in entries], 6, 3, seed=7)
    assert torch.equal(ds[1]["crops"], again[1]["crops"])
    ds.set_epoch(1)
    assert not torch.equal(ds[0]["crops"], again[0]["crops"])
    again.set_epoch(1)
    assert torch.equal(ds[0]["crops"], again[0]["crops"])
    # Worker processes draw the same crops as the main process.
    serial = torch.cat([b["crops"] for b in DataLoader(ds, batch_size=1, num_workers=0)])
    parallel = torch.cat([b["crops"] for b in DataLoader(ds, batch_size=1, num_workers=2)])
    assert torch.equal(serial, parallel)


def _lesion_table(tmp_path, n=3):
    rng = np.random.default_rng(4)
    rows = []
    for k in range(n):
        img = rng.normal(size=(1, 24, 22, 20)).astype(np.float32)
        mask = np.zeros((1, 24, 22, 20), np.uint8)
        mask[0, 8 + k:14, 6:12 + k, 7:13] = 1
        e = _write_entry(tmp_path, f"s{k}", img, mask, pad=-3.0)
        rows.append({"subject_id": f"s{k}", "cache_image": str(e.image_path), "cache_mask": str(e.mask_path)})
    return pd.DataFrame(rows)


def test_lesion_crops_dataset_matches_lesion_crop_and_augments_deterministically(tmp_path):
    df = _lesion_table(tmp_path)
    plain = LesionCrops(df, crop_size=12, margin_vox=2, augment=False, seed=0)
    item = plain[1]
    assert item["index"] == 1 and item["x"].shape == (2, 12, 12, 12) and item["x"].dtype == torch.float32
    ref = lesion_crop(np.load(df["cache_image"][1]), np.load(df["cache_mask"][1]), 12, 2, pad_value=-3.0)
    np.testing.assert_array_equal(item["x"].numpy(), ref)

    aug = LesionCrops(df, crop_size=12, margin_vox=2, augment=True, seed=0)
    a0 = [aug[i]["x"] for i in range(3)]
    assert all(set(torch.unique(x[1]).tolist()) <= {0.0, 1.0} for x in a0)
    assert torch.equal(aug[2]["x"], a0[2])  # same (seed, epoch, i): same draw, whatever came before
    assert any(not torch.equal(x, plain[i]["x"]) for i, x in enumerate(a0))
    aug.set_epoch(1)
    assert any(not torch.equal(aug[i]["x"], a0[i]) for i in range(3))
    aug.set_epoch(0)
    batches = list(DataLoader(aug, batch_size=3, num_workers=2))
    assert torch.equal(batches[0]["x"], torch.stack(a0))

    with pytest.raises(InputError, match="cache_mask"):
        LesionCrops(df.drop(columns="cache_mask"), 12, 2, False, 0)


def test_bright_crops_are_centred_on_the_brightest_voxels(tmp_path):
    # Dim noise with three bright blobs: every bright-sampled crop must be centred on a blob voxel,
    # while uniform crops land on a blob centre only by chance.
    rng = np.random.default_rng(0)
    vol = rng.uniform(0.0, 1.0, size=(1, 40, 36, 32)).astype(np.float32)
    blobs = [(10, 10, 10), (28, 20, 12), (18, 26, 22)]
    for x, y, z in blobs:
        vol[0, x - 1:x + 2, y - 1:y + 2, z - 1:z + 2] = 5.0
    bright = vol[0] >= 5.0  # 81 voxels, 0.18% of the volume: the 0.999 quantile lies inside the blobs
    entry = _write_entry(tmp_path, "v", vol, pad=0.0)
    ds = PretrainCrops([entry], crop_size=8, crops_per_volume=6, seed=3, bright_fraction=1.0, bright_quantile=0.999)
    for epoch in range(4):
        ds.set_epoch(epoch)
        for c in ds[0]["crops"].numpy():
            assert c[0, 4, 4, 4] == 5.0  # the centre voxel (size // 2) of each crop is a blob voxel
    # The crops still are exact sub-volumes, and the draw is deterministic per (seed, epoch, index).
    again = PretrainCrops([entry], 8, 6, seed=3, bright_fraction=1.0, bright_quantile=0.999)
    again.set_epoch(3)
    assert torch.equal(ds[0]["crops"], again[0]["crops"])
    mixed = PretrainCrops([entry], 8, 200, seed=3, bright_fraction=0.5, bright_quantile=0.999)
    centred = float((mixed[0]["crops"][:, 0, 4, 4, 4] == 5.0).float().mean())
    assert 0.35 < centred < 0.65  # about half the crops are bright-centred; uniform ones rarely hit
    assert bright.mean() < 0.01
    with pytest.raises(InputError, match="bright_fraction"):
        PretrainCrops([entry], 8, 2, seed=0, bright_fraction=1.5)


def test_lesion_crops_magnify_with_a_smaller_minimum_side(tmp_path):
    df = _lesion_table(tmp_path)
    native = LesionCrops(df, crop_size=24, margin_vox=1, augment=False, seed=0)
    zoomed = LesionCrops(df, crop_size=24, margin_vox=1, augment=False, seed=0, min_side_vox=4)
    image, mask = np.load(df["cache_image"][0]), np.load(df["cache_mask"][0])
    # The zoomed cube is the lesion box + margin (8 voxels here), resized to 24: the mask fills more of it.
    start, size = lesion_box(mask[0], 1, 4)
    assert size == (8, 8, 8)
    np.testing.assert_array_equal(zoomed[0]["x"].numpy(), lesion_crop(image, mask, 24, 1, min_size=4, pad_value=-3.0))
    assert zoomed[0]["x"][1].mean() > 5 * native[0]["x"][1].mean()


def test_segmentation_windows_are_fixed_size_in_the_volume_and_mostly_lesion_free():
    """data.crops.segmentation_box, nnU-Net's way: every window has the sliding window's side and lies in
    the volume as the sliding window does; about a third hold a lesion voxel (forced), the rest anywhere."""
    from data.crops import LESION_FORCED, segmentation_box
    shape, side = (40, 36, 30), 12
    lesion = np.argwhere(np.ones((3, 3, 3), bool)) + np.array([20, 5, 25])  # [27, 3], near two faces
    rng = np.random.default_rng(0)
    hits = []
    for _ in range(600):
        start, size = segmentation_box(lesion, side, shape, rng)
        assert size == (side,) * 3
        assert all(0 <= s <= n - side for s, n in zip(start, shape))
        inside = np.all((lesion >= start) & (lesion < np.add(start, side)), axis=1)  # [27]
        hits.append(inside.any())
    # forced windows always hold the lesion; a uniform one does with probability ~0.04 here
    assert LESION_FORCED - 0.06 < np.mean(hits) < LESION_FORCED + 0.12, np.mean(hits)
    # a corner voxel is still inside its forced window after the window is moved into the volume
    corner = np.array([[0, 35, 29]])
    for _ in range(50):
        start, _ = segmentation_box(corner, side, shape, np.random.default_rng(_))
        if all(0 <= c - s < side for c, s in zip(corner[0], start)):
            break
    else:
        raise AssertionError("no forced window held the corner voxel")
    # a volume smaller than the window: the window holds the whole volume, as a padded sliding window does
    start, size = segmentation_box(lesion, 64, shape, np.random.default_rng(1))
    assert all(s <= 0 and s + 64 >= n for s, n in zip(start, shape))
