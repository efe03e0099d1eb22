"""The fine-tuning model: patch-embed inflation, fusion modes, heads, optimizer groups, save/load."""
import dataclasses
import json

import pytest
import torch

from core.errors import InputError
from models.input_spec import InputSpec, load_input_spec
from models.multimodal import MultimodalConfig, MultimodalModel, inflate_patch_embed
from models.vit3d import ViT3D, ViT3DConfig

S, F = 32, 5


def encoder_config(**overrides) -> ViT3DConfig:
    base = dict(in_channels=2, img_size=S, patch_size=8, dim=24, depth=2, heads=2)
    return ViT3DConfig(**{**base, **overrides})


def make(fusion="concat", task="classification", **kw) -> MultimodalModel:
    torch.manual_seed(0)
    cfg = MultimodalConfig(encoder=kw.pop("encoder", encoder_config()), fusion=fusion, task=task,
                           clinical_dim=kw.pop("clinical_dim", 0 if fusion == "none" else F), **kw)
    return MultimodalModel(cfg)


def inputs(b=2):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(b, 2, S, S, S, generator=g)  # [B, 2, S, S, S]
    x[:, 1] = (x[:, 1] > 1).float()  # a binary "mask" channel
    return x, torch.randn(b, F, generator=g)  # [B, F]


def save_pretrained_encoder(folder, **overrides):
    torch.manual_seed(3)
    enc = ViT3D(encoder_config(in_channels=1, **overrides)).eval()
    enc.save_pretrained(folder)
    return enc


# ---- inflation -------------------------------------------------------------------------------------


def test_zero_inflation_gives_the_pretrained_features(tmp_path):
    pretrained = save_pretrained_encoder(tmp_path / "enc")
    model = MultimodalModel.from_pretrained_encoder(make().config, tmp_path / "enc").eval()
    x, _ = inputs()
    with torch.no_grad():
        want = pretrained(x[:, :1])  # [B, N, D] on the image alone
        got = model.encoder(x)  # [B, N, D] on [image, mask]
    assert torch.allclose(got, want, atol=1e-5)
    w = model.encoder.patch_embed.weight
    assert torch.equal(w[:, :1], pretrained.patch_embed.weight) and not w[:, 1].any()


def test_mean_inflation_sets_the_mask_kernel_to_the_channel_mean(tmp_path):
    pretrained = save_pretrained_encoder(tmp_path / "enc")
    cfg = make(mask_channel_init="mean").config
    w = MultimodalModel.from_pretrained_encoder(cfg, tmp_path / "enc").encoder.patch_embed.weight
    assert torch.equal(w[:, 1], pretrained.patch_embed.weight[:, 0])
    three = torch.randn(6, 3, 2, 2, 2)
    wide = inflate_patch_embed(three, 5, "mean")  # [6, 5, 2, 2, 2]
    assert torch.equal(wide[:, :3], three)
    for c in (3, 4):
        assert torch.allclose(wide[:, c], (three[:, 0] + three[:, 1] + three[:, 2]) / 3)
    with pytest.raises(InputError, match="shrink"):
        inflate_patch_embed(three, 2)


@pytest.mark.parametrize("override, key", [({"dim": 48}, "dim"), ({"depth": 3}, "depth"),
                                           ({"patch_size": 16}, "patch_size")])
def test_architecture_mismatch_is_an_error_naming_the_key(tmp_path, override, key):
    save_pretrained_encoder(tmp_path / "enc", **override)
    with pytest.raises(InputError, match=rf"{key}: folder {list(override.values())[0]} vs config"):
        MultimodalModel.from_pretrained_encoder(make().config, tmp_path / "enc")


def test_no_folder_is_training_from_scratch():
    a = MultimodalModel.from_pretrained_encoder(make().config, None)
    assert a.encoder.patch_embed.weight.shape == (24, 2, 8, 8, 8)


# ---- fusion modes and heads ------------------------------------------------------------------------

FEATURE_DIM = {"none": 24, "concat": 24 + 16, "film": 24, "tokens": 48, "clinical_only": 16}


@pytest.mark.parametrize("fusion", list(FEATURE_DIM))
def test_every_fusion_runs_forward_and_backward(fusion):
    model = make(fusion, "multitask", survival_head="discrete", n_time_bins=3, clinical_hidden=16)
    x, clin = inputs()
    out = model(x, clin if fusion != "none" else None)
    assert out["features"].shape == (2, FEATURE_DIM[fusion])
    assert out["logit"].shape == (2,) and out["hazard_logits"].shape == (2, 3)
    (out["logit"].sum() + out["hazard_logits"].sum()).backward()
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None, name
    if fusion != "none":  # the clinical branch learns (for FiLM, through its zero-initialised last layer)
        heads = {id(p) for p in [*model.cls_head.parameters(), *model.surv_head.parameters()]}
        fusion_params = [p for p in model.head_parameters() if id(p) not in heads]
        assert fusion_params and any(p.grad.abs().sum() > 0 for p in fusion_params)


