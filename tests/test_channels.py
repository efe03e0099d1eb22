"""Several image channels: per-channel normalisation, PET SUV and TBR by hand, grids, missing sequences,
channel order, and the one-image path unchanged."""
import numpy as np
import pandas as pd
import pytest
import torch

from core.errors import ConfigError, InputError, ManifestError
from data.brain import brain_mask
from data.cache import CacheEntry
from data.manifest import clinical_columns, one_sample_per_image, read_manifest
from data.nifti import save_volume
from data.pet import reference_region, suv_factor
from data.prep_config import PetConfig, PrepConfig
from data.prepare import foreground_mask, prepare_table, resample
from models.vit3d import inflate_patch_embed

SHAPE = (40, 36, 32)
AFFINE = np.diag([2.0, 2.0, 2.0, 1.0])
LESION = (slice(18, 22), slice(16, 20), slice(14, 18))


def _head(seed: int) -> tuple[np.ndarray, np.ndarray]:
    g = np.stack(np.meshgrid(*[np.arange(s) for s in SHAPE], indexing="ij"), -1)  # [X, Y, Z, 3]
    c = np.array(SHAPE) / 2 - 0.5
    head = (((g - c) / (c - 1.5)) ** 2).sum(-1) <= 1  # [X, Y, Z] bool
    rng = np.random.default_rng(seed)
    img = np.where(head, 100 + 4 * g[..., 0] + rng.normal(0, 5, SHAPE), 0).astype(np.float32)
    return img, head


def _subject(folder, sid="s1", pet_affine=None):
    """T1 (head), FLAIR (another contrast on the same grid), PET in Bq/mL (lesion TBR 2.5), mask."""
    t1, head = _head(0)
    flair = np.where(head, 300 - 2.0 * t1 + 50, 0).astype(np.float32)
    suv = np.where(head, 1.0, 0.05).astype(np.float32)
    suv[LESION] = 2.5
    factor = suv_factor(200.0, 70.0, 30.0, 109.77)  # SUV per Bq/mL
    mask = np.zeros(SHAPE, np.float32)
    mask[LESION] = 1
    save_volume(folder / f"{sid}_t1.nii.gz", t1, AFFINE)
    save_volume(folder / f"{sid}_flair.nii.gz", flair, AFFINE)
    save_volume(folder / f"{sid}_pet.nii.gz", suv / factor, AFFINE if pet_affine is None else pet_affine)
    save_volume(folder / f"{sid}_mask.nii.gz", mask, AFFINE)
    return {"subject_id": sid, "t1": f"{sid}_t1.nii.gz", "flair": f"{sid}_flair.nii.gz", "pet": f"{sid}_pet.nii.gz",
            "mask": f"{sid}_mask.nii.gz", "label": 1, "pet_dose_mbq": 200.0, "pet_weight_kg": 70.0,
            "pet_minutes": 30.0, "age": 60}


def _manifest(folder, rows) -> str:
    path = folder / "manifest.csv"
    pd.DataFrame(rows).to_csv(path, index=False)
    return str(path)


PREP = PrepConfig(images=("t1,flair", "pet:pet"), crop_foreground=False,
                  pet=PetConfig(brain_erode_mm=4.0, lesion_margin_mm=6.0))


def test_suv_factor_is_the_textbook_formula():
    # 185 MBq, 80 kg, 60 min after injection of F-18: D(t) = 185e6 * 2^(-60/109.77) Bq
    decayed = 185e6 * 0.5 ** (60 / 109.77)
    assert suv_factor(185.0, 80.0, 60.0, 109.77) == pytest.approx(80_000 / decayed, rel=1e-12)
    assert suv_factor(185.0, 80.0, 0.0, 109.77) == pytest.approx(80_000 / 185e6, rel=1e-12)


