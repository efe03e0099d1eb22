"""Issue 35: lesion candidates with a confidence. Probability maps are built by hand (no model): two lesions come
back as two scored candidates in world coordinates on an LPS oblique anisotropic grid; a head with no lesion has
no confident lesion unless low confidence is accepted; a scalp candidate is dropped by the brain mask."""
import math

import numpy as np
import pandas as pd
import pytest

from finetune.lesion import candidates as cand

SPACING = (1.2, 1.0, 4.0)


def oblique_lps_affine(spacing=SPACING, angle=0.35, origin=(60.0, 40.0, -20.0)) -> np.ndarray:
    """An LPS-stored (x and y axes flipped), obliquely rotated, anisotropic voxel grid."""
    c, s = math.cos(angle), math.sin(angle)
    rot = np.array([[c, -s, 0], [s, c, 0], [0, 0, 1.0]]) @ np.array([[1, 0, 0], [0, c, -s], [0, s, c]])
    a = np.eye(4)
    a[:3, :3] = rot @ np.diag([-1.0, -1.0, 1.0]) @ np.diag(spacing)
    a[:3, 3] = origin
    return a


def world_grid(shape, affine) -> np.ndarray:
    idx = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), -1).astype(float)  # [X, Y, Z, 3]
    return idx @ affine[:3, :3].T + affine[:3, 3]  # [X, Y, Z, 3] mm


def test_two_lesions_are_two_scored_candidates_in_world_mm():
    shape, affine = (60, 64, 14), oblique_lps_affine()
    world = world_grid(shape, affine)
    centre = world[30, 32, 7]  # [3] mm: the balls are placed in world mm, not in voxels
    big_centre, small_centre = centre + [-10.0, 8.0, 4.0], centre + [14.0, -6.0, -6.0]
    big = np.linalg.norm(world - big_centre, axis=-1) <= 8.0  # [X, Y, Z]
    small = np.linalg.norm(world - small_centre, axis=-1) <= 5.0
    prob = np.full(shape, 0.1)
    prob[big], prob[small] = 0.9, 0.7
    prob[tuple(np.argwhere(small)[0])] = 0.95  # the small lesion's maximum
    table, labels = cand.find_candidates(prob, affine)
    assert list(table["rank"]) == [1, 2] and list(table.columns) == list(cand.COLUMNS)
    voxel_ml = abs(np.linalg.det(affine[:3, :3])) / 1000
    for row, ball, p_max, true_centre, radius in ((table.iloc[0], big, 0.9, big_centre, 8.0),
                                                  (table.iloc[1], small, 0.95, small_centre, 5.0)):
        got = row[["x_mm", "y_mm", "z_mm"]].to_numpy(float)
        np.testing.assert_allclose(got, world[ball].mean(0), atol=1e-6)  # the voxels' own world centroid
        assert np.linalg.norm(got - true_centre) < 1.0  # and the ball's centre, through the LPS oblique affine
        assert row["volume_ml"] == pytest.approx(ball.sum() * voxel_ml)
        assert row["volume_ml"] == pytest.approx(4 / 3 * math.pi * radius ** 3 / 1000, rel=0.15)
        assert row["p_max"] == pytest.approx(p_max) and row["p_mean"] == pytest.approx(prob[ball].mean())
        v = row["volume_ml"]
        assert row["score"] == pytest.approx(row["p_mean"] * v / (v + cand.VOLUME_HALF_ML))  # in_region 1
        assert (labels == row["label"]).sum() == ball.sum() and np.all(labels[ball] == row["label"])
    assert table["confident"].all() and not table["index_lesion"].any()
    choice = cand.choose_index(table)
    assert choice == (table["label"].iloc[0], cand.FOUND) and list(table["index_lesion"]) == [True, False]
    # a lesion centre given in world mm picks the small one, however it ranks
    table, labels = cand.find_candidates(prob, affine)
    near, distance = cand.nearest_label(labels, affine, small_centre)
    assert distance < 2.2  # within half a voxel diagonal of the 1.2 x 1 x 4 mm grid
    assert cand.choose_index(table, label=near) == (table["label"].iloc[1], cand.FOUND)
    assert list(table["index_lesion"]) == [False, True]
    # a centre that matches no candidate (the segmenter missed what the user pointed at) is never scored
    # silently as the nearest other structure: no confident lesion, or that candidate marked low-confidence
    table, labels = cand.find_candidates(prob, affine)
    far_label, distance = cand.nearest_label(labels, affine, small_centre + [0.0, 0.0, 30.0])
    assert distance > cand.CENTRE_TOLERANCE_MM
    assert cand.choose_index(table, label=far_label, far=True) == (None, cand.NO_CONFIDENT)
    assert cand.choose_index(table, True, far_label, far=True) == (far_label, cand.LOW_ACCEPTED)


