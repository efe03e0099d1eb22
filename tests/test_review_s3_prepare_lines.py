"""Review findings (issue 32): data/prepare.py's error lines name each file once, and a subject whose preparation
fails for a reason that is not bad input (a read error, a full disk) is named with the file that failed, not
always with its first image."""
import numpy as np
import pandas as pd
import pytest

import data.nifti
import data.prepare
from core.errors import InputError
from data.nifti import save_volume
from data.prep_config import PrepConfig
from data.prepare import PrepareFailed, prepare_table
from test_data_robustness_s3_brain import PREP, SHIFTED, _row  # T1 + PET (SUV), brain_mask column, 1 mm grid


def _refused(row, prep=PREP) -> str:
    with pytest.raises(InputError) as info:
        prepare_table(pd.DataFrame([row]), prep, row["cache"], require_lesion=False, progress=False)
    return str(info.value)


def test_an_empty_brain_mask_names_its_file_once(tmp_path):
    row = _row(tmp_path, np.eye(4))
    save_volume(row["brain_mask"], np.zeros((40, 40, 40), np.uint8), np.eye(4), dtype=np.uint8)
    text = _refused({**row, "cache": tmp_path / "cache"})
    assert text == f"subject s1 brain_mask {row['brain_mask']}: empty (no voxel is 1); expected a region"


def test_a_brain_mask_on_another_grid_names_its_file_once(tmp_path):
    row = _row(tmp_path, SHIFTED)
    text = _refused({**row, "cache": tmp_path / "cache"})
    assert text.startswith(f"subject s1 brain_mask {row['brain_mask']}: affine differs from ") and \
        text.count(row["brain_mask"]) == 1, text


def _read_error_on(monkeypatch, path) -> None:
    """Reading `path` fails as a bad disk does (OSError, not bad input); every other file reads as usual."""
    real = data.nifti.load_volume

    def load(p, *args, **kwargs):
        if str(p) == str(path):
            raise OSError(5, "Input/output error")
        return real(p, *args, **kwargs)
    for module in (data.nifti, data.prepare):  # the readers call it by either name
        monkeypatch.setattr(module, "load_volume", load)


def _lesion_row(folder) -> dict:
    """s1: a T1 (a bright ball), a FLAIR (the same) and a lesion mask, 1 mm, 16^3."""
    g = np.linalg.norm(np.stack(np.meshgrid(*[np.arange(16)] * 3, indexing="ij"), -1) - 7.5, axis=-1)  # [16]*3
    for name, array in (("t1", 100.0 + g), ("flair", 50.0 + g), ("mask", g <= 2)):
        save_volume(folder / f"s1_{name}.nii.gz", np.where(g <= 7, array, 0).astype(np.float32), np.eye(4))
    return {"subject_id": "s1", **{c: str(folder / f"s1_{c}.nii.gz") for c in ("t1", "flair", "mask")}}


@pytest.mark.parametrize("failing", ["mask", "flair", "t1"])
def test_a_subject_that_fails_is_named_with_the_file_that_failed(tmp_path, monkeypatch, failing):
    row = _lesion_row(tmp_path)
    _read_error_on(monkeypatch, row[failing])
    prep = PrepConfig(images=("t1", "flair"), spacing=(2.0, 2.0, 2.0))
    with pytest.raises(PrepareFailed) as info:
        prepare_table(pd.DataFrame([row]), prep, tmp_path / "cache", progress=False)
    assert str(info.value) == f"subject s1 {failing} {row[failing]}: OSError: [Errno 5] Input/output error"


def test_a_brain_mask_that_fails_to_read_is_named(tmp_path, monkeypatch):
    row = _row(tmp_path, np.eye(4))
    _read_error_on(monkeypatch, row["brain_mask"])
    with pytest.raises(PrepareFailed) as info:
        prepare_table(pd.DataFrame([row]), PREP, tmp_path / "cache", require_lesion=False, progress=False)
    assert str(info.value) == f"subject s1 brain_mask {row['brain_mask']}: OSError: [Errno 5] Input/output error"
