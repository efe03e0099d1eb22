"""Pretraining views: the level-1 sub-volumes MiM / MAE see, cut from the cache.

A view is a cube of `crop_size` voxels. A configurable share of views is centred on a lesion (the
lesion centres come from masks when the data has them, else from candidates found without labels,
see data.candidates); the rest are placed uniformly, or on the brightest voxels (`bright_fraction`).
A lesion view puts the lesion centre at one of `anchor_fractions` of the view's edge on each axis
(plus a little jitter), so that MiM can give the lesion its own child sub-volume at the next level:
with a 4^3 token grid and children of 2^3 patches the lattice cells are centred at 1/4 and 3/4.
Each view also returns its anchor (the lesion centre in view voxels, NaN for a view without one).

Every random draw comes from (seed, epoch, item index), never from worker or global state, so a
resumed run or a different number of workers sees exactly the same views.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from core.errors import InputError
from data.cache import CacheEntry, load_array
from data.crops import crop_with_pad, random_crop_boxes
from data.datasets import pad_value_of


class PretrainCrops(Dataset):
    """Item i -> {"crops": [K, 1, S, S, S] float32, "anchors": [K, 3] float32, "index": i}: K views of
    volume i (padded where the volume is smaller) and each view's lesion centre in view voxels (NaN: none)."""

    def __init__(self, entries: Sequence[CacheEntry | str | Path], crop_size: int, crops_per_volume: int, seed: int,
                 bright_fraction: float = 0.0, bright_quantile: float = 0.995, lesion_fraction: float = 0.0,
                 lesion_centres: Sequence[np.ndarray] | None = None, anchor_fractions: Sequence[float] = (0.5,),
                 anchor_jitter: float = 0.0):
        # Paths, not memory maps: a np.memmap would be pickled whole into every worker.
        self.paths = [e.image_path if isinstance(e, CacheEntry) else Path(e) for e in entries]
        missing = [str(p) for p in self.paths if not p.is_file()]
        if missing:
            raise InputError(f"PretrainCrops: {len(missing)} cached image(s) not found, e.g. {missing[0]}; rerun data.prepare")
        if not 0.0 <= bright_fraction <= 1.0 or not 0.0 < bright_quantile < 1.0:
            raise InputError(f"PretrainCrops: bright_fraction must be in [0, 1] and bright_quantile in (0, 1), "
                             f"got {bright_fraction} and {bright_quantile}")
        if not 0.0 <= lesion_fraction <= 1.0 or lesion_fraction + bright_fraction > 1.0:
            raise InputError(f"PretrainCrops: lesion_fraction must be in [0, 1] and leave room for bright_fraction, "
                             f"got {lesion_fraction} and {bright_fraction}")
        if lesion_fraction and (lesion_centres is None or len(lesion_centres) != len(self.paths)):
            raise InputError("PretrainCrops: lesion views need one array of lesion centres per volume")
        self.pad_values = [pad_value_of(p) for p in self.paths]
        self.crop_size, self.crops_per_volume, self.seed = int(crop_size), int(crops_per_volume), int(seed)
        self.bright_fraction, self.bright_quantile = float(bright_fraction), float(bright_quantile)
        self.lesion_fraction = float(lesion_fraction)
        self.centres = [np.asarray(c, dtype=np.float64).reshape(-1, 3) for c in lesion_centres or []]
        self.anchor_fractions = np.asarray(anchor_fractions, dtype=np.float64)
        self.anchor_jitter = float(anchor_jitter)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> dict:
        volume = load_array(self.paths[i])  # [1, X, Y, Z]; a damaged file is one line naming it
        rng = np.random.default_rng([self.seed, self.epoch, i])
        k = self.crops_per_volume
        boxes = random_crop_boxes(volume.shape[1:], self.crop_size, k, rng)
        anchors = np.full((k, 3), np.nan)  # [K, 3]
        kinds = rng.choice(3, size=k, p=[1 - self.lesion_fraction - self.bright_fraction, self.bright_fraction,
                                         self.lesion_fraction]) if (self.lesion_fraction or self.bright_fraction) \
            else np.zeros(k, int)
        if (kinds == 1).any():
            bright = bright_crop_boxes(np.asarray(volume[0]), self.crop_size, int((kinds == 1).sum()),
                                       self.bright_quantile, rng)
            for j, box in zip(np.flatnonzero(kinds == 1), bright):
                boxes[j] = box
        centres = self.centres[i] if self.centres else np.zeros((0, 3))
        for j in np.flatnonzero(kinds == 2):
            if len(centres):  # a volume without lesions keeps its uniform view
                boxes[j], anchors[j] = self.lesion_box(centres[rng.integers(len(centres))], rng)
        crops = [crop_with_pad(volume, start, size, self.pad_values[i]) for start, size in boxes]  # each [1, S, S, S]
        return {"crops": torch.from_numpy(np.stack(crops).astype(np.float32, copy=False)),  # [K, 1, S, S, S]
                "anchors": torch.from_numpy(anchors.astype(np.float32)),                   # [K, 3]
                "index": i}

    def lesion_box(self, centre: np.ndarray, rng: np.random.Generator) -> tuple:
        """A view that puts `centre` [3] (volume voxels) at an anchor fraction of its edge, per axis."""
        s = self.crop_size
        where = rng.choice(self.anchor_fractions, size=3) + rng.uniform(-1, 1, size=3) * self.anchor_jitter  # [3]
        start = np.round(centre - where * s).astype(int)  # [3]
        return (tuple(int(v) for v in start), (s, s, s)), centre - start  # the anchor, in view voxels


def bright_crop_boxes(volume: np.ndarray, size: int, n: int, quantile: float, rng: np.random.Generator) -> list:
    """`n` boxes of `size`^3 centred on voxels at or above the volume's `quantile` intensity.

    Contrast-enhanced lesions are among the brightest structures of a T1-CE scan, so centring some
    pretraining crops on bright voxels puts pathology into them more often than uniform crops do
    (MONAI's weighted_patch_samples draws the centres from the 0/1 weight map). volume: [X, Y, Z].
    """
    from monai.transforms.utils import weighted_patch_samples
    weights = (volume >= np.quantile(volume, quantile)).astype(np.float32)  # [X, Y, Z]
    state = np.random.RandomState(int(rng.integers(2**31)))
    centres = weighted_patch_samples(size, weights, n, state)
    half = int(size) // 2
    return [(tuple(int(c) - half for c in centre), (int(size),) * 3) for centre in centres]


def anchor_fractions(grid: int, child_patches: int, levels: int) -> tuple[tuple[float, ...], float]:
    """Where a lesion view puts the lesion (fractions of the view edge) and the jitter: the centres of
    MiM's child lattice cells, so the first child can hold the lesion; the view centre for plain MAE."""
    if levels <= 1 or child_patches >= grid:
        return (0.5,), 0.125
    cells = grid // child_patches
    return tuple((j * child_patches + child_patches / 2) / grid for j in range(cells)), child_patches / grid / 4
