"""ViT3D's and MiMModel's initial weights, now drawn module by module through `Module.apply` (so that
DeepSpeed's zero.Init can gather each module while it is initialised), are bit for bit the weights the
loops over parameters drew before that change, for the same seed.

The reference is the former code itself, kept here: each model is built once with the former methods
patched in and once as shipped, from the same seed.
"""
import pytest
import torch
from torch import nn

from models.mim import MiMConfig, MiMModel
from models.mim_masks import MaskConfig
from models.vit3d import ViT3D, ViT3DConfig


def _loop_init_weights(self):
    """ViT3D._init_weights before issue 36 (a loop over the blocks' Linear layers)."""
    w = self.patch_embed.weight
    nn.init.xavier_uniform_(w.view(w.shape[0], -1))
    nn.init.zeros_(self.patch_embed.bias)
    for m in self.blocks.modules():
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)


def _loop_init_decoder(self):
    """MiMModel._init_decoder before issue 36 (a loop over every non-encoder Linear layer)."""
    nn.init.normal_(self.mask_token, std=0.02)
    for name, m in self.named_modules():
        if name.startswith("encoder"):
            continue
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            nn.init.zeros_(m.bias)


def _mim_config(pos_embed: str, levels: int) -> MiMConfig:
    # two blocks each side, so a wrong order among Linear layers of the same shape changes the weights
    enc = ViT3DConfig(img_size=16, patch_size=4, dim=24, depth=2, heads=2, pos_embed=pos_embed)
    return MiMConfig(encoder=enc, masks=MaskConfig(levels=levels, mask_ratio=(0.75,)), decoder_dim=16,
                     decoder_depth=2, decoder_heads=2, proj_dim=8)


def _build(cfg: MiMConfig, seed: int, former: bool) -> dict[str, torch.Tensor]:
    patched = {}
    if former:
        patched = {(ViT3D, "_init_weights"): _loop_init_weights, (MiMModel, "_init_decoder"): _loop_init_decoder}
    saved = {key: getattr(*key) for key in patched}
    try:
        for (cls, name), fn in patched.items():
            setattr(cls, name, fn)
        torch.manual_seed(seed)
        return MiMModel(cfg).state_dict()
    finally:
        for (cls, name), fn in saved.items():
            setattr(cls, name, fn)


@pytest.mark.parametrize("pos_embed,levels", [("sincos", 2), ("learned", 1)])
def test_module_wise_init_draws_the_former_weights(pos_embed, levels):
    cfg = _mim_config(pos_embed, levels)
    former, shipped = _build(cfg, 3, former=True), _build(cfg, 3, former=False)
    assert former.keys() == shipped.keys()
    for k in former:
        assert torch.equal(former[k], shipped[k]), k
    # the init ran at all: the biases it zeroes are zero, and a Linear weight is xavier's, not torch's default
    assert all(shipped[k].abs().sum() == 0 for k in shipped if k.endswith(".bias") and "norm" not in k)
    w = shipped["decoder_blocks.1.mlp.fc1.weight"]  # [64, 16]: xavier bound sqrt(6 / 80)
    assert w.abs().max() <= (6 / sum(w.shape)) ** 0.5 and w.abs().max() > 0.9 * (6 / sum(w.shape)) ** 0.5
    assert shipped["encoder.patch_embed.weight"].abs().max() <= (6 / (24 + 4**3)) ** 0.5  # [24, 1, 4, 4, 4] as [24, 64]


def test_vit3d_alone_draws_the_former_weights():
    """The encoder built on its own (fine-tuning's path) as well as inside MiMModel."""
    cfg = ViT3DConfig(img_size=16, patch_size=4, dim=24, depth=2, heads=2)
    torch.manual_seed(5)
    shipped = ViT3D(cfg).state_dict()
    init, ViT3D._init_weights = ViT3D._init_weights, _loop_init_weights
    try:
        torch.manual_seed(5)
        former = ViT3D(cfg).state_dict()
    finally:
        ViT3D._init_weights = init
    for k in former:
        assert torch.equal(former[k], shipped[k]), k


def test_pretraining_groups_equal_timms_on_an_ordinary_build():
    """pretrain.train now groups by each parameter's whole shape (engine.distributed.weight_decay_groups, for
    ZeRO-3's placeholders); on an ordinary MiMModel the groups are timm's, in timm's order."""
    from timm.optim import param_groups_weight_decay

    from engine.distributed import weight_decay_groups
    model = MiMModel(_mim_config("sincos", 2))
    names = {id(p): n for n, p in model.named_parameters()}

    def split(groups):
        return [(g["weight_decay"], [names[id(p)] for p in g["params"]]) for g in groups]

    ours = split(weight_decay_groups(model, 0.05, model.no_weight_decay()))
    assert ours == split(param_groups_weight_decay(model, 0.05, no_weight_decay_list=model.no_weight_decay()))
    assert "mask_token" in ours[0][1] and "decoder_pred.weight" in ours[1][1]
