"""FLAIR and FET-PET in the synthetic cohort (`--sequences t1ce,flair,pet`): the default output is unchanged,
the T1-CE does not depend on the new sequences, the files sit on their stated grids, SUV comes back from
Bq/mL with the manifest's injection columns, and the label shows in TBR and in the FLAIR match sign."""
from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
from scipy import ndimage

from data.synth import generate_cohort
from data.synth.__main__ import main
from data.synth.cohort import MANIFEST_COLUMNS, resolve_params
from data.synth.params import PET_COLUMNS, CohortParams
from data.synth.render import ScanJob, render_scan
from data.synth.sequences import draw_lesion_sequences

TINY = dict(n_unlabeled=1, n_labeled=3, n_external=1)
PAIRED = dict(outcome={"second_lesion_fraction": 1.0})
ALL = ("t1ce", "flair", "pet")


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _suv(cohort: Path, row) -> tuple[np.ndarray, np.ndarray]:
    """SUV [Px, Py, Pz] by hand from Bq/mL and the row's injection columns, and the PET affine."""
    img = nib.load(cohort / row["pet"])
    decayed_bq = row["pet_dose_mbq"] * 1e6 * 2.0 ** (-row["pet_minutes"] / 109.77)
    return np.asarray(img.dataobj, np.float64) * row["pet_weight_kg"] * 1000.0 / decayed_bq, img.affine


def _mask_on_pet(mask_img, pet_affine, pet_shape) -> np.ndarray:
    """The MRI-grid mask read at the PET voxels' world positions (nearest): [Px, Py, Pz] bool."""
    ijk = np.stack(np.meshgrid(*[np.arange(n) for n in pet_shape], indexing="ij"), -1).reshape(-1, 3)
    world = ijk @ pet_affine[:3, :3].T + pet_affine[:3, 3]
    vox = (world - mask_img.affine[:3, 3]) @ np.linalg.inv(mask_img.affine[:3, :3]).T
    m = ndimage.map_coordinates(np.asarray(mask_img.dataobj, np.float32), vox.T, order=0, cval=0)
    return m.reshape(pet_shape) > 0


def _tbr(cohort: Path, row) -> float:
    """Lesion mean SUV / normal-brain mean SUV (brain: SUV > 0.5, at least 20 mm from the lesion)."""
    suv, aff = _suv(cohort, row)
    lesion = _mask_on_pet(nib.load(cohort / row["mask"]), aff, suv.shape)
    far = ndimage.distance_transform_edt(~lesion, sampling=abs(aff[0, 0])) > 20
    return float(suv[lesion].mean() / suv[far & (suv > 0.5)].mean())


@pytest.fixture(scope="module")
def full(tmp_path_factory) -> Path:
    """A tiny cohort with every sequence, made through the CLI flag."""
    out = tmp_path_factory.mktemp("seq") / "full"
    args = ["--out", str(out), "--n-unlabeled", "4", "--n-labeled", "3", "--n-external", "2", "--seed", "0",
            "--no-progress", "--sequences", "t1ce,flair,pet", "--outcome.second_lesion_fraction", "1.0",
            "--flair.unlabeled_missing_p", "0.5"]
    assert main(args) == 0
    return out


def test_default_is_unchanged_and_t1ce_does_not_depend_on_new_sequences(tmp_path):
    plain = _files(generate_cohort(tmp_path / "plain", seed=0, progress=False, **TINY, **PAIRED))
    explicit = _files(generate_cohort(tmp_path / "explicit", seed=0, progress=False, sequences=("t1ce",), **TINY, **PAIRED))
    assert plain == explicit  # every byte, cohort.json included
    assert "sequences" not in json.loads(plain["cohort.json"])["params"]
    assert not [k for k in plain if "_flair" in k or "_pet" in k]

    full_dir = generate_cohort(tmp_path / "full", seed=0, progress=False, sequences=ALL, **TINY, **PAIRED)
    full = _files(full_dir)
    volumes = [k for k in plain if k.endswith(".nii.gz")]
    assert volumes and [k for k in volumes if full[k] != plain[k]] == []  # T1-CE and masks
    for name in ("manifest.csv", "external.csv", "unlabeled.csv", "oracle.csv"):
        before = pd.read_csv(tmp_path / "plain" / name)
        after = pd.read_csv(full_dir / name)
        pd.testing.assert_frame_equal(after[before.columns], before)
    assert json.loads(full["cohort.json"])["params"]["sequences"] == list(ALL)


