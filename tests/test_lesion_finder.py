"""The lesion finder's measurement (benchmarks.research.lesion_finder) counts what a user would: a head is
found when the best candidate overlaps the drawn lesion, a patient's second lesion is no false positive, a
flagged head is a miss in Dice and HD95, and the threshold comes from the validation heads alone."""
import json

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from benchmarks.research.lesion_finder import choose_threshold, head_metrics, predict_flag, score_heads, summarise


def box(shape, lo, hi):
    m = np.zeros(shape, bool)
    m[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]] = True
    return m


def test_found_means_the_best_candidate_overlaps_the_drawn_lesion():
    """Rank 1 on the drawn lesion (Dice by hand: 2 x 8 / (16 + 8) = 0.667), rank 2 on the patient's other
    lesion (touches it: no false positive), rank 3 in empty tissue (a false positive)."""
    shape = (12, 12, 12)
    drawn, other = box(shape, (1, 1, 1), (3, 3, 3)), box(shape, (8, 8, 8), (10, 10, 10))
    labels = np.zeros(shape, np.int32)
    labels[box(shape, (1, 1, 1), (3, 3, 5))] = 1   # 16 voxels, 8 inside the drawn lesion
    labels[other] = 2
    labels[box(shape, (5, 0, 0), (6, 1, 1))] = 3
    m = head_metrics(labels, drawn, drawn | other, (2.0, 2.0, 2.0))
    assert m["found"] and m["dice_best"] == pytest.approx(2 * 8 / 24)
    assert m["touches"] == {1: True, 2: True, 3: False}
    labels = np.select([labels == 1, labels == 2], [2, 1], labels)  # the other lesion ranked first: not the drawn one
    assert not head_metrics(labels, drawn, drawn | other, (2.0, 2.0, 2.0))["found"]


def test_threshold_is_youdens_point_of_the_validation_heads():
    """Found heads score 0.9 and 0.7, missed ones 0.3 and 0.6: every threshold in (0.6, 0.7] separates them
    (J = 1); roc_curve's is the lowest found score, 0.7."""
    val = pd.DataFrame({"found": [True, True, False, False], "best_score": [0.9, 0.7, 0.3, 0.6]})
    choice = choose_threshold(val)
    assert choice["threshold"] == pytest.approx(0.7) and choice["tpr"] == 1.0 and choice["fpr"] == 0.0
    from finetune.lesion.candidates import CONFIDENCE_THRESHOLD
    assert choose_threshold(val.assign(found=True))["threshold"] == CONFIDENCE_THRESHOLD


def test_the_no_silent_rule_leaves_no_wrong_validation_head_confident():
    """Found heads 0.9, 0.55, 0.5, 0.45; missed 0.3 and 0.6. By hand, Youden's J is largest (1 - 0.5) at 0.45
    (every found head, one missed one confident); no_silent takes 0.9, the only found score above 0.6 (TPR
    0.25, no missed head confident). When a missed head outscores every found one, nothing may be confident."""
    val = pd.DataFrame({"found": [True, True, True, True, False, False],
                        "best_score": [0.9, 0.55, 0.5, 0.45, 0.3, 0.6]})
    assert choose_threshold(val, "youden")["threshold"] == pytest.approx(0.45)
    strict = choose_threshold(val, "no_silent")
    assert strict["threshold"] == pytest.approx(0.9) and strict["tpr"] == 0.25 and strict["fpr"] == 0.0
    worst = choose_threshold(val.assign(best_score=[0.5, 0.4, 0.3, 0.2, 0.1, 0.95]), "no_silent")
    assert worst["threshold"] > 0.95 and worst["tpr"] == 0.0


def test_a_flagged_head_counts_as_a_miss_and_a_confident_wrong_one_as_silent(tmp_path):
    """Three heads on a 10^3 grid of 1 x 1 x 3 mm: found and confident (Dice 1, HD95 0), found but flagged
    (Dice 0, HD95 at the diagonal), wrong and confident (a silent wrong lesion, Dice 0, one false positive)."""
    shape, affine = (10, 10, 10), np.diag([1.0, 1.0, 3.0, 1.0])
    lesion = box(shape, (2, 2, 2), (4, 4, 4))
    wrong = box(shape, (6, 6, 6), (8, 8, 8))
    rows, cands = [], []
    for sid, best, score in (("a", lesion, 0.9), ("b", lesion, 0.2), ("c", wrong, 0.8)):
        nib.save(nib.Nifti1Image(lesion.astype(np.uint8), affine), tmp_path / f"{sid}_mask.nii.gz")
        nib.save(nib.Nifti1Image(best.astype(np.int16), affine), tmp_path / f"{sid}_candidates.nii.gz")
        rows.append({"subject_id": sid, "patient_id": sid, "mask": str(tmp_path / f"{sid}_mask.nii.gz")})
        cands.append({"subject_id": sid, "rank": 1, "score": score})
    heads = pd.DataFrame(rows)
    scored = score_heads(heads, heads, pd.DataFrame(cands), tmp_path)
    assert scored["found"].tolist() == [True, True, False]
    s = summarise(scored, threshold=0.5, seconds=6.0)
    diagonal = float(np.sqrt(100 + 100 + 900))
    assert (s["detected"], s["flagged"], s["flagged_but_found"], s["silent_wrong"]) == (1, 1, 1, 1)
    assert s["mean_dice"] == pytest.approx(1 / 3) and s["median_dice"] == 0.0
    # HD95 sorted: 0 (a), the wrong lesion's distance (c), the diagonal (b, flagged); c lies between the
    # boxes' nearest voxels, (3, 3, 3) voxels = (3, 3, 9) mm apart, and their farthest, (5, 5, 5) = (5, 5, 15) mm
    assert np.sqrt(9 + 9 + 81) <= s["median_hd95_mm"] <= np.sqrt(25 + 25 + 225) < diagonal
    assert s["fp_per_head_confident"] == pytest.approx(1 / 3) and s["seconds_per_head"] == 2.0
    assert json.loads(scored.loc[2, "candidates"]) == [[0.8, False]]
    assert (s["silent_other_lesion"], s["silent_wrong_tissue"]) == (0, 1)  # c's best touches no lesion of c's


