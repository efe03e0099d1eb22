import json
import math

import pytest
import torch
from huggingface_hub import ModelCard
from safetensors.torch import load_file, save_file
from timm.optim import create_optimizer_v2

from core.errors import ConfigError, InputError
from data.prep_config import PrepConfig
from models.hf import load_hf_folder, load_state_dict_strict
from models.input_spec import InputSpec, load_input_spec
from models.pos_embed import resize_pos_embed, sincos_3d
from models.vit3d import PRESETS, ViT3D, ViT3DConfig, vit3d_config, vit3d_config_from_dict

CFG = ViT3DConfig(img_size=32, patch_size=8, dim=48, depth=2, heads=2)  # 4^3 = 64 tokens


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return ViT3D(CFG).eval()


@pytest.fixture(scope="module")
def x():
    return torch.randn(2, 1, 32, 32, 32, generator=torch.Generator().manual_seed(1))


def _blocks_then_norm(model, tokens):
    for blk in model.blocks:
        tokens = blk(tokens)
    return model.norm(tokens)


def test_config_presets_and_validation():
    # The CPU-sized encoder lives in launch/pretrain_tiny_cpu.yaml, not in PRESETS (a second copy disagreed).
    assert "tiny" not in PRESETS
    tiny = ViT3DConfig(dim=96, depth=4, heads=3, img_size=64, patch_size=16)
    assert tiny.hidden_size == 96 and tiny.grid == 4 and tiny.num_patches == 64
    assert (PRESETS["base"].dim, PRESETS["base"].depth, PRESETS["base"].heads) == (768, 12, 12)
    assert vit3d_config("small", img_size=128).img_size == 128
    assert PRESETS["small"].img_size == 96  # overrides do not leak into the preset
    for preset in PRESETS.values():
        ViT3DConfig(**{k: getattr(preset, k) for k in preset.__dataclass_fields__})  # validates
    with pytest.raises(ConfigError, match="divisible by 6"):
        ViT3DConfig(dim=64, heads=4)
    with pytest.raises(ConfigError, match="multiple of patch_size"):
        ViT3DConfig(img_size=60)
    with pytest.raises(ConfigError, match="unknown ViT3D preset"):
        vit3d_config("huge")
    with pytest.raises(ConfigError, match="unknown key"):
        vit3d_config_from_dict({"dim": 48, "widht": 3})
    with pytest.raises(InputError, match="model_type"):
        vit3d_config_from_dict({"model_type": "bert"})


def test_forward_shapes(model, x):
    vis = torch.stack([torch.randperm(64)[:16] for _ in range(2)])  # [2, 16]
    extra = torch.randn(2, 3, 48)
    with torch.no_grad():
        assert model(x).shape == (2, 64, 48)
        assert model(x, visible_idx=vis).shape == (2, 16, 48)
        assert model(x, extra_tokens=extra).shape == (2, 67, 48)
        assert model(x, visible_idx=vis, extra_tokens=extra).shape == (2, 19, 48)
    with pytest.raises(InputError, match=r"\[B, 1, D, H, W\]"):
        model(torch.randn(1, 2, 32, 32, 32))
    with pytest.raises(InputError, match="extra_tokens"):
        model(x, extra_tokens=torch.randn(2, 3, 47))


@torch.no_grad()
def test_visible_idx_selects_tokens_before_the_blocks(model, x):
    full = model(x)
    in_order = torch.arange(64).expand(2, -1)
    assert torch.allclose(model(x, visible_idx=in_order), full, atol=1e-6)

    vis = torch.stack([torch.randperm(64, generator=torch.Generator().manual_seed(s))[:20] for s in (2, 3)])
    out = model(x, visible_idx=vis)  # [2, 20, 48]
    perm = torch.randperm(20, generator=torch.Generator().manual_seed(4))
    assert torch.allclose(model(x, visible_idx=vis[:, perm]), out[:, perm], atol=1e-5)

    # The blocks see only the visible tokens (MAE): same as running them on the gathered embeddings.
    tokens = torch.stack([model.embed(x)[b, vis[b]] for b in range(2)])
    assert torch.allclose(out, _blocks_then_norm(model, tokens), atol=1e-5)
    assert not torch.allclose(out, torch.stack([full[b, vis[b]] for b in range(2)]), atol=1e-3)


