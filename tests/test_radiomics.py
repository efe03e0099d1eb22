import json

import numpy as np
import pandas as pd
import pytest
from scipy import stats
from scipy.spatial import cKDTree
from skimage.feature import graycomatrix, graycoprops
from sklearn.metrics import roc_auc_score
from sksurv.datasets import load_veterans_lung_cancer
from sksurv.metrics import concordance_index_censored

from core.errors import InputError
from finetune.baselines.radiomics import (RadiomicsModel, extract_features, first_order_features, glcm_features, glcm_matrices,
                                peritumoral_ring, predict_splits, quantise, shape_features, survival_target)


def _ball(shape, centre_mm, radius_mm, spacing):
    grid = np.indices(shape).astype(float) * np.asarray(spacing)[:, None, None, None]
    return ((grid - np.asarray(centre_mm)[:, None, None, None]) ** 2).sum(0) <= radius_mm ** 2


# Anisotropic voxels make the staircase coarser along z (sphericity ~0.87 at 0.8 x 0.8 x 2 mm).
@pytest.mark.parametrize("spacing", [(1.0, 1.0, 1.0), (1.0, 1.0, 1.5)])
def test_sphere_shape(spacing):
    r = 10.0
    mask = _ball((30, 30, 30), (12, 12, 14), r, spacing)
    s = shape_features(mask, spacing)
    assert s["volume_mm3"] == pytest.approx(4 / 3 * np.pi * r ** 3, rel=0.03)
    assert s["mesh_volume_mm3"] == pytest.approx(4 / 3 * np.pi * r ** 3, rel=0.05)
    assert 0.9 < s["sphericity"] <= 1.0  # voxel staircase inflates the mesh area a little
    assert s["compactness"] == pytest.approx(s["sphericity"] ** 3)
    assert s["max_diameter_mm"] == pytest.approx(2 * r, rel=0.1)
    assert s["elongation"] == pytest.approx(1, abs=0.05) and s["flatness"] == pytest.approx(1, abs=0.05)


def test_box_volume_is_exact_and_axes_follow_the_box():
    spacing = (0.5, 1.0, 2.0)
    mask = np.zeros((30, 16, 12), bool)
    mask[2:22, 3:13, 4:9] = True  # 20 x 10 x 5 voxels = 10 x 10 x 10 mm: a cube in mm
    s = shape_features(mask, spacing)
    assert s["volume_mm3"] == 20 * 10 * 5 * 0.5 * 1.0 * 2.0
    # Voxel-centre variance along an axis of n voxels is (n^2 - 1)/12 * spacing^2.
    var = sorted([(n * n - 1) / 12 * h * h for n, h in zip((20, 10, 5), spacing)], reverse=True)
    assert s["elongation"] == pytest.approx(np.sqrt(var[1] / var[0]))
    assert s["flatness"] == pytest.approx(np.sqrt(var[2] / var[0]))
    assert s["major_axis_mm"] == pytest.approx(4 * np.sqrt(var[0]))
    assert s["surface_area_mm2"] == pytest.approx(600, rel=0.1)


def test_first_order_matches_scipy():
    rng = np.random.default_rng(0)
    image = rng.gamma(2.0, 1.5, (20, 20, 20))
    mask = _ball(image.shape, (10, 10, 10), 6, (1, 1, 1))
    v = image[mask]
    f = first_order_features(v, bins=32)
    assert f["mean"] == pytest.approx(np.mean(v)) and f["std"] == pytest.approx(np.std(v))
    assert f["skewness"] == pytest.approx(stats.skew(v))
    assert f["kurtosis"] == pytest.approx(stats.kurtosis(v, fisher=False))
    p10, p25, p50, p75, p90 = np.percentile(v, [10, 25, 50, 75, 90])
    assert (f["p10"], f["p50"], f["p90"]) == pytest.approx((p10, p50, p90))
    assert f["iqr"] == pytest.approx(stats.iqr(v))
    assert f["energy"] == pytest.approx(np.sum(v ** 2))
    assert f["entropy"] == pytest.approx(stats.entropy(np.histogram(v, bins=32)[0], base=2))
    # extract_features reports exactly these for the lesion region.
    feats = extract_features(image.astype(np.float32), mask.astype(np.uint8), (1, 1, 1))
    assert feats["lesion_firstorder_skewness"] == pytest.approx(stats.skew(v.astype(np.float32)), rel=1e-4)


