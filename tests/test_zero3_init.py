"""ZeRO-3 with the model built partitioned (`engine.distributed.zero3_init`, deepspeed.zero.Init).

The memory benchmark's "ZeRO-3 + zero.Init" row builds ViT3D under zero.Init; these tests hold what it
builds to the weights of an ordinary build with the same seed, and the optimizer groups to timm's.

Run as a script under `accelerate launch` (2 ranks), this file is the worker: `python tests/test_zero3_init.py OUT`.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def _config():
    from models.vit3d import ViT3DConfig
    # sincos (fixed, set in ViT3D's own __init__) and every re-initialised module kind: Conv3d patch
    # projection, Linear layers; dims small enough for two CPU ranks in seconds
    return ViT3DConfig(dim=48, depth=2, heads=2, img_size=32, patch_size=16)


def worker(out: Path) -> None:
    """Each rank builds ViT3D twice with seed 0: whole, and under zero3_init; rank 0 writes both state dicts."""
    import deepspeed
    from safetensors.torch import save_file

    from benchmarks.speed.zero_memory import _init_through_apply
    from engine.config import LoopConfig
    from engine.distributed import configure_deepspeed, make_accelerator, zero3_init
    from models.vit3d import ViT3D

    accelerator = make_accelerator(LoopConfig(mixed_precision="no", report_to="none"))
    assert accelerator.num_processes == 2
    configure_deepspeed(accelerator, micro_batch=1, clip_grad=1.0, width=48, mixed_precision="no")
    torch.manual_seed(0)
    whole = {k: v.clone() for k, v in ViT3D(_config()).state_dict().items()}
    torch.manual_seed(0)
    init, ViT3D._init_weights = ViT3D._init_weights, _init_through_apply
    try:
        with zero3_init(accelerator):
            model = ViT3D(_config())
    finally:
        ViT3D._init_weights = init
    params = list(model.parameters())
    large = [p for p in params if p.ds_numel > 10 * 48]  # smaller ones stay whole (persistence threshold)
    assert large and all(p.numel() == 0 for p in large), "built whole, not partitioned"
    with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
        built = {k: v.detach().clone() for k, v in model.state_dict().items()}
    if accelerator.is_main_process:
        save_file(whole, str(out / "whole.safetensors"))
        save_file(built, str(out / "zero3_init.safetensors"))
    accelerator.wait_for_everyone()


def test_zero3_init_builds_the_weights_of_an_ordinary_build(tmp_path):
    from safetensors.torch import load_file
    from test_deepspeed import launch
    launch("deepspeed_zero3", str(Path(__file__).resolve()), str(tmp_path))
    whole, built = load_file(tmp_path / "whole.safetensors"), load_file(tmp_path / "zero3_init.safetensors")
    assert whole.keys() == built.keys()
    for k in whole:
        assert torch.equal(whole[k], built[k]), k
    assert whole["patch_embed.bias"].abs().sum() == 0 and whole["blocks.0.attn.qkv.weight"].std() > 0


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
