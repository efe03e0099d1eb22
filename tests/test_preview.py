"""Pretraining previews show tissue: per level the sample with the most, every panel titled, a colour bar."""

import pytest
import torch

from models.mim import MiMConfig, MiMModel
from models.mim_masks import MaskConfig, build_hierarchy
from models.vit3d import ViT3DConfig
from pretrain import preview

P = 4


def _cfg() -> MiMConfig:
    enc = ViT3DConfig(img_size=16, patch_size=P, dim=24, depth=1, heads=2)
    return MiMConfig(encoder=enc, masks=MaskConfig(levels=3, mask_ratio=(0.75,)), decoder_dim=16,
                     decoder_depth=1, decoder_heads=2, proj_dim=8, level_weights=(1.0,))


def _forward(crops):
    """levels and per-level reconstructions of a tiny random MiM on crops [B, 1, 32, 32, 32]."""
    torch.manual_seed(0)
    cfg = _cfg()
    levels = build_hierarchy(crops, cfg.masks, P, 16, torch.Generator().manual_seed(0))
    with torch.no_grad():
        return levels, MiMModel(cfg).eval()(levels).preds


def _ball_crops():
    """A small bright ball in a corner of constant background: most sub-volumes miss it."""
    g = torch.stack(torch.meshgrid(*[torch.arange(32.0)] * 3, indexing="ij"))
    ball = ((g - torch.tensor([8.0, 8.0, 24.0]).view(3, 1, 1, 1)) ** 2).sum(0) < 9**2
    vol = torch.where(ball, 1.0 + 0.2 * torch.randn(32, 32, 32, generator=torch.Generator().manual_seed(1)),
                      torch.tensor(-1.0))
    return vol.expand(2, 1, 32, 32, 32).clone()


def test_each_level_shows_its_sample_with_most_tissue():
    levels, outputs = _forward(_ball_crops())
    rows = preview._rows(levels, outputs, P, True, None)
    picked = []
    for level, row in zip(levels, rows):
        t = preview.tissue(level.x, torch.full((level.x.shape[0],), -1.0), torch.ones(level.x.shape[0]))
        counts = t.flatten(1).sum(1)
        assert counts[row["row"]] == counts.max()  # never a black row when some sample has tissue
        picked.append((row["row"], counts.tolist()))
    assert any(r > 0 and c[0] < c[r] for r, c in picked[1:]), picked  # the first sample would show less


def test_panels_are_titled_and_background_is_said(tmp_path):
    levels, outputs = _forward(torch.full((2, 1, 32, 32, 32), -1.0))  # nothing but background
    fig = preview.preview_figure(levels, outputs, P, True, step=150, subjects=["sub-a", "sub-b"])
    panels = [ax for ax in fig.axes if ax.get_title()]
    assert len(panels) == 27  # 3 levels x (input, masked, recon) x 3 views
    titles = [ax.get_title() for ax in panels]
    for view in ("axial", "coronal", "sagittal"):
        assert sum(view in t for t in titles) == 9
    assert all("step 150" in t and ("sub-a" in t or "sub-b" in t) for t in titles)
    assert all(t.startswith(("L1 ", "L2 ", "L3 ")) for t in titles)
    assert all(any(x.get_text() == "background only" for x in ax.texts) for ax in panels)
    bars = [ax for ax in fig.axes if ax.get_label() == "<colorbar>"]
    assert len(bars) == 3


def test_old_call_still_writes_a_png(tmp_path):
    levels, outputs = _forward(_ball_crops())
    path = preview.save_previews(levels, outputs, P, True, tmp_path / "p" / "step0000150.png")
    assert path.read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("norm_pix", [True, False])
def test_masked_panel_hides_exactly_the_masked_patches(norm_pix):
    levels, outputs = _forward(_ball_crops())
    x = levels[0].x
    masked = preview._masked_input(x, levels[0].mask, P)
    g = x.shape[-1] // P
    hidden = levels[0].mask.reshape(-1, g, g, g)
    blocks = torch.isnan(masked[:, 0]).reshape(-1, g, P, g, P, g, P).all(6).all(4).all(2)  # [B, g, g, g]
    assert torch.equal(blocks, hidden)
    assert torch.equal(masked[~torch.isnan(masked)], x[~torch.isnan(masked)])
