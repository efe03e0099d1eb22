"""data.nifti: loading, RAS reorientation, every check on real bad files, atomic saving."""
from __future__ import annotations

import gzip
import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from nibabel.affines import apply_affine

from core.errors import NiftiError
from data.nifti import Volume, check_same_grid, load_mask, load_pair, load_volume, save_volume

RAS = np.array([[1.5, 0, 0, -10], [0, 2.0, 0, 20], [0, 0, 3.0, 5], [0, 0, 0, 1]])
# Axis 0 runs Left (x decreasing), axis 1 runs Superior, axis 2 runs Posterior: LSP, far from RAS.
PERMUTED = np.array([[-2.0, 0, 0, 30], [0, 0, -1.5, 7], [0, 3.0, 0, -4], [0, 0, 0, 1]])


def write(path, array, affine=RAS, dtype=None):
    array = np.asarray(array)
    img = nib.Nifti1Image(array if dtype is None else array.astype(dtype), affine)
    nib.save(img, str(path))
    return path


def random_volume(shape=(16, 12, 10), seed=0):
    return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


def assert_error(match, fn, *args, **kwargs):
    with pytest.raises(NiftiError, match=match) as info:
        fn(*args, **kwargs)
    assert "\n" not in str(info.value)
    return str(info.value)


@pytest.mark.parametrize("name", ["vol.nii", "vol.nii.gz"])
def test_load_ras_volume_keeps_values_affine_and_spacing(tmp_path, name):
    data = random_volume()
    vol = load_volume(write(tmp_path / name, data))
    assert isinstance(vol, Volume)
    assert vol.array.dtype == np.float32 and vol.array.flags.c_contiguous
    np.testing.assert_array_equal(vol.array, data)
    np.testing.assert_allclose(vol.affine, RAS)
    assert vol.shape == (16, 12, 10)
    assert vol.spacing == pytest.approx((1.5, 2.0, 3.0))
    assert vol.path == tmp_path / name


def test_scaled_integer_data_is_returned_in_real_units(tmp_path):
    img = nib.Nifti1Image(np.arange(4 * 4 * 4, dtype=np.int16).reshape(4, 4, 4), RAS)
    img.header.set_slope_inter(0.5, -10.0)
    nib.save(img, str(tmp_path / "ct.nii.gz"))
    vol = load_volume(tmp_path / "ct.nii.gz")
    np.testing.assert_allclose(vol.array, np.arange(64).reshape(4, 4, 4) * 0.5 - 10.0)


@pytest.mark.parametrize("affine", [np.diag([-1.0, -2.0, 3.0, 1.0]) + np.array([[0, 0, 0, 40]] * 3 + [[0, 0, 0, 0]]), PERMUTED],
                         ids=["LPS", "permuted"])
def test_reorientation_to_ras_keeps_every_voxel_at_its_world_position(tmp_path, affine):
    data = random_volume()
    assert nib.aff2axcodes(affine) != ("R", "A", "S")
    vol = load_volume(write(tmp_path / "v.nii.gz", data, affine))
    assert nib.aff2axcodes(vol.affine) == ("R", "A", "S")
    assert sorted(vol.spacing) == pytest.approx(sorted(nib.affines.voxel_sizes(affine)))

    ijk = np.stack(np.meshgrid(*[np.arange(s) for s in data.shape], indexing="ij"), -1).reshape(-1, 3)  # [N, 3]
    world = apply_affine(affine, ijk)  # [N, 3] mm
    new_ijk = np.rint(apply_affine(np.linalg.inv(vol.affine), world)).astype(int)  # [N, 3]
    assert (new_ijk >= 0).all() and (new_ijk < np.array(vol.shape)).all()
    np.testing.assert_array_equal(vol.array[tuple(new_ijk.T)], data[tuple(ijk.T)])


def test_missing_file(tmp_path):
    assert_error(r"image .*nope\.nii\.gz: file not found", load_volume, tmp_path / "nope.nii.gz")