@torch.no_grad()
def test_extra_tokens_join_the_sequence_without_position_embedding(model, x):
    extra = torch.randn(2, 3, 48)
    out = model(x, extra_tokens=extra)
    ref = _blocks_then_norm(model, torch.cat([model.embed(x), extra], dim=1))
    assert torch.allclose(out, ref, atol=1e-5)
    assert not torch.allclose(out[:, :64], model(x), atol=1e-3)  # attention mixes them in


def test_sincos_values_by_hand():
    pe = sincos_3d(12, (2, 3, 4))  # 4 dims per axis: frequencies 1 and 1/100
    assert pe.shape == (1, 24, 12)
    for d, h, w in [(0, 0, 0), (1, 2, 3), (0, 1, 2), (1, 0, 1)]:
        n = d * 12 + h * 4 + w  # depth-major token order of Conv3d.flatten(2)
        want = []
        for p in (d, h, w):
            want += [math.sin(p), math.sin(p / 100), math.cos(p), math.cos(p / 100)]
        assert torch.allclose(pe[0, n], torch.tensor(want), atol=1e-6), (d, h, w)
    with pytest.raises(ValueError, match="even dim"):
        sincos_3d(51, 4)
    with pytest.raises(ConfigError, match="divisible by 6"):  # the encoder keeps three equal axis parts
        ViT3DConfig(dim=50, heads=2)


def test_sincos_pos_embed_is_frozen_and_saved(model):
    assert not model.pos_embed.requires_grad
    assert torch.equal(model.state_dict()["pos_embed"], sincos_3d(48, 4))
    learned = ViT3D(ViT3DConfig(img_size=32, patch_size=8, dim=32, depth=1, heads=2, pos_embed="learned"))
    assert learned.pos_embed.requires_grad and learned.pos_embed.std() > 0


def _linear_weights(n_old, n_new):
    """Independent 1D linear-interpolation matrix [n_new, n_old] with half-pixel centres (align_corners=False)."""
    w = torch.zeros(n_new, n_old, dtype=torch.float64)
    for i in range(n_new):
        src = max((i + 0.5) * n_old / n_new - 0.5, 0.0)
        i0 = min(int(math.floor(src)), n_old - 1)
        i1 = min(i0 + 1, n_old - 1)
        frac = src - i0
        w[i, i0] += 1 - frac
        w[i, i1] += frac
    return w


def test_resize_pos_embed_matches_trilinear_reference():
    old, new = (2, 3, 4), (3, 5, 2)
    pe = torch.randn(1, 24, 6, dtype=torch.float64)
    assert resize_pos_embed(pe, old, old) is pe
    out = resize_pos_embed(pe.float(), old, new)
    vol = pe[0].reshape(*old, 6)
    wd, wh, ww = (_linear_weights(a, b) for a, b in zip(old, new))
    ref = torch.einsum("ad,bh,cw,dhwk->abck", wd, wh, ww, vol).reshape(1, -1, 6)
    assert out.shape == (1, 30, 6)
    assert torch.allclose(out.double(), ref, atol=1e-5)


@torch.no_grad()
def test_other_input_sizes(model):
    x48 = torch.randn(1, 1, 48, 48, 40)
    assert model(x48).shape == (1, 6 * 6 * 5, 48)
    x32 = torch.randn(1, 1, 32, 32, 32)
    tokens = model.patch_embed(x32).flatten(2).transpose(1, 2)
    # native size: no resampling; embed's matmul equals the Conv3d up to float rounding
    assert torch.allclose(model.embed(x32), tokens + model.pos_embed, atol=1e-5)


