"""Issue 32, defects 3 and 9: the TBR reference is brain (a brain-mask column, else data.brain's estimate) less the
lesion, also when predict finds the lesion itself; morphology in mm by distance transforms equals ball morphology."""
import numpy as np
import pandas as pd
import pytest
from scipy import ndimage

from core.errors import InputError
from data.brain import brain_mask, dilate_mm, erode_mm
from data.cache import CacheEntry
from data.manifest import clinical_columns, read_manifest
from data.nifti import save_volume
from data.prep_config import PetConfig, PrepConfig
from data.prepare import prepare_table

SPACING = (2.0, 2.0, 2.0)
AFFINE = np.diag([*SPACING, 1.0])
SHAPE = (40, 40, 40)
LESION = (slice(22, 26), slice(18, 22), slice(18, 22))
# Shells outward from the centre, in voxels: brain, CSF, skull, scalp; (outer radius, T1-CE, SUV).
LAYERS = ((12.0, 100.0, 1.0), (13.0, 20.0, 0.1), (15.0, 10.0, 0.3), (18.0, 120.0, 0.6))
PREP = PrepConfig(images=("t1", "pet:pet"), crop_foreground=False, pet=PetConfig(units="suv", lesion_margin_mm=6.0))


def _radius() -> np.ndarray:
    g = np.stack(np.meshgrid(*[np.arange(s) for s in SHAPE], indexing="ij"), -1)  # [X, Y, Z, 3]
    return np.linalg.norm(g - (np.array(SHAPE) / 2 - 0.5), axis=-1)  # [X, Y, Z] voxels from the centre


def _phantom():
    """A layered head: T1-CE [X,Y,Z] (bright brain and scalp, dark CSF and skull), SUV [X,Y,Z], the brain [X,Y,Z]
    bool, and the lesion [X,Y,Z] bool (enhancing, SUV 2.5)."""
    r = _radius()
    t1, suv = np.zeros(SHAPE, np.float32), np.full(SHAPE, 0.02, np.float32)
    for outer, value, uptake in reversed(LAYERS):
        t1[r <= outer], suv[r <= outer] = value, uptake
    t1 += np.random.default_rng(0).normal(0, 3, SHAPE).astype(np.float32) * (r <= LAYERS[-1][0])
    lesion = np.zeros(SHAPE, bool)
    lesion[LESION] = True
    t1[lesion], suv[lesion] = 150.0, 2.5
    return t1, suv, r <= LAYERS[0][0], lesion


def _row(folder, sid="s1", mask=True):
    t1, suv, brain, lesion = _phantom()
    save_volume(folder / f"{sid}_t1.nii.gz", t1, AFFINE)
    save_volume(folder / f"{sid}_pet.nii.gz", suv, AFFINE)
    save_volume(folder / f"{sid}_mask.nii.gz", lesion.astype(np.uint8), AFFINE, dtype=np.uint8)
    return {"subject_id": sid, "t1": f"{sid}_t1.nii.gz", "pet": f"{sid}_pet.nii.gz",
            "mask": f"{sid}_mask.nii.gz" if mask else "", "age": 50}


def _prepared(folder, rows, prep=PREP, columns=("image", "mask")):
    path = folder / "manifest.csv"
    pd.DataFrame(rows).to_csv(path, index=False)
    df = read_manifest(path, columns=columns, prep=prep)
    out, _ = prepare_table(df, prep, folder / "cache", progress=False)
    return [CacheEntry.from_path(p) for p in out["cache_image"]]


# ---- defect 9: morphology in mm --------------------------------------------------------------------------------

def _ball(radius_mm, spacing):
    """The structuring element the old code used: every offset within radius_mm, an ellipsoid in voxels.
    Below the smallest voxel edge it is the centre alone (erosion and growth do nothing)."""
    half = [max(1, int(np.floor(radius_mm / s))) for s in spacing]
    g = np.meshgrid(*[np.arange(-h, h + 1) * s for h, s in zip(half, spacing)], indexing="ij")
    return sum(a ** 2 for a in g) <= radius_mm ** 2 + 1e-9


