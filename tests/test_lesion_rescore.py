"""benchmarks.research.lesion_rescore: a candidate score learned on the validation heads picks the index lesion the
hand-made score misses, on heads it was never fitted on, and lesion_finder's figures follow the chosen candidate."""
import json

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from benchmarks.research.lesion_finder import score_heads
from benchmarks.research.lesion_rescore import candidate_table, dice_by_rank, main


def _box(shape, lo, size=2):
    m = np.zeros(shape, bool)
    m[lo[0]:lo[0] + size, lo[1]:lo[1] + size, lo[2]:lo[2] + size] = True
    return m


def _searched_set(folder, n, rng):
    """n heads, each with two candidates: the lesion (small, p_mean about 0.7) and wrong tissue (large, p_mean
    about 0.8). The hand score (p_mean x a volume factor) ranks the wrong one first in every head; what tells
    them apart is the volume, which only a learned score can weigh against p_mean."""
    masks = folder / "predicted_masks"
    masks.mkdir(parents=True)
    shape, rows, cands = (10, 10, 10), [], []
    for i in range(n):
        sid = f"h{i}"
        lesion, wrong = _box(shape, (1, 1, 1)), _box(shape, (5, 5, 5), 3)
        nib.save(nib.Nifti1Image(lesion.astype(np.uint8), np.eye(4)), folder / f"{sid}_mask.nii.gz")
        labels = np.zeros(shape, np.int16)
        labels[wrong], labels[lesion] = 1, 2  # rank 1: the hand score's best
        nib.save(nib.Nifti1Image(labels, np.eye(4)), masks / f"{sid}_candidates.nii.gz")
        rows.append({"subject_id": sid, "patient_id": sid, "mask": str(folder / f"{sid}_mask.nii.gz")})
        for rank, p_mean, volume in ((1, 0.8, 8.0), (2, 0.7, 3.0)):
            p_mean, volume = p_mean + rng.normal(0, 0.02), volume * np.exp(rng.normal(0, 0.2))
            cands.append({"subject_id": sid, "rank": rank, "score": p_mean * volume / (volume + 0.05),
                          "p_max": p_mean + 0.15, "p_mean": p_mean, "volume_ml": volume,
                          "depth_mm": 20 + rng.normal(0, 2), "in_region": 1.0})
    pd.DataFrame(cands).to_csv(masks / "candidates.csv", index=False)
    heads = pd.DataFrame(rows)
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
    hand, learned = results["scores"]["hand"]["youden"], results["scores"]["learned"]["youden"]
    assert hand["test"]["found_best"] == 0 and learned["test"]["found_best"] == 6
    assert learned["val"]["found_best"] == 12  # out of fold: each head scored by a model fitted on the others
    # predict would write the chosen candidate: the drawn lesion itself, Dice 1, for every confident head
    assert learned["test"]["detected"] == 6 and learned["test"]["median_dice"] == pytest.approx(1.0)
    assert results["coef"]["log_volume_ml"] < 0 and results["val_candidates"] == 24
    assert "learned  youden" in capsys.readouterr().out


def test_dice_by_rank_is_each_candidates_overlap_with_the_drawn_lesion(tmp_path):
    """By hand: rank 1 holds 8 voxels, 4 inside the 8-voxel lesion (2 x 4 / 16 = 0.5); rank 2 is off it."""
    shape = (8, 8, 8)
    lesion = _box(shape, (2, 2, 2))
    labels = np.zeros(shape, np.int16)
    labels[3:5, 2:4, 2:4], labels[6, 6, 6] = 1, 2
    nib.save(nib.Nifti1Image(lesion.astype(np.uint8), np.eye(4)), tmp_path / "m.nii.gz")
    nib.save(nib.Nifti1Image(labels, np.eye(4)), tmp_path / "l.nii.gz")
    assert dice_by_rank(str(tmp_path / "l.nii.gz"), str(tmp_path / "m.nii.gz")) == {1: 0.5, 2: 0.0}
