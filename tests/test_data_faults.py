"""Issue 32's fault tests for the data side: a damaged cache entry is rebuilt or named in one line; a damaged
NIfTI is one line naming the file, from the preparing step that every run goes through before training."""
import gzip
import struct

import numpy as np
import pandas as pd
import pytest

from core.errors import InputError
from data.cache import CacheEntry
from data.nifti import save_volume
from data.prep_config import PrepConfig
from data.prepare import main as prepare_main
from data.prepare import prepare_table

SHAPE = (12, 10, 8)
AFFINE = np.diag([2.0, 2.0, 2.0, 1.0])


def _subject(folder, name="s1.nii"):
    g = np.stack(np.meshgrid(*[np.arange(s) for s in SHAPE], indexing="ij"), -1)  # [X, Y, Z, 3]
    head = (((g - (np.array(SHAPE) / 2 - 0.5)) / (np.array(SHAPE) / 2 - 1)) ** 2).sum(-1) <= 1
    image = np.where(head, 100.0 + g[..., 0], 0.0).astype(np.float32)  # [X, Y, Z]
    mask = np.zeros(SHAPE, np.uint8)
    mask[5:7, 4:6, 3:5] = 1
    save_volume(folder / name, image, AFFINE)
    save_volume(folder / "s1_mask.nii", mask, AFFINE, dtype=np.uint8)
    return {"subject_id": "s1", "image": str(folder / name), "mask": str(folder / "s1_mask.nii")}


def _truncate(path, keep: float = 0.5):
    blob = path.read_bytes()
    path.write_bytes(blob[: int(len(blob) * keep)])


# ---- (a) a damaged cache entry ----------------------------------------------------------------------------------

@pytest.mark.parametrize("damage", ["truncated image.npy", "truncated mask.npy", "garbled meta.json"])
def test_a_damaged_cache_entry_is_rebuilt(tmp_path, damage):
    df = pd.DataFrame([_subject(tmp_path)])
    out, _ = prepare_table(df, PrepConfig(), tmp_path / "cache", progress=False)
    entry = CacheEntry.from_path(out["cache_image"][0])
    want_image, want_mask = np.array(entry.image()), np.array(entry.mask())
    name = damage.split()[1]
    if name == "meta.json":
        (entry.dir / name).write_text('{"subject_id": "s1", "sha')
    else:
        _truncate(entry.dir / name)
    again, _ = prepare_table(df, PrepConfig(), tmp_path / "cache", progress=False)
    rebuilt = CacheEntry.from_path(again["cache_image"][0])
    assert rebuilt.dir == entry.dir
    np.testing.assert_array_equal(rebuilt.image(), want_image)
    np.testing.assert_array_equal(rebuilt.mask(), want_mask)


def test_reading_a_cache_array_damaged_after_preparing_is_one_line_naming_it(tmp_path):
    out, _ = prepare_table(pd.DataFrame([_subject(tmp_path)]), PrepConfig(), tmp_path / "cache", progress=False)
    entry = CacheEntry.from_path(out["cache_image"][0])
    _truncate(entry.image_path, 0.7)
    with pytest.raises(InputError, match=rf"{entry.image_path}: damaged cache array .*data\.prepare") as info:
        entry.image()
    assert "\n" not in str(info.value)


# ---- (b) a damaged NIfTI ----------------------------------------------------------------------------------------

def _set_voxel(path, value):
    import nibabel as nib
    img = nib.load(str(path), mmap=False)
    data = np.asarray(img.dataobj, np.float32).copy()
    data[3, 3, 3] = value
    save_volume(path, data, img.affine)


def _set_pixdim(path, first):
    # Only the qform carries the grid, and pixdim[1] is broken: nibabel alone would read 0 as 1 mm, -2 as 2 mm.
    import nibabel as nib
    img = nib.load(str(path), mmap=False)  # the file is rewritten below: never write under a live mapping
    img = nib.Nifti1Image(np.asarray(img.dataobj), None, img.header)
    img.set_sform(None, code=0)
    nib.save(img, str(path))
    blob = bytearray(path.read_bytes())
    blob[80:84] = struct.pack("<f", first)
    path.write_bytes(bytes(blob))


def _other_grid_mask(folder):
    save_volume(folder / "s1_mask.nii", np.zeros((6, 5, 4), np.uint8), np.diag([4.0, 4.0, 4.0, 1.0]), dtype=np.uint8)


FAULTS = {
    "truncated": (lambda f: _truncate(f / "s1.nii"), "s1.nii", "cannot read NIfTI"),
    "truncated gzip": (lambda f: _truncate(f / "s1.nii.gz"), "s1.nii.gz", "cannot read NIfTI"),
    "NaN voxel": (lambda f: _set_voxel(f / "s1.nii", np.nan), "s1.nii", "1 of 960 voxels are not finite"),
    "infinite voxel": (lambda f: _set_voxel(f / "s1.nii", np.inf), "s1.nii", "1 of 960 voxels are not finite"),
    "zero voxel size": (lambda f: _set_pixdim(f / "s1.nii", 0.0), "s1.nii", "voxel size"),
    "negative voxel size": (lambda f: _set_pixdim(f / "s1.nii", -2.0), "s1.nii", "voxel size"),
    "mask on another grid": (_other_grid_mask, "s1_mask.nii", "does not match"),
}


@pytest.mark.parametrize("fault", list(FAULTS))
def test_a_damaged_nifti_is_one_line_naming_the_file_before_any_training(tmp_path, fault, capsys):
    damage, culprit, reason = FAULTS[fault]
    row = _subject(tmp_path, "s1.nii.gz" if fault == "truncated gzip" else "s1.nii")
    damage(tmp_path)
    pd.DataFrame([row]).to_csv(tmp_path / "manifest.csv", index=False)
    with pytest.raises(SystemExit) as info:
        prepare_main(["--manifest", str(tmp_path / "manifest.csv"), "--cache", str(tmp_path / "cache")])
    assert info.value.code == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error:")]  # beside the progress bars
    assert len(lines) == 1 and f"{tmp_path / culprit}" in lines[0] and reason in lines[0], err
    assert "Traceback" not in err
    assert not list((tmp_path / "cache").glob("index-*.csv"))  # nothing for a training run to read