@pytest.mark.parametrize("radius", [1.2, 2.0, 3.0, 4.5])
def test_distance_morphology_equals_ball_morphology_on_an_anisotropic_grid(radius):
    spacing = (1.0, 1.5, 3.0)
    rng = np.random.default_rng(int(radius * 10))
    blob = ndimage.gaussian_filter(rng.normal(size=(18, 15, 9)), 1.5) > 0.02  # [18, 15, 9], touches the border
    blob[2:14, 3:12, 2:7] = True  # a solid block that survives erosion
    ball = _ball(radius, spacing)
    want_eroded = ndimage.binary_erosion(blob, ball, border_value=0)
    want_grown = ndimage.binary_dilation(blob, ball)
    assert want_eroded.any() and (blob & ~want_eroded).any() and (want_grown & ~blob).any()
    np.testing.assert_array_equal(erode_mm(blob, radius, spacing), want_eroded)
    np.testing.assert_array_equal(dilate_mm(blob, radius, spacing), want_grown)


# ---- the brain mask --------------------------------------------------------------------------------------------

def test_brain_mask_keeps_brain_and_leaves_csf_skull_and_scalp_out():
    t1, _, brain, lesion = _phantom()
    got = brain_mask(t1, SPACING)
    assert got.dtype == bool and got.shape == SHAPE
    assert not (got & ~brain).any()  # no CSF, skull or scalp voxel
    assert got[brain].mean() > 0.97  # nearly all brain, the enhancing lesion too (pet.py removes it)


def test_brain_mask_of_the_synthetic_head_is_the_template_brain():
    # The synthetic cohort's head: MNI brain wrapped in CSF, dura, skull tables, diploe, muscle and scalp fat.
    from data.synth.anatomy import load_template
    tpl = load_template(3.0)
    got = brain_mask(tpl.intensity, (3.0,) * 3)
    truth = tpl.brain > 0.5  # [X, Y, Z] the template's brain, ventricles included
    outside_mm = ndimage.distance_transform_edt(~truth) * 3.0
    assert (got & ~truth).sum() / got.sum() < 0.02  # precision: almost nothing outside the brain
    assert not (got & (outside_mm > 4.0)).any()  # nothing beyond the CSF rim: no skull, marrow, muscle or scalp
    assert got[truth].mean() > 0.8  # most of the brain (ventricles and sulcal CSF are left out on purpose)


# ---- defect 3: the TBR reference -------------------------------------------------------------------------------

def test_tbr_reference_is_brain_without_lesion_not_the_eroded_head(tmp_path):
    (entry,) = _prepared(tmp_path, [_row(tmp_path)])
    x = np.asarray(entry.image())  # [2, X, Y, Z]
    _, suv, _, lesion = _phantom()
    # Normal brain has SUV 1 and nothing else the reference may hold has more: TBR = SUV exactly.
    np.testing.assert_allclose(x[1], suv, rtol=1e-5)
    assert x[1][lesion].mean() == pytest.approx(2.5, rel=1e-5)
    pet = entry.meta["channels"][1]
    assert pet["reference_suv"] == pytest.approx(1.0, rel=1e-6)
    assert pet["reference"]["brain"].startswith("estimated") and pet["reference"]["lesion_excluded"]


def test_a_brain_mask_column_is_the_reference_and_never_clinical(tmp_path):
    row = _row(tmp_path)
    t1, suv, brain, lesion = _phantom()
    half = brain & (np.arange(SHAPE[0]) < 20)[:, None, None]  # a drawn brain mask: the left half only
    suv[brain & ~half & ~lesion] = 0.8  # the right half has lower uptake: only the column gives reference 1.0
    save_volume(tmp_path / "s1_pet.nii.gz", suv, AFFINE)
    save_volume(tmp_path / "s1_brain.nii.gz", half.astype(np.uint8), AFFINE, dtype=np.uint8)
    row["brain_mask"] = "s1_brain.nii.gz"
    (entry,) = _prepared(tmp_path, [row])
    np.testing.assert_allclose(np.asarray(entry.image())[1], suv, rtol=1e-5)
    assert entry.meta["channels"][1]["reference"]["brain"] == f"brain_mask column: {tmp_path / 's1_brain.nii.gz'}"
    df = read_manifest(tmp_path / "manifest.csv", columns=("image", "mask"), prep=PREP)
    assert clinical_columns(df, PREP) == ["age"]


