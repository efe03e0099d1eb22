"""Crops in voxel space: random sub-volumes for pretraining and lesion-centred crops for fine-tuning.

A box is `(start, size)`, two 3-tuples of ints in voxel indices of the [X, Y, Z] grid. A start may
be negative and start + size may pass the edge: the part outside the volume is padded.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from monai.transforms import Resize

from core.errors import InputError

Box = tuple[tuple[int, int, int], tuple[int, int, int]]


def _triple(v) -> tuple[int, int, int]:
    t = tuple(int(x) for x in (v if isinstance(v, Sequence) else (v, v, v)))
    if len(t) != 3:
        raise ValueError(f"expected 3 values, got {t}")
    return t


def random_crop_boxes(shape: Sequence[int], size, n: int, rng: np.random.Generator) -> list[Box]:
    """`n` boxes of `size` placed uniformly in a volume of `shape` [X, Y, Z].

    Where the volume is smaller than the crop, the volume is placed uniformly inside the crop
    (a negative start) so padding is spread on both sides.
    """
    shape, size = _triple(shape), _triple(size)
    lo = np.minimum(0, np.subtract(shape, size))  # [3]
    hi = np.maximum(0, np.subtract(shape, size))  # [3], inclusive
    starts = rng.integers(lo, hi + 1, size=(n, 3))  # [n, 3]
    return [(tuple(int(s) for s in st), size) for st in starts]


def crop_with_pad(array, start: Sequence[int], size: Sequence[int], pad_value: float = 0.0):
    """Cut `array` [C, X, Y, Z] (numpy, memmap or torch) at `start` with `size`, padding outside.

    Only the in-bounds slab is read, so a memory-mapped volume is never read whole.
    Returns [C, *size] of the input's type and dtype.
    """
    start, size = _triple(start), _triple(size)
    spatial = array.shape[1:]
    src, dst = [], []
    for st, sz, n in zip(start, size, spatial):
        a, b = max(st, 0), min(st + sz, n)
        if b <= a:  # the box misses the volume on this axis: all padding
            a = b = 0
        src.append(slice(a, b))
        dst.append(slice(a - st, a - st + (b - a)))
    out_shape = (array.shape[0], *size)
    if isinstance(array, torch.Tensor):
        out = torch.full(out_shape, pad_value, dtype=array.dtype, device=array.device)
        out[(slice(None), *dst)] = array[(slice(None), *src)]
    else:
        out = np.full(out_shape, pad_value, dtype=array.dtype)
        out[(slice(None), *dst)] = array[(slice(None), *src)]
    return out


def lesion_box(mask, margin_vox, min_size) -> Box:
    """Cube around the lesion in `mask` [X, Y, Z]: the bounding box grown by `margin_vox` on every side
    (so the peritumoral region is inside), widened to a cube of side >= `min_size`, centred on the lesion.

    The cube always contains the whole grown box; it may extend past the volume (then padded).
    """
    mask = np.asarray(mask)
    if mask.ndim != 3:
        raise ValueError(f"lesion_box: expected a [X, Y, Z] mask, got shape {mask.shape}")
    margin = np.array(_triple(margin_vox))
    nz = np.argwhere(mask > 0)  # [N, 3]
    if len(nz) == 0:
        raise InputError("lesion_box: the mask is empty, so there is no lesion to centre the crop on")
    grown_lo = nz.min(0) - margin  # [3]
    extent = nz.max(0) + margin + 1 - grown_lo  # [3], grown box size
    side = int(max(extent.max(), max(_triple(min_size))))
    # Split the extra room evenly (floor before, rest after) so the grown box stays inside.
    start = grown_lo - (side - extent) // 2
    return tuple(int(s) for s in start), (side, side, side)


def lesion_crop(image, mask, out_size, margin_vox, *, min_size=None, pad_value: float | None = None) -> np.ndarray:
    """Lesion-centred crop of image [C,X,Y,Z] and mask [1,X,Y,Z], resized to `out_size` -> [C + 1, *out_size] float32.

    The cube is `lesion_box(mask, margin_vox, min_size)`, with min_size defaulting to out_size so a
    small lesion keeps its native scale instead of being magnified. The image is resized trilinearly,
    the mask with exact nearest-neighbour ("nearest-exact" samples voxel centres; plain "nearest" in
    torch is shifted by half an input voxel). Outside the volume the image gets `pad_value`
    (default: the image minimum, i.e. background) and the mask 0.
    """
    return _lesion_crop(image, mask, out_size, margin_vox, min_size, pad_value)[0]


def lesion_crop_with_affine(image, mask, out_size, margin_vox, affine, *, min_size=None,
                            pad_value: float | None = None) -> tuple[np.ndarray, np.ndarray]:
    """`lesion_crop` plus the crop's own voxel -> world affine [4, 4] (for overlays and saving NIfTIs).

    Output voxel j samples input position start + (j + 0.5) * side / out - 0.5 on each axis
    (align_corners=False), so the crop affine is `affine` composed with that scale and shift.
    """
    x, start, size = _lesion_crop(image, mask, out_size, margin_vox, min_size, pad_value)
    scale = np.array(size, dtype=np.float64) / np.array(x.shape[1:], dtype=np.float64)  # [3] input voxels per output voxel
    to_input = np.eye(4)
    to_input[:3, :3] = np.diag(scale)
    to_input[:3, 3] = np.array(start, dtype=np.float64) + 0.5 * (scale - 1)
    return x, np.asarray(affine, dtype=np.float64) @ to_input


def _lesion_crop(image, mask, out_size, margin_vox, min_size, pad_value):
    out_size = _triple(out_size)
    image, mask = (np.asarray(a) if isinstance(a, torch.Tensor) else a for a in (image, mask))
    start, size = lesion_box(np.asarray(mask[0]), margin_vox, min_size if min_size is not None else max(out_size))
    return crop_box(image, mask, start, size, out_size, pad_value), start, size


def crop_box(image, mask, start, size, out_size, pad_value=None) -> np.ndarray:
    """Image [C,X,Y,Z] and mask [1,X,Y,Z] cut at the box (start, size) and resized to `out_size` ->
    [C + 1, *out_size] float32 (the mask last), as lesion_crop resizes them (image trilinear, mask exact
    nearest). `pad_value`: one number, or one per image channel (default: each channel's minimum)."""
    out_size, size = _triple(out_size), _triple(size)
    n = image.shape[0]
    if pad_value is None:
        pad_value = [float(np.min(image[c])) for c in range(n)]
    pads = [float(v) for v in pad_value] if isinstance(pad_value, Sequence) else [float(pad_value)] * n
    if len(pads) != n:
        raise ValueError(f"crop_box: {len(pads)} pad values for {n} image channels")
    img = np.concatenate([crop_with_pad(image[c:c + 1], start, size, pads[c]) for c in range(n)])
    img = img.astype(np.float32, copy=False)  # [C, *size]
    msk = crop_with_pad(mask, start, size, 0).astype(np.float32, copy=False)  # [1, *size]
    if size != out_size:
        img = _resize(img, out_size, mode="trilinear", align_corners=False)
        msk = _resize(msk, out_size, mode="nearest-exact")
    return np.concatenate([img, msk], axis=0)  # [C + 1, *out_size] float32


# nnU-Net's share of patches forced onto foreground; the rest go anywhere, as its sliding window does.
LESION_FORCED = 1 / 3


def segmentation_box(lesion_voxels: np.ndarray, side: int, shape, rng: np.random.Generator) -> Box:
    """A segmentation training window, nnU-Net's way, at one fixed scale (`side` voxels: the scale the
    sliding window of whole-head inference uses). With probability LESION_FORCED it holds a lesion voxel
    (drawn from `lesion_voxels` [N, 3], placed anywhere in the window); else it lies anywhere in the volume
    of `shape` (the prepared head crop), as the sliding window does, and is mostly lesion-free: those
    windows teach the head what is not a lesion. Like the sliding window, it stays inside the volume
    where the volume is larger than it."""
    size = _triple(side)
    if rng.random() >= LESION_FORCED:
        return random_crop_boxes(shape, size, 1, rng)[0]
    voxel = np.asarray(lesion_voxels)[rng.integers(len(lesion_voxels))]  # [3]
    start = voxel - rng.integers(0, np.array(size))  # [3]: the voxel at a random place in the window
    lo = np.minimum(0, np.subtract(shape, size))  # [3], as random_crop_boxes bounds its starts
    hi = np.maximum(0, np.subtract(shape, size))  # [3]; clipping keeps the voxel inside the window
    return tuple(int(a) for a in np.clip(start, lo, hi)), size


def _resize(a: np.ndarray, out_size, **kw) -> np.ndarray:
    out = Resize(out_size, **kw)(torch.from_numpy(np.ascontiguousarray(a)))
    return torch.as_tensor(out).numpy().astype(np.float32, copy=False)
