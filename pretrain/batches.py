"""Pretraining micro-batches: the loader's workers send level-1 crops; the MiM levels are built on the device.

The split follows the costs (docs/BENCHMARKS.md, "The loader against the GPU it must feed"): reading and
cropping the cache needs the files and is cheap, so `CropCollate` does it in the DataLoader workers; cutting,
resizing and masking every level and computing the loss targets is where the time goes, so `LevelBuilder`
does it in the training loop, on `accelerator.device` (the same code on CPU and GPU). A crop is also about
30x smaller than the finished levels it becomes, which is what crosses from the workers to the device.

The masks of micro-batch m on `rank` come from `hierarchy_generator(seed, m, rank)`, a CPU generator: the
random draws (noise of [B_l, N] and [B_l, cells^3]) are made on the CPU and then moved
(`models.mim_masks._rand`), so the masks are the same for 0 or N workers, on CPU or GPU, and on a resumed
run. On the CPU the levels are bit for bit those the workers used to build.
"""
from __future__ import annotations

import torch

from engine.steps import step_seed
from models.mim import MiMConfig, patch_targets
from models.mim_masks import Level, build_hierarchy


def hierarchy_generator(seed: int, m: int, rank: int) -> torch.Generator:
    """The private generator of micro-batch m on `rank`: the one `reseed_torch(seed, m, rank)` returns."""
    return torch.Generator().manual_seed(step_seed(seed, m, rank))


class CropCollate:
    """(m, PretrainCrops items) -> {"crops": [B * n_crops, C, S, S, S], "anchors": [B * n_crops, 3] (NaN: none),
    "index": [B] long, "m": m}: what the loader's workers send. Picklable, so spawned workers run it too."""

    def __call__(self, m: int, items: list[dict]) -> dict:
        # B items of [n_crops, C, S, S, S] -> [B * n_crops, C, S, S, S]; anchors [n_crops, 3] -> [B * n_crops, 3]
        crops = torch.cat([it["crops"] for it in items])
        anchors = torch.cat([it["anchors"] for it in items])
        index = torch.tensor([int(it["index"]) for it in items])  # [B]
        return {"crops": crops, "anchors": anchors, "index": index, "m": int(m)}


class LevelBuilder:
    """(a CropCollate batch, device) -> [Level, ...] on `device`: every level's masked inputs
    (`models.mim_masks.build_hierarchy`) with its loss target (`models.mim.patch_targets`, [B_l, N, C p^3])."""

    def __init__(self, model: MiMConfig, seed: int, rank: int):
        self.model, self.seed, self.rank = model, seed, rank

    def __call__(self, batch: dict, device: torch.device | str = "cpu") -> list[Level]:
        enc = self.model.encoder
        crops = batch["crops"].to(device, non_blocking=True)  # [B * n_crops, C, S, S, S]
        # float32 whatever autocast the caller runs under: resizes and targets are data, not model arithmetic
        with torch.autocast(torch.device(device).type, enabled=False):
            levels = build_hierarchy(crops, self.model.masks, enc.patch_size, enc.img_size,
                                     hierarchy_generator(self.seed, batch["m"], self.rank), anchors=batch["anchors"])
            for lvl in levels:
                lvl.target = patch_targets(lvl.x, enc.patch_size, self.model.norm_pix_loss)  # [B_l, N, C p^3]
        return levels


class HierarchyCollate:
    """(m, items) -> {"levels": [Level, ...] (CPU), "index": [B] long}: both halves in one call on the CPU, for
    callers that keep ready micro-batches (benchmarks.research.pretrain_heldout's held-out batches, scored by
    every checkpoint). Training does not use it: its workers run CropCollate and its loop LevelBuilder."""

    def __init__(self, model: MiMConfig, seed: int, rank: int):
        self.crops, self.levels = CropCollate(), LevelBuilder(model, seed, rank)

    def __call__(self, m: int, items: list[dict]) -> dict:
        batch = self.crops(m, items)
        return {"levels": self.levels(batch, "cpu"), "index": batch["index"]}
