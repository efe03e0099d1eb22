"""Pretraining micro-batches: the MiM hierarchy is built in the DataLoader workers, not in the step.

`HierarchyCollate(m, items)` stacks the views of a micro-batch and builds every level's masked inputs
(`models.mim_masks.build_hierarchy`: the level-1 resize, the children's cuts and resizes, the masks)
and their reconstruction targets (`models.mim.patch_targets`) where the loader runs, so with workers it overlaps the model step. Its generator comes from
`step_seed(seed, m, rank)` (micro-batch m of this rank), never from worker state: the masks are the
same for 0 or N workers, on CPU or GPU, and on a resumed run. With 0 workers the same code runs in the
training process.
"""
from __future__ import annotations

import time

import torch

from engine.steps import step_seed
from models.mim import MiMConfig, patch_targets
from models.mim_masks import build_hierarchy


def hierarchy_generator(seed: int, m: int, rank: int) -> torch.Generator:
    """The private generator of micro-batch m on `rank`: the one `reseed_torch(seed, m, rank)` returns."""
    return torch.Generator().manual_seed(step_seed(seed, m, rank))


class HierarchyCollate:
    """(m, PretrainCrops items) -> {"levels": [Level, ...] (CPU), "index": [B] long, "build_s": float}.

    Picklable (plain fields), so spawned workers can run it too.
    """

    def __init__(self, model: MiMConfig, seed: int, rank: int):
        self.model, self.seed, self.rank = model, seed, rank

    def __call__(self, m: int, items: list[dict]) -> dict:
        t0 = time.perf_counter()
        # B items of [n_crops, C, S, S, S] -> [B * n_crops, C, S, S, S]; anchors [n_crops, 3] -> [B * n_crops, 3]
        crops = torch.cat([it["crops"] for it in items])
        anchors = torch.cat([it["anchors"] for it in items])
        enc = self.model.encoder
        levels = build_hierarchy(crops, self.model.masks, enc.patch_size, enc.img_size,
                                 hierarchy_generator(self.seed, m, self.rank), anchors=anchors)
        for lvl in levels:
            lvl.target = patch_targets(lvl.x, enc.patch_size, self.model.norm_pix_loss)  # [B_l, N, C p^3]
        index = torch.tensor([int(it["index"]) for it in items])  # [B]
        return {"levels": levels, "index": index, "build_s": time.perf_counter() - t0}