def test_quantise_matches_numpy_histogram_bins():
    v = np.random.default_rng(1).normal(size=500)
    counts = np.bincount(quantise(v, 16), minlength=17)[1:]
    np.testing.assert_array_equal(counts, np.histogram(v, bins=16)[0])


def test_constant_region_uses_defined_fallbacks():
    image = np.full((8, 8, 8), 3.0)
    mask = np.zeros_like(image, bool)
    mask[2:6, 2:6, 2:6] = True
    f = first_order_features(image[mask], 32)
    assert f["std"] == 0 and f["skewness"] == 0 and f["kurtosis"] == 0 and f["entropy"] == 0
    g = glcm_features(image, mask, 32)
    assert g == {"contrast": 0, "dissimilarity": 0, "homogeneity": 1, "joint_energy": 1, "entropy": 0,
                 "correlation": 1}


def test_checkerboard_glcm_contrast():
    # Neighbours along 1 or 3 axes differ in parity, along 2 axes they agree: 3 + 4 of 13 directions.
    image = (np.indices((9, 9, 9)).sum(0) % 2).astype(float)
    region = np.ones(image.shape, bool)
    g = glcm_features(image, region, bins=2)
    assert g["contrast"] == pytest.approx(7 / 13)
    assert g["dissimilarity"] == pytest.approx(7 / 13)
    assert glcm_features(image, region, bins=32)["contrast"] == pytest.approx(7 / 13 * 31 ** 2)


def test_single_slice_glcm_agrees_with_skimage():
    rng = np.random.default_rng(2)
    image = rng.normal(size=(24, 20, 1)).cumsum(axis=0)  # some spatial correlation
    region = np.ones(image.shape, bool)
    bins = 8
    levels = quantise(image[..., 0], bins) - 1  # skimage counts levels from 0
    angles = [0, np.pi / 4, np.pi / 2, 3 * np.pi / 4]
    P = graycomatrix(levels.astype(np.uint8), [1], angles, levels=bins, symmetric=True, normed=False)
    ours = [m for m in glcm_matrices(levels[..., None] + 1, bins) if m.sum() > 0]
    assert len(ours) == 4  # only the in-plane directions have pairs
    theirs = [P[:, :, 0, a].astype(float) for a in range(4)]
    for m in theirs:
        assert any(np.array_equal(m, o) for o in ours)

    g = glcm_features(image, region, bins)
    Pn = P / P.sum(axis=(0, 1), keepdims=True)
    for prop in ("contrast", "dissimilarity", "homogeneity", "correlation"):
        assert g[prop] == pytest.approx(graycoprops(Pn, prop).mean(), rel=1e-6), prop
    assert g["joint_energy"] == pytest.approx(graycoprops(Pn, "ASM").mean(), rel=1e-6)  # skimage's energy is its root
    assert g["entropy"] == pytest.approx(graycoprops(Pn, "entropy").mean() / np.log(2), rel=1e-6)


def test_ring_is_outside_lesion_within_ring_mm_and_complete():
    spacing = (0.7, 0.7, 2.5)
    lesion = _ball((40, 40, 14), (14, 14, 17), 6.0, spacing)
    ring = peritumoral_ring(lesion, spacing, 5.0)
    assert ring.any() and not (ring & lesion).any()
    tree = cKDTree(np.argwhere(lesion) * spacing)
    outside = np.argwhere(~lesion)
    dist, _ = tree.query(outside * spacing)
    expected = np.zeros_like(lesion)
    expected[tuple(outside[dist <= 5.0].T)] = True
    np.testing.assert_array_equal(ring, expected)


