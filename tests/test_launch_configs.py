"""Launch configs: each DeepSpeed YAML points at a JSON a run accepts, with no precision of its own
(accelerate refuses mixed_precision beside a deepspeed_config_file). The YAMLs are run for real, on 2
CPU ranks, in tests/test_deepspeed.py; the SLURM script renders one launch line per node."""
import os
import stat
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
LAUNCH = ROOT / "launch"


def _accel(name):
    return yaml.safe_load((LAUNCH / "accelerate" / name).read_text())


@pytest.mark.parametrize("yaml_name, stage", [("deepspeed_zero2.yaml", 2), ("deepspeed_zero3.yaml", 3)])
def test_deepspeed_json_agrees_with_accelerate_yaml(yaml_name, stage):
    from engine.distributed import FILLED_AUTO, check_deepspeed_json
    acc = _accel(yaml_name)
    assert acc["distributed_type"] == "DEEPSPEED" and "mixed_precision" not in acc
    ds = check_deepspeed_json(ROOT / acc["deepspeed_config"]["deepspeed_config_file"])
    assert ds["zero_optimization"]["stage"] == stage
    # the run fills these; hard-coding them would silently disagree with its flags
    for key in ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "gradient_clipping"):
        assert ds[key] == "auto" and key in FILLED_AUTO
    assert "bf16" not in ds and "fp16" not in ds  # the run's --mixed_precision, as torch autocast


def test_every_accelerate_yaml_is_consistent():
    for path in sorted((LAUNCH / "accelerate").glob("*.yaml")):
        acc = yaml.safe_load(path.read_text())
        assert acc["num_processes"] >= acc["num_machines"], path.name
        assert acc["distributed_type"] in {"NO", "MULTI_GPU", "DEEPSPEED"}, path.name


def test_run_presets_parse_into_their_configs():
    from core.config import load_config
    from finetune.config import FinetuneConfig
    from pretrain.config import PretrainConfig
    for path in sorted(LAUNCH.glob("pretrain_*.yaml")):
        cfg = load_config(PretrainConfig, path)
        assert cfg.model.encoder.img_size % cfg.model.encoder.patch_size == 0
    for path in sorted(LAUNCH.glob("finetune_*.yaml")):
        cfg = load_config(FinetuneConfig, path)
        assert cfg.model.encoder.in_channels == 2