def test_every_channel_is_normalised_on_its_own_by_hand(tmp_path):
    df = read_manifest(_manifest(tmp_path, [_subject(tmp_path)]), columns=("image", "mask", "label"), prep=PREP)
    out, _ = prepare_table(df, PREP, tmp_path / "cache", progress=False)
    entry = CacheEntry.from_path(out["cache_image"][0])
    x = np.asarray(entry.image())  # [3, X, Y, Z]
    assert x.shape == (3, *SHAPE)
    t1, _ = _head(0)
    fg = foreground_mask(t1, "mri")  # the head of the first channel serves every channel
    for k, raw in ((0, t1), (1, np.where(_head(0)[1], 300 - 2.0 * t1 + 50, 0))):
        lo, hi = np.percentile(raw[fg], PREP.mri_percentiles)
        clipped = np.clip(raw, lo, hi)
        want = (clipped - clipped[fg].mean()) / clipped[fg].std()
        want[~fg] = (lo - clipped[fg].mean()) / clipped[fg].std()
        np.testing.assert_allclose(x[k], want, atol=2e-5)
    # PET: SUV from the columns, then TBR over the estimated brain minus the grown lesion
    mask = np.zeros(SHAPE, bool)
    mask[LESION] = True
    brain = brain_mask(t1, [2.0] * 3, head=fg, head_erode_mm=PREP.pet.brain_erode_mm)
    region = reference_region(brain, mask, [2.0] * 3, PREP.pet)
    suv = np.where(_head(0)[1], 1.0, 0.05)
    suv[LESION] = 2.5
    assert not (region & mask).any() and region.sum() > 100
    np.testing.assert_allclose(x[2], suv / suv[region].mean(), rtol=2e-4)
    assert x[2][LESION].mean() == pytest.approx(2.5, rel=1e-3)  # normal brain is SUV 1: TBR = SUV
    assert [c["modality"] for c in entry.meta["channels"]] == ["mri", "mri", "pet"]
    assert entry.meta["channels"][2]["reference_suv"] == pytest.approx(1.0, rel=1e-3)


def test_a_channel_on_another_grid_is_resampled_through_the_affines(tmp_path):
    # PET on a 3 mm grid shifted by 5 mm: each prepared voxel must read the same world point
    pet_affine = np.diag([3.0, 3.0, 3.0, 1.0])
    pet_affine[:3, 3] = [-5.0, -5.0, -5.0]
    folder = tmp_path
    row = _subject(folder, pet_affine=pet_affine)
    g = np.stack(np.meshgrid(*[np.arange(30)] * 3, indexing="ij"), -1).astype(float)  # PET voxels
    world = g @ pet_affine[:3, :3].T + pet_affine[:3, 3]
    save_volume(folder / "s1_pet.nii.gz", (1.0 + 0.01 * world[..., 0]).astype(np.float32), pet_affine)  # a ramp in x (mm)
    prep = PrepConfig(images=("t1", "pet:pet"), crop_foreground=False, pet=PetConfig(units="suv", scale="suv"))
    df = read_manifest(_manifest(folder, [row]), columns=("image", "mask"), prep=prep)
    out, _ = prepare_table(df, prep, folder / "cache", progress=False)
    x = np.asarray(CacheEntry.from_path(out["cache_image"][0]).image())[1]  # [X, Y, Z] on the T1 grid
    mine = np.stack(np.meshgrid(*[np.arange(s) for s in SHAPE], indexing="ij"), -1) @ AFFINE[:3, :3].T  # world mm
    inside = (mine[..., 0] < 80) & (mine[..., 1] < 80) & (mine[..., 2] < 80)
    np.testing.assert_allclose(x[inside], 1.0 + 0.01 * mine[..., 0][inside], atol=1e-4)


def test_a_channel_that_misses_the_head_is_refused_with_one_line(tmp_path):
    far = np.diag([2.0, 2.0, 2.0, 1.0])
    far[:3, 3] = [200.0, 0.0, 0.0]
    row = _subject(tmp_path, pet_affine=far)
    prep = PrepConfig(images=("t1", "pet:pet"), pet=PetConfig(units="suv"))
    df = read_manifest(_manifest(tmp_path, [row]), columns=("image", "mask"), prep=prep)
    with pytest.raises(InputError, match=r"s1 pet .*covers 0% of the head in t1"):
        prepare_table(df, prep, tmp_path / "cache", progress=False)


