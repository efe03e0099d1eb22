"""The synthetic cohort: determinism, well-formed outputs, site shift, and the generative model's statistics.

Rendered cohorts here are tiny (a few scans); statistics use the tabular half only (no volumes).
"""
from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
from scipy import ndimage
from sklearn.metrics import roc_auc_score

from data.synth import generate_cohort, sample_tables
from data.synth.__main__ import main
from data.synth.cohort import MANIFEST_COLUMNS
from data.synth.params import LATENTS, CohortParams, OutcomeParams
from data.synth.render import ScanJob, render_scan

TINY = dict(n_unlabeled=1, n_labeled=3, n_external=2)
# Every patient gets two index lesions where rows allow, so a 3-row cohort always has a shared patient.
PAIRED = dict(outcome={"second_lesion_fraction": 1.0})


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("synth") / "cohort"
    return generate_cohort(out, seed=0, workers=1, progress=False, **TINY, **PAIRED)


def test_same_seed_same_bytes_for_any_worker_count_and_other_seed_differs(cohort, tmp_path):
    again = generate_cohort(tmp_path / "again", seed=0, workers=2, progress=False, **TINY, **PAIRED)
    a, b = _files(cohort), _files(again)
    assert sorted(a) == sorted(b)
    assert [k for k in a if a[k] != b[k]] == []

    other = generate_cohort(tmp_path / "other", n_unlabeled=0, n_labeled=1, n_external=0, seed=1, progress=False)
    c = _files(other)
    assert c["labeled/A0001_image.nii.gz"] != a["labeled/A0001_image.nii.gz"]
    assert c["oracle.csv"] != a["oracle.csv"]


def test_manifest_is_well_formed(cohort):
    for name, folder, site in (("manifest.csv", "labeled", "siteA"), ("external.csv", "external", "siteB")):
        df = pd.read_csv(cohort / name, dtype={"subject_id": str, "patient_id": str})
        assert tuple(df.columns) == MANIFEST_COLUMNS
        assert set(df["label"]) <= {0, 1} and set(df["event"]) <= {0, 1}
        assert (df["time"] > 0).all() and (df["site"] == site).all()
        assert set(df["sex"].dropna()) <= {"M", "F"}
        assert set(df["kps"].dropna()) <= set(range(40, 101, 10))
        for _, row in df.iterrows():
            assert not Path(row["image"]).is_absolute() and row["image"].startswith(folder + "/")
            img, mask = nib.load(cohort / row["image"]), nib.load(cohort / row["mask"])
            assert img.shape == mask.shape and np.allclose(img.affine, mask.affine)
            m = np.asarray(mask.dataobj)
            assert m.dtype == np.uint8 and set(np.unique(m)) == {0, 1}
            # The mask sits on the enhancing lesion, whatever the storage orientation.
            a = np.asarray(img.dataobj, dtype=np.float32)
            assert a[m > 0].mean() > 1.1 * np.median(a[a > np.percentile(a, 60)])
            assert (cohort / row["image"]).stat().st_size < 2.5e6
    lab = pd.read_csv(cohort / "manifest.csv")
    assert lab["patient_id"].duplicated().any()  # patient-level splitting matters
    pair = lab[lab["patient_id"].duplicated(keep=False)]
    assert pair[["age", "sex", "time", "event"]].nunique(dropna=False).max() == 1
    assert (cohort / pair["image"].iloc[0]).read_bytes() == (cohort / pair["image"].iloc[1]).read_bytes()
    assert not np.array_equal(np.asarray(nib.load(cohort / pair["mask"].iloc[0]).dataobj),
                              np.asarray(nib.load(cohort / pair["mask"].iloc[1]).dataobj))


def test_manifest_reads_with_the_project_reader(cohort):
    from models.tasks import MULTITASK
    df = MULTITASK.read_manifest(cohort / "manifest.csv")
    assert len(df) == TINY["n_labeled"] and all(Path(p).is_file() for p in df["mask"])


