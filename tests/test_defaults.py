"""What a user gets without --config is what was measured: the configs' defaults are the recipes of
launch/finetune_tiny_cpu.yaml and launch/pretrain_cpu.yaml, and `encoder_blr auto` picks the measured
encoder rate by whether the encoder is pretrained, written as a number into the run's config.yaml."""
from pathlib import Path

import pytest
import yaml

from core.cli import parse_config
from core.config import load_config, save_config, to_dict
from finetune.config import FinetuneConfig
from finetune.recipe import PRETRAINED_ENCODER_BLR, SCRATCH_ENCODER_BLR
from pretrain.config import PretrainConfig

ROOT = Path(__file__).resolve().parents[1]
LAUNCH = ROOT / "launch"

# Settings that change how a run is reported or how fast it goes, not what it learns.
NOT_RECIPE = {"n_boot", "explain", "num_workers", "log_every", "ckpt_every", "keep_ckpts", "preview_every"}


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {prefix + k: v})
    return out


def _differences(cls, yaml_name: str) -> dict:
    default, preset = _flat(to_dict(cls())), _flat(to_dict(load_config(cls, LAUNCH / yaml_name)))
    return {k: (default[k], preset[k]) for k in default
            if default[k] != preset[k] and k.rsplit(".", 1)[-1] not in NOT_RECIPE}


def test_finetune_defaults_are_the_measured_recipe():
    # crop_mm: the YAML's 40 mm for scratch; unset, a pretrained encoder's own lesion view (40 mm for the recipe's)
    assert _differences(FinetuneConfig, "finetune_tiny_cpu.yaml") == {"crop_mm": (None, 40.0)}


def test_pretrain_defaults_are_the_measured_recipe():
    diff = _differences(PretrainConfig, "pretrain_cpu.yaml")
    # one ratio for every level is the YAML's two equal ratios
    assert diff == {"model.masks.mask_ratio": ([0.75], [0.75, 0.75])}
    assert PretrainConfig().input_spec() == load_config(PretrainConfig, LAUNCH / "pretrain_cpu.yaml").input_spec()


def test_the_benchmark_that_measured_it_ran_these_defaults():
    """ssl_gain's cpu preset made RESULTS' headline numbers: its epochs, folds and pretrained rate are the defaults."""
    from benchmarks.research.ssl_gain.presets import PRESETS
    cpu, cfg = PRESETS["cpu"], FinetuneConfig()
    assert (cpu.epochs, cpu.folds, cpu.patience) == (cfg.epochs, cfg.folds, cfg.patience)
    assert cpu.pretrained_encoder_blr == PRETRAINED_ENCODER_BLR
    assert cpu.pretrain_config == "pretrain_cpu.yaml" and cpu.finetune_config == "finetune_tiny_cpu.yaml"


@pytest.mark.parametrize("pretrained, rate", [(True, PRETRAINED_ENCODER_BLR), (False, SCRATCH_ENCODER_BLR)])
def test_encoder_blr_auto_is_resolved_into_the_saved_config(tmp_path, monkeypatch, pretrained, rate):
    """`python -m finetune --config launch/finetune_tiny_cpu.yaml --encoder_blr auto [--pretrained ENC]`: the
    config the run gets, and the config.yaml it writes, hold the number."""
    import finetune.train as train
    seen = []
    monkeypatch.setattr(train, "run", seen.append)
    argv = ["--config", str(LAUNCH / "finetune_tiny_cpu.yaml"), "--encoder_blr", "auto", "--manifest", "m.csv"]
    assert train.main(argv + (["--pretrained", str(tmp_path / "enc")] if pretrained else [])) == 0
    cfg = seen[0]
    assert cfg.encoder_blr == rate
    save_config(cfg, tmp_path / "config.yaml")  # what finetune.train.run writes
    saved = yaml.safe_load((tmp_path / "config.yaml").read_text())
    assert saved["encoder_blr"] == rate
    assert load_config(FinetuneConfig, tmp_path / "config.yaml").encoder_blr == rate  # a rerun from it agrees


def test_encoder_blr_auto_is_the_default_and_a_number_wins():
    assert FinetuneConfig().encoder_blr == SCRATCH_ENCODER_BLR
    assert FinetuneConfig(pretrained="enc").encoder_blr == PRETRAINED_ENCODER_BLR
    cfg, _ = parse_config(FinetuneConfig, ["--pretrained", "enc", "--encoder_blr", "1e-3"])
    assert cfg.encoder_blr == 1e-3
    for name in ("finetune_tiny_cpu.yaml", "finetune_base_gpu.yaml"):
        assert yaml.safe_load((LAUNCH / name).read_text())["encoder_blr"] == "auto"


def test_help_says_the_defaults_are_the_recipe(capsys):
    for cls, yaml_name in ((FinetuneConfig, "finetune_tiny_cpu.yaml"), (PretrainConfig, "pretrain_cpu.yaml")):
        with pytest.raises(SystemExit):
            parse_config(cls, ["--help"], prog="mimfm")
        text = " ".join(capsys.readouterr().out.split())
        assert f"The defaults are the measured recipe of launch/{yaml_name}" in text
    with pytest.raises(SystemExit):
        parse_config(FinetuneConfig, ["--help"], prog="mimfm")
    text = " ".join(capsys.readouterr().out.split())
    assert "--encoder_blr FLOAT|auto" in text and "(default: auto)" in text
