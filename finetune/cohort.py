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

from core.errors import InputError
from finetune.clinical import ClinicalSchema
from models.tasks import Task


@dataclass
class Targets:
    label: np.ndarray | None   # [N] float32 0/1
    time: np.ndarray | None    # [N] float32 months
    event: np.ndarray | None   # [N] float32 0/1

    @classmethod
    def from_table(cls, df: pd.DataFrame, task: Task) -> "Targets":
        get = lambda c: df[c].to_numpy(np.float32) if c in task.columns else None
        return cls(get("label"), get("time"), get("event"))


class CohortDataset(Dataset):
    """Item i -> dict(x [C + 1, S, S, S] (x2 with the peritumoral crop) and its crop scale, or absent; with
    segmentation windows, seg_x [C + 1, S, S, S]; clinical [F], label, time, event, bin, index)."""

    def __init__(self, crops: Dataset | None, clinical: np.ndarray, targets: Targets,
                 time_bins: np.ndarray | None = None):
        self.crops, self.clinical, self.targets = crops, clinical.astype(np.float32), targets
        self.bins = None
        if time_bins is not None and targets.time is not None:
            self.bins = to_bin(targets.time, time_bins)  # [N] the discrete-time bin of each subject

    def __len__(self) -> int:
        return len(self.clinical)

    def set_epoch(self, epoch: int) -> None:
        if self.crops is not None and hasattr(self.crops, "set_epoch"):
            self.crops.set_epoch(epoch)

    def __getitem__(self, i: int) -> dict:
        item = {"clinical": torch.from_numpy(self.clinical[i]), "index": i}
        if self.crops is not None:
            crop = self.crops[i]
            item["x"], item["scale"] = crop["x"], crop["scale"]
            if "seg_x" in crop:
                item["seg_x"] = crop["seg_x"]
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


def time_bins(times, events, n_bins: int) -> np.ndarray:
    """Bin edges [n_bins + 1] for the discrete-time model: 0, event-time quantiles, the largest time.

    Bin k covers (edges[k], edges[k+1]]. Quantiles of *event* times put equal numbers of events
    in each bin, which keeps every hazard estimable. Tied quantiles give empty bins rather than
    fewer bins, so the head size stays `n_bins`.
    """
    times = np.asarray(times, dtype=float)
    events = np.asarray(events).astype(bool)
    if n_bins < 1:
        raise InputError(f"n_bins must be >= 1, got {n_bins}")
    if not events.any():
        raise InputError("time_bins: no events among the training times, cannot place bin edges")
    inner = np.quantile(times[events], np.arange(1, n_bins) / n_bins)
    return np.concatenate([[0.0], inner, [times.max()]])


def to_bin(time, edges) -> np.ndarray:
    """Index of the bin (edges[k], edges[k+1]] holding each time; times past the last edge go to the last bin."""
    edges = np.asarray(edges, dtype=float)
    idx = np.searchsorted(edges, np.asarray(time, dtype=float), side="left") - 1
    return np.clip(idx, 0, len(edges) - 2)


def make_dataset(df: pd.DataFrame, task: Task, schema: ClinicalSchema | None, *, use_images: bool,
                 crop_size: int, margin_vox: int, augment: bool, seed: int,
                 min_side_vox: int | None = None, time_bins: np.ndarray | None = None,
                 placement: str = "lesion", wide_margin_vox: int | None = None,
                 seg_windows: bool = False) -> CohortDataset:
    """`placement`: where the crops go (data.datasets.LesionCrops): "lesion"-centred, or "segmentation"
    (windows on and away from the lesion, for training the segmentation task). `wide_margin_vox`: a second,
    peritumoral crop of each lesion (InputSpec.view_voxels). `seg_windows`: each item also carries a
    segmentation window, "seg_x" (an outcome task's auxiliary segmentation head trains on it too)."""
    from data.datasets import LesionCrops
    crops = LesionCrops(df.reset_index(drop=True), crop_size=crop_size, margin_vox=margin_vox,
                        augment=augment, seed=seed, min_side_vox=min_side_vox, placement=placement,
                        wide_margin_vox=wide_margin_vox, seg_windows=seg_windows) if use_images else None
    return CohortDataset(crops, clinical_matrix(schema, df), Targets.from_table(df, task), time_bins)