@torch.no_grad()
def test_attention_maps_are_probabilities_and_reproduce_forward(model, x):
    extra = torch.randn(2, 2, 48)
    feats, maps = model.forward_with_attention(x, extra_tokens=extra)
    assert torch.allclose(feats, model(x, extra_tokens=extra), atol=1e-5)
    assert len(maps) == CFG.depth
    for m in maps:
        assert m.shape == (2, CFG.heads, 66, 66)
        assert torch.allclose(m.sum(-1), torch.ones(2, CFG.heads, 66), atol=1e-5)
    assert len(model.attention_maps(x)) == CFG.depth


def test_grad_checkpointing_same_gradients_and_recomputes(x):
    torch.manual_seed(0)
    model = ViT3D(CFG).train()
    calls = []
    for blk in model.blocks:  # count MLP runs (module hooks do not fire during checkpoint recomputation)
        blk.mlp.forward = (lambda fwd: lambda *a: (calls.append(1), fwd(*a))[1])(blk.mlp.forward)

    def grads():
        model.zero_grad()
        calls.clear()
        model(x).pow(2).mean().backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}, len(calls)

    plain, plain_calls = grads()
    model.set_grad_checkpointing(True)
    ckpt, ckpt_calls = grads()
    assert plain_calls == CFG.depth and ckpt_calls == 2 * CFG.depth  # blocks are re-run in backward
    for n in plain:
        assert torch.allclose(plain[n], ckpt[n], atol=1e-6), n


def test_layer_decay_param_groups():
    cfg = ViT3DConfig(img_size=32, patch_size=8, dim=48, depth=3, heads=2, pos_embed="learned")
    model = ViT3D(cfg)
    opt = create_optimizer_v2(model, "adamw", lr=1e-3, weight_decay=0.05, layer_decay=0.5)
    names = {id(p): n for n, p in model.named_parameters()}
    seen = set()
    for group in opt.param_groups:
        for p in group["params"]:
            name = names[id(p)]
            seen.add(name)
            # timm's convention: stem is layer 0, block i layer i + 1, the final norm joins the last block.
            if name.startswith(("patch_embed", "pos_embed")):
                scale = 0.5**cfg.depth
            elif name.startswith("blocks."):
                scale = 0.5 ** (cfg.depth - 1 - int(name.split(".")[1]))
            else:
                assert name.startswith("norm.")
                scale = 1.0
            assert group["lr_scale"] == pytest.approx(scale), name
            no_decay = p.ndim <= 1 or name == "pos_embed"
            assert group["weight_decay"] == (0.0 if no_decay else 0.05), name
    assert seen == set(names.values())
    # A fixed sin-cos embedding is not trained at all.
    frozen = ViT3D(CFG)
    opt = create_optimizer_v2(frozen, "adamw", lr=1e-3, layer_decay=0.5)
    assert all(p is not frozen.pos_embed for g in opt.param_groups for p in g["params"])


def test_save_load_round_trip(tmp_path, model, x):
    pre = InputSpec(prep=PrepConfig(spacing=(1.5, 1.5, 1.5), modality="ct"), input_size=32, channels=("image",))
    model.save_pretrained(tmp_path / "enc", input_spec=pre, card={"metrics": {"loss": 0.123}})
    assert sorted(p.name for p in (tmp_path / "enc").iterdir()) == ["README.md", "config.json", "input_spec.json",
                                                                    "model.safetensors"]
    config = json.loads((tmp_path / "enc" / "config.json").read_text())
    assert config["model_type"] == "mimfm_vit3d" and config["architectures"] == ["ViT3D"]
    assert config["hidden_size"] == 48 and config["depth"] == 2 and load_input_spec(tmp_path / "enc") == pre
    assert config["mimfm_version"]
    card = ModelCard((tmp_path / "enc" / "README.md").read_text())
    assert {"medical-imaging", "3d", "vit", "self-supervised"} <= set(card.data.tags)
    assert card.data.library_name == "mimfm" and card.data.license
    assert "Not for clinical use." in card.text and "0.123" in card.text and "RAS" in card.text

    loaded = ViT3D.from_pretrained(tmp_path / "enc").eval()
    assert loaded.input_spec == pre
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


