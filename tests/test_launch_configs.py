"""Launch configs: DeepSpeed JSON parses, agrees with the accelerate YAML that points at it, and
accelerate's own DeepSpeedPlugin accepts it. (`accelerate launch --use_deepspeed` cannot run on a
CPU host, so the configs are checked by parsing, as DESIGN.md says.)"""
import json
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
LAUNCH = ROOT / "launch"


def _accel(name):
    return yaml.safe_load((LAUNCH / "accelerate" / name).read_text())


@pytest.mark.parametrize("yaml_name, stage", [("deepspeed_zero2.yaml", 2), ("deepspeed_zero3.yaml", 3)])
def test_deepspeed_json_agrees_with_accelerate_yaml(yaml_name, stage):
    acc = _accel(yaml_name)
    assert acc["distributed_type"] == "DEEPSPEED"
    ds_path = ROOT / acc["deepspeed_config"]["deepspeed_config_file"]
    ds = json.loads(ds_path.read_text())
    assert ds["zero_optimization"]["stage"] == stage
    # accelerate fills these from the run; hard-coding them would silently disagree with the flags
    for key in ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "gradient_clipping"):
        assert ds[key] == "auto"
    assert ds["bf16"]["enabled"] == "auto" and acc["mixed_precision"] == "bf16"
    if stage == 3:
        assert ds["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] is True


@pytest.mark.parametrize("yaml_name", ["deepspeed_zero2.yaml", "deepspeed_zero3.yaml"])
def test_accelerate_deepspeed_plugin_accepts_config(yaml_name):
    from accelerate.utils import DeepSpeedPlugin
    acc = _accel(yaml_name)
    plugin = DeepSpeedPlugin(hf_ds_config=str(ROOT / acc["deepspeed_config"]["deepspeed_config_file"]))
    assert plugin.zero_stage == (2 if "zero2" in yaml_name else 3)


def test_every_accelerate_yaml_is_consistent():
    for path in sorted((LAUNCH / "accelerate").glob("*.yaml")):
        acc = yaml.safe_load(path.read_text())
        assert acc["num_processes"] >= acc["num_machines"], path.name
        assert acc["distributed_type"] in {"NO", "MULTI_GPU", "DEEPSPEED"}, path.name


def test_run_presets_parse_into_their_configs():
    from data.config import load_config
    from pretrain.train import PretrainConfig
    from finetune.train import FinetuneConfig
    for path in sorted(LAUNCH.glob("pretrain_*.yaml")):
        cfg = load_config(PretrainConfig, path)
        assert cfg.model.encoder.img_size % cfg.model.encoder.patch_size == 0
    for path in sorted(LAUNCH.glob("finetune_*.yaml")):
        cfg = load_config(FinetuneConfig, path)
        assert cfg.model.encoder.in_channels == 2


def test_slurm_script_expands_machine_rank_per_node():
    text = (LAUNCH / "slurm_pretrain.sh").read_text()
    # $SLURM_PROCID must be inside the single-quoted command that srun runs on each node
    assert "--machine_rank $SLURM_PROCID" in text and "bash -c '" in text
