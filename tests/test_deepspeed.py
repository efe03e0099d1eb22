"""DeepSpeed through the shipped configs, as a cluster user runs it, on 2 CPU ranks over gloo.

Every run is `accelerate launch --config_file launch/accelerate/deepspeed_zero{2,3}.yaml --num_processes 2`
with nothing else changed: two real ranks with their own data, written once; stop and resume equal to an
uninterrupted run bit for bit; ZeRO against DDP; the exports against the checkpoint and the engine.
"""
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from core.errors import ConfigError
from ds_reference import HALF, ROOT, STEPS, launch, losses, pretrain_command, run_env, run_to_end, weights
from engine.distributed import check_deepspeed_json, configure_deepspeed


@pytest.fixture(scope="module")
def runs(ds_runs):
    """DDP, and per ZeRO stage an uninterrupted run and the chain of the same configuration (stopped at half,
    resumed and killed, resumed to the end): the session's shared runs."""
    out = {"ddp": ds_runs.full("ddp")}
    for stage in (2, 3):
        out[stage], out[f"{stage}_chain"] = ds_runs.full(f"deepspeed_zero{stage}"), ds_runs.chain(stage)
        out[f"{stage}_cut"] = out[f"{stage}_chain"].run
    return out


@pytest.mark.parametrize("stage", [2, 3])
def test_zero_runs_on_two_ranks_and_writes_once(runs, stage):
    run = runs[stage]
    ckpt = run / "checkpoints" / f"ckpt-{STEPS:07d}"
    assert json.loads((ckpt / "summary.json").read_text())["world_size"] == 2
    # each rank saved its own optimizer shard: two real DeepSpeed ranks
    shards = sorted(p.name for p in (ckpt / "pytorch_model").glob("*optim_states.pt"))
    assert len(shards) == 2 and "rank_0" in shards[0] and "rank_1" in shards[1], shards
    rows = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert rows == list(range(1, STEPS + 1))  # logged by one rank, once
    assert not list((run / "checkpoints").glob(".tmp-*"))


@pytest.mark.parametrize("stage", [2, 3])
def test_zero_resume_equals_uninterrupted(runs, stage):
    chain = runs[f"{stage}_chain"]
    assert not chain.encoder_after_stop  # --stop_at is no end of the run: nothing exported
    assert f"resumed from {chain.run / 'checkpoints' / f'ckpt-{HALF:07d}'}" in chain.killed_log
    a, b = weights(runs[stage]), weights(runs[f"{stage}_cut"])
    assert a.keys() == b.keys()
    assert [k for k in a if not torch.equal(a[k], b[k])] == []  # bit for bit
    assert losses(runs[stage]) == losses(runs[f"{stage}_cut"])


def test_zero_checkpoint_resumed_on_other_ranks_is_one_line(runs, synth_cohort):
    run = runs["2_cut"]
    before = {p: p.stat().st_mtime_ns for p in run.rglob("*") if p.is_file()}
    cmd, env = pretrain_command("deepspeed_zero2", synth_cohort, run, "--resume", "auto", "--max_steps",
                                str(2 * STEPS), processes=1, tee=False)
    res = run_to_end(cmd, env, ok=False)
    errors = [line for line in res.stderr.splitlines() if line.startswith("error: ")]
    assert errors == [f"error: {run / 'checkpoints' / f'ckpt-{STEPS:07d}'}: written by 2 DeepSpeed ranks, this run "
                      "has 1; resume it with --num_processes 2 (ZeRO shards the optimizer state per rank)"]
    assert before == {p: p.stat().st_mtime_ns for p in run.rglob("*") if p.is_file()}  # nothing written


@pytest.mark.parametrize("stage", [2, 3])
def test_zero_matches_ddp(runs, stage):
    # Same seed, global batch and clipping. Only the order of the gradient reductions differs (DDP's
    # all-reduce buckets against ZeRO's reduce-scatter), so fp32 rounding is all that may differ:
    # measured at most 3e-7 relative over these 20 steps.
    zero, ddp = np.array(losses(runs[stage])), np.array(losses(runs["ddp"]))
    assert len(zero) == len(ddp) == STEPS
    np.testing.assert_allclose(zero, ddp, rtol=1e-5)
    assert zero[-5:].mean() < zero[:5].mean()  # and it trains


