"""NIfTI in and out: load a volume in RAS+ as float32, check it, and save atomically.

Every check raises `NiftiError` with a one-line message that names the file. Volumes are
reoriented with `nibabel.as_closest_canonical`, so array axes run Right, Anterior, Superior
and `affine` maps those voxel indices to world millimetres.
"""
from __future__ import annotations

import gzip
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
from nibabel.affines import voxel_sizes
from nibabel.funcs import squeeze_image

from core.atomic import atomic_path
from core.errors import NiftiError, first_line

NIFTI_SUFFIXES = (".nii.gz", ".nii")


@dataclass
class Volume:
    array: np.ndarray  # [X, Y, Z] float32, RAS+
    affine: np.ndarray  # [4, 4] float64, voxel index -> world mm, after reorientation
    path: Path

    @property
    def spacing(self) -> tuple[float, float, float]:
        return tuple(float(s) for s in voxel_sizes(self.affine))

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(int(s) for s in self.array.shape)


def load_volume(path, *, role: str = "image") -> Volume:
    """Load a 3D NIfTI (.nii or .nii.gz) as float32 in RAS+; `role` names the file in errors."""
    path = Path(path)
    where = f"{role} {path}"
    if not path.is_file():
        raise NiftiError(f"{where}: file not found")
    try:
        img = nib.load(str(path))
        shape = tuple(int(s) for s in img.shape)
        # A 4D file holding a single volume is common (exported series); trailing 1s are dropped.
        if len(shape) < 3 or (len(shape) > 3 and any(s != 1 for s in shape[3:])):
            raise NiftiError(f"{where}: expected a 3D volume, got shape {shape}")
        _check_voxel_size(path, img.header, where)
        affine = np.asarray(img.affine, dtype=np.float64)
        if not np.all(np.isfinite(affine)) or abs(np.linalg.det(affine[:3, :3])) < 1e-12:
            raise NiftiError(f"{where}: affine is not finite and invertible: {_one_line(affine)}")
        img = nib.as_closest_canonical(squeeze_image(img))
        array = np.ascontiguousarray(img.get_fdata(dtype=np.float32))  # [X, Y, Z]
    except NiftiError:
        raise
    except Exception as e:  # truncated gzip (EOFError, zlib.error), bad header, wrong format...
        raise NiftiError(f"{where}: cannot read NIfTI ({first_line(e, typed=True)})") from None
    n_bad = int(array.size - np.count_nonzero(np.isfinite(array)))
    if n_bad:
        raise NiftiError(f"{where}: {n_bad} of {array.size} voxels are not finite (NaN or inf)")
    return Volume(array=array, affine=np.asarray(img.affine, dtype=np.float64), path=path)


def _check_voxel_size(path: Path, header, where: str) -> None:
    """Refuse a stored voxel size (pixdim[1:4]) that is not positive: nibabel's reader turns 0 into 1 mm and
    -s into s with only a log line, so a broken header would silently set the grid. Only where pixdim sets
    the grid: with an sform (sform_code > 0) the affine comes from srow_x/y/z and pixdim is not read."""
    if not isinstance(header, nib.Nifti1Header):  # Nifti2Header is one too; other formats have no pixdim
        return
    if int(header["sform_code"]) > 0:
        return
    from nibabel.openers import ImageOpener
    with ImageOpener(str(path)) as f:
        stored = type(header).from_fileobj(f, check=False)["pixdim"][1:4]  # as written, before nibabel's fix
    if not np.all(np.isfinite(stored) & (stored > 0)):
        raise NiftiError(f"{where}: voxel size (pixdim[1:4]) is {[float(v) for v in stored]} mm in the header; "
                         "expected 3 positive numbers")


def load_mask(path, image: Volume, *, require_lesion: bool = True, atol: float = 1e-3, role: str = "mask") -> Volume:
    """Load a binary mask (`role`: the lesion "mask", or e.g. "brain_mask") on the same grid as `image`;
    returned as float32 0/1. `require_lesion`: an empty mask is refused."""
    mask = load_volume(path, role=role)
    check_same_grid(image, mask, atol=atol)
    other = (mask.array != 0) & (mask.array != 1)  # [X, Y, Z] bool
    if other.any():
        values = np.unique(mask.array[other])
        shown = ", ".join(f"{v:g}" for v in values[:5]) + (f" and {len(values) - 5} more" if len(values) > 5 else "")
        raise NiftiError(
            f"{role} {mask.path}: expected binary 0/1 values, found {shown} in {int(other.sum())} voxels"
        )
    if require_lesion and not mask.array.any():
        raise NiftiError(f"{role} {mask.path}: empty (no voxel is 1); expected "
                         f"{'a lesion' if role == 'mask' else 'a region'}")
    mask.array = (mask.array > 0.5).astype(np.float32)  # also turns -0.0 into 0.0
    return mask


def load_pair(image_path, mask_path, *, require_lesion: bool = True) -> tuple[Volume, Volume]:
    image = load_volume(image_path, role="image")
    return image, load_mask(mask_path, image, require_lesion=require_lesion)


def check_same_grid(a: Volume, b: Volume, atol: float = 1e-3) -> None:
    """Raise if `b` is not on `a`'s voxel grid (shape, or affine beyond `atol` mm)."""
    if a.shape != b.shape:
        raise NiftiError(f"{b.path}: shape {b.shape} does not match {a.path} shape {a.shape}")
    diff = float(np.max(np.abs(a.affine - b.affine)))
    if not diff <= atol:
        raise NiftiError(
            f"{b.path}: affine differs from {a.path} by up to {diff:.4g} (atol {atol:g}); "
            f"{b.path.name} affine {_one_line(b.affine)} vs {a.path.name} affine {_one_line(a.affine)}"
        )


def save_volume(path, array: np.ndarray, affine: np.ndarray, dtype=np.float32, compresslevel: int = 1) -> None:
    """Write a NIfTI atomically (temporary sibling, then `os.replace`); equal inputs give equal bytes.

    `compresslevel` (1-9) applies to .nii.gz only; 1 is nibabel's own default. qform and sform both
    hold `affine` with code 1 (scanner), as dcm2niix writes them, so every viewer reads the same grid.
    """
    path = Path(path)
    if not path.name.endswith(NIFTI_SUFFIXES):
        raise NiftiError(f"{path}: expected a .nii or .nii.gz file name")
    affine = np.asarray(affine, dtype=np.float64)
    if affine.shape != (4, 4):
        raise NiftiError(f"{path}: expected a 4x4 affine, got shape {affine.shape}")
    img = nib.Nifti1Image(np.asarray(array).astype(dtype, copy=False), affine)
    img.header.set_data_dtype(dtype)
    img.header.set_xyzt_units("mm")
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    data = img.to_bytes()
    if path.name.endswith(".gz"):
        # mtime 0 and no stored file name: a rerun (e.g. the synthetic cohort) is byte-identical.
        data = gzip.compress(data, compresslevel=compresslevel, mtime=0)
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def _one_line(a: np.ndarray) -> str:
    return " ".join(np.array2string(a, precision=4, suppress_small=True, max_line_width=10**6).split())