def test_the_patients_other_lesion_is_a_silent_miss_but_not_wrong_tissue(tmp_path):
    """Patient p has two lesions, rows a (drawn: the first) and b (drawn: the second). The best candidate of both
    heads is the first lesion, confident: b is not found (a silent wrong row) yet its best candidate is a real
    lesion of the patient, so it counts as another lesion, not as wrong tissue."""
    shape, affine = (10, 10, 10), np.eye(4)
    first, second = box(shape, (1, 1, 1), (3, 3, 3)), box(shape, (6, 6, 6), (8, 8, 8))
    rows, cands = [], []
    for sid, drawn in (("a", first), ("b", second)):
        nib.save(nib.Nifti1Image(drawn.astype(np.uint8), affine), tmp_path / f"{sid}_mask.nii.gz")
        nib.save(nib.Nifti1Image(first.astype(np.int16), affine), tmp_path / f"{sid}_candidates.nii.gz")
        rows.append({"subject_id": sid, "patient_id": "p", "mask": str(tmp_path / f"{sid}_mask.nii.gz")})
        cands.append({"subject_id": sid, "rank": 1, "score": 0.9})
    heads = pd.DataFrame(rows)
    s = summarise(score_heads(heads, heads, pd.DataFrame(cands), tmp_path), threshold=0.5, seconds=1.0)
    assert (s["detected"], s["silent_wrong"], s["silent_other_lesion"], s["silent_wrong_tissue"]) == (1, 1, 1, 0)


def test_a_given_lesion_centre_never_reaches_the_search_and_patient_id_is_required(tmp_path):
    """A manifest's lesion centre would pick the candidate for the search, so the heads drawn leave it out;
    without patient_id a patient's second lesion would count as a false positive, so it is refused."""
    from benchmarks.research.lesion_finder import draw_heads
    from core.errors import InputError
    from finetune.lesion.search import CENTRE_COLUMNS
    rows = pd.DataFrame({"subject_id": ["a", "b"], "patient_id": ["p", "p"], "image": ["a.nii.gz", "b.nii.gz"],
                         "mask": ["am.nii.gz", "bm.nii.gz"]} | {c: ["1.0", "2.0"] for c in CENTRE_COLUMNS})
    rows.to_csv(tmp_path / "m.csv", index=False)
    heads, _ = draw_heads(tmp_path / "m.csv", 5, tmp_path / "out" / "heads.csv")
    assert not set(CENTRE_COLUMNS) & set(pd.read_csv(tmp_path / "out" / "heads.csv").columns)
    assert heads["image"].iloc[0] == str((tmp_path / "a.nii.gz").resolve())
    rows.drop(columns="patient_id").to_csv(tmp_path / "m.csv", index=False)
    with pytest.raises(InputError, match="patient_id"):
        draw_heads(tmp_path / "m.csv", 5, tmp_path / "out" / "heads.csv")


def test_a_candidate_missing_from_the_label_map_still_counts_as_a_false_positive(tmp_path):
    """candidates.csv lists ranks 1 and 2; the written label map holds rank 1 only (rank 2's few voxels were lost
    going back to the source grid). The user still sees rank 2, so it is one false positive, at its score."""
    shape, affine = (8, 8, 8), np.eye(4)
    lesion = box(shape, (2, 2, 2), (4, 4, 4))
    nib.save(nib.Nifti1Image(lesion.astype(np.uint8), affine), tmp_path / "a_mask.nii.gz")
    nib.save(nib.Nifti1Image(lesion.astype(np.int16), affine), tmp_path / "a_candidates.nii.gz")
    heads = pd.DataFrame([{"subject_id": "a", "patient_id": "a", "mask": str(tmp_path / "a_mask.nii.gz")}])
    cands = pd.DataFrame([{"subject_id": "a", "rank": 1, "score": 0.9}, {"subject_id": "a", "rank": 2, "score": 0.7}])
    scored = score_heads(heads, heads, cands, tmp_path)
    assert json.loads(scored.loc[0, "candidates"]) == [[0.9, True], [0.7, False]]
    s = summarise(scored, threshold=0.5, seconds=1.0)
    assert s["fp_per_head_confident"] == 1.0 and s["fp_per_head_all"] == 1.0
    assert summarise(scored, threshold=0.8, seconds=1.0)["fp_per_head_confident"] == 0.0


def test_the_printed_predict_flag_keeps_the_threshold_exactly():
    """no_silent's threshold is the float just above a not-found head's score (0.734512345 here); a flag rounded
    to 6 digits (0.734512) would make that head confident again in predict."""
    val = pd.DataFrame({"found": [True, False], "best_score": [0.5, 0.734512345]})
    t = choose_threshold(val, "no_silent")["threshold"]
    value = float(predict_flag(t).split()[-1])
    assert value == t and value > 0.734512345
