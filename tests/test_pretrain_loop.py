"""The pretraining loop on the built-in synthetic cohort: loss goes down, resume is exact,
two real CPU processes, non-finite losses, and the exported encoder loads strictly."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from core.config import load_config
from engine.steps import TrainingStopped
from pretrain.config import PretrainConfig
from pretrain.train import train

ROOT = Path(__file__).resolve().parents[1]


def tiny_cfg(cohort, out, **over) -> PretrainConfig:
    cfg = load_config(PretrainConfig, ROOT / "launch" / "pretrain_tiny_cpu.yaml")
    cfg.data = str(cohort / "unlabeled")
    cfg.cache_dir = str(out.parent / "cache")
    cfg.output_dir = str(out)
    cfg.mixed_precision = "no"
    cfg.log_every, cfg.preview_every = 1, 0
    cfg.crop_size, cfg.crops_per_volume, cfg.batch_size = 64, 1, 2
    for k, v in over.items():
        setattr(cfg, k, v)
    return cfg


def losses(out, key="train/loss"):
    rows = [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]
    if key == "reconstruction":  # sum of the per-level reconstruction terms
        return [sum(v for k, v in r.items() if k.startswith("train/rec_l")) for r in rows]
    return [r[key] for r in rows]


def test_loss_goes_down_and_encoder_exports(synth_cohort, tmp_path):
    out = tmp_path / "run"
    train(tiny_cfg(synth_cohort, out, max_steps=40, ckpt_every=40))
    ls = losses(out, "reconstruction")
    assert len(ls) == 40
    first, last = sum(ls[:5]) / 5, sum(ls[-5:]) / 5
    # predicting each patch mean scores 1 per level; the model must beat its start clearly
    assert last < 0.97 * first, (first, last)
    # the exported HF folder loads strictly and holds exactly the trained encoder weights
    from models.vit3d import ViT3D
    enc = ViT3D.from_pretrained(out / "encoder")
    full = load_file(str(out / "checkpoints" / "ckpt-0000040" / "weights.safetensors"))
    for k, v in enc.state_dict().items():
        assert torch.equal(v, full["encoder." + k]), k
    cfg = json.loads((out / "encoder" / "config.json").read_text())
    from models.input_spec import load_input_spec
    spec = load_input_spec(out / "encoder")  # the input contract travels with the encoder
    assert cfg["model_type"] and spec.prep.spacing == (2.0, 2.0, 2.0) and spec.channels == ("image",)
    run = load_config(PretrainConfig, out / "config.yaml")
    assert spec.view.centre == "random" and spec.view.crop_mm == run.crop_size * 2.0
    assert spec.input_size == run.model.encoder.img_size


def test_resume_equals_uninterrupted(synth_cohort, tmp_path):
    # grad_accum 2 with 4 volumes / batch 2 makes the resume point fall mid-epoch
    kw = dict(max_steps=6, ckpt_every=3, grad_accum=2, batch_size=1)
    train(tiny_cfg(synth_cohort, tmp_path / "full", **kw))
    train(tiny_cfg(synth_cohort, tmp_path / "cut", stop_at=3, **kw))            # "crashes" after step 3
    assert not (tmp_path / "cut" / "encoder").exists()
    train(tiny_cfg(synth_cohort, tmp_path / "cut", resume="auto", **kw))
    a = load_file(str(tmp_path / "full" / "checkpoints" / "ckpt-0000006" / "weights.safetensors"))
    b = load_file(str(tmp_path / "cut" / "checkpoints" / "ckpt-0000006" / "weights.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert losses(tmp_path / "full") == losses(tmp_path / "cut")  # log has no duplicate steps either


def test_nonfinite_losses_stop_the_run_and_keep_the_last_good_checkpoint(synth_cohort, tmp_path, monkeypatch):
    import models.mim as mim
    out = tmp_path / "nan"
    train(tiny_cfg(synth_cohort, out, max_steps=2, ckpt_every=2))
    real_forward = mim.mim_losses

    def nan_forward(outputs, levels, config):
        res = real_forward(outputs, levels, config)
        res["loss"] = res["loss"] * float("nan")
        return res
    monkeypatch.setattr(mim, "mim_losses", nan_forward)
    with pytest.raises(TrainingStopped, match="3 consecutive skipped optimizer steps"):
        train(tiny_cfg(synth_cohort, out, max_steps=10, ckpt_every=1, max_nonfinite=3, resume="auto"))
    ckpts = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert ckpts[-1] == "ckpt-0000004"  # steps 3-4 were skipped (counted), step 5 stopped the run
    state = json.loads((out / "checkpoints" / "ckpt-0000004" / "trainer_state.json").read_text())
    assert state["nonfinite"]["total"] == 2


def test_two_process_cpu_run(synth_cohort, tmp_path):
    out = tmp_path / "ddp"
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--main_process_port", "29533",
           "-m", "pretrain", "--config", str(ROOT / "launch" / "pretrain_tiny_cpu.yaml"),
           "--data", str(synth_cohort / "unlabeled"), "--output_dir", str(out), "--cache_dir", str(tmp_path / "cache"),
           "--max_steps", "2", "--ckpt_every", "2", "--batch_size", "1", "--crops_per_volume", "1",
           "--crop_size", "64", "--preview_every", "0", "--mixed_precision", "no"]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert res.returncode == 0, res.stderr[-3000:]
    summary = json.loads((out / "checkpoints" / "ckpt-0000002" / "summary.json").read_text())
    assert summary["world_size"] == 2
    assert (out / "encoder" / "model.safetensors").is_file()
    # both ranks resume from the DDP checkpoint (accelerate's wrapped-key state loads strictly)
    cmd[cmd.index("--max_steps") + 1] = "3"
    res = subprocess.run(cmd + ["--resume", "auto"], env=env, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "resumed from" in res.stdout
    assert json.loads((out / "checkpoints" / "ckpt-0000003" / "summary.json").read_text())["step"] == 3


def test_bad_data_path_is_one_line_exit_2(tmp_path):
    res = subprocess.run([sys.executable, "-m", "pretrain", "--data", str(tmp_path / "nope"),
                          "--output_dir", str(tmp_path / "o")], capture_output=True, text=True, cwd=ROOT)
    assert res.returncode == 2
    assert res.stderr.strip().count("\n") == 0 and "nope" in res.stderr


def test_lesion_views_from_candidates_train_and_set_the_encoder_contract(synth_cohort, tmp_path):
    """The unlabeled folder has no masks: views centre on label-free candidates, and the encoder's
    contract records level 2's lesion-view scale, which fine-tuning then defaults to."""
    out = tmp_path / "lesion"
    cfg = tiny_cfg(synth_cohort, out, max_steps=2, ckpt_every=2, crop_size=40, lesion_view_fraction=1.0)
    train(cfg)
    from models.input_spec import load_input_spec
    spec = load_input_spec(out / "encoder")
    g, c = cfg.model.encoder.grid, cfg.model.masks.child_patches
    assert spec.view.centre == "lesion" and spec.view.crop_mm == pytest.approx(40 * 2.0 * c / g)  # 40 mm
    cached = list((out.parent / "cache").rglob("candidates-*.json"))
    assert len(cached) == 4  # one per unlabeled volume, reused by later runs
    assert any(json.loads(p.read_text())["centres"] for p in cached)
    from finetune.config import FinetuneConfig
    from finetune.train import resolve_inputs
    _, ft_spec = resolve_inputs(FinetuneConfig(pretrained=str(out / "encoder")))
    assert ft_spec.view.crop_mm == spec.view.crop_mm and ft_spec.view.centre == "lesion"


