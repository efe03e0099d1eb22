"""Preprocessing and cache: geometry, normalisation, foreground crop, cache hits/invalidation, atomicity, bad input."""
import os

import numpy as np
import pandas as pd
import pytest
from scipy.spatial.transform import Rotation

import data.cache as cache_mod
import data.prepare as prep
from core.errors import InputError, NiftiError
from data.nifti import save_volume
from data.prep_config import PrepConfig
from data.prepare import prepare_subject, prepare_table


def _grid(shape):
    return np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij"), -1).astype(np.float64)  # [X,Y,Z,3]


def _ellipsoid(shape, centre, radii):
    g = _grid(shape)
    return (((g - centre) / radii) ** 2).sum(-1) <= 1  # [X,Y,Z] bool


def _head(shape=(20, 18, 16)):
    """MRI-like: zero background, an ellipsoid of tissue with a smooth gradient and a dark enclosed 'ventricle'."""
    rng = np.random.default_rng(0)
    ell = _ellipsoid(shape, np.array(shape) / 2 - 0.5, np.array(shape) / 2 - 2)
    img = np.where(ell, 100 + 3 * _grid(shape)[..., 0] + rng.normal(0, 5, shape), 0).astype(np.float32)
    vent = _ellipsoid(shape, np.array(shape) / 2 - 0.5, np.array([2.5, 2.5, 2.5]))
    img[vent] = 20
    return img, ell


def _lesion(shape, lo, hi):
    m = np.zeros(shape, np.float32)
    m[tuple(slice(a, b) for a, b in zip(lo, hi))] = 1
    return m


@pytest.fixture
def subject(tmp_path):
    img, _ = _head()
    aff = np.diag([2.0, 2.0, 2.0, 1.0])
    save_volume(tmp_path / "s1.nii.gz", img, aff)
    save_volume(tmp_path / "s1_mask.nii.gz", _lesion(img.shape, (8, 7, 6), (11, 10, 9)), aff)
    return {"subject_id": "s1", "image": str(tmp_path / "s1.nii.gz"), "mask": str(tmp_path / "s1_mask.nii.gz")}


def test_resampling_keeps_world_geometry(tmp_path):
    # Oblique, anisotropic CT: a Gaussian bump on a body block; its world position must survive
    # resampling to 2 mm and the foreground crop (the cached affine is the one after the crop).
    shape, spacing = (36, 30, 16), np.array([0.9, 1.1, 2.6])
    aff = np.eye(4)
    aff[:3, :3] = Rotation.from_euler("xyz", [0.08, -0.05, 0.1]).as_matrix() @ np.diag(spacing)
    aff[:3, 3] = [-15.0, 7.0, 30.0]
    centre = np.array([17.3, 13.6, 8.4])
    world_offset = (_grid(shape) - centre) @ aff[:3, :3].T  # [X,Y,Z,3] mm from the bump centre
    bump = 500 * np.exp(-(world_offset ** 2).sum(-1) / (2 * 3.0 ** 2))
    body = np.zeros(shape, bool)
    body[4:32, 4:26, 2:14] = True
    hu = np.where(body, bump, -1000).astype(np.float32)
    save_volume(tmp_path / "ct.nii.gz", hu, aff)

    cfg = PrepConfig(spacing=(2.0, 2.0, 2.0), modality="ct", ct_window=(-1000.0, 1000.0), foreground_margin=1)
    entry = prepare_subject({"subject_id": "ct", "image": str(tmp_path / "ct.nii.gz")}, cfg, tmp_path / "cache")
    meta = entry.meta
    # Shape: the resampled grid spans the same extent as the source (centre to centre), within half a voxel.
    span_before = (np.array(shape) - 1) * spacing
    span_after = (np.array(meta["resampled_shape"]) - 1) * 2.0
    assert np.all(np.abs(span_after - span_before) <= 1.0 + 1e-6), (span_before, span_after)
    assert np.allclose(meta["spacing"], 2.0, atol=1e-6)
    assert meta["crop_start"] != [0, 0, 0]  # the air around the body was cropped away

    img = np.asarray(entry.image()[0])  # [X', Y', Z'], HU window -> [0, 1]
    level = (img - 0.5) * 2000  # back to HU: the window is linear, and the bump is inside it
    weights = np.clip(level - 50, 0, None)  # the bump only (body is 0 HU, air -1000)
    idx = _grid(img.shape)
    found = (idx * weights[..., None]).sum((0, 1, 2)) / weights.sum()
    world_found = np.asarray(meta["affine"]) @ np.r_[found, 1]
    world_true = aff @ np.r_[centre, 1]
    assert np.linalg.norm(world_found[:3] - world_true[:3]) <= 1.0, (world_found, world_true)