def test_manifest_columns_and_files(full):
    for name, folder in (("manifest.csv", "labeled"), ("external.csv", "external")):
        df = pd.read_csv(full / name)
        cols = list(MANIFEST_COLUMNS)
        assert list(df.columns) == cols[:4] + ["flair", "pet", *PET_COLUMNS] + cols[4:]
        assert df[["flair", "pet", *PET_COLUMNS]].notna().all().all()  # labeled subjects have every sequence
        assert df["pet_dose_mbq"].between(150, 250).all() and df["pet_weight_kg"].between(45, 130).all()
        assert df["pet_minutes"].between(20, 40).all()
        pair = df[df["patient_id"].duplicated(keep=False)]
        assert pair[list(PET_COLUMNS)].nunique().max() == 1  # one scan, one injection
        assert (full / pair["pet"].iloc[0]).read_bytes() == (full / pair["pet"].iloc[1]).read_bytes()
        assert all(p.startswith(f"{folder}/") and p.endswith("_flair.nii.gz") for p in df["flair"])
    u = pd.read_csv(full / "unlabeled.csv")
    assert list(u.columns) == ["subject_id", "patient_id", "site", "image", "flair", "pet", *PET_COLUMNS, "n_lesions"]
    listed = {p for c in ("image", "flair", "pet") for p in u[c].dropna()}
    assert listed == {f"unlabeled/{p.name}" for p in (full / "unlabeled").iterdir()}  # a missing one has no file
    assert (u[list(PET_COLUMNS)].isna().all(axis=1) == u["pet"].isna()).all()
    oracle = pd.read_csv(full / "oracle.csv")
    assert set(oracle["flair_match"]) <= {0, 1} and (oracle["pet_tbr"] > 0).all()
    assert ((oracle["flair_match"] == 1) == (oracle["flair_mismatch"] == 0)).all()


def test_flair_on_the_t1_grid_pet_on_its_own(full):
    for name, voxel in (("manifest.csv", 2.5), ("external.csv", 3.0)):
        for _, row in pd.read_csv(full / name).iterrows():
            t1, flair, pet = (nib.load(full / row[c]) for c in ("image", "flair", "pet"))
            assert flair.shape == t1.shape and np.allclose(flair.affine, t1.affine)
            assert flair.get_data_dtype() == np.int16 and pet.get_data_dtype() == np.float32
            assert nib.aff2axcodes(flair.affine) == nib.aff2axcodes(t1.affine)
            assert nib.aff2axcodes(pet.affine) == ("R", "A", "S")
            assert np.allclose(pet.header.get_zooms(), (voxel,) * 3) and pet.shape != t1.shape
            assert not np.allclose(pet.affine[:3, 3], t1.affine[:3, 3])
            # FLAIR contrast: the brain is there and fluid is dark, so the image is not a copy of T1.
            f = np.asarray(flair.dataobj, np.float32)
            assert not np.array_equal(f, np.asarray(t1.dataobj, np.float32))


def test_suv_from_bq_and_normal_brain_near_one(full):
    for name, (lo, hi) in (("manifest.csv", (0.85, 1.15)), ("external.csv", (0.75, 1.05))):  # site B reads 10% low
        for _, row in pd.read_csv(full / name).iterrows():
            suv, _ = _suv(full, row)
            brain = suv[suv > 0.5]
            assert lo < brain.mean() < hi, (row["subject_id"], brain.mean())
            assert np.percentile(suv, 5) < 0.05  # air around the head


def _one_lesion_job(name: str, site, label: int, params: CohortParams, seed: int = 7) -> ScanJob:
    ph = dict(radius_mm=11.0, irregularity=0.1, enhancement=1.6, necrotic=0.35, rim_mm=3.5, nodularity=0.8,
              core_fraction=0.45, oedema_mm=14.0, peritumoral=0.3, septation=0.2)
    return ScanJob(scan_id=name, site=site, seed=np.random.SeedSequence(seed), images=[f"{name}.nii.gz"],
                   lesions=[ph], masks=[f"{name}_mask.nii.gz"], labels=[label], flair=[f"{name}_flair.nii.gz"],
                   pet=[f"{name}_pet.nii.gz"], pet_site=params.site_pet(site.name), pet_injection=(200.0, 70.0, 30.0))


