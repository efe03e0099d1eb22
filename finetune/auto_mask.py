"""A lesion mask for a subject who has none: segment, pick the index lesion, write it on the image's grid.

    prepared image [1, X, Y, Z] (data.prepare: RAS, the contract's spacing, normalised, brain crop)
      -> resampled to the model's own voxel (the contract's view: crop_mm / input_size mm)
      -> MONAI sliding_window_inference of the segmentation head (fold ensemble: mean probability)
      -> back to the prepared grid -> connected components of p > 0.5
      -> the index lesion: the largest component whose voxels lie, at the median, deeper than
         `surface_margin_mm` below the head's surface (scalp and skull are bright rims too), or the one
         nearest a given lesion centre (world RAS mm)
      -> resampled (nearest) onto the source image's own voxel grid and affine, written as NIfTI

finetune.predict then reads that file as the row's mask, exactly as it reads a drawn one.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from core.errors import InputError
from models.input_spec import InputSpec

CENTRE_COLUMNS = ("lesion_x_mm", "lesion_y_mm", "lesion_z_mm")  # optional lesion centre, world RAS mm
SURFACE_MARGIN_MM = 10.0  # scalp + skull: a candidate mostly shallower than this is not a brain lesion
OVERLAP = 0.25  # sliding-window overlap (MONAI's default); Gaussian weighting blends the windows


def model_voxel_mm(spec: InputSpec) -> float:
    """The edge of one model input voxel in mm: the lesion view's scale (crop_mm over input_size), or the
    prepared spacing when the view is at native scale."""
    return spec.view.crop_mm / spec.input_size if spec.view.crop_mm > 0 else spec.spacing_mm


@torch.no_grad()
def lesion_probability(models: list, image: np.ndarray, spec: InputSpec, pad_value: float,
                       sw_batch_size: int = 8) -> np.ndarray:
    """image [C, X, Y, Z] on the prepared grid -> the mean lesion probability of `models` [X, Y, Z] there.
    `pad_value`: the first channel's background (where a window passes the volume's edge; the head crop
    keeps a margin, so windows seldom do)."""
    from monai.inferers import sliding_window_inference
    factor = spec.spacing_mm / model_voxel_mm(spec)  # prepared voxels -> model voxels
    x = torch.from_numpy(np.array(image, dtype=np.float32))[None]  # [1, C, X, Y, Z]
    shape = x.shape[2:]
    up = F.interpolate(x, size=[max(1, round(s * factor)) for s in shape], mode="trilinear", align_corners=False)
    x2 = torch.cat([up, torch.zeros_like(up[:, :1])], dim=1)  # [1, C + 1, X', Y', Z']: the mask channel is unused
    roi = (spec.input_size,) * 3
    prob = torch.stack([
        sliding_window_inference(x2, roi, sw_batch_size, lambda w, m=m: torch.sigmoid(m.segment(w).float()),
                                 overlap=OVERLAP, mode="gaussian", padding_mode="constant", cval=float(pad_value))
        for m in models]).mean(0)  # [1, 1, X', Y', Z']
    return F.interpolate(prob, size=list(shape), mode="trilinear", align_corners=False)[0, 0].numpy()


def head_depth_mm(image: np.ndarray, pad_value: float, spacing) -> np.ndarray:
    """[X, Y, Z] distance in mm of each voxel of a prepared image below the head's surface (0 outside):
    the head is every voxel above the background value data.prepare gives, holes filled."""
    from scipy import ndimage
    head = ndimage.binary_fill_holes(np.asarray(image) > pad_value + 1e-6)
    return ndimage.distance_transform_edt(head, sampling=[float(s) for s in spacing])


def index_lesion(prob: np.ndarray, affine: np.ndarray, centre_mm=None, depth_mm: np.ndarray | None = None,
                 surface_margin_mm: float = SURFACE_MARGIN_MM) -> np.ndarray | None:
    """The index lesion of a probability map [X, Y, Z] with voxel-to-world `affine`: the largest connected
    component of p > 0.5 whose median voxel depth exceeds `surface_margin_mm` (by `depth_mm` [X, Y, Z],
    when given), or, with `centre_mm` (3 world RAS mm), the component with a voxel nearest it.
    None when no component qualifies."""
    from scipy import ndimage  # connected components with the full 26-neighbourhood
    labels, n = ndimage.label(prob > 0.5, structure=np.ones((3, 3, 3)))
    if n == 0:
        return None
    if centre_mm is None:
        sizes = np.bincount(labels.ravel())[1:].astype(float)  # [n]
        if depth_mm is not None and surface_margin_mm > 0:
            # the median depth, not the centroid's: a scalp rim closed around the head has its centroid
            # deep inside the brain, but most of its voxels at the surface
            depth = np.asarray(ndimage.median(depth_mm, labels, range(1, n + 1)))  # [n]
            sizes[depth < surface_margin_mm] = 0
        if not sizes.any():
            return None
        return labels == 1 + int(np.argmax(sizes))
    idx = np.argwhere(labels > 0)  # [M, 3]
    world = idx @ np.asarray(affine)[:3, :3].T + np.asarray(affine)[:3, 3]  # [M, 3] mm
    nearest = np.argmin(np.linalg.norm(world - np.asarray(centre_mm, dtype=np.float64), axis=1))
    return labels == labels[tuple(idx[nearest])]


def on_source_grid(mask: np.ndarray, affine: np.ndarray, source_path: str) -> tuple[np.ndarray, np.ndarray]:
    """A mask [X, Y, Z] with voxel-to-world `affine` -> (uint8 mask on the source NIfTI's own grid, that
    grid's affine): each source voxel takes the nearest mask voxel at the same world position."""
    import nibabel as nib
    from scipy import ndimage
    src = nib.load(source_path)
    to_mask = np.linalg.inv(np.asarray(affine, dtype=np.float64)) @ src.affine  # source voxel -> mask voxel
    out = ndimage.affine_transform(mask.astype(np.uint8), to_mask[:3, :3], offset=to_mask[:3, 3],
                                   output_shape=tuple(src.shape[:3]), order=0, mode="constant", cval=0)
    return out.astype(np.uint8), src.affine


def lesion_centre(row) -> list[float] | None:
    """The row's lesion centre (CENTRE_COLUMNS, world RAS mm), or None when the columns are absent or empty."""
    values = [row.get(c) for c in CENTRE_COLUMNS]
    if all(v is None or (isinstance(v, float) and np.isnan(v)) or str(v).strip() == "" for v in values):
        return None
    try:
        centre = [float(v) for v in values]
    except (TypeError, ValueError):
        raise InputError(f"subject {row['subject_id']}: {list(CENTRE_COLUMNS)} must be three numbers (mm), "
                         f"got {values}") from None
    if not np.all(np.isfinite(centre)):
        raise InputError(f"subject {row['subject_id']}: {list(CENTRE_COLUMNS)} must all be given, got {values}")
    return centre


def predict_mask(models: list, row, spec: InputSpec, out_dir: Path,
                 surface_margin_mm: float = SURFACE_MARGIN_MM) -> tuple[Path, float]:
    """Segment one prepared row (cache_image), write its index lesion into `out_dir` (NIfTI on the source
    grid, and a PNG overlay on the prepared image); returns the NIfTI's path and the lesion's volume in ml.
    InputError when nothing is found."""
    from data.cache import CacheEntry
    from data.nifti import save_volume
    entry = CacheEntry.from_path(row["cache_image"])
    affine = np.asarray(entry.meta["affine"], dtype=np.float64)
    pad_value = entry.meta.get("pad_value", 0.0)  # the first channel's: it sets the head and the grid
    prob = lesion_probability(models, entry.image(), spec, pad_value)
    depth = head_depth_mm(entry.image()[0], pad_value, np.linalg.norm(affine[:3, :3], axis=0))
    lesion = index_lesion(prob, affine, lesion_centre(row), depth, surface_margin_mm)
    if lesion is None:
        raise InputError(f"subject {row['subject_id']}: the segmentation found no lesion (no component of "
                         f"p > 0.5 lying deeper than {surface_margin_mm:g} mm below the head's surface) in {entry.meta['source_image']}")
    source = entry.meta["source_image"]  # the first channel's file: the mask is written on its grid
    mask, src_affine = on_source_grid(lesion, affine, source)
    if not mask.any():
        raise InputError(f"subject {row['subject_id']}: the lesion found lies outside the image grid of {source}")
    path = out_dir / f"{row['subject_id']}_pred_mask.nii.gz"
    save_volume(path, mask, src_affine, dtype=np.uint8)
    from finetune.figures import save_overlay  # a look at what was found, for quality control
    save_overlay(path.with_name(f"{row['subject_id']}_pred_mask.png"), np.asarray(entry.image()[0]), None, lesion,
                 title=str(row["subject_id"]))
    volume_ml = float(lesion.sum() * abs(np.linalg.det(affine[:3, :3])) / 1000.0)
    return path, volume_ml