def test_no_lesion_is_no_confident_lesion_unless_low_confidence_is_accepted():
    affine = oblique_lps_affine()
    prob = np.full((20, 20, 8), 0.2)
    prob[5:7, 5:7, 3] = 0.55  # 4 voxels of 4.8 mm^3, barely above 0.5: noise, not a lesion
    prob[12:14, 12:14, 5] = 0.6
    table, _ = cand.find_candidates(prob, affine)
    assert len(table) == 2 and not table["confident"].any()
    assert table["score"].iloc[0] == pytest.approx(0.6 * 0.0192 / (0.0192 + cand.VOLUME_HALF_ML))  # hand
    assert cand.choose_index(table) == (None, cand.NO_CONFIDENT) and not table["index_lesion"].any()
    choice = cand.choose_index(table, accept_low_confidence=True)
    assert choice == (table["label"].iloc[0], cand.LOW_ACCEPTED)
    assert list(table["index_lesion"]) == [True, False] and not table["confident"].iloc[0]
    empty, labels = cand.find_candidates(np.zeros((6, 6, 6)), affine)
    assert len(empty) == 0 and list(empty.columns) == list(cand.COLUMNS) and not labels.any()
    assert cand.choose_index(empty, accept_low_confidence=True) == (None, cand.NO_CONFIDENT)
    # the threshold is a parameter: at 0.1 the same noise is confident
    assert cand.find_candidates(prob, affine, threshold=0.1)[0]["confident"].all()


def test_a_candidate_mostly_outside_the_region_is_dropped():
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    prob = np.zeros((20, 20, 20))
    prob[0:2, :, :] = 0.99  # a large bright rim along one face
    prob[9:12, 9:12, 9:12] = 0.9
    region = np.zeros(prob.shape, bool)
    region[3:17, 3:17, 3:17] = True
    table, labels = cand.find_candidates(prob, affine, region=region)
    assert len(table) == 1 and table["volume_ml"].iloc[0] == pytest.approx(27 * 8 / 1000)
    assert labels[10, 10, 10] == table["label"].iloc[0] and not labels[0].any()
    assert len(cand.find_candidates(prob, affine)[0]) == 2  # without the region the rim is a candidate


# ---- the brain region: scalp, skull and face are no candidates ---------------------------------------------------

HEAD_SHAPE, HEAD_MM = (40, 40, 40), 2.0
# Shells outward from the centre, outer radius in mm and T1-CE value: brain, CSF, skull, scalp (bright fat).
HEAD_LAYERS = ((24.0, 100.0), (26.0, 20.0), (30.0, 10.0), (36.0, 120.0))


def layered_head(folder):
    """A head on a 2 mm RAS grid (its image, its brain [X, Y, Z] bool and the head's centre in world mm), written
    as NIfTI with the brain as a 0/1 file beside it."""
    from data.nifti import save_volume
    affine = np.diag([HEAD_MM] * 3 + [1.0])
    world = world_grid(HEAD_SHAPE, affine)
    centre = world[20, 20, 20] - HEAD_MM / 2
    r = np.linalg.norm(world - centre, axis=-1)  # [X, Y, Z] mm from the centre
    t1 = np.zeros(HEAD_SHAPE, np.float32)
    for outer, value in reversed(HEAD_LAYERS):
        t1[r <= outer] = value
    t1 += np.random.default_rng(0).normal(0, 3, HEAD_SHAPE).astype(np.float32) * (r <= HEAD_LAYERS[-1][0])
    save_volume(folder / "head.nii.gz", t1, affine)
    save_volume(folder / "brain.nii.gz", (r <= HEAD_LAYERS[0][0]).astype(np.uint8), affine, dtype=np.uint8)
    return centre


