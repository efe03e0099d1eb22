"""A lesion mask for a subject who has none: segment the whole head, score the candidates, write the index lesion.

    prepared image [C, X, Y, Z] (data.prepare: RAS, the contract's spacing, normalised, head crop)
      -> the search region: the brain (the manifest's brain_mask column, else data.brain's estimate from the
         first channel), holes filled and grown by BRAIN_TOLERANCE_MM; only when no brain is found, the head
         deeper than `surface_margin_mm` (scalp and skull are bright rims too)
      -> the region's bounding box grown by BOX_MARGIN_MM, resampled to the model's own voxel (the
         contract's view: crop_mm / input_size mm; as it is at native scale, crop_mm 0)
      -> MONAI sliding_window_inference of the segmenter, the ViT's head or a CNN (fold ensemble: mean
         probability; with --tta each model is FlipAveraged: a window's probability is the mean over its 8
         axis flips)
      -> back to the prepared grid (probability 0 outside the box)
      -> candidates (finetune/lesion/candidates.py): components of p > 0.5 in the region, scored, ranked
      -> the index lesion: the best-scoring candidate, or the one nearest a given lesion centre (world RAS
         mm); none when it is below the confidence threshold, unless low confidence is accepted
      -> resampled (nearest) onto the source image's own voxel grid and affine, written as NIfTI, with every
         candidate as a label map (voxel value = rank) beside it

finetune.predict then reads that file as the row's mask, exactly as it reads a drawn one, and writes the
candidates table as a CSV beside the masks.
"""
from __future__ import annotations

import contextlib
import itertools
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from core.errors import InputError
from data.brain import brain_mask, dilate_mm, fill_slices
from finetune.lesion import candidates as cand
from models.input_spec import InputSpec

CENTRE_COLUMNS = ("lesion_x_mm", "lesion_y_mm", "lesion_z_mm")  # optional lesion centre, world RAS mm
SURFACE_MARGIN_MM = 10.0  # the fallback region without a brain: scalp + skull lie shallower than this
BRAIN_TOLERANCE_MM = 5.0  # the brain grows by this: a cortical lesion, its rim at the pia, a lesion by a cistern
REGION_MM = 4.0  # the brain region is estimated on a grid of about this voxel edge
OVERLAP = 0.25  # sliding-window overlap (MONAI's default); Gaussian weighting blends the windows
SW_BATCH_SIZE = 8  # windows per forward pass
# The sliding window covers the search region's bounding box grown by this, not the whole head crop: a
# candidate is kept only when most of it lies in the region, so its part outside needs a margin, not the
# face and neck (a synthetic cohort head: 210 windows instead of 252 at 0.83 mm, 12 instead of 18 at 2 mm).
BOX_MARGIN_MM = 10.0


class LesionSearch(NamedTuple):
    """What the search of one row found."""
    mask_path: Path | None   # the index lesion's NIfTI on the source grid; None: no lesion chosen
    volume_ml: float         # the index lesion's volume (NaN when none)
    status: str              # candidates.FOUND, NO_CONFIDENT or LOW_ACCEPTED
    candidates: pd.DataFrame  # candidates.COLUMNS, best first
    region: str              # what the search region was (Region.source)


def model_voxel_mm(spec: InputSpec) -> float:
    """The edge of one model input voxel in mm: the lesion view's scale (crop_mm over input_size), or the
    prepared spacing when the view is at native scale."""
    return spec.view.crop_mm / spec.input_size if spec.view.crop_mm > 0 else spec.spacing_mm


# The 8 mirrorings of a window [B, C, D, H, W]: every subset of its three spatial axes (nnU-Net's test-time
# mirroring). Written out here because MONAI's TestTimeAugmentation draws random transforms (for an
# uncertainty estimate), not this fixed, exactly invertible set.
FLIPS = [dims for k in range(4) for dims in itertools.combinations((2, 3, 4), k)]