def test_mri_normalisation_matches_reference(tmp_path, subject):
    img, ell = _head()
    cfg = PrepConfig(spacing=(2.0, 2.0, 2.0), crop_foreground=False, mri_percentiles=(0.5, 99.5))  # no resampling
    out = np.asarray(prepare_subject(subject, cfg, tmp_path / "cache").image()[0])
    assert out.shape == img.shape
    # Foreground = the ellipsoid incl. its dark enclosed ventricle; independent reference computation.
    lo, hi = np.percentile(img[ell], [0.5, 99.5])
    clipped = np.clip(img[ell], lo, hi)
    ref = (clipped - clipped.mean()) / clipped.std()
    np.testing.assert_allclose(out[ell], ref, atol=1e-4)
    assert abs(out[ell].mean()) < 1e-4 and abs(out[ell].std() - 1) < 1e-4
    assert np.all(out[~ell] == out.min())  # background sits at the minimum
    assert np.isclose(out.min(), (lo - clipped.mean()) / clipped.std(), atol=1e-4)


def test_ct_window(tmp_path):
    hu = np.full((8, 8, 8), -1000, np.float32)
    values = [-2000, -1000, -500, 0, 250, 1000, 3000]
    hu[0, 0, : len(values)] = values
    hu[2:6, 2:6, 2:6] = 40
    save_volume(tmp_path / "ct.nii.gz", hu, np.eye(4))
    cfg = PrepConfig(spacing=(1.0, 1.0, 1.0), modality="ct", ct_window=(-1000.0, 1000.0), crop_foreground=False)
    out = np.asarray(prepare_subject({"subject_id": "c", "image": str(tmp_path / "ct.nii.gz")}, cfg, tmp_path / "c").image())
    expected = np.clip((np.array(values) + 1000) / 2000, 0, 1)
    np.testing.assert_allclose(out[0, 0, 0, : len(values)], expected, atol=1e-6)
    np.testing.assert_allclose(out[0, 3, 3, 3], 0.52, atol=1e-6)


def test_crop_foreground_keeps_whole_mask(tmp_path):
    # The lesion pokes out of the tissue towards the volume corner: the crop must follow it, not the tissue.
    shape = (30, 30, 30)
    img = np.zeros(shape, np.float32)
    img[12:24, 10:22, 12:22] = 100 + np.random.default_rng(1).normal(0, 3, (12, 12, 10))
    mask = _lesion(shape, (5, 9, 14), (14, 13, 18))
    save_volume(tmp_path / "i.nii.gz", img, np.eye(4))
    save_volume(tmp_path / "m.nii.gz", mask, np.eye(4))
    cfg = PrepConfig(spacing=(1.0, 1.0, 1.0), foreground_margin=2)
    entry = prepare_subject({"subject_id": "x", "image": str(tmp_path / "i.nii.gz"), "mask": str(tmp_path / "m.nii.gz")},
                            cfg, tmp_path / "cache")
    start, end = entry.meta["crop_start"], entry.meta["crop_end"]
    # Expected box by hand: (tissue ∪ lesion) grown by 2 and clipped.
    assert start == [3, 7, 10] and end == [26, 24, 24]
    cached = np.asarray(entry.mask()[0])
    assert cached.sum() == mask.sum()
    np.testing.assert_array_equal(cached, mask[3:26, 7:24, 10:24])
    # The affine moved its origin to the crop start.
    np.testing.assert_allclose(np.asarray(entry.meta["affine"])[:3, 3], [3, 7, 10])


def test_cache_hit_does_not_rebuild(tmp_path, subject, monkeypatch):
    cfg = PrepConfig()
    first = prepare_subject(subject, cfg, tmp_path / "cache")
    stamp = os.stat(first.image_path).st_mtime_ns

    def fail(*a, **k):
        raise AssertionError("cache hit must not rebuild")

    monkeypatch.setattr(prep, "build_entry", fail)
    second = prepare_subject(subject, cfg, tmp_path / "cache")
    assert second.dir == first.dir and os.stat(second.image_path).st_mtime_ns == stamp
    np.testing.assert_array_equal(second.image(), first.image())
    assert isinstance(second.image(), np.memmap) and second.image().dtype == np.float32
    assert second.mask().shape == second.image().shape
    assert cache_mod.CacheEntry.from_path(first.image_path).meta == first.meta
    table, rejected = prepare_table(pd.DataFrame([subject]), cfg, tmp_path / "cache", progress=False)
    assert rejected == [] and table["cache_image"][0] == str(first.image_path)