def test_empty_ring_and_single_voxel_give_nan_for_undefined_features():
    image = np.random.default_rng(3).normal(size=(4, 4, 4)).astype(np.float32)
    f = extract_features(image, np.ones((4, 4, 4)), (1, 1, 1))
    assert np.isnan(f["ring_firstorder_mean"]) and np.isnan(f["ring_glcm_contrast"])
    assert np.isfinite(f["lesion_glcm_contrast"]) and np.isfinite(f["lesion_shape_sphericity"])
    one = np.zeros((4, 4, 4))
    one[2, 2, 2] = 1
    f = extract_features(image, one, (1, 1, 1))
    assert np.isnan(f["lesion_glcm_contrast"]) and f["lesion_shape_volume_mm3"] == 1
    with pytest.raises(InputError, match="empty"):
        extract_features(image, np.zeros((4, 4, 4)), (1, 1, 1))


def _driven_dataset(n, rng):
    X = rng.normal(size=(n, 25))
    X[:, 1] = X[:, 0] + 0.01 * rng.normal(size=n)  # a redundant copy the filter should drop
    y = (rng.random(n) < 1 / (1 + np.exp(-4 * X[:, 0]))).astype(int)
    X[:, 2:][rng.random((n, 23)) < 0.05] = np.nan  # a few missing values, imputed inside the pipeline
    return pd.DataFrame(X, columns=[f"f{i}" for i in range(25)]), y


def test_classifier_learns_the_driving_feature():
    rng = np.random.default_rng(4)
    X, y = _driven_dataset(160, rng)
    model = RadiomicsModel("classification", seed=0).fit(X[:110], y[:110])
    prob = model.predict(X[110:])
    assert ((prob >= 0) & (prob <= 1)).all()
    assert roc_auc_score(y[110:], prob) > 0.8  # chance is 0.5; knowing f0 exactly gives ~0.9
    assert model.best_params_["n_features_kept"] == 24  # the near-copy of f0 is dropped
    # Column order does not matter when fitted on a DataFrame.
    np.testing.assert_allclose(model.predict(X[110:][X.columns[::-1]]), prob)


def test_survival_model_ranks_veterans_data():
    X, y = load_veterans_lung_cancer()
    X = X[["Age_in_years", "Karnofsky_score", "Months_from_Diagnosis"]].astype(float)
    order = np.random.default_rng(5).permutation(len(X))
    train, test = order[:90], order[90:]
    model = RadiomicsModel("survival", seed=0).fit(X.iloc[train], y[train])
    risk = model.predict(X.iloc[test])
    cindex = concordance_index_censored(y[test]["Status"], y[test]["Survival_in_days"], risk)[0]
    assert cindex > 0.6  # Karnofsky score alone gives ~0.7 here


def test_predict_splits_layout_and_coverage():
    rng = np.random.default_rng(6)
    X, y = _driven_dataset(60, rng)
    ids = [f"s{i:02d}" for i in range(60)]
    X.index = pd.Index(ids, name="subject_id")
    targets = pd.DataFrame({"label": y}, index=X.index)
    test = ids[:12]
    rest = ids[12:]
    folds = [{"val": rest[k::3], "train": [s for s in rest if s not in rest[k::3]]} for k in range(3)]
    external = X.iloc[:5].copy()
    external.index = pd.Index([f"e{i}" for i in range(5)], name="subject_id")
    preds, params = predict_splits(X, targets, {"test": test, "folds": folds}, "classification",
                                   external=external)
    assert list(preds.columns) == ["subject_id", "split", "fold", "prob"]
    val = preds[preds.split == "val"]
    assert sorted(val.subject_id) == sorted(rest) and val.subject_id.is_unique
    for k, fold in enumerate(folds):
        assert sorted(val[val.fold == k].subject_id) == sorted(fold["val"])
    assert sorted(preds[preds.split == "test"].subject_id) == sorted(test)
    assert (preds[preds.split != "val"].fold == -1).all()
    ext = preds[preds.split == "external"].prob.to_numpy()
    # The external rows copy the first 5 (test) rows, so the all-train model scores them alike.
    np.testing.assert_allclose(ext, preds[preds.split == "test"].prob.to_numpy()[:5])
    assert [p["fold"] for p in params] == [0, 1, 2, -1]

    with pytest.raises(InputError, match="no features"):
        predict_splits(X.drop(index="s00"), targets, {"test": test, "folds": folds}, "classification")