class FlipAveraged:
    """A segmenter under test-time flips (predict --tta): its lesion probability on a window is the mean over
    FLIPS of the model's probability on the flipped window, flipped back (8x the compute). It keeps the
    segmenter's contract, so the search takes it as any other model."""
    def __init__(self, model):
        self.model = model

    def segment(self, window: torch.Tensor) -> torch.Tensor:
        """window [B, C + 1, s, s, s] -> logits [B, 1, s, s, s] of the flip-averaged probability."""
        prob = torch.stack([torch.sigmoid(self.model.segment(window.flip(d)).float()).flip(d) for d in FLIPS]).mean(0)
        return torch.logit(prob, eps=1e-7)


def no_timer(stage: str):
    """The default `timer` of the search: times nothing (benchmarks/speed/lesion_search.py passes one that
    records each stage's seconds)."""
    return contextlib.nullcontext()


def window_mm(spec: InputSpec) -> float:
    """The edge of one sliding window in mm: the contract's input size at the model's voxel."""
    return spec.input_size * model_voxel_mm(spec)


def search_box(region: np.ndarray | None, spacing_mm, shape, min_mm: float = 0.0) -> tuple[slice, slice, slice]:
    """The part of a prepared grid of `shape` that the sliding window covers: the bounding box of `region`
    [X, Y, Z] bool grown by BOX_MARGIN_MM (`spacing_mm`: the grid's voxel edge per axis), clipped to the grid;
    the whole grid when there is no region or it is empty. An axis shorter than `min_mm` (a window: window_mm)
    grows about its centre to that length, shifted to stay inside the grid: MONAI pads a volume narrower than a
    window with a constant, and the real tissue beside the box is what the model was trained to see there."""
    if region is None or not region.any():
        return tuple(slice(0, int(n)) for n in shape)
    idx = np.argwhere(region)  # [N, 3]
    spacing = np.asarray(spacing_mm, dtype=np.float64)
    margin = np.ceil(BOX_MARGIN_MM / spacing).astype(int)  # [3] voxels
    lo, hi = np.maximum(idx.min(0) - margin, 0), np.minimum(idx.max(0) + 1 + margin, shape)
    need = np.minimum(np.ceil(min_mm / spacing - 1e-9).astype(int), shape)  # [3] voxels, at most the grid
    short = hi - lo < need
    lo = np.where(short, np.clip((lo + hi - need) // 2, 0, np.asarray(shape) - need), lo)
    hi = np.where(short, lo + need, hi)
    return tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))


def to_model_grid(image: np.ndarray, spec: InputSpec) -> torch.Tensor:
    """image [C, X, Y, Z] on the prepared grid -> [1, C, X', Y', Z'] float32 at the model's own voxel
    (model_voxel_mm), trilinear; the image itself at native scale."""
    factor = spec.spacing_mm / model_voxel_mm(spec)  # prepared voxels -> model voxels
    x = torch.from_numpy(np.array(image, dtype=np.float32))[None]  # [1, C, X, Y, Z]
    if factor == 1.0:
        return x
    size = [max(1, round(s * factor)) for s in x.shape[2:]]
    return F.interpolate(x, size=size, mode="trilinear", align_corners=False)


def slide(models: list, x: torch.Tensor, spec: InputSpec, pad_value: float, overlap: float = OVERLAP,
          sw_batch_size: int = SW_BATCH_SIZE) -> torch.Tensor:
    """x [1, C, X', Y', Z'] at the model's voxel -> the mean lesion probability of `models` [1, 1, X', Y', Z']:
    MONAI's sliding window of the contract's input size, Gaussian-blended, one pass per model. The unused
    mask channel (zeros) joins each window only as the window is read, so the volume never holds it, and a
    window that passes the volume's edge pads the image with `pad_value` but the mask with 0."""
    from monai.inferers import sliding_window_inference

    def probability(model):
        def predict(window: torch.Tensor) -> torch.Tensor:  # [B, C, s, s, s] -> [B, 1, s, s, s]
            window = torch.cat([window, torch.zeros_like(window[:, :1])], dim=1)  # [B, C + 1, s, s, s]
            return torch.sigmoid(model.segment(window).float())
        return predict

    roi = (spec.input_size,) * 3
    return torch.stack([
        sliding_window_inference(x, roi, sw_batch_size, probability(m), overlap=overlap, mode="gaussian",
                                 padding_mode="constant", cval=float(pad_value))
        for m in models]).mean(0)  # [1, 1, X', Y', Z']


