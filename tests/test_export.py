import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from monai.networks.nets import UNETR, ViT
from safetensors.torch import load_file, save_file

from core.config import to_dict
from data.prep_config import PrepConfig
from models.export import main
from models.input_spec import InputSpec, ViewSpec, load_input_spec
from models.vit3d import ViT3D, ViT3DConfig

CFG = ViT3DConfig(img_size=32, patch_size=8, dim=48, depth=2, heads=2)
SPEC = InputSpec(prep=PrepConfig(spacing=(1.0, 1.0, 1.0)), input_size=32,
                 view=ViewSpec(centre="random", crop_mm=64.0, margin_mm=0.0))
ROOT = Path(__file__).resolve().parents[1]


def _encoder(cfg=CFG, seed=0):
    torch.manual_seed(seed)
    model = ViT3D(cfg).eval()
    with torch.no_grad():  # non-trivial norms and biases, so a mis-mapped key cannot go unnoticed
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    return model


def _write_checkpoint(folder: Path, model: ViT3D, prefix="module.encoder."):
    """What the pretraining loop writes: the whole (DDP-wrapped) pretraining model plus side files."""
    folder.mkdir(parents=True)
    weights = {prefix + k: v.clone() for k, v in model.state_dict().items()}
    weights["module.decoder.proj.weight"] = torch.randn(4, 48)
    save_file(weights, folder / "model.safetensors")
    (folder / "encoder_config.json").write_text(json.dumps(to_dict(model.config)))
    SPEC.save(folder)
    (folder / "summary.json").write_text(json.dumps({"step": 1234, "losses": {"total": 0.4321, "recon": 0.3}}))
    return folder


@pytest.fixture()
def x():
    return torch.randn(2, 1, 32, 32, 32, generator=torch.Generator().manual_seed(1))


