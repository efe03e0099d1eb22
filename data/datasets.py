"""Torch datasets over the cache: lesion-centred crops for fine-tuning (pretraining views: data.views).

Every random draw comes from (seed, epoch, item index), never from worker or global state, so a
resumed run or a different number of workers sees exactly the same data. Call `set_epoch(epoch)`
before each epoch; load with `monai.data.DataLoader`.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from monai.transforms import (Compose, RandAffined, RandFlipd, RandGaussianNoised, RandScaleIntensityd,
                              RandShiftIntensityd)
from monai.utils import convert_to_tensor
from torch.utils.data import Dataset

from core.errors import InputError
from data.cache import load_array
from data.crops import crop_box, lesion_box, lesion_crop, segmentation_box


def pad_value_of(image_path: Path) -> float:
    """Background value of the (first) image channel: see pad_values_of."""
    return pad_values_of(image_path)[0]


def pad_values_of(image_path: Path) -> list[float]:
    """Background value of each image channel, stored by data.prepare next to image.npy; else each
    channel's minimum."""
    meta = image_path.parent / "meta.json"
    if meta.is_file():
        d = json.loads(meta.read_text())
        if d.get("pad_values") is not None:
            return [float(v) for v in d["pad_values"]]
        if d.get("pad_value") is not None:
            return [float(d["pad_value"])]
    image = load_array(image_path)  # [C, X, Y, Z]
    return [float(image[c].min()) for c in range(image.shape[0])]


def item_seed(seed: int, epoch: int, index: int) -> int:
    return int(np.random.SeedSequence([seed, epoch, index]).generate_state(1)[0])  # fits a uint32


def lesion_augment(size: int | None = None) -> Compose:
    """Joint image/mask augmentation: flips, a small rotation/scale, intensity scale/shift and noise.

    With the crop `size` known, RandAffine caches its sampling grid (several times faster per item).
    """
    keys = ["image", "mask"]
    return Compose([
        RandFlipd(keys, prob=0.5, spatial_axis=0),
        RandFlipd(keys, prob=0.5, spatial_axis=1),
        RandFlipd(keys, prob=0.5, spatial_axis=2),
        RandAffined(keys, prob=0.5, rotate_range=(0.26, 0.26, 0.26), scale_range=(0.1, 0.1, 0.1),
                    mode=("bilinear", "nearest"), padding_mode=("border", "zeros"),
                    spatial_size=(size,) * 3 if size else None, cache_grid=size is not None),
        RandScaleIntensityd("image", factors=0.1, prob=0.5),
        RandShiftIntensityd("image", offsets=0.1, prob=0.5),
        RandGaussianNoised("image", prob=0.3, std=0.05),
    ])


class LesionCrops(Dataset):
    """Item i -> {"x": [C + 1, S, S, S] float32 (the image channels, then the mask), "scale": prepared voxels
    per crop voxel, "index": i}:
    the lesion-centred crop of row i (its voxel edge is scale x the prepared spacing).

    `df` needs cache_image and cache_mask (the index CSV written by data.prepare).
    """

    def __init__(self, df: pd.DataFrame, crop_size: int, margin_vox: int, augment: bool, seed: int,
                 min_side_vox: int | None = None, placement: str = "lesion", wide_margin_vox: int | None = None,
                 seg_windows: bool = False):
        for col in ("cache_image", "cache_mask"):
            if col not in df.columns:
                raise InputError(f"LesionCrops: column {col!r} missing; use the index CSV written by data.prepare")
        no_mask = [str(s) for s, m in zip(df.get("subject_id", df.index), df["cache_mask"]) if not isinstance(m, str) or not m]
        if no_mask:
            raise InputError(f"LesionCrops: subject(s) {no_mask[:5]} have no cached mask; lesion crops need one")
        self.images = [Path(p) for p in df["cache_image"]]
        self.masks = [Path(p) for p in df["cache_mask"]]
        self.pad_values = [pad_values_of(p) for p in self.images]  # [C] each
        self.crop_size = int(crop_size)
        self.margin_vox = int(margin_vox)
        self.min_side_vox = None if min_side_vox is None else int(min_side_vox)  # None: crop_size (native scale)
        self.seed = int(seed)
        self.epoch = 0
        self.transform = lesion_augment(self.crop_size) if augment else None
        # "lesion": centred on the lesion; "segmentation": data.crops.segmentation_box (training the mask)
        if placement not in ("lesion", "segmentation"):
            raise InputError(f"LesionCrops: placement {placement!r}, expected 'lesion' or 'segmentation'")
        self.placement = placement
        # beside the lesion crop, a segmentation window ("seg_x"): an outcome model's auxiliary segmentation
        # head then also trains on lesion-free windows, as whole-head inference will show it
        self.seg_windows = bool(seg_windows)
        # a second, wide (peritumoral) crop of each lesion after the first, at the same crop size
        self.wide_margin_vox = None if wide_margin_vox is None else int(wide_margin_vox)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> dict:
        # load_array: a cache file damaged after preparing is one line naming it, not a traceback mid-epoch
        image = load_array(self.images[i])  # [C, X, Y, Z] float32
        mask = load_array(self.masks[i])  # [1, X, Y, Z] uint8
        start, size = lesion_box(mask[0], self.margin_vox, self.min_side_vox or self.crop_size)
        item = {}
        if self.placement == "segmentation":
            start, size = self._window(i, image.shape[1:], mask)
        elif self.seg_windows:
            box = self._window(i, image.shape[1:], mask)
            window = crop_box(image, mask, *box, self.crop_size, self.pad_values[i])  # [C + 1, S, S, S]
            item["seg_x"] = self._augment(window, i, stream=2)
        x = self._augment(crop_box(image, mask, start, size, self.crop_size, self.pad_values[i]), i)  # [C + 1, S, S, S]
        if self.wide_margin_vox is not None:
            wide = lesion_crop(image, mask, self.crop_size, self.wide_margin_vox,
                               min_size=self.min_side_vox or self.crop_size, pad_value=self.pad_values[i])
            x = torch.cat([x, self._augment(wide, i)])  # [2 (C + 1), S, S, S]: lesion crop, then the wide one
        return {"x": x, "scale": torch.tensor(size[0] / self.crop_size, dtype=torch.float32), "index": i, **item}

    def _window(self, i: int, shape, mask) -> tuple:
        """Item i's segmentation window (data.crops.segmentation_box) at the view's fixed scale: min_side_vox,
        else crop_size voxels, the side of the sliding window finetune.lesion.search runs."""
        rng = np.random.default_rng(item_seed(self.seed + 1, self.epoch, i))
        return segmentation_box(np.argwhere(np.asarray(mask[0]) > 0), self.min_side_vox or self.crop_size, shape, rng)

    def _augment(self, x: np.ndarray, i: int, stream: int = 0) -> torch.Tensor:
        """[C + 1, S, S, S] -> the same, augmented (both crops of a lesion get the same draws; a segmentation
        window, `stream` 2, its own)."""
        if self.transform is not None:
            self.transform.set_random_state(seed=item_seed(self.seed + stream, self.epoch, i))
            out = self.transform({"image": torch.from_numpy(x[:-1]), "mask": torch.from_numpy(x[-1:])})
            x = torch.cat([convert_to_tensor(out["image"], track_meta=False),
                           convert_to_tensor(out["mask"], track_meta=False)])  # [C + 1, S, S, S]
        return torch.as_tensor(x, dtype=torch.float32)
