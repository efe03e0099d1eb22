"""ZeRO-3 with the model built partitioned (`engine.distributed.zero3_init`, deepspeed.zero.Init).

Under ZeRO-3 pretraining builds MiMModel under zero.Init (`pretrain.train.build_model`), so no rank ever
holds the whole weights. These tests hold what it builds, on 2 CPU ranks, to each rank's half of every
partitioned parameter right after construction, and to the weights of an ordinary build with the same
seed; and the optimizer groups to timm's.

Run as a script under `accelerate launch` (2 ranks), this file is the worker: `python tests/test_zero3_init.py OUT`.
"""
import json
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
WORLD = 2


def _config():
    from models.vit3d import ViT3DConfig
    # learned pos_embed (drawn in ViT3D's own __init__), the decoder's sin-cos table and every re-initialised
    # module kind: Conv3d patch projection, Linear layers, the mask token, the projection head (2 levels)
    return ViT3DConfig(dim=48, depth=2, heads=2, img_size=16, patch_size=4, pos_embed="learned")


def _pretrain_config():
    from models.mim import MiMConfig
    from models.mim_masks import MaskConfig
    from pretrain.config import PretrainConfig
    model = MiMConfig(encoder=_config(), masks=MaskConfig(levels=2, mask_ratio=(0.75,)), decoder_dim=24,
                      decoder_depth=1, decoder_heads=2, proj_dim=16)
    return PretrainConfig(model=model, mixed_precision="no", report_to="none", seed=7)


def _partition(model) -> dict:
    """Per parameter name: (whole element count, elements this rank holds), where ZeRO-3 split it."""
    return {n: (p.ds_numel, p.ds_tensor.numel(), p.numel()) for n, p in model.named_parameters()
            if not p.ds_persist}


def _gathered(model) -> dict:
    import deepspeed
    params = list(model.parameters())
    with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
        return {k: v.detach().clone() for k, v in model.state_dict().items()}


def worker(out: Path) -> None:
    """Each rank builds MiMModel with the run's seed three ways: whole; under zero3_init; through pretraining's
    build_model. Each rank writes what it holds of each split parameter; rank 0 writes the three state dicts."""
    from safetensors.torch import save_file

    from engine.distributed import make_accelerator, zero3_init
    from engine.steps import reseed_torch
    from models.mim import MiMModel
    from pretrain.train import build_model

    cfg = _pretrain_config()
    accelerator = make_accelerator(cfg)
    assert accelerator.num_processes == WORLD
    reseed_torch(cfg.seed, -1)
    whole = {k: v.clone() for k, v in MiMModel(cfg.model).state_dict().items()}
    model = build_model(cfg, accelerator)  # configures DeepSpeed, so zero3_init below sees the same thresholds
    reseed_torch(cfg.seed, -1)
    with zero3_init(accelerator):
        direct = MiMModel(cfg.model)
    rank = accelerator.process_index
    (out / f"partition-rank{rank}.json").write_text(json.dumps({"build_model": _partition(model),
                                                                "zero3_init": _partition(direct)}))
    built, direct = _gathered(model), _gathered(direct)
    if accelerator.is_main_process:
        save_file(whole, str(out / "whole.safetensors"))
        save_file(built, str(out / "build_model.safetensors"))
        save_file(direct, str(out / "zero3_init.safetensors"))
    accelerator.wait_for_everyone()


def test_zero3_builds_partitioned_with_the_weights_of_an_ordinary_build(tmp_path):
    from safetensors.torch import load_file
    from ds_reference import launch
    launch("deepspeed_zero3", str(Path(__file__).resolve()), str(tmp_path))
    whole = load_file(tmp_path / "whole.safetensors")
    ranks = [json.loads((tmp_path / f"partition-rank{r}.json").read_text()) for r in range(WORLD)]
    for how in ("build_model", "zero3_init"):
        split = ranks[0][how]
        # every large matrix is split: its module holds an empty placeholder, each rank its half (padded)
        assert {"encoder.blocks.0.attn.qkv.weight", "encoder.pos_embed", "decoder_pred.weight",
                "projector.fc1.weight"} <= split.keys()
        assert sum(n for n, _, _ in split.values()) > 0.9 * sum(v.numel() for v in whole.values())
        for r in ranks:
            assert r[how].keys() == split.keys()
            for name, (n, held, local) in r[how].items():
                assert local == 0 and held == math.ceil(n / WORLD), (how, name)
        built = load_file(tmp_path / f"{how}.safetensors")
        assert whole.keys() == built.keys()
        for k in whole:
            assert torch.equal(whole[k], built[k]), (how, k)
    assert whole["encoder.patch_embed.bias"].abs().sum() == 0 and whole["mask_token"].std() > 0


def test_weight_decay_groups_read_the_whole_shape():
    """A zero.Init placeholder is empty and 1-D: timm's rule would not decay it; ours decays what timm
    decays on the whole model."""
    from timm.optim import param_groups_weight_decay

    from engine.distributed import weight_decay_groups
    from models.vit3d import ViT3D

    model = ViT3D(_config())
    names = {id(p): n for n, p in model.named_parameters()}

    def split(groups):
        return {g["weight_decay"]: sorted(names[id(p)] for p in g["params"]) for g in groups}

    expected = split(param_groups_weight_decay(model, 0.05))
    assert split(weight_decay_groups(model, 0.05)) == expected
    for p in model.parameters():  # as zero.Init leaves them
        p.ds_shape = p.shape
        p.data = torch.empty(0)
    assert split(weight_decay_groups(model, 0.05)) == expected
    assert split(param_groups_weight_decay(model, 0.05)) != expected  # why the rule needs ds_shape


if __name__ == "__main__":
    worker(Path(sys.argv[1]))
