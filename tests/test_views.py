"""Pretraining views (data.views) and the label-free lesion candidates (data.candidates)."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from core.errors import InputError
from data.cache import CacheEntry
from data.candidates import CandidateConfig, find_candidates, mask_centres
from data.datasets import pad_value_of
from data.views import PretrainCrops, anchor_fractions


def _entry(root: Path, name: str, image: np.ndarray) -> CacheEntry:
    d = root / name
    d.mkdir(parents=True)
    np.save(d / "image.npy", image)
    (d / "meta.json").write_text(json.dumps({"has_mask": False, "pad_value": -1.0}))
    return CacheEntry.open(d)


@pytest.fixture()
def blob_volume(tmp_path):
    """Noise with one bright 5^3 blob centred at (30, 22, 18): the 'lesion'."""
    rng = np.random.default_rng(0)
    vol = rng.uniform(0, 1, size=(1, 60, 48, 40)).astype(np.float32)
    vol[0, 28:33, 20:25, 16:21] = 10.0
    return _entry(tmp_path, "v", vol), np.array([[30.0, 22.0, 18.0]])


def test_lesion_views_hold_the_lesion_at_an_anchor_fraction(blob_volume):
    entry, centres = blob_volume
    fractions, jitter = anchor_fractions(grid=4, child_patches=2, levels=2)
    assert fractions == (0.25, 0.75) and jitter == pytest.approx(0.125)
    ds = PretrainCrops([entry], crop_size=16, crops_per_volume=40, seed=1, lesion_fraction=1.0,
                       lesion_centres=[centres], anchor_fractions=fractions, anchor_jitter=jitter)
    item = ds[0]
    crops, anchors = item["crops"], item["anchors"].numpy()  # [K, 1, S, S, S], [K, 3]
    assert np.isfinite(anchors).all()
    for crop, a in zip(crops, anchors):
        d, h, w = np.round(a).astype(int)
        assert crop[0, d, h, w] == 10.0  # the anchor voxel is the lesion's centre voxel
        frac = a / 16
        near = np.min(np.abs(frac[:, None] - np.array(fractions)[None]), axis=1)  # distance to 1/4 or 3/4
        assert (near <= jitter + 1 / 16).all(), frac


def test_lesion_share_and_determinism(blob_volume):
    entry, centres = blob_volume
    ds = PretrainCrops([entry], crop_size=16, crops_per_volume=400, seed=2, lesion_fraction=0.6,
                       lesion_centres=[centres])
    item = ds[0]
    anchored = torch.isfinite(item["anchors"]).all(dim=1)  # [K]
    assert 0.5 < anchored.float().mean() < 0.7  # the configured share of lesion views
    has_lesion = (item["crops"] == 10.0).flatten(1).any(dim=1)
    assert has_lesion[anchored].all()
    assert has_lesion[~anchored].float().mean() < 0.5  # uniform views hit the lesion only by chance
    again = PretrainCrops([entry], 16, 400, seed=2, lesion_fraction=0.6, lesion_centres=[centres])
    assert torch.equal(again[0]["crops"], item["crops"])
    assert torch.equal(again[0]["anchors"].nan_to_num(-1), item["anchors"].nan_to_num(-1))
    ds.set_epoch(1)
    assert not torch.equal(ds[0]["anchors"].nan_to_num(-1), item["anchors"].nan_to_num(-1))
    ds.set_epoch(0)
    loaded = next(iter(DataLoader(ds, batch_size=1, num_workers=2)))
    assert torch.equal(loaded["crops"][0], item["crops"])  # workers draw the same views


def test_a_volume_without_lesions_keeps_uniform_views_and_bad_shares_are_refused(blob_volume):
    entry, _ = blob_volume
    ds = PretrainCrops([entry], 16, 5, seed=0, lesion_fraction=1.0, lesion_centres=[np.zeros((0, 3))])
    assert torch.isnan(ds[0]["anchors"]).all()
    with pytest.raises(InputError, match="lesion_fraction"):
        PretrainCrops([entry], 16, 5, seed=0, lesion_fraction=0.8, bright_fraction=0.5,
                      lesion_centres=[np.zeros((0, 3))])
    with pytest.raises(InputError, match="lesion centres"):
        PretrainCrops([entry], 16, 5, seed=0, lesion_fraction=0.5)


def test_mask_centres_are_component_centres_largest_first():
    mask = np.zeros((20, 20, 20), np.uint8)
    mask[2:5, 2:5, 2:5] = 1       # 27 voxels around (3, 3, 3)
    mask[10:16, 10:14, 8:12] = 1  # 96 voxels around (12.5, 11.5, 9.5)
    np.testing.assert_allclose(mask_centres(mask), [[12.5, 11.5, 9.5], [3, 3, 3]])


def test_candidates_find_the_index_lesions_of_the_built_in_cohort(synth_cohort, tmp_path):
    """Scored against the masks the detector does not use. A candidate hits when its centre lies in the
    index lesion's box (grown by 2 voxels). The masks mark index lesions only, so other real lesions
    count as misses for precision: it is a lower bound. Measured on the seed-0 cohort's 30 lesions:
    top-1 hit 0.53, any of the top 3 0.70, precision 0.39 (a random brain voxel: about 0.01)."""
    from data.prep_config import PrepConfig
    from data.prepare import prepare_table
    from models.tasks import CLASSIFICATION
    df, _ = prepare_table(CLASSIFICATION.read_manifest(synth_cohort / "manifest.csv"), PrepConfig(),
                          tmp_path / "cache", progress=False)
    top1, recall, precision = [], [], []
    for _, row in df.iterrows():
        image, mask = np.load(row["cache_image"])[0], np.load(row["cache_mask"])[0] > 0
        found = find_candidates(image, 2.0, CandidateConfig(), pad_value_of(Path(row["cache_image"])))
        nz = np.argwhere(mask)
        lo, hi = nz.min(0) - 2, nz.max(0) + 2
        hits = [bool(((c >= lo) & (c <= hi)).all()) for c in found]
        top1.append(bool(hits) and hits[0])
        recall.append(any(hits))
        precision.append(np.mean(hits) if hits else 0.0)
    assert len(df) == 30
    assert np.mean(recall) >= 0.6 and np.mean(top1) >= 0.4 and np.mean(precision) >= 0.3, \
        (np.mean(top1), np.mean(recall), np.mean(precision))