def test_a_missing_column_and_a_missing_sequence_get_one_line_each(tmp_path):
    rows = [_subject(tmp_path, "s1"), _subject(tmp_path, "s2")]
    rows[1]["flair"] = ""
    path = _manifest(tmp_path, rows)
    with pytest.raises(ManifestError, match=r"missing column\(s\) \['dwi'\] \(named by --images\)"):
        read_manifest(path, columns=("image",), prep=PrepConfig(images=("t1", "dwi")))
    with pytest.raises(ManifestError, match=r"empty flair in row 2 \(subject s2\).*--missing_image zero"):
        read_manifest(path, columns=("image",), prep=PrepConfig(images=("t1", "flair")))
    zero = PrepConfig(images=("t1", "flair"), missing_image="zero", crop_foreground=False)
    df = read_manifest(path, columns=("image", "mask"), prep=zero)
    assert list(df["missing_flair"]) == [0, 1]
    assert "missing_flair" in clinical_columns(df, zero) and "flair" not in clinical_columns(df, zero)
    out, _ = prepare_table(df, zero, tmp_path / "cache", progress=False)
    x = np.asarray(CacheEntry.from_path(out["cache_image"][1]).image())
    assert x[1].min() == x[1].max() == 0.0 and x[0].std() > 0


def test_pet_columns_are_checked_up_front_and_never_clinical(tmp_path):
    row = _subject(tmp_path)
    row["pet_weight_kg"] = "heavy"
    with pytest.raises(ManifestError, match=r"PET column pet_weight_kg .*row 1 \(subject s1\): heavy"):
        read_manifest(_manifest(tmp_path, [row]), columns=("image",), prep=PREP)
    row["pet_weight_kg"] = 70
    df = read_manifest(_manifest(tmp_path, [row]), columns=("image",), prep=PREP)
    assert clinical_columns(df, PREP) == ["age"]


@pytest.mark.parametrize("images", [("image", "mask"), ("t1", "cache_image"), ("t1", "t1"), ("t1:spect",)])
def test_bad_images_flag_is_a_config_error(images):
    with pytest.raises(ConfigError, match="--images"):
        PrepConfig(images=images)


def test_one_image_keeps_todays_cache_key_and_entry(tmp_path):
    # The key today's single-channel runs have used (computed before channels existed): unchanged, so
    # their cache entries and results are the same.
    assert PrepConfig().key() == PrepConfig(images=("image",)).key() == "8b0bc26a2236c0fb"
    row = _subject(tmp_path)
    row["image"] = row["t1"]
    df = read_manifest(_manifest(tmp_path, [row]), columns=("image", "mask"))
    out, _ = prepare_table(df, PrepConfig(), tmp_path / "cache", progress=False)
    entry = CacheEntry.from_path(out["cache_image"][0])
    assert entry.image().shape[0] == 1 and "channels" not in entry.meta


def test_several_channel_and_pet_keys_changed_with_issue_32_and_one_image_did_not():
    # Their outputs changed (covered voxels only, the brain reference): entries prepared before are not served.
    # The keys before, from the code of 0da7323: t1+pet, t1+flair, one PET image.
    before = ["6fb7f71e577faf57", "de8704828fc615ed", "3f0ccb0760c698f0"]
    now = [PrepConfig(images=("t1", "pet:pet")), PrepConfig(images=("t1", "flair")), PrepConfig(modality="pet")]
    assert all(p.key() != k for p, k in zip(now, before))
    assert PrepConfig().key() == "8b0bc26a2236c0fb"


def test_pretraining_takes_each_sequence_as_its_own_sample(tmp_path):
    rows = [_subject(tmp_path, "s1"), _subject(tmp_path, "s2")]
    rows[1]["flair"] = ""
    prep = PrepConfig(images=("t1", "flair", "pet:pet"), missing_image="zero")
    df = read_manifest(_manifest(tmp_path, rows), columns=("image",), prep=prep)
    parts = one_sample_per_image(df, prep)
    assert [(len(t), p.images) for t, p in parts] == [(2, ("image:mri",)), (1, ("image:mri",)), (2, ("image:pet",))]
    assert list(parts[1][0]["subject_id"]) == ["s1/flair"]
    assert parts[1][0]["image"][0].endswith("s1_flair.nii.gz")


def test_inflating_one_pretrained_channel_over_several_images_keeps_its_embedding():
    torch.manual_seed(0)
    w = torch.randn(8, 1, 4, 4, 4)
    big = inflate_patch_embed(w, 3, "zero", image_channels=2)  # [8, 3, 4, 4, 4]: two images, then the mask
    v = torch.randn(1, 1, 8, 8, 8)
    x = torch.cat([v, v, torch.ones_like(v)], dim=1)  # one volume in both image channels, any mask
    ref = torch.nn.functional.conv3d(v, w, stride=4)
    torch.testing.assert_close(torch.nn.functional.conv3d(x, big, stride=4), ref)
    assert torch.equal(inflate_patch_embed(w, 2, "zero", image_channels=1), inflate_patch_embed(w, 2, "zero"))


