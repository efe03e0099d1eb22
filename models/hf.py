"""Hugging Face-format folders: config.json + safetensors weights (sharded past a size) + README.md model card.

Loading reads safetensors only: a folder is never unpickled, whoever wrote it.
"""
from __future__ import annotations

import importlib.metadata
import json
import os
from pathlib import Path
from typing import Callable

import yaml
from huggingface_hub import split_torch_state_dict_into_shards
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from core.atomic import atomic_dir
from core.errors import InputError
from models.input_spec import InputSpec

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
MAX_KEYS_LISTED = 30


def mimfm_version() -> str:
    try:
        return importlib.metadata.version("mimfm")
    except importlib.metadata.PackageNotFoundError:
        return "0.1.0"


def _unshared(state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
    """CPU, contiguous tensors; safetensors refuses tensors that share memory, so copies are made for those."""
    out, seen = {}, set()
    for name, t in state_dict.items():
        t = t.detach().to("cpu").contiguous()
        ptr = t.untyped_storage().data_ptr()
        if ptr in seen and t.numel():
            t = t.clone()
        seen.add(ptr)
        out[name] = t
    return out


def check_replaceable(folder: str | os.PathLike, marker: str = CONFIG_NAME) -> None:
    """Refuse to replace a non-empty folder that is not a model folder (writing replaces the folder as a whole)."""
    folder = Path(folder)
    if folder.exists() and (not folder.is_dir() or (any(folder.iterdir()) and not (folder / marker).is_file())):
        raise InputError(f"{folder}: exists and is not a model folder (no {marker}); refusing to replace it")


def save_hf_folder(folder: str | os.PathLike, state_dict: dict[str, Tensor], config: dict, card_text: str,
                   max_shard_size: int | str = "2GB", input_spec: InputSpec | None = None) -> None:
    """Write `folder` atomically: config.json, model.safetensors (or shards + index), README.md and the
    input contract input_spec.json."""
    check_replaceable(folder)
    state_dict = _unshared(state_dict)
    try:
        split = split_torch_state_dict_into_shards(state_dict, max_shard_size=max_shard_size)
    except ValueError as e:
        raise InputError(f"max_shard_size {max_shard_size!r}: {e}") from None
    with atomic_dir(folder) as tmp:
        config = {**config, "mimfm_version": mimfm_version()}
        (tmp / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")
        for filename, names in split.filename_to_tensors.items():
            save_file({n: state_dict[n] for n in names}, tmp / filename, metadata={"format": "pt"})
        if split.is_sharded:
            index = {"metadata": split.metadata, "weight_map": split.tensor_to_filename}
            (tmp / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
        (tmp / "README.md").write_text(card_text)
        if input_spec is not None:
            input_spec.save(tmp)


def read_json(path: Path) -> dict:
    if not path.is_file():
        raise InputError(f"{path}: file not found")
    try:
        obj = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise InputError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(obj, dict):
        raise InputError(f"{path}: expected a JSON object, got {type(obj).__name__}")
    return obj


def load_safetensors_file(path: Path) -> dict[str, Tensor]:
    if not path.is_file():
        raise InputError(f"{path}: weights file not found")
    try:
        return load_file(path, device="cpu")
    except (SafetensorError, OSError, ValueError) as e:
        raise InputError(f"{path}: not a readable safetensors file ({e})") from None


def load_safetensors_weights(folder: str | os.PathLike) -> dict[str, Tensor]:
    """The state dict in `folder`: model.safetensors, or the shards its index names (all of them, nothing else)."""
    folder = Path(folder)
    if (folder / WEIGHTS_NAME).is_file():
        return load_safetensors_file(folder / WEIGHTS_NAME)
    if (folder / INDEX_NAME).is_file():
        weight_map = read_json(folder / INDEX_NAME).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise InputError(f"{folder / INDEX_NAME}: no 'weight_map'")
        state_dict: dict[str, Tensor] = {}
        for shard in sorted(set(weight_map.values())):
            part = load_safetensors_file(folder / shard)
            stray = sorted(k for k in part if weight_map.get(k) != shard)
            if stray:
                raise InputError(f"{folder / shard}: tensors not in the index: {_listed(stray)}")
            state_dict.update(part)
        absent = sorted(set(weight_map) - set(state_dict))
        if absent:
            raise InputError(f"{folder / INDEX_NAME}: tensors missing from the shards: {_listed(absent)}")
        return state_dict
    pickled = [p.name for p in folder.glob("*.bin")] + [p.name for p in folder.glob("*.pt")]
    hint = f" (found {pickled}; pickled weights are not loaded from a model folder)" if pickled else ""
    raise InputError(f"{folder}: no {WEIGHTS_NAME} or {INDEX_NAME}{hint}")


def load_hf_folder(folder: str | os.PathLike) -> tuple[dict, dict[str, Tensor]]:
    """(config, state dict) of an HF-format folder."""
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(f"{folder}: model folder not found")
    config = read_json(folder / CONFIG_NAME)
    return config, load_safetensors_weights(folder)


def _listed(keys: list[str]) -> str:
    more = f" ... (+{len(keys) - MAX_KEYS_LISTED} more)" if len(keys) > MAX_KEYS_LISTED else ""
    return ", ".join(keys[:MAX_KEYS_LISTED]) + more


def load_state_dict_strict(module: nn.Module, state_dict: dict[str, Tensor], what: str) -> None:
    """Load every key exactly; any missing, unexpected or mis-shaped key is an InputError that lists them."""
    expected = module.state_dict()
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    mis_shaped = sorted(f"{k} {tuple(state_dict[k].shape)} != {tuple(expected[k].shape)}"
                        for k in set(expected) & set(state_dict) if state_dict[k].shape != expected[k].shape)
    problems = []
    if missing:
        problems.append(f"missing keys: {_listed(missing)}")
    if unexpected:
        problems.append(f"unexpected keys: {_listed(unexpected)}")
    if mis_shaped:
        problems.append(f"shape mismatch (checkpoint != model): {_listed(mis_shaped)}")
    if problems:
        raise InputError(f"{what}: weights do not match {type(module).__name__}; " + "; ".join(problems))
    module.load_state_dict(state_dict, strict=True)


def save_model_folder(folder: str | os.PathLike, module: nn.Module, *, model_type: str, architecture: str,
                      section: str, section_config: dict, extra_config: dict, card: dict, card_shape: dict,
                      input_spec: InputSpec) -> None:
    """A fine-tuned model's HF-format folder: config.json = {"model_type", "architectures": [architecture],
    section: section_config, **extra_config}, model.safetensors, README.md and input_spec.json. `card` holds
    model_card's keyword arguments (title, intended_use, ...); `card_shape` the keys its Model section lists."""
    reserved = {"model_type", "architectures", section} & set(extra_config)
    if reserved:
        raise InputError(f"extra_config may not use the reserved key(s) {sorted(reserved)}")
    config = {"model_type": model_type, "architectures": [architecture], section: section_config, **extra_config}
    text = model_card({**card_shape, **config}, input_spec=input_spec, **{"training": {}, "metrics": {}, **card})
    save_hf_folder(folder, module.state_dict(), config, text, input_spec=input_spec)


def load_model_folder(folder: str | os.PathLike, *, model_type: str, section: str,
                      build: Callable[[dict, str], nn.Module]) -> tuple[nn.Module, dict]:
    """(model, config.json) of a folder save_model_folder wrote: config.json's model_type must be `model_type`
    (one line naming the folder otherwise), `build(config[section], where)` makes the module, and the
    safetensors weights load with strict key and shape matching."""
    config, state = load_hf_folder(folder)
    if config.get("model_type") != model_type or not isinstance(config.get(section), dict):
        raise InputError(f"{folder}: config.json is not a {model_type} model (model_type={config.get('model_type')!r})")
    model = build(config[section], f"{folder}/config.json:{section}")
    load_state_dict_strict(model, state, str(folder))
    return model, config


def _bullets(d: dict) -> str:
    if not d:
        return "- (not recorded)\n"
    lines = []
    for k, v in d.items():
        if isinstance(v, float):
            v = f"{v:.6g}"
        elif isinstance(v, (dict, list)):
            v = json.dumps(v)
        lines.append(f"- **{k}**: {v}")
    return "\n".join(lines) + "\n"


# Each mimfm architecture named in config.json: its module, and what its from_pretrained returns.
ARCH_LOADERS = {"ViT3D": ("models.vit3d", "model"), "MultimodalModel": ("models.multimodal", "model, config")}


def _load_snippet(arch: str) -> str:
    module, returns = ARCH_LOADERS.get(arch, ("models", "model"))
    return (f"With mimfm installed (strict key matching; safetensors only):\n\n```python\n"
            f"from {module} import {arch}\n"
            f"{returns} = {arch}.from_pretrained(\"path/to/this/folder\")\n```\n")


def model_card(config: dict, *, title: str, intended_use: str, training: dict, metrics: dict,
               input_spec: InputSpec | None = None, how_to_load: str | None = None, license: str = "apache-2.0",
               tags: tuple[str, ...] = ("medical-imaging", "3d", "vit", "self-supervised")) -> str:
    """README.md text: YAML front matter (library_name, tags, license) and the sections a model card needs."""
    front = {"library_name": "mimfm", "license": license, "tags": list(tags)}
    arch = (config.get("architectures") or ["Model"])[0]
    shape = {k: config[k] for k in ("model_type", "in_channels", "img_size", "patch_size", "dim", "depth", "heads",
                                    "mlp_ratio", "pos_embed") if k in config}
    sections = [
        f"---\n{yaml.safe_dump(front, sort_keys=False)}---\n",
        f"# {title}\n",
        f"## Intended use\n\n{intended_use.strip()}\n\n"
        "**Not for clinical use.** This is a research model: it has not been validated for diagnosis, "
        "treatment or any decision about a patient.\n",
        f"## Model\n\n{_bullets(shape)}",
        f"## Training data and steps\n\n{_bullets(training)}",
        f"## Losses and metrics reached\n\n{_bullets(metrics)}",
        "## Input contract\n\nInputs must be prepared exactly as in training (input_spec.json, read by "
        "`models.input_spec.load_input_spec`)."
        + (f" Channels, in order: {input_spec.describe_channels()}." if input_spec is not None else "") + "\n\n"
        f"{_bullets(input_spec.to_dict() if input_spec is not None else {})}",
        f"## How to load\n\n{how_to_load or _load_snippet(arch)}\n",
    ]
    return "\n".join(sections)