@pytest.mark.parametrize("design", ["linear_clinical", "deep"])
@pytest.mark.parametrize("task, head, keys", [("classification", "cox", {"logit"}), ("survival", "cox", {"risk"}),
                                              ("survival", "discrete", {"hazard_logits"}),
                                              ("multitask", "cox", {"logit", "risk"})])
def test_heads_match_the_task(task, head, keys, design):
    model = make("concat", task, survival_head=head, n_time_bins=4, survival_design=design)
    out = model(*inputs())
    image_term = {"image_hazard"} if design == "linear_clinical" and task != "classification" else set()
    assert set(out) == keys | {"features"} | image_term
    if "risk" in keys:  # Cox is shift-invariant: no bias
        surv = model.surv_head
        assert surv.bias is None if design == "deep" else (surv.baseline is None and surv.image.bias is None)


def test_clinical_tokens_join_the_sequence():
    model = make("tokens").eval()
    x, clin = inputs()
    with torch.no_grad():
        a, b = model(x, clin)["features"], model(x, clin + 1)["features"]
    # The clinical tokens are attended to, so even the pooled image tokens change with the clinical data.
    assert not torch.allclose(a[:, :24], b[:, :24])


def test_film_starts_as_identity():
    film, none = make("film").eval(), make("none").eval()
    none.encoder.load_state_dict(film.encoder.state_dict())
    x, clin = inputs()
    with torch.no_grad():
        assert torch.allclose(film(x, clin)["features"], none(x, None)["features"], atol=1e-6)
        torch.nn.init.normal_(film.film.net[-1].weight)
        assert not torch.allclose(film(x, clin)["features"], none(x, None)["features"], atol=1e-3)


def test_clinical_only_is_a_linear_model_without_encoder():
    model = make("clinical_only", "survival", clinical_hidden=0, head_dropout=0.5).train()
    assert model.encoder is None and model.encoder_parameters() == []
    assert len(model.head_parameters()) == len(list(model.parameters())) == 1
    _, clin = inputs(8)
    risk = model(None, clin)["risk"]
    assert torch.allclose(risk, clin @ model.surv_head.weight[0])  # exactly linear, even in train mode


def test_bad_clinical_input_names_the_shape():
    with pytest.raises(InputError, match=r"expected \[B, 5\]"):
        make("concat")(inputs()[0], torch.zeros(2, 4))
    incomplete = MultimodalConfig(encoder=encoder_config(), fusion="concat", clinical_dim=0)  # a preset may
    with pytest.raises(InputError, match="clinical_dim"):                                     # but a model may not
        MultimodalModel(incomplete)


# ---- optimisation ----------------------------------------------------------------------------------


def test_param_groups_decay_the_encoder_layers():
    model = make("concat")
    groups = model.param_groups(lr=1.0, weight_decay=0.05, layer_decay=0.5)
    lr_of = {id(p): g["lr"] for g in groups for p in g["params"]}
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert sum(len(g["params"]) for g in groups) == len(trainable) == len(lr_of)
    depth = model.config.encoder.depth
    assert lr_of[id(model.encoder.patch_embed.weight)] == 0.5 ** (depth + 1)
    assert lr_of[id(model.encoder.blocks[0].attn.qkv.weight)] == 0.5 ** depth
    assert lr_of[id(model.encoder.blocks[-1].attn.qkv.weight)] == 0.5
    assert lr_of[id(model.cls_head.weight)] == 1.0
    wd_of = {id(p): g["weight_decay"] for g in groups for p in g["params"]}
    assert wd_of[id(model.cls_head.weight)] == 0.05 and wd_of[id(model.cls_head.bias)] == 0.0


def test_linear_probe_freezes_the_encoder():
    model = make("concat")
    model.freeze_encoder(linear_probe=True)
    model.train()
    assert not model.encoder.training and model.cls_head.training
    in_groups = {id(p) for g in model.param_groups(1e-3, 0.05, 0.75) for p in g["params"]}
    assert in_groups == {id(p) for p in model.head_parameters()}
    model.freeze_encoder(linear_probe=False)
    model.train()
    assert model.encoder.training and model.encoder.blocks[0].attn.qkv.weight.requires_grad


# ---- save / load -----------------------------------------------------------------------------------


def test_save_load_round_trip_is_exact_and_strict(tmp_path):
    model = make("tokens", "multitask", survival_head="discrete", n_time_bins=3).eval()
    extra = {"clinical_schema": {"age": "numeric"}, "time_bins": [0.0, 12.0, 24.0], "crop_size": S}
    spec = InputSpec(input_size=S, channels=("image", "lesion_mask"))
    model.save_pretrained(tmp_path / "mm", extra_config=extra, card={"title": "test", "metrics": {"auc": 0.5}},
                          input_spec=spec)
    loaded, config = MultimodalModel.from_pretrained(tmp_path / "mm")
    assert load_input_spec(tmp_path / "mm") == spec
    assert dataclasses.asdict(loaded.config) == dataclasses.asdict(model.config)
    assert {k: config[k] for k in extra} == extra
    x, clin = inputs()
    with torch.no_grad():
        a, b = model(x, clin), loaded.eval()(x, clin)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert "auc" in (tmp_path / "mm" / "README.md").read_text()

    path = tmp_path / "mm" / "config.json"
    saved = json.loads(path.read_text())
    saved["multimodal"]["fusion"] = "concat"
    path.write_text(json.dumps(saved))
    with pytest.raises(InputError, match="unexpected keys: clinical_tokens"):
        MultimodalModel.from_pretrained(tmp_path / "mm")