def test_resample_of_the_first_channel_is_unchanged():
    # The first channel still goes through resample() alone, as before channels existed.
    img, _ = _head(0)
    from data.nifti import Volume
    vol = Volume(array=img, affine=AFFINE, path=None)
    out, _, aff = resample(vol, None, (2.0, 2.0, 2.0))
    assert out is img and np.array_equal(aff, AFFINE)


def test_two_scales_pool_each_crop_with_its_own_mask_and_share_the_encoder():
    from models.multimodal import MultimodalConfig, MultimodalModel
    from models.vit3d import ViT3DConfig
    torch.manual_seed(0)
    enc = ViT3DConfig(in_channels=3, img_size=16, patch_size=8, dim=24, depth=1, heads=2)
    model = MultimodalModel(MultimodalConfig(encoder=enc, fusion="none", pool="mask", scales=2)).eval()
    near, wide = torch.randn(2, 3, 16, 16, 16), torch.randn(2, 3, 16, 16, 16)
    near[:, -1], wide[:, -1] = 0, 0
    near[:, -1, :8, :8, :8] = 1  # the lesion fills token 0 of the lesion crop
    wide[:, -1, 8:, 8:, 8:] = 1  # and token 7 of the wide crop
    x = torch.cat([near, wide], dim=1)  # [2, 6, 16, 16, 16]
    with torch.no_grad():
        t_near, t_wide = model.encoder(near), model.encoder(wide)  # [2, 8, 24] each
        want = 0.5 * (t_near[:, 0] + t_wide[:, 7])
        torch.testing.assert_close(model.pool_image(model.image_tokens(x), x), want)
        assert model(x, None)["logit"].shape == (2,)
    with pytest.raises(InputError, match=r"expected \[B, 6, S, S, S\]"):
        model(near, None)
    with pytest.raises(ConfigError, match="peritumoral_mm"):
        MultimodalConfig(encoder=enc, fusion="tokens", scales=2)


def test_the_probe_prepares_a_several_sequence_encoders_cohort_like_a_t1_encoders():
    from benchmarks.probe.cohort import probe_prep
    pooled = PrepConfig(images=("image", "flair", "pet:pet"))
    assert probe_prep(pooled) == PrepConfig() and probe_prep(PrepConfig()) is not None
    assert probe_prep(PrepConfig(images=("fet:pet", "t1"))).images == ("image:pet",)


def test_channel_gain_reports_each_comparison_as_a_row():
    from benchmarks.research.channel_gain import report
    d = {"n": 10, "auc": {"a": 0.8, "diff": 0.05, "ci": [0.01, 0.09]}, "c_index": {"a": 0.7, "diff": -0.01, "ci": [-0.03, 0.01]}}
    results = {"models": {"mim": {"vs_t1ce": {"t1ce_flair": {"splits": {"test_large": d}}}}}}
    assert "| mim | t1ce_flair | test_large (n = 10) | 0.800 | +0.050 [+0.010, +0.090] | 0.700 | -0.010 [-0.030, +0.010] |" \
        in report(results)


def test_a_ct_channel_gets_its_hounsfield_window_by_hand(tmp_path):
    row = _subject(tmp_path)
    t1, head = _head(0)
    hu = np.where(head, 40.0 + 10 * np.arange(SHAPE[0])[:, None, None] - 150, -1000.0).astype(np.float32)
    save_volume(tmp_path / "s1_ct.nii.gz", hu, AFFINE)
    row["ct"] = "s1_ct.nii.gz"
    prep = PrepConfig(images=("t1", "ct:ct"), crop_foreground=False, ct_window=(-100.0, 200.0))
    df = read_manifest(_manifest(tmp_path, [row]), columns=("image", "mask"), prep=prep)
    out, _ = prepare_table(df, prep, tmp_path / "cache", progress=False)
    x = np.asarray(CacheEntry.from_path(out["cache_image"][0]).image())
    np.testing.assert_allclose(x[1], np.clip((hu + 100.0) / 300.0, 0, 1), atol=1e-6)
    assert CacheEntry.from_path(out["cache_image"][0]).meta["channels"][1]["window"] == [-100.0, 200.0]