@pytest.mark.parametrize("brain_column", [False, True])
def test_a_scalp_candidate_is_excluded_by_the_brain_mask(tmp_path, brain_column):
    from data.cache import CacheEntry
    from data.prep_config import PrepConfig
    from data.prepare import prepare_table
    from finetune.lesion import search
    centre = layered_head(tmp_path)
    row = {"subject_id": "s1", "image": str(tmp_path / "head.nii.gz")}
    if brain_column:
        row["brain_mask"] = str(tmp_path / "brain.nii.gz")
    prep = PrepConfig(spacing=(HEAD_MM,) * 3)
    good, rejected = prepare_table(pd.DataFrame([row]), prep, tmp_path / "cache", require_lesion=False,
                                   on_error="collect", progress=False)
    assert not rejected
    entry = CacheEntry.from_path(good["cache_image"].iloc[0])
    affine = np.asarray(entry.meta["affine"])
    world = world_grid(entry.image().shape[1:], affine)  # the prepared grid, cropped to the head
    r = np.linalg.norm(world - centre, axis=-1)
    prob = np.zeros(r.shape)
    prob[(r > 31) & (r < 35) & (world[..., 0] > centre[0])] = 0.95  # a cap of scalp: large and sure
    lesion_centre = centre + [8.0, 4.0, 0.0]
    prob[np.linalg.norm(world - lesion_centre, axis=-1) <= 5.0] = 0.9
    # a zero surface margin keeps every candidate the old rule would: the brain mask alone drops the scalp
    region = search.search_region(entry, good.iloc[0], prep, surface_margin_mm=0.0)
    assert region.source.startswith("brain_mask column" if brain_column else "estimated")
    table, _ = cand.find_candidates(prob, affine, region.mask, region.depth_mm)
    assert len(table) == 1, table
    assert np.linalg.norm(table[["x_mm", "y_mm", "z_mm"]].to_numpy(float)[0] - lesion_centre) < 1.0
    assert table["in_region"].iloc[0] == 1.0 and table["depth_mm"].iloc[0] > 10
    everything, _ = cand.find_candidates(prob, affine)
    assert len(everything) == 2 and everything["volume_ml"].max() > 10 * table["volume_ml"].iloc[0]


def test_without_a_brain_the_surface_margin_is_the_region(tmp_path, monkeypatch):
    from data.cache import CacheEntry
    from data.prep_config import PrepConfig
    from data.prepare import prepare_table
    from finetune.lesion import search
    layered_head(tmp_path)
    prep = PrepConfig(spacing=(HEAD_MM,) * 3)
    good, _ = prepare_table(pd.DataFrame([{"subject_id": "s1", "image": str(tmp_path / "head.nii.gz")}]), prep,
                            tmp_path / "cache", require_lesion=False, on_error="collect", progress=False)
    monkeypatch.setattr(search, "brain_mask", lambda image, *a, **k: np.zeros(np.shape(image), bool))
    region = search.search_region(CacheEntry.from_path(good["cache_image"].iloc[0]), good.iloc[0], prep, 10.0)
    assert region.source == "surface margin 10 mm (no brain found)"
    np.testing.assert_array_equal(region.mask, region.depth_mm > 10.0)


def test_a_prepared_ct_is_read_back_in_hounsfield_units_for_the_brain_mask(tmp_path):
    from data.cache import CacheEntry
    from data.nifti import save_volume
    from data.prep_config import PrepConfig
    from data.prepare import prepare_table
    from finetune.lesion import search
    hu = np.full((12, 12, 12), -1000.0, np.float32)  # air
    hu[2:10, 2:10, 2:10] = np.linspace(-200, 300, 8 ** 3).reshape(8, 8, 8)  # fat to bone, the brain range inside
    save_volume(tmp_path / "ct.nii.gz", hu, np.diag([2.0, 2.0, 2.0, 1.0]))
    prep = PrepConfig(spacing=(2.0, 2.0, 2.0), modality="ct", ct_window=(-100.0, 200.0), crop_foreground=False)
    good, rejected = prepare_table(pd.DataFrame([{"subject_id": "c1", "image": str(tmp_path / "ct.nii.gz")}]), prep,
                                   tmp_path / "cache", require_lesion=False, on_error="collect", progress=False)
    assert not rejected
    entry = CacheEntry.from_path(good["cache_image"].iloc[0])
    back = search.source_intensity(np.asarray(entry.image()[0]), entry.meta, "ct")
    np.testing.assert_allclose(back, np.clip(hu, -100, 200), atol=1e-3)  # the window's HU, voxel for voxel