def _write_cohort(folder, n, rng):
    from data.nifti import save_volume

    rows = []
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    for i in range(n):
        label = i % 2
        head = _ball((20, 20, 20), (10, 10, 10), 8, (1, 1, 1))
        image = np.where(head, rng.normal(100, 5, head.shape), rng.normal(0, 1, head.shape))
        lesion = _ball(head.shape, (10 + rng.integers(-2, 3), 10, 10), 2.5 + rng.random() * 1.5, (1, 1, 1))
        image[lesion] = rng.normal(140 if label else 70, 5, lesion.sum())  # enhancing vs necrotic, for the test
        save_volume(folder / f"s{i:02d}_img.nii.gz", image, affine)
        save_volume(folder / f"s{i:02d}_seg.nii.gz", lesion.astype(np.uint8), affine, dtype=np.uint8)
        rows.append({"subject_id": f"s{i:02d}", "image": f"s{i:02d}_img.nii.gz", "mask": f"s{i:02d}_seg.nii.gz",
                     "label": label, "time": 10.0 + i, "event": int(i % 3 != 0)})
    pd.DataFrame(rows).to_csv(folder / "manifest.csv", index=False)
    return folder / "manifest.csv"


def test_cli_writes_predictions_for_every_split(tmp_path, monkeypatch):
    from finetune.baselines import radiomics

    manifest = _write_cohort(tmp_path, 20, np.random.default_rng(7))
    out = tmp_path / "run"
    common = ["--manifest", str(manifest), "--cache", str(tmp_path / "cache"), "--out", str(out), "--folds", "3"]
    argv = common + ["--splits", str(tmp_path / "splits.json"), "--task", "classification", "--external", str(manifest)]
    assert radiomics.main(argv) == 0
    preds = pd.read_csv(out / "predictions.csv", dtype={"subject_id": str})
    assert list(preds.columns) == ["subject_id", "split", "fold", "prob"]
    splits = json.loads((tmp_path / "splits.json").read_text())
    assert sorted(preds[preds.split == "val"].subject_id) == sorted(s for f in splits["folds"] for s in f["val"])
    assert sorted(preds[preds.split == "test"].subject_id) == sorted(splits["test"])
    assert sorted(preds.fold.unique()) == [-1, 0, 1, 2]
    assert len(preds[preds.split == "external"]) == 20
    val = preds[preds.split == "val"].merge(pd.read_csv(manifest, dtype={"subject_id": str}), on="subject_id")
    assert roc_auc_score(val.label, val.prob) > 0.8  # lesion intensity separates the classes
    features = pd.read_csv(out / "features.csv")
    assert len(features) == 40 and set(features.cohort) == {"internal", "external"}

    # The survival run reuses the cached features (extracting again would fail).
    monkeypatch.setattr(radiomics, "extract_features", lambda *a, **k: pytest.fail("features recomputed"))
    assert radiomics.main(common + ["--splits", str(tmp_path / "splits_surv.json"), "--task", "survival"]) == 0
    preds = pd.read_csv(out / "predictions.csv", dtype={"subject_id": str})
    assert list(preds.columns) == ["subject_id", "split", "fold", "risk"] and set(preds.split) == {"val", "test"}
    assert len(pd.read_csv(out / "features.csv")) == 40  # the external rows stay cached

    with pytest.raises(SystemExit) as e:
        radiomics.main(common + ["--splits", str(tmp_path / "splits.json"), "--task", "classification",
                                 "--manifest", str(tmp_path / "absent.csv")])
    assert e.value.code == 2


def test_a_splits_file_for_another_cohort_is_refused_before_any_volume_is_prepared(tmp_path, capsys):
    """--splits made for other subjects is refused in one line before the cache or --out is written."""
    from data.splits import make_splits
    from finetune.baselines import radiomics

    manifest = _write_cohort(tmp_path, 8, np.random.default_rng(0))
    table = pd.read_csv(manifest, dtype={"subject_id": str})
    splits = make_splits(table.iloc[1:], test_fraction=0.25, folds=2, seed=0)  # made before s00 joined
    (tmp_path / "splits.json").write_text(json.dumps(splits))
    with pytest.raises(SystemExit) as e:
        radiomics.main(["--manifest", str(manifest), "--cache", str(tmp_path / "cache"), "--out", str(tmp_path / "out"),
                        "--splits", str(tmp_path / "splits.json"), "--task", "classification", "--folds", "2",
                        "--test_fraction", "0.25"])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and len(err.splitlines()) == 1 and "made for a different set of subjects" in err
    assert not (tmp_path / "cache").exists() and not (tmp_path / "out").exists()