def test_the_contract_describes_each_channel_for_the_model_card():
    from models.input_spec import InputSpec
    spec = InputSpec(prep=PrepConfig(images=("t1ce", "fet:pet")), channels=("t1ce", "fet", "lesion_mask"))
    text = spec.describe_channels()
    assert text.startswith("0: t1ce (MRI, clipped") and "1: fet (PET, SUV body weight from the dose" in text
    assert "(TBR)" in text and text.endswith("2: lesion_mask (0/1 lesion mask)")
    pooled = InputSpec(prep=PrepConfig(images=("t1ce", "fet:pet")), channels=("image",)).describe_channels()
    assert pooled.startswith("0: image, one sequence at a time") and "fet (PET" in pooled


# ---- issue 32, defect 2: statistics only over the voxels a channel covers ------------------------------------

SLAB = 6  # the last x-slices of the T1 grid that a cut-down FLAIR or PET leaves uncovered


def _cut(folder, name: str, array: np.ndarray) -> str:
    """`array` without its last SLAB x-slices, on the same voxels (same affine): a smaller field of view."""
    save_volume(folder / name, np.ascontiguousarray(array[:-SLAB]), AFFINE)
    return name


def test_mri_statistics_leave_out_the_voxels_a_channel_does_not_cover(tmp_path):
    row = _subject(tmp_path)
    t1, head = _head(0)
    flair = np.where(head, 300 - 2.0 * t1 + 50, 0).astype(np.float32)
    row["flair"] = _cut(tmp_path, "s1_flair_cut.nii.gz", flair)
    prep = PrepConfig(images=("t1", "flair"), crop_foreground=False)
    df = read_manifest(_manifest(tmp_path, [row]), columns=("image", "mask"), prep=prep)
    out, _ = prepare_table(df, prep, tmp_path / "cache", progress=False)
    x = np.asarray(CacheEntry.from_path(out["cache_image"][0]).image())[1]  # [X, Y, Z]
    fg = foreground_mask(t1, "mri")
    inside = np.zeros(SHAPE, bool)
    inside[:-SLAB] = True
    assert 0.9 <= inside[fg].mean() < 0.99 and (fg & ~inside).any()  # a slab of head, within MIN_COVERAGE
    seen = fg & inside  # by hand: percentiles, mean and std over the covered head only
    lo, hi = np.percentile(flair[seen], prep.mri_percentiles)
    clipped = np.clip(flair, lo, hi)
    mean, std = clipped[seen].mean(), clipped[seen].std()
    want = np.where(fg, (clipped - mean) / std, (lo - mean) / std)
    np.testing.assert_allclose(x[inside], want[inside], atol=2e-5)
    np.testing.assert_allclose(x[~inside], (lo - mean) / std, rtol=1e-6)  # the pad value


def test_tbr_inside_is_the_same_with_and_without_an_uncovered_slab(tmp_path):
    row = _subject(tmp_path)
    prep = PrepConfig(images=("t1", "pet:pet"), crop_foreground=False,
                      pet=PetConfig(brain_erode_mm=4.0, lesion_margin_mm=6.0))
    full = read_manifest(_manifest(tmp_path, [row]), columns=("image", "mask"), prep=prep)
    whole, _ = prepare_table(full, prep, tmp_path / "cache", progress=False)
    pet = np.asarray(__import__("nibabel").load(tmp_path / "s1_pet.nii.gz").dataobj, np.float32)
    row["pet"] = _cut(tmp_path, "s1_pet_cut.nii.gz", pet)
    cut = read_manifest(_manifest(tmp_path, [row]), columns=("image", "mask"), prep=prep)
    part, _ = prepare_table(cut, prep, tmp_path / "cache", progress=False)
    a = np.asarray(CacheEntry.from_path(whole["cache_image"][0]).image())[1]  # [X, Y, Z] TBR, PET covers all
    b = np.asarray(CacheEntry.from_path(part["cache_image"][0]).image())[1]  # the same PET less SLAB x-slices
    # Resampling through the affines leaves float rounding (< 1e-4); zeros in the reference moved it by 1.3%.
    np.testing.assert_allclose(b[:-SLAB], a[:-SLAB], rtol=2e-4)
    assert b[LESION].mean() == pytest.approx(2.5, rel=1e-4)  # normal brain is SUV 1 in both: TBR = SUV
