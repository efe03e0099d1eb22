"""The bf16 autocast path (on CPU too, so CI exercises the GPU path's logic) and, on a GPU, SDPA flash
attention. The CUDA-marked tests run in benchmarks/gpu_check.sh; they skip where there is no GPU."""
import math

import pytest
import torch
from accelerate import Accelerator

from engine.steps import NonFiniteGuard, optimizer_step
from models.mim import MiMConfig, MiMModel
from models.mim_masks import MaskConfig, build_hierarchy
from models.vit3d import ViT3D, ViT3DConfig

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture(autouse=True)
def fresh_accelerator_state():
    """accelerate keeps one process-wide state: a bf16 Accelerator here would make every later
    Accelerator(mixed_precision="no") in this pytest process fail, so reset it after each test; and
    before it, since an fp32 Accelerator left by an earlier test file (the pretraining loop) refuses bf16."""
    from accelerate.state import AcceleratorState
    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


def _bf16_steps(accelerator: Accelerator, steps: int = 25) -> tuple[list[float], set]:
    """Overfit one fixed batch with the loops' own micro-step block under bf16 autocast: (losses, the
    dtypes the encoder's attention saw)."""
    torch.manual_seed(0)
    enc = ViT3DConfig(img_size=16, patch_size=4, dim=48, depth=2, heads=2)
    model = MiMModel(MiMConfig(encoder=enc, masks=MaskConfig(levels=2, mask_ratio=(0.75,)), decoder_dim=32,
                               decoder_depth=1, decoder_heads=2, proj_dim=16))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model, optimizer = accelerator.prepare(model, optimizer)
    axis = torch.linspace(0, 2 * math.pi, 32)
    d, h, w = torch.meshgrid(axis, axis, axis, indexing="ij")
    crops = torch.sin(d + 2 * h + w)[None, None].repeat(2, 1, 1, 1, 1).to(accelerator.device)  # [2, 1, 32^3]
    seen = set()
    accelerator.unwrap_model(model).encoder.blocks[0].attn.qkv.register_forward_hook(
        lambda mod, inp, out: seen.add(out.dtype))
    guard, losses = NonFiniteGuard(3), []
    for step in range(steps):
        levels = build_hierarchy(crops, accelerator.unwrap_model(model).config.masks, 4, 16,
                                 torch.Generator().manual_seed(step % 3))
        terms, ok, _ = optimizer_step(accelerator, model, optimizer, guard, 1.0, [levels], lambda lv: model(lv).losses)
        assert ok
        losses.append(terms["loss"])
    return losses, seen


def _check_falls(losses: list[float]) -> None:
    assert all(math.isfinite(v) for v in losses), losses
    assert sum(losses[-5:]) / 5 < 0.8 * sum(losses[:5]) / 5, losses


def test_bf16_autocast_path_on_cpu_trains_with_a_finite_falling_loss():
    losses, seen = _bf16_steps(Accelerator(cpu=True, mixed_precision="bf16"))
    assert torch.bfloat16 in seen  # the encoder really ran under bf16 autocast
    _check_falls(losses)


@pytest.mark.cuda
@needs_cuda
def test_bf16_autocast_path_on_cuda_trains_with_a_finite_falling_loss():
    losses, seen = _bf16_steps(Accelerator(mixed_precision="bf16"))
    assert torch.bfloat16 in seen
    _check_falls(losses)


@pytest.mark.cuda
@needs_cuda
def test_vit_b_attention_runs_on_the_flash_kernel_and_matches_the_math_kernel():
    from torch.nn.attention import SDPBackend, sdpa_kernel
    torch.manual_seed(0)
    model = ViT3D(ViT3DConfig(img_size=96, patch_size=16, dim=768, depth=2, heads=12)).cuda().eval()
    assert model.blocks[0].attn.fused_attn  # timm's Attention calls F.scaled_dot_product_attention
    x = torch.randn(2, 1, 96, 96, 96, device="cuda")
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):  # fails if flash cannot take these shapes
            flash = model(x).float()
        with sdpa_kernel(SDPBackend.MATH):
            math_out = model(x).float()
    torch.testing.assert_close(flash, math_out, atol=5e-2, rtol=5e-2)
