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
    near = cand.nearest_label(labels, affine, small_centre)
    assert cand.choose_index(table, label=near) == (table["label"].iloc[1], cand.FOUND)
    assert list(table["index_lesion"]) == [False, True]


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