@pytest.mark.parametrize("task, head", [("survival", "cox"), ("multitask", "discrete")])
def test_linear_clinical_hazard_round_trips(tmp_path, task, head):
    model = make("concat", task, survival_head=head, n_time_bins=3).eval()
    model.set_clinical_hazard(torch.arange(F, dtype=torch.float32) - 2.0)
    torch.nn.init.normal_(model.surv_head.image.weight)  # g off zero, so the comparison sees it
    model.save_pretrained(tmp_path / "mm", extra_config={}, card={}, input_spec=InputSpec(input_size=S))
    loaded, _ = MultimodalModel.from_pretrained(tmp_path / "mm")
    x, clin = inputs()
    with torch.no_grad():
        a, b = model(x, clin), loaded.eval()(x, clin)
    assert loaded.config.survival_design == "linear_clinical" and all(torch.equal(a[k], b[k]) for k in a)


def test_a_folder_saved_before_survival_design_loads_as_deep(tmp_path):
    model = make("concat", "survival", survival_design="deep").eval()
    model.save_pretrained(tmp_path / "mm", extra_config={}, card={}, input_spec=InputSpec(input_size=S))
    path = tmp_path / "mm" / "config.json"
    saved = json.loads(path.read_text())
    del saved["multimodal"]["survival_design"]
    path.write_text(json.dumps(saved))
    loaded, _ = MultimodalModel.from_pretrained(tmp_path / "mm")
    assert loaded.config.survival_design == "deep"
    with torch.no_grad():
        assert torch.equal(loaded.eval()(*inputs())["risk"], model(*inputs())["risk"])


# ---- normalisation before the head ---------------------------------------------------------------


def test_head_norm_none_adds_nothing():
    model = make("none")
    assert model.image_norm is None and not any("image_norm" in k for k in model.state_dict())


@pytest.mark.parametrize("fusion", ["none", "concat"])
def test_batchnorm_head_norm_standardises_each_pooled_dimension_over_the_batch(fusion):
    model = make(fusion, head_norm="batchnorm").train()
    x, clin = inputs(b=6)
    pooled = model.pool(model.encoder(x), mask=x[:, 1])  # [B, D] before the norm
    d = pooled.shape[1]
    image = model(x, clin)["features"][:, :d]  # the image part of the fused vector
    want = (pooled - pooled.mean(0)) / torch.sqrt(pooled.var(0, unbiased=False) + 1e-6)  # by hand
    assert torch.allclose(image, want, atol=1e-5)
    assert not any(p.requires_grad for p in model.image_norm.parameters())  # no affine parameters
    model.eval()  # eval: the running statistics, updated once (momentum 0.1) by the train pass above
    rm, rv = 0.1 * pooled.mean(0), 0.9 + 0.1 * pooled.var(0, unbiased=True)
    eval_image = model(x, clin)["features"][:, :d]
    assert torch.allclose(eval_image, (pooled - rm) / torch.sqrt(rv + 1e-6), atol=1e-5)


def test_layernorm_head_norm_standardises_each_sample():
    model = make("none", head_norm="layernorm").eval()
    x, clin = inputs(b=3)
    pooled = model.pool(model.encoder(x), mask=x[:, 1])  # [B, D]
    want = (pooled - pooled.mean(1, keepdim=True)) / torch.sqrt(pooled.var(1, unbiased=False, keepdim=True) + 1e-6)
    assert torch.allclose(model(x, clin)["features"], want, atol=1e-5)


def test_head_norm_round_trips_with_its_running_statistics(tmp_path):
    model = make("concat", head_norm="batchnorm").train()
    x, clin = inputs(b=4)
    model(x, clin)  # moves the running statistics off their initial values
    model.eval().save_pretrained(tmp_path / "mm", extra_config={}, card={}, input_spec=InputSpec(input_size=S))
    loaded, _ = MultimodalModel.from_pretrained(tmp_path / "mm")
    assert torch.equal(loaded.image_norm.running_mean, model.image_norm.running_mean)
    with torch.no_grad():
        assert torch.equal(loaded.eval()(x, clin)["logit"], model(x, clin)["logit"])


def test_bad_head_norm_and_batchnorm_with_single_samples_are_refused():
    from core.errors import ConfigError
    from finetune.config import FinetuneConfig
    with pytest.raises(ConfigError, match="head_norm"):
        MultimodalConfig(encoder=encoder_config(), head_norm="groupnorm")
    with pytest.raises(ConfigError, match="--batch_size >= 2"):
        FinetuneConfig(batch_size=1, model=MultimodalConfig(head_norm="batchnorm"))