def test_strict_load_lists_missing_unexpected_and_mis_shaped(tmp_path, model):
    model.save_pretrained(tmp_path / "enc")
    weights = load_file(tmp_path / "enc" / "model.safetensors")
    del weights["blocks.1.mlp.fc2.bias"]
    weights["head.weight"] = torch.zeros(2, 48)
    save_file(weights, tmp_path / "enc" / "model.safetensors")
    with pytest.raises(InputError) as e:
        ViT3D.from_pretrained(tmp_path / "enc")
    msg = str(e.value)
    assert "missing keys: blocks.1.mlp.fc2.bias" in msg and "unexpected keys: head.weight" in msg
    bad = dict(model.state_dict(), **{"norm.weight": torch.ones(47)})
    with pytest.raises(InputError, match=r"shape mismatch.*norm\.weight \(47,\) != \(48,\)"):
        load_state_dict_strict(ViT3D(CFG), bad, what="test")


def test_sharded_save_writes_index_and_loads_back(tmp_path, model, x):
    model.save_pretrained(tmp_path / "enc", max_shard_size="100KB")
    files = sorted(p.name for p in (tmp_path / "enc").iterdir())
    shards = [f for f in files if f.startswith("model-")]
    assert "model.safetensors" not in files and "model.safetensors.index.json" in files and len(shards) > 1
    index = json.loads((tmp_path / "enc" / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(model.state_dict()) and set(index["weight_map"].values()) == set(shards)
    with torch.no_grad():
        assert torch.equal(ViT3D.from_pretrained(tmp_path / "enc").eval()(x), model(x))


def test_load_hf_folder_errors(tmp_path, model):
    with pytest.raises(InputError, match="not found"):
        load_hf_folder(tmp_path / "nope")
    model.save_pretrained(tmp_path / "enc")
    (tmp_path / "enc" / "model.safetensors").write_bytes(b"not safetensors at all")
    with pytest.raises(InputError, match="not a readable safetensors"):
        load_hf_folder(tmp_path / "enc")
    (tmp_path / "enc" / "model.safetensors").unlink()
    torch.save(model.state_dict(), tmp_path / "enc" / "pytorch_model.bin")
    with pytest.raises(InputError, match="pickled weights are not loaded"):
        load_hf_folder(tmp_path / "enc")
    (tmp_path / "enc" / "config.json").unlink()
    with pytest.raises(InputError, match="config.json: file not found"):
        load_hf_folder(tmp_path / "enc")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("keep me")
    with pytest.raises(InputError, match="refusing to replace"):
        model.save_pretrained(tmp_path / "other")
    assert (tmp_path / "other" / "notes.txt").read_text() == "keep me"


@torch.no_grad()
def test_from_pretrained_inflates_patch_embedding(tmp_path, model, x):
    model.save_pretrained(tmp_path / "enc")
    two = ViT3D.from_pretrained(tmp_path / "enc", in_channels=2).eval()
    assert two.config.in_channels == 2 and two.patch_embed.weight.shape[1] == 2
    mask = (torch.rand_like(x) > 0.5).float()
    assert torch.allclose(two(torch.cat([x, mask], 1)), model(x), atol=1e-5)  # zero kernel: mask adds nothing
    mean = ViT3D.from_pretrained(tmp_path / "enc", in_channels=2, inflate="mean")
    assert torch.equal(mean.patch_embed.weight[:, 1], model.patch_embed.weight[:, 0])
    with pytest.raises(ConfigError, match="shrink"):
        ViT3D.from_pretrained(tmp_path / "enc", in_channels=0)