def to_prepared_grid(prob: torch.Tensor, shape) -> np.ndarray:
    """prob [1, 1, X', Y', Z'] at the model's voxel -> [X, Y, Z] float32 on the prepared grid of `shape`."""
    if tuple(prob.shape[2:]) != tuple(shape):
        prob = F.interpolate(prob, size=list(shape), mode="trilinear", align_corners=False)
    return prob[0, 0].numpy()


@torch.no_grad()
def lesion_probability(models: list, image: np.ndarray, spec: InputSpec, pad_value: float,
                       sw_batch_size: int = SW_BATCH_SIZE, overlap: float = OVERLAP,
                       region: np.ndarray | None = None, timer=no_timer) -> np.ndarray:
    """image [C, X, Y, Z] on the prepared grid -> the mean lesion probability of `models` [X, Y, Z] there,
    computed over search_box(`region`) and 0 outside it (no window is run where no lesion may lie).
    `pad_value`: the first channel's background (where a window passes the volume's edge; the head crop
    keeps a margin, so windows seldom do). `timer(stage)`: a context manager around each stage."""
    image = np.asarray(image)
    box = search_box(region, spec.prep.spacing, image.shape[1:], window_mm(spec))
    with timer("resample up"):
        x = to_model_grid(image[(slice(None), *box)], spec)  # [1, C, X', Y', Z']
    with timer("sliding window"):
        prob = slide(models, x, spec, pad_value, overlap, sw_batch_size)  # [1, 1, X', Y', Z']
    with timer("resample down"):
        out = np.zeros(image.shape[1:], np.float32)  # [X, Y, Z]
        out[box] = to_prepared_grid(prob, [b.stop - b.start for b in box])
    return out


def head_depth_mm(image: np.ndarray, pad_value: float, spacing) -> np.ndarray:
    """[X, Y, Z] distance in mm of each voxel of a prepared image below the head's surface (0 outside):
    the head is every voxel above the background value data.prepare gives, with its holes filled in 3D and
    slice by slice (data.brain.fill_slices: preparing clips a dark skull to the background value, and
    where the field of view opens the skull's shell a 3D fill alone leaves it out of the head)."""
    from scipy import ndimage
    head = fill_slices(np.asarray(image) > pad_value + 1e-6)
    return ndimage.distance_transform_edt(head, sampling=[float(s) for s in spacing])


class Region(NamedTuple):
    """Where a lesion may lie on the prepared grid, and what it is (the output names it per row)."""
    mask: np.ndarray      # [X, Y, Z] bool
    depth_mm: np.ndarray  # [X, Y, Z] mm below the head's surface
    source: str


