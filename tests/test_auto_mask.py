"""Predict without a mask (finetune/lesion/search.py): the lesion found comes back on the image's own grid, and
predict fills the masks of a manifest that has none, flags a row with no confident lesion (no outcome) unless
--accept_low_confidence, writes every candidate, and refuses a head trained on lesion crops only."""
import math

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import torch

from data.nifti import save_volume
from data.prep_config import PrepConfig
from data.prepare import prepare_table
from finetune.lesion import search
from models.input_spec import InputSpec, ViewSpec
from test_lesion_candidates import oblique_lps_affine  # the LPS oblique anisotropic grid both files test on


def brain_with_ball(path_dir, name, ball_centre_vox, shape=(56, 60, 16), radius_mm=7.0, affine=None, ball=True):
    """A bright ball in a noisy ellipsoidal 'brain' surrounded by air; returns (image path, true mask on the
    same grid)."""
    affine = oblique_lps_affine() if affine is None else affine
    idx = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), -1).astype(float)  # [X, Y, Z, 3]
    world = idx @ affine[:3, :3].T + affine[:3, 3]
    centre_world = affine[:3, :3] @ np.asarray(ball_centre_vox, float) + affine[:3, 3]
    mask = (np.linalg.norm(world - centre_world, axis=-1) <= radius_mm) & ball
    rng = np.random.default_rng(0)
    box_centre = (np.array(shape) - 1) / 2
    brain = (((idx - box_centre) / (0.45 * np.array(shape))) ** 2).sum(-1) <= 1  # an ellipsoid in air
    image = np.where(brain, 100 + 5 * rng.standard_normal(shape), 0.0)
    image[mask] += 200
    path = path_dir / f"{name}.nii.gz"
    save_volume(path, image.astype(np.float32), affine)
    return path, mask


class ThresholdSegmenter:
    """Stands in for a trained head: lesion logits where the (normalised) image exceeds `threshold`."""
    def __init__(self, threshold):
        self.threshold = threshold

    def segment(self, x):
        return 20.0 * (x[:, :1] - self.threshold)  # [B, 1, S, S, S]


SPEC = InputSpec(prep=PrepConfig(spacing=(2.0, 2.0, 2.0)), input_size=24, channels=("image", "lesion_mask"),
                 view=ViewSpec(crop_mm=24.0))  # model voxel 1 mm: the sliding window runs at 2x the prepared grid


def test_predicted_mask_lands_on_the_source_grid(tmp_path):
    centre_vox = (30.0, 26.0, 8.0)
    path, true_mask = brain_with_ball(tmp_path, "s1", centre_vox)
    df = pd.DataFrame({"subject_id": ["s1"], "image": [str(path)]})
    good, rejected = prepare_table(df, SPEC.prep, tmp_path / "cache", require_lesion=False, on_error="collect",
                                   progress=False)
    assert not rejected
    image = np.load(good["cache_image"].iloc[0])[0]
    model = ThresholdSegmenter(threshold=(image.max() + np.median(image)) / 2)
    found = search.search_lesion([model], good.iloc[0], SPEC, tmp_path / "masks")
    assert found.status == "found" and len(found.candidates) == 1 and found.candidates["index_lesion"].all()
    written = nib.load(found.mask_path)
    assert np.allclose(written.affine, nib.load(path).affine) and written.shape == true_mask.shape
    pred = np.asanyarray(written.dataobj) > 0
    got, want = np.argwhere(pred).mean(0), np.argwhere(true_mask).mean(0)
    assert np.all(np.abs(got - want) <= 1.0), (got, want)  # centroid within one source voxel on every axis
    assert found.volume_ml == pytest.approx(4 / 3 * math.pi * 7.0 ** 3 / 1000, rel=0.3)
    # the candidate's centroid is in world mm: the ball's centre through the LPS oblique source affine
    affine = nib.load(path).affine
    centre_world = affine[:3, :3] @ np.asarray(centre_vox) + affine[:3, 3]
    got_world = found.candidates[["x_mm", "y_mm", "z_mm"]].to_numpy(float)[0]
    assert np.linalg.norm(got_world - centre_world) < 2.0, (got_world, centre_world)  # one prepared voxel
    ranks = np.asanyarray(nib.load(tmp_path / "masks" / "s1_candidates.nii.gz").dataobj)
    np.testing.assert_array_equal(ranks > 0, pred)  # the label map of every candidate, rank 1 here