def test_a_brain_mask_on_another_grid_is_one_line_naming_it(tmp_path):
    row = _row(tmp_path)
    save_volume(tmp_path / "s1_brain.nii.gz", np.ones((20, 20, 20), np.uint8), np.diag([4.0, 4.0, 4.0, 1.0]),
                dtype=np.uint8)
    row["brain_mask"] = "s1_brain.nii.gz"
    with pytest.raises(InputError, match=r"s1_brain\.nii\.gz: shape \(20, 20, 20\) does not match") as info:
        _prepared(tmp_path, [row])
    assert "\n" not in str(info.value)


def test_a_row_predicted_without_a_mask_gets_the_tbr_of_its_drawn_mask(tmp_path, monkeypatch):
    # predict segments the row, then prepares it again with the found mask: with the found mask equal to the
    # drawn one, the PET channel (its TBR reference) equals the drawn-mask row's.
    import shutil
    from types import SimpleNamespace

    import finetune.lesion.search
    from finetune.lesion.candidates import COLUMNS
    from finetune.predict import fill_masks, validate_rows
    drawn = _row(tmp_path)
    (want,) = _prepared(tmp_path, [drawn])

    def found_the_drawn_mask(models, row, spec, out_dir, margin, accept_low_confidence=False, **kw):
        path = out_dir / f"{row['subject_id']}_pred_mask.nii.gz"
        shutil.copyfile(tmp_path / "s1_mask.nii.gz", path)
        return finetune.lesion.search.LesionSearch(path, 1.0, "found", pd.DataFrame(columns=COLUMNS), "a stand-in")

    monkeypatch.setattr(finetune.lesion.search, "search_lesion", found_the_drawn_mask)
    pd.DataFrame([{**drawn, "mask": ""}]).to_csv(tmp_path / "new.csv", index=False)
    df = read_manifest(tmp_path / "new.csv", columns=("image",), prep=PREP)
    spec = SimpleNamespace(prep=PREP)
    filled, rejected = fill_masks(df, np.array([True]), [], spec, str(tmp_path / "cache"), tmp_path / "masks", 10.0)
    good, more = validate_rows(filled, {"spec": spec, "schema": None}, str(tmp_path / "cache"))
    assert not rejected and not more
    got = CacheEntry.from_path(good["cache_image"][0])
    np.testing.assert_allclose(np.asarray(got.image())[1], np.asarray(want.image())[1], rtol=1e-6)
    assert got.meta["channels"][1]["reference"]["lesion_excluded"]


def test_the_morphology_benchmark_runs_and_finds_the_same_masks():
    from benchmarks.speed import pet_morphology
    table = pet_morphology.main(["--shape", "30", "34", "26", "--spacing", "1", "1.5", "2", "--repeats", "1"])
    assert table.column("same masks") == ["—", "yes"] and table.column("ratio")[0] == "1.00x"


def test_a_pet_image_alone_takes_its_reference_from_its_own_head(tmp_path):
    # No MRI to find the brain in: the PET's own head, eroded, its largest component, less the grown lesion.
    row = _row(tmp_path)
    row["image"] = row.pop("pet")
    prep = PrepConfig(modality="pet", crop_foreground=False, pet=PetConfig(units="suv", lesion_margin_mm=6.0))
    (entry,) = _prepared(tmp_path, [row], prep=prep)
    _, suv, _, lesion = _phantom()
    region = brain_mask(suv, SPACING, modality="pet") & ~dilate_mm(lesion, 6.0, SPACING)
    np.testing.assert_allclose(np.asarray(entry.image())[0], suv / suv[region].mean(), rtol=1e-5)
    assert entry.meta["intensity"]["reference"]["brain"].startswith("estimated: data.brain.brain_mask of image")
