"""Export the ViT3D encoder of a training checkpoint as an HF-format folder or as MONAI ViT weights.

    python -m models.export --checkpoint runs/pretrain/checkpoint-final --out exports/vit3d [--format hf|monai]

The checkpoint is a folder from the pretraining loop (weights with "encoder."-prefixed keys,
encoder_config.json, input_spec.json and summary.json) or a single weights file (.safetensors, or .bin/.pt
such as DeepSpeed's zero_to_fp32 output, read with weights_only=True) next to an encoder_config.json.
A fine-tuned model folder (finetune's model/fold_k) exports its encoder with all its input channels.
Both formats carry the input contract (input_spec.json) when the checkpoint has one.
"""
from __future__ import annotations

import json
import pickle
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from safetensors.torch import save_file
from torch import Tensor

from core.atomic import atomic_dir
from core.cli import parse_config
from core.config import flat_dict
from core.errors import ConfigError, InputError, cli_entry, first_line
from models.hf import (check_replaceable, load_safetensors_file, load_safetensors_weights, load_state_dict_strict,
                       model_card, read_json)
from models.input_spec import load_input_spec
from models.vit3d import ViT3D, ViT3DConfig, vit3d_config_from_dict

ENCODER_PREFIX = "encoder."
TEACHER_PREFIX = "distiller.teacher.encoder."  # models/distill.py: the EMA teacher of a self-distilled run
# Wrappers that prefix every key: DDP / DeepSpeed ("module.") and torch.compile ("_orig_mod.").
WRAPPER_PARTS = ("module", "_orig_mod")


@dataclass
class ExportConfig:
    checkpoint: str = ""  # training checkpoint folder, or a .safetensors/.bin/.pt weights file
    out: str = ""  # output folder (replaced as a whole)
    format: Literal["hf", "monai"] = "hf"  # hf: ViT3D folder; monai: monai.networks.nets.ViT weights
    max_shard_size: str = "2GB"  # HF format only: larger weights are split into shards
    # student: the trained encoder; teacher: the EMA teacher of a self-distilled MiM run (model.distill)
    encoder: Literal["student", "teacher"] = "student"


# --- reading a training checkpoint -----------------------------------------------------------------------

def _load_weights_file(path: Path) -> dict[str, Tensor]:
    if path.suffix == ".safetensors":
        return load_safetensors_file(path)
    if path.suffix not in (".bin", ".pt", ".pth"):
        raise InputError(f"{path}: expected a .safetensors, .bin or .pt weights file")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError) as e:
        raise InputError(f"{path}: not a loadable torch weights file ({first_line(e)})") from None
    # Some savers wrap the state dict: {"module": ...} (DeepSpeed), {"state_dict"|"model": ...}.
    while isinstance(obj, dict) and not all(isinstance(v, Tensor) for v in obj.values()):
        inner = next((obj[k] for k in ("module", "state_dict", "model") if isinstance(obj.get(k), dict)), None)
        if inner is None:
            raise InputError(f"{path}: not a state dict (keys {sorted(obj)[:10]})")
        obj = inner
    if not isinstance(obj, dict):
        raise InputError(f"{path}: expected a state dict, got {type(obj).__name__}")
    return obj


def load_checkpoint_weights(folder: Path) -> dict[str, Tensor]:
    """The full weights of a checkpoint folder, as saved (keys may still carry wrapper prefixes)."""
    if (folder / "weights.safetensors").is_file():  # the training loop's full, unwrapped weights
        return _load_weights_file(folder / "weights.safetensors")
    if (folder / "model.safetensors").is_file() or (folder / "model.safetensors.index.json").is_file():
        return load_safetensors_weights(folder)
    if (folder / "pytorch_model.bin").is_file():  # accelerate save_state(safe_serialization=False)
        return _load_weights_file(folder / "pytorch_model.bin")
    hint = " (a DeepSpeed checkpoint? consolidate it with zero_to_fp32.py first)" \
        if any(folder.glob("global_step*")) else ""
    raise InputError(f"{folder}: no model.safetensors or pytorch_model.bin{hint}")