def test_slurm_script_renders_one_launch_per_node(tmp_path):
    """launch/slurm_pretrain.sh on 2 nodes, with fake srun and scontrol on PATH: srun runs the per-node
    command once per node (as SLURM would, with that node's SLURM_PROCID), and a fake accelerate records
    the line it was given."""
    bin_ = tmp_path / "bin"
    bin_.mkdir()
    fakes = {
        # a long host list, as a big job has: a reader that stops at the first line would SIGPIPE it
        "scontrol": 'printf "gpu-a\\ngpu-b\\n"; seq 200000',
        # after its own flag, srun's arguments are the per-node command (bash -c '...'): once per node
        "srun": 'for r in 0 1; do SLURM_PROCID=$r "${@:2}" || exit 1; done',
        "accelerate": 'echo "accelerate $*" >> "$LAUNCH_LOG"',
    }
    for name, body in fakes.items():
        (bin_ / name).write_text(f"#!/usr/bin/env bash\n{body}\n")
        (bin_ / name).chmod(stat.S_IRWXU)
    env = {**os.environ, "PATH": f"{bin_}:{os.environ['PATH']}", "SLURM_JOB_NODELIST": "gpu-[a-b]",
           "SLURM_NNODES": "2", "LAUNCH_LOG": str(tmp_path / "launch.log")}
    res = subprocess.run(["bash", str(LAUNCH / "slurm_pretrain.sh"), "--config", "launch/pretrain_base_gpu.yaml",
                          "--data", "/data/ct"], cwd=ROOT, env=env, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    lines = (tmp_path / "launch.log").read_text().splitlines()
    assert len(lines) == 2
    for rank, line in enumerate(lines):
        args = line.split()
        value = lambda flag: args[args.index(flag) + 1]  # noqa: E731
        assert value("--config_file") == "launch/accelerate/deepspeed_zero2.yaml"
        assert (value("--num_machines"), value("--num_processes"), value("--machine_rank")) == ("2", "16", str(rank))
        assert (value("--main_process_ip"), value("--main_process_port")) == ("gpu-a", "29500")
        assert args[args.index("-m"):] == ["-m", "pretrain", "--resume", "auto", "--config",
                                           "launch/pretrain_base_gpu.yaml", "--data", "/data/ct"]
        # what accelerate makes of that line: one torchrun of 8 ranks on this node, joined to the other
        # node's through gpu-a (not DeepSpeed's pdsh launcher, which would ssh out from the first node)
        torchrun = _accelerate_per_node(args[2:])  # after "accelerate launch"
        assert torchrun == {"cmd": None, "nproc_per_node": "8", "nnodes": "2", "node_rank": rank,
                            "rdzv_endpoint": "gpu-a:29500", "rdzv_backend": "static"}


def _accelerate_per_node(argv: list[str]) -> dict:
    """How `accelerate launch argv` would start this node's ranks (accelerate's own parsing, nothing run)."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_deepspeed_cmd_env
    args, defaults, mp_from_config = _validate_launch_command(launch_command_parser().parse_args(argv))
    assert args.use_deepspeed
    args.deepspeed_fields_from_accelerate_config = ",".join(list(defaults.deepspeed_config) +
                                                            (["mixed_precision"] if mp_from_config else []))
    cmd, _ = prepare_deepspeed_cmd_env(args)
    return {"cmd": cmd, **{k: getattr(args, k, None) for k in
                           ("nproc_per_node", "nnodes", "node_rank", "rdzv_endpoint", "rdzv_backend")}}


def _header(path: Path) -> str:
    """The comment block a YAML opens with, as one line."""
    lines = []
    for line in path.read_text().splitlines():
        if not line.startswith("#"):
            break
        lines.append(line.lstrip("#").strip())
    return " ".join(lines)


def test_gpu_pretraining_carries_the_measured_recipe_scaled():
    """launch/pretrain_base_gpu.yaml keeps what the probe chose on the CPU (lesion views at 0.75, 2 levels, the
    alignment weight) and the scales in mm (level 1 about 80 mm of context, the lesion view about 40 mm, which
    fine-tuning then crops at), on ViT-B's 6^3 token grid."""
    from core.config import load_config
    from pretrain.config import PretrainConfig
    cpu = load_config(PretrainConfig, LAUNCH / "pretrain_cpu.yaml")
    gpu = load_config(PretrainConfig, LAUNCH / "pretrain_base_gpu.yaml")
    assert gpu.lesion_view_fraction == cpu.lesion_view_fraction == 0.75
    assert gpu.lesion_view_level == cpu.lesion_view_level
    assert gpu.model.masks.levels == cpu.model.masks.levels == 2
    assert gpu.model.align_weight == cpu.model.align_weight
    # a child covers the same share of its parent's edge (2 of 4 patches on the CPU, 3 of 6 on ViT-B)
    assert (gpu.model.masks.child_patches / gpu.model.encoder.grid
            == cpu.model.masks.child_patches / cpu.model.encoder.grid)
    level1 = lambda cfg: cfg.crop_size * cfg.prep.spacing[0]  # noqa: E731
    assert level1(gpu) == pytest.approx(level1(cpu), rel=0.05)
    assert gpu.input_spec().view.centre == "lesion"
    assert gpu.input_spec().view.crop_mm == pytest.approx(cpu.input_spec().view.crop_mm, rel=0.05)


@pytest.mark.parametrize("name", ["pretrain_base_gpu.yaml", "finetune_base_gpu.yaml"])
def test_gpu_presets_say_what_was_measured_and_what_is_extrapolated(name):
    header = _header(LAUNCH / name).lower()
    assert "not yet run" in header and "measured" in header and "extrapolated" in header


@pytest.mark.parametrize("name", ["pretrain_cpu.yaml", "finetune_tiny_cpu.yaml"])
def test_cpu_recipes_say_they_were_measured(name):
    assert "measured" in _header(LAUNCH / name).lower()


def test_finetune_recipe_yaml_runs_the_epochs_results_report():
    """RESULTS' numbers were fine-tuned 3 folds x 20 epochs, averaging from epoch 5 (ssl_gain's cpu preset)."""
    import yaml
    recipe = yaml.safe_load((LAUNCH / "finetune_tiny_cpu.yaml").read_text())
    assert (recipe["folds"], recipe["epochs"], recipe["min_epochs"]) == (3, 20, 5)
