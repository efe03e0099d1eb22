"""Segmentation metrics count the misses (issue 32, defect 10): HD95 is MONAI's where both masks have a lesion,
the crop's diagonal in mm where one of them is empty, and the report gives the number of misses beside the mean."""
import math

import numpy as np
import pandas as pd
import pytest
import torch

from finetune.lesion.seg_metrics import segmentation_metrics, segmentation_report


def cube(size, lo, hi):
    """A [1, 1, size, size, size] mask with the cube [lo, hi)^3 set."""
    m = torch.zeros(1, 1, size, size, size)
    m[0, 0, lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]] = 1
    return m


@pytest.mark.filterwarnings("ignore:.*always_return_as_numpy:FutureWarning")  # MONAI 1.6 about itself
def test_found_lesions_match_monai_hd95():
    """Three found lesions of different shapes and voxel sizes: HD95 equals MONAI's, subject by subject."""
    from monai.metrics import compute_hausdorff_distance
    true = torch.cat([cube(12, (2, 2, 2), (7, 7, 7)), cube(12, (3, 3, 3), (9, 6, 8)), cube(12, (1, 4, 2), (5, 9, 6))])
    pred = torch.cat([cube(12, (3, 2, 2), (8, 8, 7)), cube(12, (3, 4, 3), (11, 6, 9)), cube(12, (1, 4, 2), (5, 9, 6))])
    pred[0, 0, 10, 10, 10] = 1  # a stray voxel: a distance the 95th percentile must weigh, not the maximum
    voxel_mm = np.array([1.0, 2.0, 0.5])
    got = segmentation_metrics(pred, true, voxel_mm)["hd95_mm"]
    for i in range(3):
        want = float(compute_hausdorff_distance(pred[i:i + 1], true[i:i + 1], include_background=True,
                                                percentile=95, spacing=float(voxel_mm[i]))[0, 0])
        assert got[i] == pytest.approx(want)
    assert got[2] == 0.0 and got[1] > 0


def test_a_missed_lesion_is_counted_at_the_crop_diagonal():
    """Nothing predicted on a 10^3 crop of 2 mm voxels: Dice 0 and HD95 = 2 mm x sqrt(3 x 10^2)."""
    true = cube(10, (2, 2, 2), (6, 6, 6))
    m = segmentation_metrics(torch.zeros_like(true), true, [2.0])
    assert m["dice"][0] == 0.0
    assert m["hd95_mm"][0] == pytest.approx(2.0 * math.sqrt(300.0))  # 34.64 mm
    # a lesion predicted where the crop has none is the same worst case, on a non-cubic crop of 1.5 mm
    pred = torch.zeros(1, 1, 4, 6, 8)
    pred[0, 0, 1:3, 1:3, 1:3] = 1
    m = segmentation_metrics(pred, torch.zeros_like(pred), 1.5)
    assert m["dice"][0] == 0.0 and m["hd95_mm"][0] == pytest.approx(1.5 * math.sqrt(16 + 36 + 64))


def test_empty_truth_and_empty_prediction_is_a_perfect_match():
    """No lesion and none predicted: Dice 1 and HD95 0 (the BraTS convention), and not a miss."""
    empty = torch.zeros(1, 1, 6, 6, 6)
    m = segmentation_metrics(empty, empty, [1.0])
    assert m["dice"][0] == 1.0 and m["hd95_mm"][0] == 0.0
    rep = segmentation_report(pd.DataFrame({k: v for k, v in m.items()}), n_boot=10)
    assert rep["missed"] == 0 and rep["hd95_misses"] == 0 and rep["hd95_found_mm"]["n"] == 0


def test_report_puts_the_misses_into_the_mean_and_counts_them():
    """Two found lesions (HD95 2 mm and 0 mm) and one missed: the mean HD95 is (2 + 0 + diagonal) / 3 over n = 3,
    with 1 miss beside it; the mean over found lesions alone is 1 mm over n = 2; Dice is (d1 + 1 + 0) / 3."""
    true = torch.cat([cube(10, (2, 2, 2), (6, 6, 6))] * 3)
    pred = torch.cat([cube(10, (3, 2, 2), (7, 6, 6)), cube(10, (2, 2, 2), (6, 6, 6)), torch.zeros(1, 1, 10, 10, 10)])
    m = segmentation_metrics(pred, true, [2.0, 2.0, 2.0])
    diagonal = 2.0 * math.sqrt(300.0)
    assert m["hd95_mm"] == pytest.approx([2.0, 0.0, diagonal])
    rep = segmentation_report(pd.DataFrame(m), n_boot=20)
    assert rep["n"] == 3 and rep["missed"] == 1 and rep["hd95_misses"] == 1
    assert rep["hd95_mm"]["n"] == 3 and rep["hd95_mm"]["mean"] == pytest.approx((2.0 + 0.0 + diagonal) / 3)
    assert rep["hd95_found_mm"]["n"] == 2 and rep["hd95_found_mm"]["mean"] == pytest.approx(1.0)
    assert rep["dice"]["mean"] == pytest.approx((2 * 48 / 128 + 1.0 + 0.0) / 3)


def test_an_anisotropic_grid_counts_each_axis_in_its_own_mm():
    """Voxels of 1 x 1 x 3 mm (a [B, 3] voxel_mm): a lesion shifted by one voxel along z is 3 mm off, not 1
    (the hand count: the shifted faces lie one z-voxel apart); a 2^3-voxel lesion is 2 x 2 x 6 mm = 0.024 ml;
    a miss sits at the diagonal sqrt((1 x 8)^2 + (1 x 8)^2 + (3 x 8)^2) mm."""
    true = cube(8, (2, 2, 2), (4, 4, 4))
    shifted = cube(8, (2, 2, 3), (4, 4, 5))
    m = segmentation_metrics(torch.cat([shifted, torch.zeros_like(true)]), torch.cat([true, true]),
                             np.array([[1.0, 1.0, 3.0]] * 2))
    assert m["hd95_mm"][0] == pytest.approx(3.0)
    assert m["true_volume_ml"] == pytest.approx([0.024, 0.024])
    assert m["hd95_mm"][1] == pytest.approx(math.sqrt(64 + 64 + 576))