def test_the_fallback_region_passes_over_a_scalp_rim():
    """Without a brain, the region is the head deeper than the surface margin: a rim at the surface, even one
    closed all around the head (its centroid deep, its voxels not), is no candidate."""
    from finetune.lesion import candidates as cand
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    image = np.zeros((20, 20, 20))
    image[1:19, 1:19, 1:19] = 1.0  # the head, 18 voxels of 2 mm across
    depth = search.head_depth_mm(image, 0.0, (2.0, 2.0, 2.0))
    assert depth[0, 0, 0] == 0 and depth[1, 10, 10] == pytest.approx(2.0) and depth[10, 10, 10] == pytest.approx(18.0)
    lesion = np.zeros_like(image)
    lesion[9:12, 9:12, 9:12] = 0.9  # a 27-voxel lesion in the middle
    shell = (depth > 0) & (depth <= 2.0)
    for rim in (np.pad(np.ones((2, 18, 18)), ((1, 17), (1, 1), (1, 1))) > 0, shell):  # one face; all around
        prob = np.where(rim, 0.9, lesion)
        assert len(cand.find_candidates(prob, affine)[0]) == 2
        table, labels = cand.find_candidates(prob, affine, depth > 10.0, depth)
        assert len(table) == 1 and (labels > 0).sum() == 27 and labels[10, 10, 10]
        assert table["depth_mm"].iloc[0] == pytest.approx(np.median(depth[9:12, 9:12, 9:12]))