def test_cache_invalidation_on_parameter_and_source_change(tmp_path, subject):
    cache = tmp_path / "cache"
    base = prepare_subject(subject, PrepConfig(), cache)
    other_params = prepare_subject(subject, PrepConfig(spacing=(3.0, 3.0, 3.0)), cache)
    assert other_params.dir != base.dir and other_params.image().shape[1] < base.image().shape[1]
    assert PrepConfig(mri_percentiles=(1.0, 99.0)).key() != PrepConfig().key()

    # Same path, new content (e.g. a corrected scan): a fresh entry, never the stale one.
    img, _ = _head()
    save_volume(subject["image"], img * 2 + 7, np.diag([2.0, 2.0, 2.0, 1.0]))
    changed = prepare_subject(subject, PrepConfig(), cache)
    assert changed.dir != base.dir
    assert changed.meta["intensity"]["mean"] != pytest.approx(base.meta["intensity"]["mean"])


def test_hash_memo_follows_file_changes(tmp_path):
    f = tmp_path / "a.bin"
    f.write_bytes(b"x" * 100)
    os.utime(f, ns=(1_000_000_000_000_000_000, 1_000_000_000_000_000_000))  # old file: its digest is memoised
    index = cache_mod.HashIndex(tmp_path)
    assert index.digest(f) == cache_mod.file_digest(f)
    index.save()
    assert str(f.resolve()) in cache_mod.HashIndex(tmp_path).table
    f.write_bytes(b"y" * 100)  # same size, new mtime
    assert cache_mod.HashIndex(tmp_path).digest(f) == cache_mod.file_digest(f) != index.table[str(f.resolve())][3]