def test_truncated_gzip_is_a_nifti_error(tmp_path):
    path = write(tmp_path / "cut.nii.gz", random_volume((32, 32, 32)))
    blob = path.read_bytes()
    path.write_bytes(blob[: len(blob) // 2])
    assert_error(r"cut\.nii\.gz: cannot read NIfTI", load_volume, path)


def test_truncated_plain_nifti_is_a_nifti_error(tmp_path):
    path = write(tmp_path / "cut.nii", random_volume((16, 16, 16)))
    blob = path.read_bytes()
    path.write_bytes(blob[: len(blob) // 2])
    assert_error(r"cut\.nii: cannot read NIfTI", load_volume, path)


def test_text_file_with_nifti_name_is_a_nifti_error(tmp_path):
    path = tmp_path / "notes.nii"
    path.write_text("subject_id,image\n")
    assert_error(r"notes\.nii: cannot read NIfTI", load_volume, path)
    gz = tmp_path / "notes.nii.gz"
    gz.write_bytes(gzip.compress(b"not a nifti header at all"))
    assert_error(r"notes\.nii\.gz: cannot read NIfTI", load_volume, gz)


def test_2d_image_is_rejected_with_its_shape(tmp_path):
    path = write(tmp_path / "slice.nii.gz", np.zeros((16, 16), np.float32))
    assert_error(r"slice\.nii\.gz: expected a 3D volume, got shape \(16, 16\)", load_volume, path)


def test_4d_with_two_volumes_is_rejected_with_its_shape(tmp_path):
    path = write(tmp_path / "dwi.nii.gz", np.zeros((8, 8, 8, 2), np.float32))
    assert_error(r"dwi\.nii\.gz: expected a 3D volume, got shape \(8, 8, 8, 2\)", load_volume, path)


def test_4d_with_one_volume_is_squeezed(tmp_path):
    data = random_volume((8, 6, 4))
    vol = load_volume(write(tmp_path / "one.nii.gz", data[..., None]))
    assert vol.shape == (8, 6, 4)
    np.testing.assert_array_equal(vol.array, data)


def test_non_finite_voxels_are_counted(tmp_path):
    data = random_volume((8, 8, 8))
    data[1, 2, 3] = np.nan
    data[4, 4, 4] = np.nan
    data[0, 0, 0] = np.inf
    path = write(tmp_path / "nan.nii.gz", data)
    assert_error(r"nan\.nii\.gz: 3 of 512 voxels are not finite", load_volume, path)


def test_singular_affine_is_rejected(tmp_path):
    img = nib.Nifti1Image(random_volume((4, 4, 4)), None)
    img.set_sform(np.diag([1.0, 0.0, 1.0, 1.0]), code="scanner")  # a qform cannot even hold this
    path = tmp_path / "flat.nii.gz"
    nib.save(img, str(path))
    assert_error(r"flat\.nii\.gz: affine is not finite and invertible", load_volume, path)


def lesion(shape=(16, 12, 10)):
    mask = np.zeros(shape, np.uint8)
    mask[5:9, 4:7, 3:6] = 1
    return mask


def test_load_pair_returns_float_binary_mask(tmp_path):
    image = write(tmp_path / "img.nii.gz", random_volume(), PERMUTED)
    mask = write(tmp_path / "seg.nii.gz", lesion(), PERMUTED)
    img_vol, mask_vol = load_pair(image, mask)
    assert mask_vol.array.dtype == np.float32
    assert set(np.unique(mask_vol.array)) == {0.0, 1.0}
    assert mask_vol.array.sum() == lesion().sum()
    np.testing.assert_allclose(mask_vol.affine, img_vol.affine)


def test_mask_stored_flipped_on_the_same_world_grid_is_accepted_and_aligned(tmp_path):
    data, seg = random_volume(), lesion()
    image = load_volume(write(tmp_path / "img.nii.gz", data, RAS))
    flip_x = np.diag([-1.0, 1.0, 1.0, 1.0])
    flip_x[0, 3] = data.shape[0] - 1  # voxel i -> n-1-i
    mask = load_mask(write(tmp_path / "seg.nii.gz", seg[::-1], RAS @ flip_x), image)
    np.testing.assert_array_equal(mask.array, seg)


def test_mask_with_shifted_affine_names_both_files(tmp_path):
    image = load_volume(write(tmp_path / "img.nii.gz", random_volume()))
    shifted = RAS.copy()
    shifted[0, 3] += 0.5
    path = write(tmp_path / "seg.nii.gz", lesion(), shifted)
    msg = assert_error(r"seg\.nii\.gz: affine differs from .*img\.nii\.gz by up to 0\.5", load_mask, path, image)
    assert "-9.5" in msg and "-10." in msg  # both affines are shown


def test_mask_affine_within_tolerance_is_accepted(tmp_path):
    image = load_volume(write(tmp_path / "img.nii.gz", random_volume()))
    nudged = RAS.copy()
    nudged[0, 3] += 1e-4
    assert load_mask(write(tmp_path / "seg.nii.gz", lesion(), nudged), image).array.sum() == lesion().sum()


def test_mask_with_different_shape_names_both_shapes(tmp_path):
    image = load_volume(write(tmp_path / "img.nii.gz", random_volume()))
    path = write(tmp_path / "seg.nii.gz", lesion((16, 12, 9)))
    assert_error(r"seg\.nii\.gz: shape \(16, 12, 9\) does not match .*img\.nii\.gz shape \(16, 12, 10\)",
                 load_mask, path, image)


def test_empty_mask_is_rejected_unless_allowed(tmp_path):
    image = load_volume(write(tmp_path / "img.nii.gz", random_volume()))
    path = write(tmp_path / "seg.nii.gz", np.zeros((16, 12, 10), np.uint8))
    assert_error(r"mask .*seg\.nii\.gz: empty", load_mask, path, image)
    assert load_mask(path, image, require_lesion=False).array.sum() == 0


def test_non_binary_mask_lists_the_values(tmp_path):
    image = load_volume(write(tmp_path / "img.nii.gz", random_volume()))
    seg = lesion()
    seg[0, 0, 0] = 2
    seg[1, 0, 0] = 4
    path = write(tmp_path / "seg.nii.gz", seg)
    assert_error(r"seg\.nii\.gz: expected binary 0/1 values, found 2, 4 in 2 voxels", load_mask, path, image)


def test_check_same_grid_names_the_second_volume(tmp_path):
    a = Volume(np.zeros((4, 4, 4), np.float32), RAS.copy(), tmp_path / "a.nii")
    b = Volume(np.zeros((4, 4, 5), np.float32), RAS.copy(), tmp_path / "b.nii")
    check_same_grid(a, Volume(a.array, a.affine, tmp_path / "c.nii"))
    assert_error(r"^.*b\.nii: shape", check_same_grid, a, b)


@pytest.mark.parametrize("name,gzipped", [("out.nii", False), ("out.nii.gz", True)])
def test_save_volume_round_trip_and_format(tmp_path, name, gzipped):
    data = random_volume()
    save_volume(tmp_path / name, data, PERMUTED)
    assert (tmp_path / name).read_bytes()[:2] == b"\x1f\x8b" if gzipped else (tmp_path / name).read_bytes()[:2] != b"\x1f\x8b"
    img = nib.load(str(tmp_path / name))
    np.testing.assert_array_equal(np.asarray(img.dataobj), data)
    np.testing.assert_allclose(img.affine, PERMUTED)
    assert os.listdir(tmp_path) == [name]


def test_save_volume_keeps_integer_dtype(tmp_path):
    save_volume(tmp_path / "seg.nii.gz", lesion(), RAS, dtype=np.uint8)
    img = nib.load(str(tmp_path / "seg.nii.gz"))
    assert img.get_data_dtype() == np.uint8
    np.testing.assert_array_equal(np.asarray(img.dataobj), lesion())


def test_failed_save_leaves_existing_file_intact_and_no_temp(tmp_path, monkeypatch):
    target = tmp_path / "out.nii.gz"
    save_volume(target, random_volume(seed=1), RAS)
    before = target.read_bytes()

    def disk_full(tmp, data):
        with open(tmp, "wb") as f:
            f.write(b"half a file")
        raise OSError("No space left on device")

    monkeypatch.setattr(Path, "write_bytes", disk_full)
    with pytest.raises(OSError, match="No space"):
        save_volume(target, random_volume(seed=2), RAS)
    assert target.read_bytes() == before
    assert os.listdir(tmp_path) == ["out.nii.gz"]


def test_save_volume_is_byte_identical_on_rerun_and_sets_scanner_codes(tmp_path):
    save_volume(tmp_path / "a.nii.gz", random_volume(), PERMUTED, compresslevel=6)
    save_volume(tmp_path / "b.nii.gz", random_volume(), PERMUTED, compresslevel=6)
    assert (tmp_path / "a.nii.gz").read_bytes() == (tmp_path / "b.nii.gz").read_bytes()
    header = nib.load(str(tmp_path / "a.nii.gz")).header
    assert (int(header["qform_code"]), int(header["sform_code"])) == (1, 1)
    np.testing.assert_allclose(header.get_qform(), PERMUTED, atol=1e-6)


def test_save_volume_rejects_unknown_suffix(tmp_path):
    assert_error(r"out\.npy: expected a \.nii or \.nii\.gz", save_volume, tmp_path / "out.npy", random_volume(), RAS)


def _with_pixdim(path: Path, pixdim) -> Path:
    """Overwrite the header's voxel size (pixdim[1:4], bytes 80-91) as a broken writer would; nibabel's
    own writer refuses to, and its reader silently turns 0 into 1 and -s into s."""
    import struct
    gz = path.name.endswith(".gz")
    blob = bytearray(gzip.decompress(path.read_bytes()) if gz else path.read_bytes())
    blob[80:92] = struct.pack("<3f", *pixdim)
    path.write_bytes(gzip.compress(bytes(blob)) if gz else bytes(blob))
    return path


@pytest.mark.parametrize("name", ["vox.nii", "vox.nii.gz"])
@pytest.mark.parametrize("pixdim", [(0.0, 2.0, 3.0), (1.5, -2.0, 3.0), (1.5, 2.0, float("nan"))])
def test_zero_negative_or_nan_voxel_size_is_refused_naming_the_file(tmp_path, name, pixdim):
    img = nib.Nifti1Image(random_volume((6, 5, 4)), None)
    img.set_qform(RAS, code=1)  # the grid from pixdim alone (no sform), as some converters write
    img.set_sform(None, code=0)
    path = tmp_path / name
    nib.save(img, str(path))
    assert load_volume(path).spacing == pytest.approx((1.5, 2.0, 3.0))
    _with_pixdim(path, pixdim)
    assert_error(rf"image .*{name}: voxel size .* expected 3 positive", load_volume, path)


def test_a_zero_pixdim_beside_a_valid_sform_is_read_from_the_sform(tmp_path):
    """With sform_code > 0 nibabel takes the grid from the sform and never reads pixdim: such a file is valid."""
    img = nib.Nifti1Image(random_volume((6, 5, 4)), None)
    img.set_sform(np.diag([2.0, 2.0, 2.0, 1.0]), code=1)
    img.set_qform(None, code=0)
    path = tmp_path / "sform.nii.gz"
    nib.save(img, str(path))
    _with_pixdim(path, (0.0, 0.0, 0.0))
    assert load_volume(path).spacing == pytest.approx((2.0, 2.0, 2.0))
