"""benchmarks/speed/loader_need.py: the MiM step's FLOP count (issue 36, item 6), by hand and by torch's counter."""
import pytest
import torch

from benchmarks.speed.loader_need import mim_forward_flops, views_needed
from models.mim import MiMConfig, MiMModel
from models.mim_masks import MaskConfig, build_hierarchy
from models.vit3d import ViT3DConfig


def tiny() -> MiMConfig:
    enc = ViT3DConfig(in_channels=1, img_size=16, patch_size=4, dim=36, depth=2, heads=2, mlp_ratio=4.0)
    masks = MaskConfig(levels=2, mask_ratio=(0.75,), children=2, child_patches=2)
    return MiMConfig(encoder=enc, masks=masks, decoder_dim=12, decoder_depth=1, decoder_heads=2, proj_dim=8)


def test_hand_count():
    # 4^3 = 64 tokens of 4^3 = 64 values; 48 masked, 16 visible; encoder 36 wide (MLP 144), decoder 12 (MLP 48)
    embed = 2 * 16 * 64 * 36                                   # visible patches only
    enc_block = (2 * 16 * 36 * 108 + 2 * 16 * 16 * 36 * 2      # qkv, QK^T + AV
                 + 2 * 16 * 36 * 36 + 2 * 2 * 16 * 36 * 144)   # proj, MLP
    dec_embed = 2 * 16 * 36 * 12
    dec_block = (2 * 64 * 12 * 36 + 2 * 64 * 64 * 12 * 2 + 2 * 64 * 12 * 12 + 2 * 2 * 64 * 12 * 48)
    pred = 2 * 64 * 12 * 64
    sub = embed + 2 * enc_block + dec_embed + dec_block + pred
    proj = 2 * 12 * 8 + 2 * 8 * 12                              # each child's projection head, one token
    assert sub == 1_672_704
    assert mim_forward_flops(tiny()) == sub + 2 * (sub + proj) == 5_018_880  # level 1, then K=2 children


def test_matches_torch_flop_counter():
    flop_counter = pytest.importorskip("torch.utils.flop_counter")
    cfg = tiny()
    torch.manual_seed(0)
    model = MiMModel(cfg).eval()
    for m in model.modules():  # explicit QK^T and AV matmuls: CPU SDPA kernels are not in torch's FLOP registry
        if hasattr(m, "fused_attn"):
            m.fused_attn = False
    b = 3
    levels = build_hierarchy(torch.randn(b, 1, 20, 20, 20), cfg.masks, 4, 16, torch.Generator().manual_seed(0))
    counter = flop_counter.FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        model(levels)
    assert counter.get_total_flops() == b * mim_forward_flops(cfg)


def test_views_needed_scales():
    cfg = tiny()
    assert views_needed(cfg, 0.4, 1e12) == pytest.approx(0.4e12 / (3 * 5_018_880))
    assert views_needed(cfg, 0.8, 1e12) == pytest.approx(2 * views_needed(cfg, 0.4, 1e12))



def test_loader_preset_runs(capsys, monkeypatch):
    """`python -m benchmarks.speed.loader --preset P` hands P's config to loader_need, which measures and judges."""
    from benchmarks.speed import loader, loader_need
    assert loader_need.main(["--config", str(loader.PRESETS["tiny"]), "--volumes", "2", "--steps", "1",
                             "--repeats", "1"]) == 0
    out = capsys.readouterr().out
    assert "loader cores per GPU" in out and "per-patch normalised loss targets" in out
    # the split: workers read and crop; the loop's level building is timed apart, as CPU time
    assert "loader worker (read + crop + stack)" in out and "level building (LevelBuilder) timed on this CPU" in out
    seen = []
    monkeypatch.setattr(loader_need, "main", lambda argv: seen.append(argv) or 0)
    assert loader.main(["--preset", "base_gpu", "--repeats", "2"]) == 0
    assert seen == [["--config", str(loader.PRESETS["base_gpu"]), "--repeats", "2"]]
