"""Self-distillation inside MiM: the EMA, centring and sharpening against hand computations, weight 0 as
plain MiM (loss and gradients), a teacher that learns without collapsing, and bit-exact resume with it."""
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from models.distill import DistillConfig, distill_cross_entropy, ema_update, entropy, sharpen, teacher_verdict
from models.mim import MiMConfig, MiMModel
from models.mim_masks import MaskConfig, build_hierarchy
from models.vit3d import ViT3D, ViT3DConfig

ENC = ViT3DConfig(img_size=16, patch_size=4, dim=48, depth=2, heads=2)


def config(weight: float, **distill) -> MiMConfig:
    return MiMConfig(encoder=ENC, masks=MaskConfig(levels=2, mask_ratio=(0.75,)), decoder_dim=32, decoder_depth=1,
                     decoder_heads=2, proj_dim=16,
                     distill=DistillConfig(weight=weight, prototypes=32, teacher_temp_steps=10, **distill))


def fields(n: int, seed: int) -> torch.Tensor:
    """[n, 1, 32, 32, 32] smooth random fields: every patch differs, so a teacher has something to tell apart
    (on blobs in a flat background most tokens are alike, and centring rightly keeps those near uniform)."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.randn(n, 1, 8, 8, 8, generator=g)
    return 2 * torch.nn.functional.interpolate(coarse, size=(32, 32, 32), mode="trilinear", align_corners=False)


def test_ema_update_by_hand():
    torch.manual_seed(0)
    teacher, student = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
    before = [p.clone() for p in teacher.parameters()]
    ema_update(teacher, student, 0.9)
    for t, b, s in zip(teacher.parameters(), before, student.parameters()):
        assert torch.allclose(t, 0.9 * b + 0.1 * s)


def test_centring_sharpening_and_cross_entropy_by_hand():
    logits, center = torch.tensor([[1.0, 2.0, 3.0]]), torch.tensor([[0.5, 0.5, 2.5]])
    p = sharpen(logits, center, temperature=0.5)  # softmax([1, 3, 1])
    z = [math.exp(1), math.exp(3), math.exp(1)]
    assert torch.allclose(p, torch.tensor([[v / sum(z) for v in z]]))
    student = torch.tensor([[0.0, 0.1, 0.2]])
    q = [math.exp(v / 0.1) for v in (0.0, 0.1, 0.2)]
    want = -sum(pi * math.log(qi / sum(q)) for pi, qi in zip(p[0].tolist(), q))
    assert distill_cross_entropy(p, student, 0.1).item() == pytest.approx(want, rel=1e-6)
    assert entropy(torch.full((2, 4), 0.25)).item() == pytest.approx(math.log(4))


def test_centre_moves_toward_the_batch_mean_and_schedules_run_as_dino():
    model = MiMModel(config(1.0, center_momentum=0.9))
    d = model.distiller
    rows = torch.tensor([[1.0] * 32, [3.0] * 32])
    d.center_sums.add(0, rows)
    d.update_center()
    assert torch.allclose(d.center, torch.full((1, 32), 0.1 * 2.0))
    d.update_center()  # no rows since: it stays
    assert torch.allclose(d.center, torch.full((1, 32), 0.1 * 2.0))
    c = d.config
    assert c.teacher_temperature(0) == c.teacher_temp_start and c.teacher_temperature(10) == c.teacher_temp
    assert c.teacher_temperature(5) == pytest.approx((c.teacher_temp_start + c.teacher_temp) / 2)
    assert c.ema_momentum(0, 100) == pytest.approx(c.momentum) and c.ema_momentum(100, 100) == pytest.approx(1.0)


def test_weight_zero_is_plain_mim_in_loss_and_gradients():
    torch.manual_seed(0)
    plain = MiMModel(config(0.0))
    torch.manual_seed(0)
    distilled = MiMModel(config(0.5))
    assert plain.distiller is None and not any(k.startswith("distiller") for k in plain.state_dict())
    shared = plain.state_dict()
    for k, v in shared.items():  # the distiller is built last: every other weight is drawn as before
        assert torch.equal(distilled.state_dict()[k], v), k
    levels = build_hierarchy(fields(2, 0), plain.config.masks, 4, 16, torch.Generator().manual_seed(1))
    torch.manual_seed(5)
    a = plain(levels).losses
    torch.manual_seed(5)
    b = distilled(levels).losses
    for k in a:
        if k != "loss":
            assert torch.equal(a[k], b[k]), k
    assert torch.allclose(b["loss"], a["loss"] + 0.5 * b["distill"])
    a["loss"].backward()
    (b["loss"] - 0.5 * b["distill"]).backward()
    grads = dict(distilled.named_parameters())
    for name, p in plain.named_parameters():
        if p.grad is not None:
            assert torch.allclose(p.grad, grads[name].grad, atol=1e-6), name


def test_teacher_leaves_uniform_without_collapsing_on_a_toy_run():
    torch.manual_seed(0)
    model = MiMModel(config(1.0))
    params = [p for p in model.parameters() if p.requires_grad]
    assert not any(p.requires_grad for p in model.distiller.teacher.parameters())
    opt = torch.optim.AdamW(params, lr=3e-3)
    crops = fields(4, 1)
    history = []
    for step in range(60):
        torch.manual_seed(step)
        levels = build_hierarchy(crops, model.config.masks, 4, 16, torch.Generator().manual_seed(step % 3))
        model.training_step_started(step)
        out = model(levels).losses
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        model.training_step_done(step, 60)
        history.append({k: float(v) for k, v in out.items()})
    uniform = math.log(32)
    late = history[-10:]
    entropy_late = sum(h["teacher_entropy"] for h in late) / len(late)
    assert entropy_late < uniform - 0.3, (entropy_late, uniform)  # left the uniform distribution
    assert entropy_late > 1.0, entropy_late                       # and did not collapse onto a few prototypes
    assert min(h["prototype_usage"] for h in late) > 0.25
    teacher = model.distiller.teacher["encoder"].state_dict()
    assert any(not torch.equal(v, model.encoder.state_dict()[k]) for k, v in teacher.items())  # it follows by EMA


@pytest.mark.parametrize("teacher_features", ["encoder", "decoder"])
def test_resume_is_bit_exact_with_the_teacher_and_both_encoders_export(synth_cohort, tmp_path, teacher_features):
    from core.config import load_config
    from pretrain.config import PretrainConfig
    from pretrain.train import train

    def cfg(out, **over):
        c = load_config(PretrainConfig, Path(__file__).resolve().parents[1] / "launch" / "pretrain_tiny_cpu.yaml")
        c.data, c.cache_dir, c.output_dir = str(synth_cohort / "unlabeled"), str(tmp_path / "cache"), str(out)
        c.mixed_precision, c.report_to, c.log_every, c.preview_every = "no", "none", 1, 0
        c.crop_size, c.crops_per_volume, c.batch_size, c.max_steps, c.ckpt_every = 64, 1, 1, 6, 3
        c.model.distill = DistillConfig(weight=0.5, prototypes=32, teacher_temp_steps=4,  # --model.distill.weight
                                        teacher_features=teacher_features)
        for k, v in over.items():
            setattr(c, k, v)
        return c
    train(cfg(tmp_path / "full"))
    train(cfg(tmp_path / "cut", stop_at=3))
    train(cfg(tmp_path / "cut", resume="auto"))
    a = load_file(str(tmp_path / "full" / "checkpoints" / "ckpt-0000006" / "weights.safetensors"))
    b = load_file(str(tmp_path / "cut" / "checkpoints" / "ckpt-0000006" / "weights.safetensors"))
    assert any(k.startswith("distiller.teacher.encoder.") for k in a) and "distiller.center" in a
    assert a["align_center"].shape == (2, 96) and a["align_center"].abs().sum() > 0  # the 3 levels' child centres
    assert any(k.startswith("distiller.teacher.decoder_blocks.") for k in a) == (teacher_features == "decoder")
    assert [k for k in a if not torch.equal(a[k], b[k])] == []
    for folder, prefix in (("encoder", "encoder."), ("encoder_teacher", "distiller.teacher.encoder.")):
        enc = ViT3D.from_pretrained(Path(tmp_path / "full" / folder))
        for k, v in enc.state_dict().items():
            assert torch.equal(v, a[prefix + k]), (folder, k)


def test_teacher_verdict_names_uniform_and_collapse():
    # E21's end state (docs/EXPERIMENT_LOG.md): 5.541 nats of ln 256 = 5.545, 34% of prototypes winning
    assert "near uniform" in teacher_verdict(5.541, 0.34, 256)
    assert "near uniform" not in teacher_verdict(0.95 * math.log(256) - 1e-3, 0.34, 256)
    assert "collapsed onto" in teacher_verdict(0.2, 2 / 256, 256)
    assert "collapsed onto" not in teacher_verdict(0.2, 3 / 256, 256)
    assert "neither" in teacher_verdict(3.9, 0.77, 256)


def test_a_decoder_reading_teacher_runs_the_students_decoder_path_and_follows_it_by_ema():
    torch.manual_seed(0)
    model = MiMModel(config(1.0, teacher_features="decoder"))
    d = model.distiller
    assert {"decoder_embed", "decoder_blocks", "decoder_norm", "proj"} <= set(d.teacher)
    x = fields(2, 3)[:, :, :16, :16, :16]
    torch.manual_seed(7)
    got = d.teacher_tokens(x)                                           # [2, N, D]
    torch.manual_seed(7)
    h = model.decoder_embed(model.encoder(d.teacher_view(x))) + model.decoder_pos_embed
    for blk in model.decoder_blocks:
        h = blk(h)
    want = d.proj(model.decoder_norm(h))  # at step 0 the teacher is the student's copy: the student's own path
    assert got.shape == (2, ENC.grid**3, ENC.dim) and torch.allclose(got, want, atol=1e-6)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not name.startswith("distiller.teacher."):
                p.add_(0.1)  # move the student, then one EMA step
    before = {k: v.clone() for k, v in d.teacher.state_dict().items()}
    model.training_step_done(0, 100)
    m = model.config.distill.ema_momentum(0, 100)
    student = {"decoder_blocks.": model.decoder_blocks.state_dict(), "proj.": d.proj.state_dict(),
               "encoder.": model.encoder.state_dict()}
    for prefix, params in student.items():
        for k, v in params.items():
            assert torch.allclose(d.teacher.state_dict()[prefix + k], m * before[prefix + k] + (1 - m) * v), k


def test_teacher_features_names_its_choices():
    from core.errors import ConfigError
    with pytest.raises(ConfigError, match="teacher_features must be encoder or decoder"):
        DistillConfig(weight=1.0, teacher_features="encoders")