def search_region(entry, row, prep, surface_margin_mm: float = SURFACE_MARGIN_MM) -> Region:
    """The brain of a prepared row (CacheEntry `entry`), holes filled and grown by BRAIN_TOLERANCE_MM: the
    row's brain_mask file when the manifest gives one, else data.brain's estimate from the first channel.
    Only when that estimate is empty is the region the head deeper than `surface_margin_mm`. The region and
    the depth are worked out on a grid of about REGION_MM (they need no finer, and it is 8x fewer voxels
    at 2 mm), then brought back to the prepared grid by nearest neighbour."""
    image = np.asarray(entry.image()[0], dtype=np.float32)  # [X, Y, Z]: the first channel, prepared
    affine = np.asarray(entry.meta["affine"], dtype=np.float64)
    spacing = np.linalg.norm(affine[:3, :3], axis=0)
    step = [max(1, round(REGION_MM / s)) for s in spacing]
    coarse = image[::step[0], ::step[1], ::step[2]]  # [X', Y', Z']
    coarse_mm = [float(s * k) for s, k in zip(spacing, step)]
    depth = head_depth_mm(coarse, entry.meta.get("pad_value", 0.0), coarse_mm)
    path = row.get("brain_mask") if hasattr(row, "get") else None
    if isinstance(path, str) and path.strip():
        brain = brain_from_file(path, entry.meta["source_image"], affine @ np.diag([*step, 1]), coarse.shape)
        source = f"brain_mask column: {path}"
    else:
        modality = prep.channels()[0][1]
        brain = brain_mask(source_intensity(coarse, entry.meta, modality), coarse_mm, head=depth > 0,
                           modality=modality)
        source = "estimated: data.brain.brain_mask of the first channel"
    if brain.any():
        region = dilate_mm(fill_slices(brain), BRAIN_TOLERANCE_MM, coarse_mm)
    else:
        region, source = depth > surface_margin_mm, f"surface margin {surface_margin_mm:g} mm (no brain found)"
    # fine voxel i lies nearest coarse voxel round(i / step)
    near = np.ix_(*[np.minimum((np.arange(n) + k // 2) // k, c - 1) for n, k, c in zip(image.shape, step, coarse.shape)])
    return Region(region[near], depth[near], source)


def source_intensity(image: np.ndarray, meta: dict, modality: str) -> np.ndarray:
    """A prepared first channel [X, Y, Z] in the units data.brain reads: CT back to HU (its brain is a HU
    range, and preparing maps the window to 0..1); MRI and PET as they are (Otsu and erosion are blind to
    scale)."""
    if modality != "ct":
        return image
    lo, hi = meta["intensity"]["window"]
    return lo + image * (hi - lo)


def brain_from_file(path: str, source_image: str, affine: np.ndarray, shape) -> np.ndarray:
    """A brain-mask file (0/1, on the source image's grid: data.nifti checks both) -> [X, Y, Z] bool on the
    prepared grid of voxel-to-world `affine`, nearest neighbour through the two affines."""
    from data.nifti import load_mask, load_volume
    brain = load_mask(path, load_volume(source_image), role="brain_mask")
    return resample_nearest(brain.array, brain.affine, affine, shape) > 0


def resample_nearest(volume: np.ndarray, affine: np.ndarray, out_affine: np.ndarray, out_shape) -> np.ndarray:
    """`volume` [X, Y, Z] with voxel-to-world `affine` -> the grid of `out_affine` and `out_shape`: each output
    voxel takes the nearest input voxel at the same world position (0 outside), the dtype kept."""
    from scipy import ndimage
    to_in = np.linalg.inv(np.asarray(affine, dtype=np.float64)) @ np.asarray(out_affine, dtype=np.float64)
    return ndimage.affine_transform(volume, to_in[:3, :3], offset=to_in[:3, 3], output_shape=tuple(out_shape),
                                    order=0, mode="constant", cval=0)


def on_source_grid(mask: np.ndarray, affine: np.ndarray, source_path: str) -> tuple[np.ndarray, np.ndarray]:
    """A mask or label map [X, Y, Z] with voxel-to-world `affine` -> (the same on the source NIfTI's own grid,
    that grid's affine)."""
    import nibabel as nib
    src = nib.load(source_path)
    return resample_nearest(mask, affine, src.affine, src.shape[:3]), src.affine


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


def search_lesion(models: list, row, spec: InputSpec, out_dir: Path, surface_margin_mm: float = SURFACE_MARGIN_MM,
                  threshold: float = cand.CONFIDENCE_THRESHOLD, accept_low_confidence: bool = False,
                  overlap: float = OVERLAP, timer=no_timer) -> LesionSearch:
    """Search one prepared row (cache_image) and write, into `out_dir`, its candidates as a label map on the
    source grid (<subject>_candidates.nii.gz, voxel value = rank) and, when an index lesion is chosen, that
    lesion (<subject>_pred_mask.nii.gz) with a PNG overlay on the prepared image. InputError when the chosen
    lesion falls outside the source image's grid. `overlap`: the sliding window's; `timer(stage)`: a context
    manager around each stage (benchmarks/speed/lesion_search.py times them)."""
    from data.cache import CacheEntry
    entry = CacheEntry.from_path(row["cache_image"])
    affine = np.asarray(entry.meta["affine"], dtype=np.float64)
    with timer("search region"):  # first: the sliding window covers the region's box alone
        region = search_region(entry, row, spec.prep, surface_margin_mm)
    prob = lesion_probability(models, entry.image(), spec, entry.meta.get("pad_value", 0.0), overlap=overlap,
                              region=region.mask, timer=timer)  # [X, Y, Z]
    with timer("candidates"):
        table, labels = cand.find_candidates(prob, affine, region.mask, region.depth_mm, threshold)
        centre = lesion_centre(row)
        label, far = None, False
        if centre is not None:
            label, distance = cand.nearest_label(labels, affine, centre)
            far = distance > cand.CENTRE_TOLERANCE_MM
        choice = cand.choose_index(table, accept_low_confidence, label, far)
    with timer("writing"):
        path = write_search(entry, row["subject_id"], table, labels, choice.label, out_dir)
    if path is None:
        return LesionSearch(None, float("nan"), choice.status, table, region.source)
    volume_ml = float(table.loc[table["index_lesion"], "volume_ml"].iloc[0])
    return LesionSearch(path, volume_ml, choice.status, table, region.source)


def write_search(entry, sid, table: pd.DataFrame, labels: np.ndarray, label: int | None, out_dir: Path) -> Path | None:
    """Write a searched row's candidates (label map [X, Y, Z] -> <sid>_candidates.nii.gz, voxel value = rank)
    and the index lesion `label` (<sid>_pred_mask.nii.gz, and its PNG overlay) on the source image's grid;
    the lesion's path, None when no lesion is chosen."""
    affine = np.asarray(entry.meta["affine"], dtype=np.float64)
    source = entry.meta["source_image"]  # the first channel's file: masks go on its grid
    out_dir.mkdir(parents=True, exist_ok=True)
    if len(table):
        ranks = np.zeros(labels.max() + 1, np.int16)
        ranks[table["label"].to_numpy()] = table["rank"].to_numpy()
        write_on_source_grid(out_dir / f"{sid}_candidates.nii.gz", ranks[labels], affine, source)
    if label is None:
        return None
    lesion = labels == label  # [X, Y, Z]
    path = out_dir / f"{sid}_pred_mask.nii.gz"
    if not write_on_source_grid(path, lesion.astype(np.uint8), affine, source):
        raise InputError(f"subject {sid}: the lesion found lies outside the image grid of {source}")
    from finetune.figures import save_overlay  # a look at what was found, for quality control
    save_overlay(path.with_name(f"{sid}_pred_mask.png"), np.asarray(entry.image()[0]), None, lesion, title=str(sid))
    return path


def write_on_source_grid(path: Path, volume: np.ndarray, affine: np.ndarray, source: str) -> bool:
    """Write `volume` [X, Y, Z] (integer, voxel-to-world `affine`) as NIfTI on the grid of the NIfTI `source`;
    False, and nothing written, when nothing of it lands there."""
    from data.nifti import save_volume
    out, src_affine = on_source_grid(volume, affine, source)
    if not out.any():
        return False
    save_volume(path, out, src_affine, dtype=volume.dtype)
    return True