def unwrap_keys(state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
    """Drop DDP/DeepSpeed "module." prefixes and torch.compile "_orig_mod." parts from every key."""
    out = {}
    for key, t in state_dict.items():
        parts = key.split(".")
        while parts and parts[0] in WRAPPER_PARTS:
            parts = parts[1:]
        out[".".join(p for p in parts if p != "_orig_mod")] = t
    return out


def encoder_state_dict(state_dict: dict[str, Tensor], where: str, prefix: str = ENCODER_PREFIX) -> dict[str, Tensor]:
    """The encoder's weights: the `prefix`ed keys (or a bare encoder state dict, for the student)."""
    state_dict = unwrap_keys(state_dict)
    encoder = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
    if encoder:
        return encoder
    if prefix == ENCODER_PREFIX and "patch_embed.weight" in state_dict:  # already a bare ViT3D state dict
        return state_dict
    raise InputError(f"{where}: no '{prefix}*' keys (found e.g. {sorted(state_dict)[:5]})")


def read_checkpoint(path: str | Path, encoder: str = "student") -> tuple[ViT3D, dict]:
    """(encoder loaded strictly, with its input contract when there is one; summary) from a checkpoint
    folder or weights file; encoder "teacher" takes a self-distilled run's EMA teacher instead.
    A fine-tuned model folder (finetune's model/fold_k) gives its encoder, with every input channel."""
    path = Path(path)
    if path.is_dir() and not (path / "encoder_config.json").is_file() and (path / "config.json").is_file():
        return _finetuned_encoder(path)
    if path.is_dir():
        folder, weights = path, load_checkpoint_weights(path)
    elif path.is_file():
        folder, weights = path.parent, _load_weights_file(path)
    else:
        raise InputError(f"{path}: checkpoint not found")
    config = vit3d_config_from_dict(read_json(folder / "encoder_config.json"),
                                    where=str(folder / "encoder_config.json"))
    model = ViT3D(config)
    prefix = TEACHER_PREFIX if encoder == "teacher" else ENCODER_PREFIX
    load_state_dict_strict(model, encoder_state_dict(weights, str(path), prefix), what=str(path))
    model.input_spec = load_input_spec(folder, required=False)
    summary = read_json(folder / "summary.json") if (folder / "summary.json").is_file() else {}
    return model.eval(), summary


def _finetuned_encoder(folder: Path) -> tuple[ViT3D, dict]:
    """The encoder of a fine-tuned folder, with the folder's contract ([images..., lesion_mask])."""
    from models.multimodal import MultimodalModel
    model, config = MultimodalModel.from_pretrained(folder)
    if model.encoder is None:
        raise InputError(f"{folder}: a clinical_only model has no image encoder to export")
    encoder = model.encoder.eval()
    encoder.input_spec = load_input_spec(folder, required=False)
    return encoder, {"fine-tuned task": config["multimodal"]["task"], "fusion": config["multimodal"]["fusion"]}


def card_from_summary(summary: dict, source: Path) -> dict:
    """model_card arguments from a training summary: loss-like values are metrics, the rest training facts."""
    flat = flat_dict(summary)
    metrics = {k: v for k, v in flat.items() if "loss" in k.lower()}
    training = {"source checkpoint": source.name, **{k: v for k, v in flat.items() if k not in metrics}}
    return {"title": "mimfm ViT3D encoder (MiM pretrained)", "training": training, "metrics": metrics}


# --- MONAI ViT key names ------------------------------------------------------------------------------

def monai_key(key: str) -> str:
    """timm Block names -> monai.networks.blocks.TransformerBlock names.

    The qkv rows need no reordering: timm reshapes them to (3, heads, head_dim) and MONAI rearranges
    "b h (qkv l d)" -- both have q/k/v outermost, then heads, then the head dimension.
    """
    if key == "pos_embed":
        return "patch_embedding.position_embeddings"
    if key.startswith("patch_embed."):
        return "patch_embedding.patch_embeddings." + key[len("patch_embed."):]
    return (key.replace(".attn.proj.", ".attn.out_proj.")
               .replace(".mlp.fc1.", ".mlp.linear1.").replace(".mlp.fc2.", ".mlp.linear2."))


def monai_config(config: ViT3DConfig) -> dict:
    """Constructor arguments of monai.networks.nets.ViT that match the encoder."""
    return dict(
        in_channels=config.in_channels, img_size=config.img_size, patch_size=config.patch_size,
        hidden_size=config.dim, mlp_dim=int(config.dim * config.mlp_ratio), num_layers=config.depth,
        num_heads=config.heads, proj_type="conv",
        pos_embed_type="sincos" if config.pos_embed == "sincos" else "learnable",
        qkv_bias=True, classification=False, spatial_dims=3,
    )


def to_monai_state_dict(model: ViT3D) -> dict[str, Tensor]:
    out = {monai_key(k): t.detach().clone() for k, t in model.state_dict().items()}
    # MONAI's TransformerBlock always owns a cross-attention LayerNorm, unused without cross-attention.
    for i in range(model.config.depth):
        out[f"blocks.{i}.norm_cross_attn.weight"] = torch.ones(model.config.dim)
        out[f"blocks.{i}.norm_cross_attn.bias"] = torch.zeros(model.config.dim)
    return out


# UNETR (monai.networks.nets.UNETR) always builds a 12-layer ViT with 16^3 patches.
UNETR_LAYERS, UNETR_PATCH = 12, 16


def fits_unetr(config: ViT3DConfig) -> bool:
    return config.depth == UNETR_LAYERS and config.patch_size == UNETR_PATCH


def monai_usage(config: ViT3DConfig) -> str:
    """The card's loading recipe: MONAI's ViT always, UNETR only when the encoder fits it, with the exact
    arguments (UNETR defaults to qkv_bias=False, which our weights do not fit)."""
    text = ("Research backbone for 3D medical volumes. Load it into MONAI's ViT:\n\n```python\n"
            "import json\nfrom safetensors.torch import load_file\nfrom monai.networks.nets import ViT\n"
            "vit = ViT(**json.load(open('monai_config.json')))\n"
            "vit.load_state_dict(load_file('model.safetensors'), strict=True)\n```\n")
    if not fits_unetr(config):
        return text + (f"\nUNETR does not fit this encoder: UNETR builds {UNETR_LAYERS} layers with "
                       f"{UNETR_PATCH}^3 patches, this one has {config.depth} layers with {config.patch_size}^3.\n")
    return text + ("\nAs the encoder of a UNETR (choose `out_channels` for your task):\n\n```python\n"
                   "from safetensors.torch import load_file\nfrom monai.networks.nets import UNETR\n"
                   f"unetr = UNETR(in_channels={config.in_channels}, out_channels=2, img_size={config.img_size}, "
                   f"hidden_size={config.dim}, mlp_dim={int(config.dim * config.mlp_ratio)}, "
                   f"num_heads={config.heads}, proj_type='conv', qkv_bias=True)\n"
                   "unetr.vit.load_state_dict(load_file('model.safetensors'), strict=True)\n```\n")


def export_monai(model: ViT3D, out: Path, summary: dict, source: Path) -> None:
    from monai.networks.nets import ViT

    cfg, weights = monai_config(model.config), to_monai_state_dict(model)
    with warnings.catch_warnings():  # MONAI's sin-cos builder calls torch.meshgrid without indexing=
        warnings.filterwarnings("ignore", message="torch.meshgrid", category=UserWarning)
        ViT(**cfg).load_state_dict(weights, strict=True)  # fail here, not in the user's hands
    card = card_from_summary(summary, source)
    text = model_card({**model.hf_config(), "architectures": ["monai.networks.nets.ViT"]},
                      title=card["title"] + ", MONAI ViT weights", training=card["training"],
                      metrics=card["metrics"], input_spec=model.input_spec, intended_use=monai_usage(model.config),
                      how_to_load="See the recipes under Intended use (strict key matching; safetensors only).")
    check_replaceable(out, marker="monai_config.json")
    with atomic_dir(out) as tmp:
        save_file(weights, tmp / "model.safetensors", metadata={"format": "pt"})
        (tmp / "monai_config.json").write_text(json.dumps(cfg, indent=2) + "\n")
        if model.input_spec is not None:
            model.input_spec.save(tmp)
        (tmp / "README.md").write_text(text)


def export_checkpoint(source: str | Path, out: str | Path, fmt: str = "hf", max_shard_size: str = "2GB",
                      encoder: str = "student") -> Path:
    """Export the encoder (or a self-distilled run's EMA teacher) of a training checkpoint to `out`."""
    source, out = Path(source), Path(out)
    if source.resolve() == out.resolve() or source.resolve() in out.resolve().parents:
        raise ConfigError(f"--out {out} must not be the checkpoint or lie inside it")
    model, summary = read_checkpoint(source, encoder)
    if fmt == "hf":
        card = card_from_summary(summary, source)
        card["training"]["exported encoder"] = encoder
        model.save_pretrained(out, card=card, max_shard_size=max_shard_size)
    else:
        export_monai(model, out, summary, source)
    print(f"exported {source} -> {out} ({fmt}, {sum(p.numel() for p in model.parameters()):,} parameters)")
    return out


@cli_entry
def main(argv: list[str] | None = None) -> int:
    cfg, _ = parse_config(ExportConfig, argv, description=__doc__.splitlines()[0])
    if not cfg.checkpoint or not cfg.out:
        raise ConfigError("--checkpoint and --out are required")
    export_checkpoint(cfg.checkpoint, cfg.out, cfg.format, cfg.max_shard_size, cfg.encoder)
    return 0

if __name__ == "__main__":
    raise SystemExit(main())