@pytest.mark.parametrize("stage", [2, 3])
def test_zero_export_equals_the_gathered_checkpoint(runs, stage):
    from models.vit3d import ViT3D
    encoder = ViT3D.from_pretrained(runs[stage] / "encoder")  # strict
    full = weights(runs[stage])
    for k, v in encoder.state_dict().items():
        assert torch.equal(v, full["encoder." + k]), k
    assert full["encoder.pos_embed"].abs().sum() > 0  # a frozen ZeRO-3 parameter, gathered too


@pytest.fixture(scope="module")
def engines(runs, tmp_path_factory):
    """Per ZeRO stage, tests/zero_helper.py launched with the shipped YAML: each rank's view of the run,
    and the encoder's output from the newest checkpoint restored into the engine."""
    out = {}
    for stage in (2, 3):
        out[stage] = tmp_path_factory.mktemp(f"engine{stage}")
        launch(f"deepspeed_zero{stage}", str(ROOT / "tests" / "zero_helper.py"), str(runs[stage]), str(out[stage]))
    return out


@pytest.mark.parametrize("stage", [2, 3])
def test_shipped_yaml_builds_two_ranks_with_their_own_data(engines, stage):
    rows = [json.loads((engines[stage] / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["process_index"] for r in rows] == [0, 1] and [r["main"] for r in rows] == [True, False]
    for r in rows:
        assert r["num_processes"] == r["world_size"] == 2 and r["backend"] == "gloo"
        assert r["distributed_type"].endswith("DEEPSPEED")
    assert not set(rows[0]["items"]) & set(rows[1]["items"])
    assert sorted(rows[0]["items"] + rows[1]["items"]) == list(range(10))


@pytest.mark.parametrize("stage", [2, 3])
def test_exports_give_the_engines_outputs(runs, engines, stage, tmp_path):
    """The encoder as the ZeRO engine holds it (restored from its own shards, weights gathered) against
    the HF folder and the MONAI export, each loaded strictly."""
    from monai.networks.nets import ViT

    from models.export import main as export
    from models.vit3d import ViT3D
    engine = load_file(str(engines[stage] / "engine.safetensors"))
    hf = ViT3D.from_pretrained(runs[stage] / "encoder").eval()
    ckpt = runs[stage] / "checkpoints" / f"ckpt-{STEPS:07d}"
    assert export(["--checkpoint", str(ckpt), "--out", str(tmp_path / "monai"), "--format", "monai"]) == 0
    monai = ViT(**json.loads((tmp_path / "monai" / "monai_config.json").read_text())).eval()
    monai.load_state_dict(load_file(str(tmp_path / "monai" / "model.safetensors")), strict=True)
    with torch.no_grad():
        assert torch.allclose(hf(engine["x"]), engine["tokens"], atol=1e-6)
        assert torch.allclose(monai(engine["x"])[0], engine["tokens"], atol=5e-6)


def test_finetuning_two_folds_under_zero2(synth_cohort, tmp_path):
    out = tmp_path / "ft"
    launch("deepspeed_zero2", "-m", "finetune", "--config", "launch/finetune_tiny_cpu.yaml",
           "--manifest", str(synth_cohort / "manifest.csv"), "--external", str(synth_cohort / "external.csv"),
           "--output_dir", str(out), "--cache_dir", str(tmp_path / "cache"), "--epochs", "2", "--folds", "2",
           "--n_boot", "20", "--explain", "0", "--model.encoder.depth", "2", "--report_to", "none")
    import pandas as pd
    pred = pd.read_csv(out / "predictions.csv", dtype={"subject_id": str})
    assert not pred.duplicated(["subject_id", "split", "fold"]).any()  # written once, by one rank
    assert sorted(pred.fold.unique()) == [-1, 0, 1]
    for k in (0, 1):  # each fold built, trained and saved its own engine's model
        assert (out / "model" / f"fold{k}" / "model.safetensors").is_file()
        assert json.loads((out / "folds" / f"fold{k}.json").read_text())["fold"] == k
    assert json.loads((out / "metrics.json").read_text())["splits"]["test"]["n"] > 0


# --- what a run refuses in a DeepSpeed JSON, and what it fills -------------------------------------------

def _json(tmp_path, **over):
    config = json.loads((ROOT / "launch" / "deepspeed" / "zero2.json").read_text())
    for key, value in over.items():
        node = config
        *parents, leaf = key.split("__")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(config))
    return path


@pytest.mark.parametrize("over, words", [
    ({"fp16__enabled": True}, "fp16.enabled is true"),
    ({"bf16__enabled": True}, "bf16.enabled is true"),
    ({"zero_optimization__allgather_bucket_size": "auto"}, "zero_optimization.allgather_bucket_size is \"auto\""),
    ({"optimizer": {"type": "AdamW"}}, "remove the 'optimizer' section"),
])
def test_deepspeed_json_a_run_cannot_honour_is_one_line(tmp_path, over, words):
    path = _json(tmp_path, **over)
    with pytest.raises(ConfigError, match=words):
        check_deepspeed_json(path)
    # and from the CLI: one line naming the file, exit 2, before anything is built or written
    env = {**run_env(), "ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_CONFIG_FILE": str(path)}
    res = subprocess.run([sys.executable, "-m", "pretrain", "--data", str(tmp_path), "--output_dir",
                          str(tmp_path / "out")], env=env, cwd=ROOT, capture_output=True, text=True)
    assert res.returncode == 2 and res.stderr.strip().count("\n") == 0, res.stderr
    assert str(path) in res.stderr and words in res.stderr and not (tmp_path / "out").exists()


@pytest.mark.parametrize("over, words", [
    ({"zero_optimization__stage": 0}, "zero_optimization.stage is 0"),
    ({"zero_optimization__compute_grad_norm": False}, "zero_optimization.compute_grad_norm is false"),
])
def test_deepspeed_json_without_the_overflow_check_is_refused(tmp_path, over, words):
    # A non-finite loss skips its step through ZeRO's overflow check (engine/steps.py); without it the
    # spoiled step would be applied.
    with pytest.raises(ConfigError, match=words) as e:
        check_deepspeed_json(_json(tmp_path, **over))
    assert str(tmp_path / "ds.json") in str(e.value) and "\n" not in str(e.value)


def test_shipped_deepspeed_jsons_pass_the_check():
    for name in ("zero2.json", "zero3.json"):
        check_deepspeed_json(ROOT / "launch" / "deepspeed" / name)


class _Fake:
    """Just enough of an Accelerator for configure_deepspeed: state.deepspeed_plugin.deepspeed_config."""

    def __init__(self, config):
        self.state = type("S", (), {"deepspeed_plugin": type("P", (), {"deepspeed_config": config})()})()


@pytest.mark.parametrize("precision, autocast", [("no", False), ("bf16", True)])
def test_configure_deepspeed_fills_the_run_and_the_width(precision, autocast):
    config = json.loads((ROOT / "launch" / "deepspeed" / "zero3.json").read_text())
    configure_deepspeed(_Fake(config), micro_batch=3, clip_grad=2.5, width=96, mixed_precision=precision)
    z = config["zero_optimization"]
    # HF's rule from the model's width: dim^2, 0.9 dim^2, 10 dim
    assert (z["reduce_bucket_size"], z["stage3_prefetch_bucket_size"], z["stage3_param_persistence_threshold"]) \
        == (9216, 8294, 960)
    assert config["train_micro_batch_size_per_gpu"] == 3 and config["gradient_clipping"] == 2.5
    assert config["torch_autocast"] == {"enabled": autocast, "dtype": "bfloat16", "lower_precision_safe_modules": []}
    assert "bf16" not in config and "fp16" not in config  # weights stay fp32: bf16 only inside autocast
