"""The loader's workers send level-1 crops; the loop builds the MiM levels on its device (pretrain.batches).

Checked on the CPU against the path it replaces: `build_hierarchy` + `patch_targets` run directly on the same
views with the micro-batch's own generator, as the workers' collate used to. Levels and losses must be equal
bit for bit, for 0 and 2 workers and from a resumed micro-batch counter.
"""
import copy

import pytest
import torch

from engine.batches import ResumableBatches
from engine.steps import reseed_torch
from models.mim import MiMConfig, MiMModel, patch_targets
from models.mim_masks import Level, MaskConfig, build_hierarchy
from models.vit3d import ViT3DConfig
from pretrain.batches import CropCollate, LevelBuilder

SEED, RANK = 7, 1


class _Views(torch.utils.data.Dataset):
    """PretrainCrops-like items, fixed per index: two 24^3 views, the first on a "lesion"."""

    def __len__(self):
        return 6

    def __getitem__(self, i):
        g = torch.Generator().manual_seed(i)
        anchors = torch.tensor([[6.0, 7.0, 5.0], [float("nan")] * 3])  # [2, 3]
        return {"crops": torch.rand(2, 1, 24, 24, 24, generator=g), "anchors": anchors, "index": i}


def _model_cfg() -> MiMConfig:
    enc = ViT3DConfig(img_size=16, patch_size=4, dim=24, depth=1, heads=2)
    return MiMConfig(encoder=enc, masks=MaskConfig(levels=3), decoder_dim=12, decoder_depth=1, decoder_heads=2,
                     proj_dim=8)


def _old_collate_levels(cfg: MiMConfig, items: list[dict], m: int) -> list[Level]:
    """What the workers used to send for micro-batch m: every level and its target, built on the CPU."""
    crops = torch.cat([it["crops"] for it in items])      # [B * 2, 1, 24, 24, 24]
    anchors = torch.cat([it["anchors"] for it in items])  # [B * 2, 3]
    levels = build_hierarchy(crops, cfg.masks, 4, 16, reseed_torch(SEED, m, RANK), anchors=anchors)
    for lvl in levels:
        lvl.target = patch_targets(lvl.x, 4, cfg.norm_pix_loss)  # [B_l, N, C p^3]
    return levels


def _assert_same_levels(got: list[Level], want: list[Level], m: int) -> None:
    assert len(got) == len(want) == 3
    for lvl, (g, w) in enumerate(zip(got, want), start=1):
        for k, v in w.__dict__.items():
            if v is None:
                assert getattr(g, k) is None, (m, lvl, k)
            else:  # NaN anchors (no lesion) count as equal to themselves
                assert g.__dict__[k].dtype == v.dtype and torch.equal(g.__dict__[k].nan_to_num(-1), v.nan_to_num(-1)), \
                    (m, lvl, k)


def _loss_and_grads(model: MiMModel, levels: list[Level], m: int):
    reseed_torch(SEED, m, RANK)
    loss = model(levels).losses["loss"]
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("workers", [0, 2])
def test_levels_built_in_the_loop_equal_the_old_collates(workers):
    cfg, data = _model_cfg(), _Views()
    build = LevelBuilder(cfg, SEED, RANK)
    torch.manual_seed(0)
    model = MiMModel(cfg).train()
    batches = ResumableBatches(data, 2, SEED, 2, RANK, num_workers=workers, collate=CropCollate())
    stream = batches.iterate(1)  # from micro-batch 1, as a resumed run starts
    try:
        for _ in range(3):
            m, batch = next(stream)
            assert batch["m"] == m
            levels = build(batch, "cpu")
            want = _old_collate_levels(cfg, [data[int(i)] for i in batch["index"]], m)
            _assert_same_levels(levels, want, m)
            assert torch.isfinite(levels[1].anchor[0]).all()  # the lesion view's first child carries the anchor
            new_loss, new_grads = _loss_and_grads(copy.deepcopy(model), levels, m)
            old_loss, old_grads = _loss_and_grads(copy.deepcopy(model), want, m)
            assert torch.equal(new_loss, old_loss), (m, new_loss, old_loss)
            assert new_grads.keys() == old_grads.keys() and new_grads
            assert all(torch.equal(new_grads[k], old_grads[k]) for k in new_grads), m
    finally:
        stream.close()


def test_workers_send_only_crops():
    data = _Views()
    batches = ResumableBatches(data, 2, SEED, 2, RANK, num_workers=0, collate=CropCollate())
    stream = batches.iterate(4)
    m, batch = next(stream)
    stream.close()
    assert set(batch) == {"crops", "anchors", "index", "m"} and batch["m"] == m == 4
    assert not any(isinstance(v, (Level, list)) for v in batch.values())
    items = [data[int(i)] for i in batch["index"]]
    assert batch["crops"].shape == (4, 1, 24, 24, 24)  # [B * n_crops, C, S, S, S]: level-1 crops, not levels
    assert torch.equal(batch["crops"], torch.cat([it["crops"] for it in items]))
    assert torch.equal(batch["anchors"].nan_to_num(-1), torch.cat([it["anchors"] for it in items]).nan_to_num(-1))

