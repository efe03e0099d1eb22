"""The fine-tuning recipe: lesion-aware pooling, the encoder's own rate, LP-FT and the epoch kept."""
import json

import numpy as np
import pytest
import torch
from accelerate import Accelerator

from engine.config import OptimConfig
from engine.steps import NonFiniteGuard, build_optimizer, optimizer_step
from finetune.recipe import EpochChoice, FinetuneSchedule, encoder_peak_lr, tag_param_groups
from models.multimodal import MultimodalConfig, MultimodalModel
from models.pooling import TokenPool, mask_token_weights
from models.vit3d import ViT3DConfig

ENC = dict(in_channels=2, img_size=24, patch_size=12, dim=24, depth=2, heads=2)


def model_of(**over) -> MultimodalModel:
    torch.manual_seed(0)
    return MultimodalModel(MultimodalConfig(encoder=ViT3DConfig(**ENC), fusion="none", **over))


# ---------------------------------------------------------------- pooling

def test_mask_pooling_on_a_mask_inside_one_token_equals_that_token():
    tokens = torch.randn(2, 8, 5)  # [B, N = 2^3, D]
    mask = torch.zeros(2, 24, 24, 24)
    mask[0, 12:20, 0:5, 12:24] = 1.0  # inside token (d=1, h=0, w=1) = index 4 + 0 + 1
    mask[1, 0:3, 0:3, 0:3] = 1.0      # inside token 0
    pooled = TokenPool("mask", 5, 1, 12)(tokens, mask)
    assert torch.allclose(pooled[0], tokens[0, 5]) and torch.allclose(pooled[1], tokens[1, 0])


def test_mask_weights_follow_the_patch_embedding_order_and_an_empty_mask_pools_the_mean():
    mask = torch.zeros(1, 24, 24, 24)
    mask[0, :12, :12, 12:] = 1.0  # the (0, 0, 1) patch: the second token in Conv3d flatten order
    assert mask_token_weights(mask, 12)[0].tolist() == [0, 1, 0, 0, 0, 0, 0, 0]
    tokens = torch.randn(1, 8, 5)
    assert torch.allclose(TokenPool("mask", 5, 1, 12)(tokens, torch.zeros(1, 24, 24, 24)), tokens.mean(1))


@pytest.mark.parametrize("pool", ["mean", "mask", "attention"])
def test_every_pool_runs_in_the_model_and_only_the_mask_pool_reads_the_mask(pool):
    model = model_of(pool=pool).eval()
    with torch.no_grad():  # as a pretrained 1-channel embedding inflated with mask_channel_init="zero"
        model.encoder.patch_embed.weight[:, 1] = 0
    x = torch.randn(2, 2, 24, 24, 24)
    x[:, 1] = 0
    x[:, 1, :12, :12, :12] = 1
    moved = x.clone()
    moved[:, 1] = 0
    moved[:, 1, 12:, 12:, 12:] = 1
    # so the mask reaches the features only through the pooling weights
    same = torch.allclose(model(x, None)["features"], model(moved, None)["features"])
    assert same == (pool != "mask")
    assert model(x, None)["logit"].shape == (2,)


# ---------------------------------------------------------------- rates and LP-FT

def groups_and_schedule(model, lp_steps=0, blr=0.0):
    cfg = OptimConfig(lr=1e-2, min_lr=1e-4, warmup_steps=2, weight_decay=0.05)
    groups = tag_param_groups(model.param_groups(cfg.lr, cfg.weight_decay, 0.5), model.encoder_parameters())
    opt = build_optimizer(groups, cfg)
    return opt, FinetuneSchedule(opt, cfg, total_steps=10, warmup_steps=2,
                                 encoder_lr=encoder_peak_lr(blr, 8), lp_steps=lp_steps)


def test_the_encoder_gets_maes_rate_layer_decayed_and_the_head_its_own():
    model = model_of()
    opt, schedule = groups_and_schedule(model, blr=1e-3)
    schedule.set_step(1)  # the end of the 2-step warm-up: both at their peak
    enc_lr = 1e-3 * 8 / 256
    by_role = {}
    for g in opt.param_groups:
        by_role.setdefault(g["role"], set()).add(round(g["lr"] / (g["lr_scale"]), 12))
        if g["role"] == "head":
            assert g["lr_scale"] == 1.0 and g["lr"] == pytest.approx(1e-2)
    assert by_role["encoder"] == {round(enc_lr, 12)}
    scales = sorted({g["lr_scale"] for g in opt.param_groups if g["role"] == "encoder"})
    assert scales == [0.5 ** 3, 0.5 ** 2, 0.5]  # stem, block 0, block 1 + norm under layer decay 0.5