def test_failed_write_leaves_no_entry(tmp_path, subject, monkeypatch):
    cache = tmp_path / "cache"
    real_write_json = cache_mod.write_json

    def crash(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(cache_mod, "write_json", crash)  # image.npy and mask.npy written, then meta.json fails
    with pytest.raises(OSError):
        prepare_subject(subject, PrepConfig(), cache)
    assert not list(cache.rglob("*.npy")) and not list(cache.rglob("meta.json"))
    monkeypatch.setattr(cache_mod, "write_json", real_write_json)
    entry = prepare_subject(subject, PrepConfig(), cache)
    assert (entry.dir / "meta.json").is_file()


def _bad_cohort(tmp_path):
    img, _ = _head()
    aff = np.diag([2.0, 2.0, 2.0, 1.0])
    rows = []
    for sid in ("good1", "good2"):
        save_volume(tmp_path / f"{sid}.nii.gz", img, aff)
        save_volume(tmp_path / f"{sid}_m.nii.gz", _lesion(img.shape, (8, 7, 6), (11, 10, 9)), aff)
        rows.append({"subject_id": sid, "image": str(tmp_path / f"{sid}.nii.gz"), "mask": str(tmp_path / f"{sid}_m.nii.gz")})
    save_volume(tmp_path / "empty_m.nii.gz", np.zeros_like(img), aff)
    save_volume(tmp_path / "small_m.nii.gz", np.ones((4, 4, 4)), aff)
    save_volume(tmp_path / "flat.nii.gz", np.full(img.shape, 5.0), aff)
    rows += [
        {"subject_id": "missing", "image": str(tmp_path / "nope.nii.gz"), "mask": None},
        {"subject_id": "empty", "image": rows[0]["image"], "mask": str(tmp_path / "empty_m.nii.gz")},
        {"subject_id": "grid", "image": rows[0]["image"], "mask": str(tmp_path / "small_m.nii.gz")},
        {"subject_id": "flat", "image": str(tmp_path / "flat.nii.gz"), "mask": None},
    ]
    return pd.DataFrame(rows)


@pytest.mark.parametrize("workers", [0, 2])
def test_prepare_table_collects_bad_rows(tmp_path, workers):
    df = _bad_cohort(tmp_path)
    out, rejected = prepare_table(df, PrepConfig(), tmp_path / "cache", on_error="collect", workers=workers, progress=False)
    assert list(out["subject_id"]) == ["good1", "good2"]
    assert out["cache_image"][0] == out["cache_image"][1]  # identical files share one entry
    assert all(os.path.isfile(p) for p in list(out["cache_image"]) + list(out["cache_mask"]))
    reasons = dict(rejected)
    assert list(reasons) == ["missing", "empty", "grid", "flat"]
    assert "nope.nii.gz" in reasons["missing"] and "not found" in reasons["missing"]
    assert "empty" in reasons["empty"] and "empty_m.nii.gz" in reasons["empty"]
    assert "shape" in reasons["grid"] and "small_m.nii.gz" in reasons["grid"]
    assert "constant" in reasons["flat"]
    assert all("\n" not in r for r in reasons.values())


def test_prepare_table_raises_first_error(tmp_path):
    df = _bad_cohort(tmp_path)
    with pytest.raises(NiftiError, match="nope.nii.gz"):
        prepare_table(df, PrepConfig(), tmp_path / "cache", progress=False)
    # Without a lesion requirement an empty mask is fine; a later strict call must still reject it.
    lenient, rejected = prepare_table(df.iloc[[3]], PrepConfig(), tmp_path / "cache", require_lesion=False, progress=False)
    assert rejected == [] and np.asarray(np.load(lenient["cache_mask"][0])).sum() == 0
    with pytest.raises(InputError, match="empty"):
        prepare_table(df.iloc[[3]], PrepConfig(), tmp_path / "cache", progress=False)


def test_cli_writes_index_and_fails_in_one_line(tmp_path, subject, capsys):
    manifest = tmp_path / "cohort.csv"
    pd.DataFrame([{**subject, "label": 1}]).to_csv(manifest, index=False)
    assert prep.main(["--manifest", str(manifest), "--cache", str(tmp_path / "cache"), "--spacing", "3", "3", "3"]) == 0
    index = pd.read_csv(tmp_path / "cache" / "index-cohort.csv")
    assert list(index["subject_id"]) == ["s1"] and index["label"][0] == 1
    assert np.load(index["cache_image"][0], mmap_mode="r").shape[0] == 1
    assert "prepared 1 of 1" in capsys.readouterr().out

    os.remove(subject["mask"])
    with pytest.raises(SystemExit) as e:
        prep.main(["--manifest", str(manifest), "--cache", str(tmp_path / "cache")])
    err = capsys.readouterr().err.replace("\r", "\n")  # tqdm bars share stderr
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert e.value.code == 2 and "Traceback" not in err
    assert len(errors) == 1 and "s1_mask.nii.gz" in errors[0]


def _cli_cohort(tmp_path):
    manifest = tmp_path / "cohort.csv"
    df = _bad_cohort(tmp_path)
    df[df["subject_id"] != "missing"].to_csv(manifest, index=False)  # a missing file fails the manifest itself
    return ["--manifest", str(manifest), "--cache", str(tmp_path / "cache")]


def test_cli_error_has_its_own_line_and_names_skip_bad(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        prep.main(_cli_cohort(tmp_path))
    err = capsys.readouterr().err
    assert e.value.code == 2
    # The bars are closed before the error is printed: it starts a line, and nothing is drawn after it.
    last = err.rstrip("\n").split("\n")[-1]
    assert last.startswith("error: ") and "empty_m.nii.gz" in last
    assert "--skip-bad" in last and "rejected-cohort.csv" in last


def test_cli_skip_bad_reports_every_bad_subject(tmp_path, capsys):
    assert prep.main(_cli_cohort(tmp_path) + ["--skip-bad"]) == 0
    out, err = capsys.readouterr()
    skipped = [line for line in err.split("\n") if line.startswith("skipped ")]
    assert [line.split(":")[0] for line in skipped] == ["skipped empty", "skipped grid", "skipped flat"]
    assert "empty_m.nii.gz" in skipped[0] and "small_m.nii.gz" in skipped[1] and "constant" in skipped[2]
    assert "prepared 2 of 5 subjects" in out and "3 rejected" in out
    rejected = pd.read_csv(tmp_path / "cache" / "rejected-cohort.csv")
    assert list(rejected["subject_id"]) == ["empty", "grid", "flat"]


def test_default_normalisation_keeps_lesion_contrast(synth_cohort, tmp_path):
    """The saturated share of lesion voxels (those at the normalised maximum) on the built-in cohort:
    under 1% with the default clip (none above), about half with the old 99.5th percentile."""
    from data.prepare import prepare_table
    from models.tasks import CLASSIFICATION
    table = CLASSIFICATION.read_manifest(synth_cohort / "manifest.csv").head(8)

    def saturated(cfg):
        df, _ = prepare_table(table, cfg, tmp_path / "cache", progress=False)
        shares = []
        for img_path, mask_path in zip(df["cache_image"], df["cache_mask"]):
            img, mask = np.load(img_path)[0], np.load(mask_path)[0] > 0
            shares.append(float((img[mask] >= img.max() - 1e-6).mean()))
        return float(np.mean(shares))
    assert saturated(PrepConfig()) < 0.01
    assert saturated(PrepConfig(mri_percentiles=(0.5, 99.5))) > 0.3
