"""The labelled cohort as tensors: lesion crops, clinical features and targets for one fold.

Clinical features are fitted on the fold's training rows only (`ClinicalSchema.fit`), then applied
to validation, test and external rows, so no statistics leak from held-out patients.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from torch.utils.data import Dataset

from data.errors import ConfigError
from finetune.clinical import ClinicalSchema

TASK_NEEDS = {"classification": ("label",), "survival": ("time", "event"), "multitask": ("label", "time", "event")}


@dataclass
class Targets:
    label: np.ndarray | None   # [N] float32 0/1
    time: np.ndarray | None    # [N] float32 months
    event: np.ndarray | None   # [N] float32 0/1

    @classmethod
    def from_table(cls, df: pd.DataFrame, task: str) -> "Targets":
        need = TASK_NEEDS[task]
        get = lambda c: df[c].to_numpy(np.float32) if c in need else None
        return cls(get("label"), get("time"), get("event"))


class CohortDataset(Dataset):
    """Item i -> dict(x [2, S, S, S] or absent, clinical [F], label, time, event, bin, index)."""

    def __init__(self, crops: Dataset | None, clinical: np.ndarray, targets: Targets,
                 time_bins: np.ndarray | None = None):
        self.crops, self.clinical, self.targets = crops, clinical.astype(np.float32), targets
        self.bins = None
        if time_bins is not None and targets.time is not None:
            from finetune.survival_losses import to_bin
            self.bins = np.asarray(to_bin(torch.as_tensor(targets.time), torch.as_tensor(time_bins)))

    def __len__(self) -> int:
        return len(self.clinical)

    def set_epoch(self, epoch: int) -> None:
        if self.crops is not None and hasattr(self.crops, "set_epoch"):
            self.crops.set_epoch(epoch)

    def __getitem__(self, i: int) -> dict:
        item = {"clinical": torch.from_numpy(self.clinical[i]), "index": i}
        if self.crops is not None:
            item["x"] = self.crops[i]["x"]
        t = self.targets
        for name in ("label", "time", "event"):
            v = getattr(t, name)
            if v is not None:
                item[name] = torch.tensor(v[i])
        if self.bins is not None:
            item["bin"] = torch.tensor(int(self.bins[i]))
        return item


def clinical_matrix(schema: ClinicalSchema | None, df: pd.DataFrame) -> np.ndarray:
    """[N, F] features, or [N, 0] when the model uses no clinical data."""
    if schema is None:
        return np.zeros((len(df), 0), np.float32)
    return schema.transform(df)


def min_side_vox(crop_mm: float, spacing: float) -> int | None:
    """The lesion cube's smallest side in voxels for `crop_mm`; None (native scale) when crop_mm is 0."""
    if crop_mm < 0:
        raise ConfigError(f"--crop_mm must be >= 0, got {crop_mm}")
    return max(1, int(round(crop_mm / spacing))) if crop_mm > 0 else None


def lesion_crop_voxels(margin_mm: float, crop_mm: float, spacing: float) -> dict:
    """The lesion crop's margin and smallest cube side in voxels at `spacing` mm (make_dataset's keywords)."""
    return {"margin_vox": int(round(margin_mm / spacing)), "min_side_vox": min_side_vox(crop_mm, spacing)}


def make_dataset(df: pd.DataFrame, task: str, schema: ClinicalSchema | None, *, use_images: bool,
                 crop_size: int, margin_vox: int, augment: bool, seed: int,
                 min_side_vox: int | None = None, time_bins: np.ndarray | None = None) -> CohortDataset:
    from data.datasets import LesionCrops
    crops = LesionCrops(df.reset_index(drop=True), crop_size=crop_size, margin_vox=margin_vox,
                        augment=augment, seed=seed, min_side_vox=min_side_vox) if use_images else None
    return CohortDataset(crops, clinical_matrix(schema, df), Targets.from_table(df, task), time_bins)