def test_unlabeled_oracle_and_summary(cohort):
    u = pd.read_csv(cohort / "unlabeled.csv")
    assert list(u["subject_id"]) == ["U0001"] and (cohort / u["image"][0]).is_file()
    assert len(list((cohort / "unlabeled").iterdir())) == 1  # images only, no masks
    oracle = pd.read_csv(cohort / "oracle.csv")
    assert len(oracle) == TINY["n_labeled"] + TINY["n_external"]
    assert np.allclose(oracle["true_prob"], 1 / (1 + np.exp(-oracle["true_logit"])), atol=1e-5)
    assert (oracle["lesion_volume_ml"] > 0).all()
    summary = json.loads((cohort / "cohort.json").read_text())
    assert summary["seed"] == 0 and summary["counts"] == TINY
    assert summary["params"]["outcome"]["second_lesion_fraction"] == 1.0
    assert summary["package_version"] != "unknown"


def test_external_site_has_shifted_acquisition(cohort):
    lab = pd.read_csv(cohort / "manifest.csv")
    ext = pd.read_csv(cohort / "external.csv")
    a = nib.load(cohort / lab["image"][0])
    b = nib.load(cohort / ext["image"][0])
    assert np.allclose(a.header.get_zooms(), (2.0, 2.0, 2.0))
    assert np.allclose(b.header.get_zooms(), (1.5, 1.5, 3.0))
    assert nib.aff2axcodes(a.affine) == ("R", "A", "S") and nib.aff2axcodes(b.affine) == ("L", "A", "S")

    def stats(img):
        x = np.asarray(img.dataobj, dtype=np.float32)
        head = x > np.percentile(x, 60)
        return np.median(x[head]), np.percentile(x, 10) / np.median(x[head])  # scale, relative noise floor

    (scale_a, floor_a), (scale_b, floor_b) = stats(a), stats(b)
    assert scale_a > 1.5 * scale_b and floor_b > 1.5 * floor_a