class _Views(torch.utils.data.Dataset):
    """PretrainCrops-like items, fixed per index: two 24^3 views and one anchor each."""

    def __len__(self):
        return 6

    def __getitem__(self, i):
        g = torch.Generator().manual_seed(i)
        anchors = torch.tensor([[6.0, 6.0, 6.0], [float("nan")] * 3])  # [2, 3]: view 0 on a "lesion"
        return {"crops": torch.rand(2, 1, 24, 24, 24, generator=g), "anchors": anchors, "index": i}


def test_the_cpu_wrapper_of_crops_and_levels_equals_a_direct_build():
    # HierarchyCollate (benchmarks.research.pretrain_heldout's held-out batches) gives for micro-batch m exactly
    # build_hierarchy on that batch's views with the micro-batch's own generator, and their loss targets.
    # Training's own path (CropCollate in the workers, LevelBuilder in the loop) is tests/test_device_hierarchy.py's.
    from engine.steps import reseed_torch
    from models.mim import MiMConfig, patch_targets
    from models.mim_masks import MaskConfig, build_hierarchy
    from models.vit3d import ViT3DConfig
    from pretrain.batches import HierarchyCollate
    masks, rank, seed = MaskConfig(levels=3), 1, 7
    model = MiMConfig(encoder=ViT3DConfig(img_size=16, patch_size=4, dim=24, depth=1, heads=2), masks=masks)
    data = _Views()
    collate = HierarchyCollate(model, seed, rank)
    for m, indices in [(1, [3, 0]), (2, [5, 1])]:
        items = [data[i] for i in indices]
        batch = collate(m, items)
        assert batch["index"].tolist() == indices
        crops = torch.cat([it["crops"] for it in items])      # [B * 2, 1, 24, 24, 24]
        anchors = torch.cat([it["anchors"] for it in items])  # [B * 2, 3]
        direct = build_hierarchy(crops, masks, 4, 16, reseed_torch(seed, m, rank), anchors=anchors)
        for lvl in direct:  # and the loss target of each level
            lvl.target = patch_targets(lvl.x, 4, model.norm_pix_loss)
        assert len(batch["levels"]) == 3
        for got, want in zip(batch["levels"], direct):
            for k, v in want.__dict__.items():
                if v is None:
                    assert getattr(got, k) is None, k
                else:
                    assert torch.equal(getattr(got, k), v) or (v.is_floating_point() and torch.allclose(
                        getattr(got, k), v, rtol=0, atol=0, equal_nan=True)), (m, k)


def test_pretraining_logs_how_long_the_step_waits_for_data(synth_cohort, tmp_path):
    out = tmp_path / "wait"
    train(tiny_cfg(synth_cohort, out, max_steps=4, ckpt_every=4, num_workers=1))
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 4
    for r in rows:
        assert 0.0 <= r["train/data_wait"] < 1.0 and r["train/step_s"] > 0 and r["train/hierarchy_s"] > 0