def _one_signal_among_noise(n, p, rng):
    X = rng.normal(size=(n, p))  # column 0 drives the outcome, the rest is pure noise
    return pd.DataFrame(X, columns=[f"f{i}" for i in range(p)])


def test_univariate_l1_keeps_the_informative_feature_and_drops_the_noise():
    rng = np.random.default_rng(8)
    X = _one_signal_among_noise(150, 40, rng)
    y = (rng.random(150) < 1 / (1 + np.exp(-3 * X["f0"]))).astype(int)
    model = RadiomicsModel("classification", seed=0, selection="univariate_l1").fit(X, y)
    used = model.used_features()
    assert "f0" in used and len(used) <= 8  # L1 after k-best: a handful of 39 noise columns at most
    p = model.best_params_
    assert {"C", "n_features_kept", "k", "n_features_selected", "n_nonzero", "selection"} <= set(p)
    assert p["n_features_kept"] == 40 and p["n_nonzero"] == len(used)
    assert p["n_features_selected"] == (40 if p["k"] == "all" else p["k"])


def test_survival_selection_keeps_the_informative_feature():
    rng = np.random.default_rng(9)
    X = _one_signal_among_noise(150, 30, rng)
    time = rng.exponential(np.exp(-1.0 * X["f0"].to_numpy()))  # higher f0 -> earlier event
    event = rng.random(150) < 0.7
    model = RadiomicsModel("survival", seed=0, selection="univariate_l1").fit(X, survival_target(event, time))
    assert model.best_params_["selection"] == "univariate_l1" and "alpha" in model.best_params_
    assert "f0" in model.used_features()
    # The univariate score is direction-free and 0 for a constant column.
    from finetune.baselines.radiomics import concordance_scores

    y = survival_target(np.ones(50, bool), np.arange(50.0))
    cols = np.column_stack([-np.arange(50.0), np.arange(50.0), np.zeros(50)])
    np.testing.assert_allclose(concordance_scores(cols, y), [0.5, 0.5, 0.0])
    # Scores are memoised on the data: other data must never get stale scores.
    x = np.random.default_rng(0).normal(size=(50, 1))
    shuffled = survival_target(np.ones(50, bool), np.random.default_rng(1).permutation(50).astype(float))
    assert concordance_scores(x, y)[0] != concordance_scores(x, shuffled)[0]
    assert concordance_scores(x, y)[0] == concordance_scores(x.copy(), y)[0]


def test_selection_is_fitted_on_training_rows_only(monkeypatch):
    # The univariate score must be computed inside each inner-CV training fold and at the final refit, never
    # on rows the model did not get: record the row count of every call.
    from finetune.baselines import radiomics

    seen, real = [], radiomics.f_classif

    def spy(X, y):
        seen.append(len(X))
        return real(X, y)

    monkeypatch.setattr(radiomics, "f_classif", spy)
    rng = np.random.default_rng(10)
    X = _one_signal_among_noise(100, 12, rng)
    y = (X["f0"] + rng.normal(size=100) > 0).astype(int).to_numpy()
    train, held_out = np.arange(80), np.arange(80, 100)
    model = RadiomicsModel("classification", seed=0, selection="univariate_l1").fit(X.iloc[train], y[train])
    assert seen and max(seen) == 80 and set(seen) <= {64, 80}  # 5 inner folds of 80 rows, and the refit
    assert seen.count(80) == 1
    before = model.used_features()
    model.predict(X.iloc[held_out])
    assert model.used_features() == before  # predicting refits nothing


def test_default_selection_per_task_and_rejects_unknown():
    assert RadiomicsModel("classification").selection == "none"
    assert RadiomicsModel("survival").selection == "univariate_l1"
    with pytest.raises(InputError, match="selection"):
        RadiomicsModel("classification", selection="lasso")
