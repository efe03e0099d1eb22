"""Byte-reproducible outputs: NIfTI gzip streams with no timestamp or file name, stable CSVs.

Files are written straight into the cohort's temporary directory; the whole directory is moved into
place at the end (data.atomic.atomic_dir), so no single file needs its own atomic rename.
"""
from __future__ import annotations

import gzip
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd


def nifti_bytes(array: np.ndarray, affine: np.ndarray, level: int = 6) -> bytes:
    """A .nii.gz as bytes; gzip's mtime is 0 and no name is stored, so equal inputs give equal bytes."""
    img = nib.Nifti1Image(array, affine)
    img.header.set_data_dtype(array.dtype)
    img.header.set_xyzt_units("mm")
    img.set_qform(affine, code=1)  # scanner coordinates
    img.set_sform(affine, code=1)
    return gzip.compress(img.to_bytes(), compresslevel=level, mtime=0)


def write_csv(path: Path, df: pd.DataFrame) -> None:
    """Missing values are empty cells; integer columns stay integers."""
    df.to_csv(path, index=False, na_rep="", lineterminator="\n")