def test_lp_ft_holds_the_encoder_exactly_then_trains_it():
    model = model_of()
    opt, schedule = groups_and_schedule(model, lp_steps=3)
    acc = Accelerator(cpu=True)
    guard = NonFiniteGuard(5)
    x, y = torch.randn(4, 2, 24, 24, 24), torch.tensor([0.0, 1.0, 0.0, 1.0])

    def loss_fn(_):
        out = model(x, None)
        return {"loss": torch.nn.functional.binary_cross_entropy_with_logits(out["logit"], y)}

    enc0 = {k: v.clone() for k, v in model.encoder.state_dict().items()}
    head0 = model.cls_head.weight.clone()
    model.hold_encoder(True)
    assert not model.encoder.training  # no drop-path while the head fits the frozen features
    for step in range(3):
        schedule.set_step(step)
        optimizer_step(acc, model, opt, guard, 1.0, iter([0]), loss_fn)
        assert all(torch.count_nonzero(p.grad) == 0 for p in model.encoder_parameters() if p.grad is not None)
    assert all(torch.equal(enc0[k], v) for k, v in model.encoder.state_dict().items())
    assert not torch.equal(head0, model.cls_head.weight)
    model.hold_encoder(False)
    assert model.encoder.training
    for step in range(3, 5):
        schedule.set_step(step)
        optimizer_step(acc, model, opt, guard, 1.0, iter([0]), loss_fn)
    assert not torch.equal(enc0["blocks.0.attn.qkv.weight"], model.encoder.state_dict()["blocks.0.attn.qkv.weight"])
    assert schedule.rates(2)[1] == 0.0 and schedule.rates(3)[1] > 0.0


# ---------------------------------------------------------------- which epoch is kept

class Scalar(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(2))


@pytest.mark.parametrize("how,expected", [("best", [1.0, 1.0]), ("last", [4.0, 4.0]), ("average", [2.5, 2.5])])
def test_epoch_choice_keeps_what_it_says(how, expected):
    m = Scalar()
    choice = EpochChoice(how, min_epochs=1, patience=10, model=m, epochs=5)
    keys = [9.0, 5.0, 1.0, 2.0, 3.0]  # epoch 0 is the best but comes before min_epochs
    for epoch, key in enumerate(keys):
        with torch.no_grad():
            m.w.fill_(float(epoch))
        choice.update(epoch, key)
    # best: epoch 1 (key 5) among epochs >= 1; last: epoch 4; average: the mean of epochs 1-4
    assert choice.chosen_state()["w"].tolist() == expected
    assert choice.should_stop(4) is False


def test_best_stops_after_patience_and_average_never_stops():
    m = Scalar()
    best = EpochChoice("best", min_epochs=0, patience=2, model=m, epochs=10)
    for epoch, key in enumerate([1.0, 0.5, 0.4]):
        best.update(epoch, key)
    assert best.should_stop(2) and best.kept_epoch == 0
    avg = EpochChoice("average", min_epochs=0, patience=2, model=m, epochs=10)
    for epoch in range(3):
        avg.update(epoch, 1.0 - epoch)
    assert not avg.should_stop(2) and "epochs 0-2" in avg.describe()


def test_a_multitask_run_with_lp_ft_mask_pooling_and_weight_averaging(synth_cohort, tmp_path):
    from finetune.train import run
    from tests.test_finetune_loop import tiny_cfg
    cfg = tiny_cfg(synth_cohort, tmp_path / "ft", task="multitask", fusion="none", epochs=3, explain=0,
                   figures=False,
                   lp_epochs=1, epoch_choice="average", min_epochs=1, warmup_epochs=0.5, encoder_blr=1e-3)
    cfg.model.pool = "mask"
    metrics = run(cfg)
    assert {f["kept"] for f in metrics["folds"]} == {"mean of the weights of epochs 1-2"}
    saved = json.loads((tmp_path / "ft" / "model" / "fold0" / "config.json").read_text())
    assert saved["multimodal"]["pool"] == "mask"
    log = [json.loads(line) for line in (tmp_path / "ft" / "metrics.jsonl").read_text().splitlines()]
    cox = [row["fold0/train_cox"] for row in log if "fold0/train_cox" in row]
    assert len(cox) == 3 and np.isfinite(cox).all()