def test_bad_arguments_give_one_line_and_exit_2(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["--out", str(tmp_path / "x"), "--n-labeled", "-1"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "--n-labeled" in err and "\n" not in err

    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("mine")
    for extra in ([], ["--overwrite"]):
        with pytest.raises(SystemExit) as e:
            main(["--out", str(busy), "--n-unlabeled", "1", "--n-labeled", "0", "--n-external", "0", *extra])
        assert e.value.code == 2
    assert (busy / "keep.txt").read_text() == "mine"


def test_cli_overwrites_a_previous_cohort(tmp_path):
    out = tmp_path / "c"
    args = ["--out", str(out), "--n-unlabeled", "1", "--n-labeled", "0", "--n-external", "0", "--no-progress"]
    assert main(args + ["--seed", "1"]) == 0
    first = (out / "unlabeled" / "U0001.nii.gz").read_bytes()
    cfg = tmp_path / "synth.yaml"
    cfg.write_text("site_b:\n  noise: 0.07\n")  # a partial section keeps site B's other defaults
    assert main(args + ["--seed", "2", "--overwrite", "--site_a.noise", "0.05", "--config", str(cfg)]) == 0
    assert (out / "unlabeled" / "U0001.nii.gz").read_bytes() != first
    params = json.loads((out / "cohort.json").read_text())["params"]
    assert params["site_a"]["noise"] == 0.05
    assert params["site_b"]["noise"] == 0.07 and params["site_b"]["name"] == "siteB"
    assert params["site_b"]["spacing"] == [1.5, 1.5, 3.0]


# ---------------------------------------------------------------- generative model, tables only

@pytest.fixture(scope="module")
def table() -> pd.DataFrame:
    return sample_tables(3000, 0, seed=0)[0]


def test_oracle_auc_and_survival_in_a_sane_band(table):
    y = table["label"].to_numpy()
    assert 0.35 < y.mean() < 0.65
    assert 0.85 < roc_auc_score(y, table["true_prob"]) < 0.95
    pat = table.groupby("patient_id").first()
    assert 0.25 < 1 - pat["event"].mean() < 0.45
    assert (table["time"] > 0).all()
    from sksurv.metrics import concordance_index_censored
    c = concordance_index_censored(pat["event"].astype(bool).to_numpy(), pat["time"].to_numpy(), pat["true_risk"].to_numpy())[0]
    assert 0.65 < c < 0.85
    assert 0.05 < table["patient_id"].duplicated().sum() / pat.shape[0] < 0.15


def test_clinical_part_adds_signal_over_image_latents(table):
    p = OutcomeParams()
    y = table["label"].to_numpy()
    image_part = table[[f"z_{k}" for k in LATENTS]].to_numpy() @ np.asarray(p.beta_image)
    assert roc_auc_score(y, table["true_logit"]) > roc_auc_score(y, image_part) + 0.02
    assert roc_auc_score(y, table["true_logit"] - p.image_weight * image_part) > 0.55


def test_classes_differ_in_latents_the_expected_way(table):
    g = table.groupby("label")
    mean = g[["ph_rim_mm", "ph_nodularity", "ph_core_fraction", "ph_septation", "ph_peritumoral"]].mean()
    oedema_ratio = (table["ph_oedema_mm"] / table["ph_radius_mm"]).groupby(table["label"]).mean()
    assert mean.loc[1, "ph_rim_mm"] > mean.loc[0, "ph_rim_mm"] + 0.5
    assert mean.loc[1, "ph_nodularity"] > mean.loc[0, "ph_nodularity"]
    assert mean.loc[1, "ph_peritumoral"] > mean.loc[0, "ph_peritumoral"]
    assert mean.loc[1, "ph_core_fraction"] < mean.loc[0, "ph_core_fraction"]
    assert mean.loc[1, "ph_septation"] < mean.loc[0, "ph_septation"]
    assert oedema_ratio[1] < oedema_ratio[0]
    # ... but the classes overlap: no single latent separates them.
    for k in LATENTS:
        assert roc_auc_score(table["label"], table[f"z_{k}"] * np.sign(CohortParams().lesion.loadings[LATENTS.index(k)])) < 0.8


# ---------------------------------------------------------------- rendered appearance

def test_subject_warp_inverse_maps_template_points_back():
    from data.synth.anatomy import SubjectWarp, load_template
    template = load_template(CohortParams().template_spacing_mm)
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    affine[:3, 3] = -90
    warp = SubjectWarp(np.random.default_rng(0), template, affine, (90, 108, 88), 5.0, 0.05, 5.0, 2.0)
    q = template.candidates[::5000]  # [N, 3] template mm
    assert np.abs(warp.template_mm(warp.output_vox(q)) - q).max() < 1e-3
    # The grid map agrees with the point map.
    v = np.array([[10, 20, 30], [50, 60, 40]])
    grid = warp.template_vox_grid()[:, v[:, 0], v[:, 1], v[:, 2]].T  # [N, 3] template voxels
    assert np.allclose(grid * template.spacing + template.affine[:3, 3], warp.template_mm(v), atol=1e-3)


def _render_one(tmp_path: Path, name: str, ph: dict) -> tuple[np.ndarray, np.ndarray, tuple]:
    p = CohortParams()
    job = ScanJob(scan_id=name, site=p.site_a, seed=np.random.SeedSequence(7), images=[f"{name}.nii.gz"],
                  lesions=[ph], masks=[f"{name}_mask.nii.gz"])
    render_scan(job, tmp_path, p)
    img = nib.load(tmp_path / f"{name}.nii.gz")
    return (np.asarray(img.dataobj, np.float32), np.asarray(nib.load(tmp_path / f"{name}_mask.nii.gz").dataobj) > 0,
            img.header.get_zooms())


def test_progression_and_necrosis_look_different_where_expected(tmp_path):
    common = dict(radius_mm=11.0, irregularity=0.1, enhancement=1.6, necrotic=0.35)
    progression = dict(common, rim_mm=3.8, nodularity=0.9, core_fraction=0.4, oedema_mm=4.0, peritumoral=0.9,
                       septation=0.1)
    necrosis = dict(common, rim_mm=0.9, nodularity=0.1, core_fraction=0.95, oedema_mm=18.0, peritumoral=0.1,
                    septation=0.9)
    feats = {}
    for name, ph in (("progression", progression), ("necrosis", necrosis)):
        img, mask, zooms = _render_one(tmp_path, name, ph)
        wm = np.median(img[img > np.percentile(img, 60)])
        dist = ndimage.distance_transform_edt(~mask, sampling=zooms)
        ring = (dist > 2) & (dist <= 8)
        feats[name] = {"enhancing_fraction": np.mean(img[mask] > 1.2 * wm), "ring": np.median(img[ring]) / wm}
    assert feats["progression"]["enhancing_fraction"] > feats["necrosis"]["enhancing_fraction"] + 0.15
    assert feats["necrosis"]["ring"] < feats["progression"]["ring"] - 0.05