def test_pet_hot_spot_is_the_lesion_in_world_mm(tmp_path):
    p = resolve_params(sequences=ALL, pet={"tbr_median_progression": 4.0, "tbr_log_sd": 0.0})
    for site in (p.site_a, p.site_b):  # site B's MRI is stored LAS with thick slices; the PET is RAS
        job = _one_lesion_job(site.name, site, 1, p)
        render_scan(job, tmp_path, p)
        mask = nib.load(tmp_path / job.masks[0])
        pet = nib.load(tmp_path / job.pet[0])
        mask_world = nib.affines.apply_affine(mask.affine, ndimage.center_of_mass(np.asarray(mask.dataobj) > 0))
        suv = np.asarray(pet.dataobj, np.float64)
        hot = suv > 0.5 * suv.max()
        hot_world = nib.affines.apply_affine(pet.affine, ndimage.center_of_mass(suv * hot))
        assert np.linalg.norm(hot_world - mask_world) < 4.0, (site.name, hot_world, mask_world)


def test_flair_margin_matches_or_not(tmp_path):
    """Same lesion, same streams: only the sign differs. A matching FLAIR lesion keeps its contrast
    against the oedema right up to the enhancing margin; a mismatching one fades inside it."""
    contrast = {}
    for match_p in (1.0, 0.0):
        p = resolve_params(sequences=ALL, flair={"match_p_progression": match_p})
        job = _one_lesion_job(f"m{int(match_p)}", p.site_a, 1, p)
        render_scan(job, tmp_path, p)
        f = np.asarray(nib.load(tmp_path / job.flair[0]).dataobj, np.float32)
        mask = np.asarray(nib.load(tmp_path / job.masks[0]).dataobj) > 0
        inside = ndimage.distance_transform_edt(mask, sampling=2.0)
        outside = ndimage.distance_transform_edt(~mask, sampling=2.0)
        edge_in, ring = mask & (inside <= 4), (outside > 0) & (outside <= 6)
        contrast[match_p] = (np.median(f[ring]) - np.median(f[edge_in])) / np.median(f[f > np.percentile(f, 60)])
    assert (tmp_path / "m1.nii.gz").read_bytes() == (tmp_path / "m0.nii.gz").read_bytes()  # T1-CE unchanged
    assert contrast[1.0] > 0.1 and contrast[1.0] > contrast[0.0] + 0.1, contrast


def test_draws_follow_the_stated_probabilities():
    p = CohortParams()
    rng = np.random.default_rng(0)
    for label, want_match, want_median in ((1, 0.75, 2.4), (0, 0.25, 1.6), (None, 0.5, None)):
        d = pd.DataFrame([draw_lesion_sequences(rng, label, p.flair, p.pet) for _ in range(4000)])
        assert abs(d["flair_match"].mean() - want_match) < 0.03
        mism = d.loc[d["flair_match"] == 0, "flair_mismatch"]
        assert mism.between(0.35, 1.0).all() and mism.std() > 0.1  # the degree varies
        if want_median:
            assert abs(np.median(d["pet_tbr"]) - want_median) < 0.05
            assert abs(np.log(d["pet_tbr"]).std() - 0.25) < 0.02


def test_label_shows_in_tbr_and_flair_match(tmp_path):
    out = generate_cohort(tmp_path / "lab", n_unlabeled=0, n_labeled=12, n_external=0, seed=3, progress=False,
                          sequences=ALL)
    df = pd.read_csv(out / "manifest.csv")
    oracle = pd.read_csv(out / "oracle.csv").set_index("subject_id").loc[df["subject_id"]]
    assert df["label"].nunique() == 2
    tbr = pd.Series([_tbr(out, r) for _, r in df.iterrows()], index=df.index).groupby(df["label"]).mean()
    assert tbr[1] > tbr[0] and tbr[1] > 1.3, tbr
    by_label = oracle.groupby(oracle["label"].to_numpy())
    assert by_label["pet_tbr"].mean()[1] > by_label["pet_tbr"].mean()[0]
    assert by_label["flair_match"].mean()[1] > by_label["flair_match"].mean()[0]


def test_bad_sequences_are_one_line_exit_2(tmp_path, capsys):
    for value in ("flair,pet", "t1ce,dwi"):
        with pytest.raises(SystemExit) as e:
            main(["--out", str(tmp_path / "x"), "--n-unlabeled", "1", "--sequences", value])
        assert e.value.code == 2
        err = capsys.readouterr().err.strip()
        assert "sequences" in err and "\n" not in err
    assert not (tmp_path / "x").exists()
