"""benchmarks.research.lesion_rescore: a candidate score learned on the validation heads picks the index lesion the
hand-made score misses, on heads it was never fitted on, and lesion_finder's figures follow the chosen candidate."""
import json

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from benchmarks.research.lesion_finder import score_heads
from benchmarks.research.lesion_rescore import candidate_table, dice_by_rank, image_features, main


def _box(shape, lo, size=2):
    m = np.zeros(shape, bool)
    m[lo[0]:lo[0] + size, lo[1]:lo[1] + size, lo[2]:lo[2] + size] = True
    return m


def _searched_set(folder, n, rng):
    """n heads, each with two candidates: the lesion (small, bright, p_mean about 0.7) and wrong tissue (large,
    as bright as its surround, p_mean about 0.8). The hand score (p_mean x a volume factor) ranks the wrong one
    first in every head; what tells them apart is the volume and the contrast, which only a learned score can
    weigh against p_mean."""
    masks = folder / "predicted_masks"
    masks.mkdir(parents=True)
    shape, rows, cands = (10, 10, 10), [], []
    for i in range(n):
        sid = f"h{i}"
        lesion, wrong = _box(shape, (1, 1, 1)), _box(shape, (5, 5, 5), 3)
        nib.save(nib.Nifti1Image(lesion.astype(np.uint8), np.eye(4)), folder / f"{sid}_mask.nii.gz")
        image = rng.normal(1.0, 0.1, shape).astype(np.float32) + 2.0 * lesion
        nib.save(nib.Nifti1Image(image, np.eye(4)), folder / f"{sid}_image.nii.gz")
        labels = np.zeros(shape, np.int16)
        labels[wrong], labels[lesion] = 1, 2  # rank 1: the hand score's best
        nib.save(nib.Nifti1Image(labels, np.eye(4)), masks / f"{sid}_candidates.nii.gz")
        rows.append({"subject_id": sid, "patient_id": sid, "mask": str(folder / f"{sid}_mask.nii.gz"),
                     "image": str(folder / f"{sid}_image.nii.gz")})
        for rank, p_mean, volume in ((1, 0.8, 8.0), (2, 0.7, 3.0)):
            p_mean, volume = p_mean + rng.normal(0, 0.02), volume * np.exp(rng.normal(0, 0.2))
            cands.append({"subject_id": sid, "rank": rank, "score": p_mean * volume / (volume + 0.05),
                          "p_max": p_mean + 0.15, "p_mean": p_mean, "volume_ml": volume,
                          "depth_mm": 20 + rng.normal(0, 2), "in_region": 1.0})
    pd.DataFrame(cands).to_csv(masks / "candidates.csv", index=False)
    heads = pd.DataFrame(rows)
    heads.to_csv(folder / "heads.csv", index=False)
    score_heads(heads, heads, pd.DataFrame(cands), masks).to_csv(folder / "heads_scored.csv", index=False)
    (folder / "timing.json").write_text(json.dumps({"seconds": float(n), "heads": n}))


def test_the_learned_score_finds_what_the_hand_score_misses_on_heads_it_never_saw(tmp_path, capsys):
    rng = np.random.default_rng(0)
    _searched_set(tmp_path / "val", 12, rng)
    _searched_set(tmp_path / "test", 6, rng)
    table = candidate_table(tmp_path / "test")
    lesion = table[table["rank"] == 2]
    assert lesion["touches"].all() and not table.loc[table["rank"] == 1, "touches"].any()
    assert lesion["dice_drawn"].eq(1.0).all()  # the candidate is the drawn lesion's 8 voxels
    assert main(["--finder", str(tmp_path), "--sets", "test"]) == 0
    results = json.loads((tmp_path / "rescore" / "results.json").read_text())
    assert results["scores"]["hand"]["youden"]["test"]["found_best"] == 0 and results["val_candidates"] == 24
    for score in ("learned", "learned_image"):
        learned = results["scores"][score]["youden"]
        assert learned["test"]["found_best"] == 6
        assert learned["val"]["found_best"] == 12  # out of fold: each head scored by a model fitted on the others
        # predict would write the chosen candidate: the drawn lesion itself, Dice 1, for every confident head
        assert learned["test"]["detected"] == 6 and learned["test"]["median_dice"] == pytest.approx(1.0)
        assert results["models"][score]["coef"]["log_volume_ml"] < 0
    assert results["models"]["learned_image"]["coef"]["contrast"] > 0
    assert "learned_image youden" in capsys.readouterr().out


def test_image_features_by_hand(tmp_path):
    """A 2^3 candidate of intensity 4 in a head whose voxels are 1 or 2 (halves: IQR 1, median 1.5), its
    2-voxel shell all 1: contrast (4 - 1) / 1 = 3, rel_intensity 4 / 1.5; an L-shaped 3-voxel candidate fills
    3 of its 2 x 2 x 1 box's 4 voxels."""
    shape = (12, 12, 12)
    image = np.ones(shape, np.float32)
    image[:, 6:, :] = 2.0
    labels = np.zeros(shape, np.int16)
    labels[2:4, 1:3, 2:4] = 1
    image[labels == 1] = 4.0
    labels[9, 8, 9], labels[10, 8, 9], labels[9, 9, 9] = 2, 2, 2
    nib.save(nib.Nifti1Image(image, np.eye(4)), tmp_path / "i.nii.gz")
    nib.save(nib.Nifti1Image(labels, np.eye(4)), tmp_path / "l.nii.gz")
    f = image_features(str(tmp_path / "i.nii.gz"), str(tmp_path / "l.nii.gz"))
    q1, med, q3 = np.percentile(image, [25, 50, 75])
    assert f[1]["contrast"] == pytest.approx((4 - 1) / (q3 - q1)) and f[1]["rel_intensity"] == pytest.approx(4 / med)
    assert f[1]["extent"] == 1.0 and f[2]["extent"] == pytest.approx(3 / 4)


def test_dice_by_rank_is_each_candidates_overlap_with_the_drawn_lesion(tmp_path):
    """By hand: rank 1 holds 8 voxels, 4 inside the 8-voxel lesion (2 x 4 / 16 = 0.5); rank 2 is off it."""
    shape = (8, 8, 8)
    lesion = _box(shape, (2, 2, 2))
    labels = np.zeros(shape, np.int16)
    labels[3:5, 2:4, 2:4], labels[6, 6, 6] = 1, 2
    nib.save(nib.Nifti1Image(lesion.astype(np.uint8), np.eye(4)), tmp_path / "m.nii.gz")
    nib.save(nib.Nifti1Image(labels, np.eye(4)), tmp_path / "l.nii.gz")
    assert dice_by_rank(str(tmp_path / "l.nii.gz"), str(tmp_path / "m.nii.gz")) == {1: 0.5, 2: 0.0}