def joint_model_and_threshold(tmp_path, monkeypatch, whole_head_trained=True):
    """A saved outcome model with a segmentation head, its untrained head replaced by a threshold: the bright
    ball, with p = 1; a head with no ball gets a faint 6 mm cube at its centre, p = 0.55 over 0.216 ml: a
    candidate, not a confident one. `whole_head_trained`: its config says the head saw lesion-free windows."""
    from finetune.fold import SEG_WINDOWS_KEY
    from models.multimodal import MultimodalConfig, MultimodalModel
    from models.vit3d import ViT3DConfig
    torch.manual_seed(0)
    cfg = MultimodalConfig(encoder=ViT3DConfig(in_channels=2, img_size=24, patch_size=6, dim=24, depth=2, heads=2),
                           task="classification", fusion="none", seg_weight=0.5)
    extra = {"clinical_schema": None, **({SEG_WINDOWS_KEY: True} if whole_head_trained else {})}
    MultimodalModel(cfg).save_pretrained(tmp_path / "model", extra_config=extra, card={}, input_spec=SPEC)
    real = search.lesion_probability

    def thresholded(models, image, spec, pad_value, **kw):
        real(models, image, spec, pad_value, **kw)  # the real sliding window still runs
        brain = image[0][image[0] > image.min()]
        prob = (image[0] > brain.mean() + 5 * brain.std()).astype(float)  # [X, Y, Z]
        if not prob.any():  # no ball
            centre = tuple(slice(n // 2 - 1, n // 2 + 2) for n in prob.shape)  # 3 voxels of 2 mm a side
            prob[centre] = 0.55
        return prob

    monkeypatch.setattr(search, "lesion_probability", thresholded)
    return tmp_path / "model"


def three_heads(tmp_path, with_ball=(True, True, False)):
    """Three heads, as NIfTI, in a manifest with no mask column; their paths and the manifest's."""
    paths = [brain_with_ball(tmp_path, f"s{i}", (28.0 + i, 30.0, 8.0), ball=b)[0] for i, b in enumerate(with_ball)]
    pd.DataFrame({"subject_id": [f"s{i}" for i in range(len(paths))], "image": [str(p) for p in paths]}).to_csv(
        tmp_path / "m.csv", index=False)
    return paths, tmp_path / "m.csv"


def test_predict_without_a_mask_column(tmp_path, monkeypatch):
    """A manifest with no mask column: masks are written and outcomes predicted; a row with no confident
    lesion is flagged and gets no outcome, the others go on; every candidate is in candidates.csv."""
    from finetune import predict
    paths, manifest = three_heads(tmp_path)
    model = joint_model_and_threshold(tmp_path, monkeypatch)
    out = tmp_path / "out" / "pred.csv"
    assert predict.main(["--model", str(model), "--manifest", str(manifest), "--out", str(out)]) == 0
    res = pd.read_csv(out, dtype={"subject_id": str}, keep_default_na=False, na_values=[""])
    assert list(res.subject_id) == ["s0", "s1", "s2"] and not out.with_suffix(".rejected.csv").exists()
    assert list(res.lesion_status) == ["found", "found", "no_confident_lesion"]
    assert res["prob"][:2].between(0, 1).all() and np.isnan(res["prob"][2])  # the flagged row: no outcome
    assert (res.mask_source == "predicted").all() and (res.predicted_volume_ml[:2] > 0).all()
    assert np.isnan(res.predicted_mask[2]) and np.isnan(res.predicted_volume_ml[2])
    assert res.search_region.str.startswith("estimated").all()
    assert "dice_vs_given" not in res.columns  # there was no drawn mask to compare with
    masks = out.parent / "pred_masks"
    for sid, mask_path in zip(res.subject_id[:2], res.predicted_mask[:2]):
        assert mask_path == str(masks / f"{sid}_pred_mask.nii.gz")  # beside --out
        assert nib.load(mask_path).shape == nib.load(paths[int(sid[1])]).shape
        assert (masks / f"{sid}_pred_mask.png").is_file()
    assert not (masks / "s2_pred_mask.nii.gz").exists()
    cands = pd.read_csv(masks / "candidates.csv", dtype={"subject_id": str})
    assert list(cands.subject_id) == ["s0", "s1", "s2"] and list(cands["rank"]) == [1, 1, 1]
    assert list(cands.confident) == [True, True, False] and list(cands.index_lesion) == [True, True, False]
    assert cands.score[2] == pytest.approx(0.55 * 0.216 / (0.216 + 0.05))  # the faint cube, by hand


def test_accept_low_confidence_takes_the_best_candidate_marked(tmp_path, monkeypatch):
    from finetune import predict
    paths, manifest = three_heads(tmp_path, with_ball=(False,))
    model = joint_model_and_threshold(tmp_path, monkeypatch)
    out = tmp_path / "pred.csv"
    assert predict.main(["--model", str(model), "--manifest", str(manifest), "--out", str(out),
                         "--accept_low_confidence"]) == 0
    res = pd.read_csv(out, dtype={"subject_id": str})
    assert list(res.lesion_status) == ["low_confidence_accepted"] and res["prob"].between(0, 1).all()
    assert res.predicted_volume_ml[0] == pytest.approx(0.216)
    assert nib.load(res.predicted_mask[0]).shape == nib.load(paths[0]).shape
    cands = pd.read_csv(tmp_path / "pred_masks" / "candidates.csv")
    assert list(cands.index_lesion) == [True] and list(cands.confident) == [False]


def test_the_confidence_threshold_is_the_users_to_set(tmp_path, monkeypatch, capsys):
    """The faint cube scores 0.447 by hand (0.55 x 0.216 / (0.216 + 0.05)): flagged at the default 0.5, taken
    as found (not merely accepted) at --confidence_threshold 0.4; a threshold outside [0, 1] is one line."""
    from finetune import predict
    _, manifest = three_heads(tmp_path, with_ball=(False,))
    model = joint_model_and_threshold(tmp_path, monkeypatch)
    out = tmp_path / "pred.csv"
    assert predict.main(["--model", str(model), "--manifest", str(manifest), "--out", str(out),
                         "--confidence_threshold", "0.4"]) == 0
    res = pd.read_csv(out, dtype={"subject_id": str})
    assert list(res.lesion_status) == ["found"] and res["prob"].between(0, 1).all()
    capsys.readouterr()
    with pytest.raises(SystemExit) as info:
        predict.main(["--model", str(model), "--manifest", str(manifest), "--out", str(tmp_path / "bad.csv"),
                      "--confidence_threshold", "1.5"])
    err = capsys.readouterr().err.strip()
    assert info.value.code == 2 and "\n" not in err and "--confidence_threshold" in err
    assert not (tmp_path / "bad.csv").exists()


def test_the_search_overlap_reaches_the_sliding_window(tmp_path, monkeypatch, capsys):
    """--overlap 0 is the overlap every search of the run slides with (the default: the search's own); outside
    [0, 1) it is one line, before any work."""
    import finetune.lesion.search as search
    from finetune import predict
    _, manifest = three_heads(tmp_path, with_ball=(True,))
    model = joint_model_and_threshold(tmp_path, monkeypatch)
    seen, real = [], search.lesion_probability

    def spy(models, image, spec, pad_value, **kw):
        seen.append(kw["overlap"])
        return real(models, image, spec, pad_value, **kw)
    monkeypatch.setattr(search, "lesion_probability", spy)
    for flags, want in (([], search.OVERLAP), (["--overlap", "0"], 0.0)):
        assert predict.main(["--model", str(model), "--manifest", str(manifest), "--out",
                             str(tmp_path / "pred.csv"), *flags]) == 0
        assert seen.pop() == want and not seen
    capsys.readouterr()
    with pytest.raises(SystemExit) as info:
        predict.main(["--model", str(model), "--manifest", str(manifest), "--out", str(tmp_path / "bad.csv"),
                      "--overlap", "1"])
    err = capsys.readouterr().err.strip()
    assert info.value.code == 2 and "\n" not in err and "--overlap" in err and not (tmp_path / "bad.csv").exists()


def test_a_head_trained_on_lesion_crops_only_is_refused_in_one_line(tmp_path, monkeypatch, capsys):
    from finetune import predict
    _, manifest = three_heads(tmp_path, with_ball=(True,))
    model = joint_model_and_threshold(tmp_path, monkeypatch, whole_head_trained=False)
    with pytest.raises(SystemExit) as info:
        predict.main(["--model", str(model), "--manifest", str(manifest), "--out", str(tmp_path / "pred.csv")])
    err = capsys.readouterr().err.strip()
    assert info.value.code == 2 and "\n" not in err and "seg_background_windows" in err and str(model) in err
    assert not (tmp_path / "pred.csv").exists()


def test_segment_all_scores_the_drawn_masks(tmp_path, monkeypatch):
    from finetune import predict
    rows = []
    for i in range(2):
        image, mask = brain_with_ball(tmp_path, f"s{i}", (26.0 + 2 * i, 30.0, 8.0))
        save_volume(tmp_path / f"s{i}_mask.nii.gz", mask.astype(np.uint8), nib.load(image).affine, dtype=np.uint8)
        rows.append({"subject_id": f"s{i}", "image": str(image), "mask": str(tmp_path / f"s{i}_mask.nii.gz")})
    pd.DataFrame(rows).to_csv(tmp_path / "m.csv", index=False)
    model = joint_model_and_threshold(tmp_path, monkeypatch)
    before = (tmp_path / "s0_mask.nii.gz").read_bytes()
    out = tmp_path / "pred.csv"
    assert predict.main(["--model", str(model), "--manifest", str(tmp_path / "m.csv"), "--out", str(out),
                         "--segment_all"]) == 0
    res = pd.read_csv(out, dtype={"subject_id": str})
    assert (res.mask_source == "predicted").all() and (res.dice_vs_given > 0.7).all()
    assert (tmp_path / "s0_mask.nii.gz").read_bytes() == before  # the drawn mask stays as it was
