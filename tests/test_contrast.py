"""The VoCo-style position contrast inside MiM: the parent's cells and the loss against hand computations,
weight 0 as plain MiM, and a toy run where children learn to find their own cell."""
import math

import pytest
import torch
import torch.nn.functional as F

from models.contrast import parent_cells, position_contrast_loss
from models.mim import MiMConfig, MiMModel
from models.mim_masks import MaskConfig, build_hierarchy
from models.vit3d import ViT3DConfig


def test_parent_cells_list_the_lattice_and_find_the_childs_own_cell():
    grid, c = 4, 2
    own_cell = (1, 0, 1)  # cell corner (2, 0, 2) in token coordinates
    tokens = torch.tensor([[(2 + d) * 16 + (0 + h) * 4 + (2 + w) for d in range(2) for h in range(2) for w in range(2)]])
    cells, own = parent_cells(tokens, grid, c)
    assert cells.shape == (1, 8, 8)
    assert own.tolist() == [(own_cell[0] * 2 + own_cell[1]) * 2 + own_cell[2]]  # 5
    assert cells[0, own[0]].sort().values.tolist() == sorted(tokens[0].tolist())
    assert sorted(cells[0].flatten().tolist()) == list(range(64))  # the cells tile the parent exactly


def test_position_contrast_loss_by_hand():
    grid, c, temperature = 4, 2, 0.5
    cells, _ = parent_cells(torch.tensor([[0, 1, 4, 5, 16, 17, 20, 21]]), grid, c)  # a child on cell 0
    feats = torch.zeros(1, 64, 8)
    for m in range(8):  # each cell's tokens carry the one-hot feature of that cell
        feats[0, cells[0, m]] = F.one_hot(torch.tensor(m), 8).float()
    own_tokens = cells[0, 3][None]  # the child covers cell 3
    query = F.one_hot(torch.tensor([3]), 8).float()
    loss, acc = position_contrast_loss(query, feats, torch.tensor([0]), own_tokens, grid, c, temperature)
    # keys: one-hots centred over the 8 cells (e_m - 1/8), normalised: cos(e_3, key_m) = 7/8 / n for m = 3 and
    # -1/8 / n otherwise, n = sqrt(7/8); cross-entropy of picking cell 3
    n = math.sqrt(7 / 8)
    own_logit, other = (7 / 8) / n / temperature, (-1 / 8) / n / temperature
    want = -math.log(math.exp(own_logit) / (math.exp(own_logit) + 7 * math.exp(other)))
    assert loss.item() == pytest.approx(want, rel=1e-5) and acc.item() == 1.0


def _config(weight: float) -> MiMConfig:
    return MiMConfig(encoder=ViT3DConfig(img_size=16, patch_size=4, dim=48, depth=2, heads=2),
                     masks=MaskConfig(levels=3, mask_ratio=(0.75,)), decoder_dim=32, decoder_depth=1, decoder_heads=2,
                     proj_dim=16, contrast_weight=weight)


def _fields(seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return 2 * F.interpolate(torch.randn(4, 1, 8, 8, 8, generator=g), size=(32, 32, 32), mode="trilinear",
                             align_corners=False)


def test_weight_zero_is_plain_mim_and_the_term_adds_its_own_weight():
    torch.manual_seed(0)
    plain = MiMModel(_config(0.0))
    torch.manual_seed(0)
    contrast = MiMModel(_config(0.5))  # no new parameters: the same weights
    levels = build_hierarchy(_fields(0), plain.config.masks, 4, 16, torch.Generator().manual_seed(1))
    a, b = plain(levels).losses, contrast(levels).losses
    assert not any(k.startswith("contrast") for k in a)
    terms = (b["contrast_l2"] + b["contrast_l3"]) / 2
    assert torch.allclose(b["loss"], a["loss"] + 0.5 * terms)


def test_children_learn_to_find_their_own_cell():
    torch.manual_seed(0)
    model = MiMModel(_config(1.0))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    crops, history = _fields(1), []
    for step in range(60):
        levels = build_hierarchy(crops, model.config.masks, 4, 16, torch.Generator().manual_seed(step % 3))
        out = model(levels).losses
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        history.append({k: float(v) for k, v in out.items()})
    first = history[0]["contrast_l2"]
    late = history[-10:]
    assert sum(h["contrast_l2"] for h in late) / 10 < 0.6 * first
    assert sum(h["contrast_acc_l2"] for h in late) / 10 > 2 / 8  # chance is 1 / 8