def _fails(argv, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err
    return err


def test_export_hf_from_checkpoint_folder(tmp_path, x):
    model = _encoder()
    ckpt = _write_checkpoint(tmp_path / "ckpt", model)
    assert main(["--checkpoint", str(ckpt), "--out", str(tmp_path / "hf")]) == 0
    loaded = ViT3D.from_pretrained(tmp_path / "hf").eval()
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    assert loaded.input_spec == SPEC and load_input_spec(tmp_path / "hf") == SPEC
    card = (tmp_path / "hf" / "README.md").read_text()
    assert "1234" in card and "0.4321" in card and "Not for clinical use." in card


def test_export_from_torch_file_with_compile_prefixes(tmp_path, x):
    model = _encoder(seed=3)
    (tmp_path / "run").mkdir()
    # As zero_to_fp32 writes it, from a torch.compile'd model: a plain state dict in a pickle.
    torch.save({"_orig_mod.encoder." + k: v for k, v in model.state_dict().items()}, tmp_path / "run" / "fp32.pt")
    (tmp_path / "run" / "encoder_config.json").write_text(json.dumps(to_dict(model.config)))
    assert main(["--checkpoint", str(tmp_path / "run" / "fp32.pt"), "--out", str(tmp_path / "hf"),
                 "--max_shard_size", "100KB"]) == 0
    assert (tmp_path / "hf" / "model.safetensors.index.json").is_file()
    with torch.no_grad():
        assert torch.equal(ViT3D.from_pretrained(tmp_path / "hf").eval()(x), model(x))


def test_bad_checkpoints_fail_with_one_line(tmp_path, capsys):
    model = _encoder()
    err = _fails(["--checkpoint", str(tmp_path / "missing"), "--out", str(tmp_path / "o")], capsys)
    assert "missing" in err and "not found" in err

    ckpt = _write_checkpoint(tmp_path / "no_enc", model, prefix="module.backbone.")
    assert "no 'encoder.*' keys" in _fails(["--checkpoint", str(ckpt), "--out", str(tmp_path / "o")], capsys)

    ckpt = _write_checkpoint(tmp_path / "partial", model)
    weights = load_file(ckpt / "model.safetensors")
    del weights["module.encoder.blocks.1.attn.qkv.weight"]
    save_file(weights, ckpt / "model.safetensors")
    assert "missing keys: blocks.1.attn.qkv.weight" in _fails(
        ["--checkpoint", str(ckpt), "--out", str(tmp_path / "o")], capsys)

    (ckpt / "encoder_config.json").unlink()
    assert "encoder_config.json" in _fails(["--checkpoint", str(ckpt), "--out", str(tmp_path / "o")], capsys)
    assert not (tmp_path / "o").exists()  # nothing half-written


def test_cli_module_exit_code(tmp_path):
    ckpt = _write_checkpoint(tmp_path / "ckpt", _encoder())
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "thesis.tex").write_text("precious")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    r = subprocess.run([sys.executable, "-m", "models.export", "--checkpoint", str(ckpt), "--out",
                        str(tmp_path / "out")], cwd=ROOT, env=env, capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "refusing to replace" in r.stderr
    assert (tmp_path / "out" / "thesis.tex").read_text() == "precious"


@pytest.mark.parametrize("pos_embed, dim", [("sincos", 48), ("learned", 32)])
def test_monai_vit_loads_export_strictly_and_matches(tmp_path, x, pos_embed, dim):
    model = _encoder(ViT3DConfig(img_size=32, patch_size=8, dim=dim, depth=2, heads=2, pos_embed=pos_embed))
    ckpt = _write_checkpoint(tmp_path / "ckpt", model)
    assert main(["--checkpoint", str(ckpt), "--out", str(tmp_path / "monai"), "--format", "monai"]) == 0
    cfg = json.loads((tmp_path / "monai" / "monai_config.json").read_text())
    vit = ViT(**cfg, save_attn=True).eval()
    vit.load_state_dict(load_file(tmp_path / "monai" / "model.safetensors"), strict=True)
    with torch.no_grad():
        theirs, _ = vit(x)
        ours, maps = model.forward_with_attention(x)
    # Tight enough to catch timm's default LayerNorm eps (1e-6 vs MONAI's 1e-5) or a tanh-GELU.
    assert torch.allclose(theirs, ours, atol=5e-6)
    assert torch.allclose(model(x).detach(), theirs, atol=5e-6)
    for blk, ours_map in zip(vit.blocks, maps):  # MONAI's explicit attention is an independent reference
        assert torch.allclose(blk.attn.att_mat, ours_map, atol=1e-6)
    assert load_input_spec(tmp_path / "monai") == SPEC
    card = (tmp_path / "monai" / "README.md").read_text()  # a 2-layer, patch-8 encoder: no UNETR recipe
    assert "UNETR does not fit this encoder" in card and "UNETR(" not in card


def test_unetr_vit_loads_export(tmp_path):
    # UNETR fixes 12 layers and 16^3 patches.
    model = _encoder(ViT3DConfig(img_size=32, patch_size=16, dim=48, depth=12, heads=2))
    ckpt = _write_checkpoint(tmp_path / "ckpt", model)
    assert main(["--checkpoint", str(ckpt), "--out", str(tmp_path / "monai"), "--format", "monai"]) == 0
    unetr = UNETR(in_channels=1, out_channels=2, img_size=32, feature_size=8, hidden_size=48, mlp_dim=192,
                  num_heads=2, qkv_bias=True).eval()
    unetr.vit.load_state_dict(load_file(tmp_path / "monai" / "model.safetensors"), strict=True)
    x = torch.randn(1, 1, 32, 32, 32)
    with torch.no_grad():
        assert torch.allclose(unetr.vit(x)[0], model(x), atol=1e-5)


def test_monai_card_recipes_run_as_written(tmp_path, monkeypatch):
    """The card's code blocks (MONAI ViT and UNETR, with the exact arguments) run in the export folder."""
    model = _encoder(ViT3DConfig(img_size=32, patch_size=16, dim=48, depth=12, heads=2))
    ckpt = _write_checkpoint(tmp_path / "ckpt", model)
    assert main(["--checkpoint", str(ckpt), "--out", str(tmp_path / "monai"), "--format", "monai"]) == 0
    card = (tmp_path / "monai" / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", card, flags=re.S)
    assert len(blocks) == 2 and "qkv_bias=True" in blocks[1] and "hidden_size=48" in blocks[1]
    monkeypatch.chdir(tmp_path / "monai")
    scope: dict = {}
    for code in blocks:
        exec(code, scope)
    x = torch.randn(1, 1, 32, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(scope["vit"].eval()(x)[0], model(x), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(scope["unetr"].eval().vit(x)[0], model(x), atol=1e-5, rtol=1e-5)


def test_hf_card_names_the_import_path(tmp_path):
    ckpt = _write_checkpoint(tmp_path / "ckpt", _encoder())
    assert main(["--checkpoint", str(ckpt), "--out", str(tmp_path / "hf")]) == 0
    card = (tmp_path / "hf" / "README.md").read_text()
    code = re.findall(r"```python\n(.*?)```", card, flags=re.S)[0]
    assert "from models.vit3d import ViT3D" in code
    scope: dict = {}
    exec(code.replace("path/to/this/folder", str(tmp_path / "hf")), scope)
    assert isinstance(scope["model"], ViT3D)
