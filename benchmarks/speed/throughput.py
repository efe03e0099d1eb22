"""The speed table of the whole product: pretraining, fine-tuning, inference and data loading.

    python -m benchmarks.speed.throughput [--device cpu|cuda] [--preset tiny|base] [--repeats 5] [--write-docs]

- pretraining: our MiM training step and its peak memory (benchmarks.speed.pretrain's runner, preset
  launch/pretrain_<preset>*.yaml, the preset's batch);
- fine-tuning: one training step (forward, BCE, backward, grad clipping, AdamW) of MultimodalModel
  with fusion "concat" on a two-channel [image, mask] input plus a clinical vector, batch 8, encoder
  from launch/finetune_<preset>*.yaml;
- inference: the same model in eval mode without gradients, batch 8;
- data: benchmarks.speed.loader's reads (.nii.gz vs the .npy cache) at a smaller size.

The model rows are timed as pretrain_speed times its rows (on CPU: one process each, round-robin).
On CUDA everything runs under bf16 autocast.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.common import (Runner, Table, add_run_args, command_line, format_memory, measure, memory_note,
                               resolve_device, run_and_report, sync)
from benchmarks.speed import loader as loader_speed
from benchmarks.speed.pretrain import PRESETS as PRETRAIN_PRESETS
from benchmarks.speed.pretrain import RUNNER as PRETRAIN_RUNNER
from benchmarks.speed.pretrain import Row, load_preset, spec_for, subvolumes_per_crop
from core.config import load_config
from core.errors import cli_entry
from models.tasks import CLASSIFICATION

ROOT = Path(__file__).resolve().parents[2]
FINETUNE_PRESETS = {"tiny": ROOT / "launch" / "finetune_tiny_cpu.yaml", "cpu": ROOT / "launch" / "finetune_tiny_cpu.yaml",
                    "base": ROOT / "launch" / "finetune_base_gpu.yaml"}
FINETUNE_RUNNER = "benchmarks.speed.throughput:FinetuneRunner"
CLINICAL_DIM = 10  # clinical features after encoding (a handful of columns, one-hot and missing indicators)


class FinetuneRunner(Runner):
    """Fine-tuning ("train") or inference ("infer") steps of MultimodalModel on random data.
    Spec: config (fine-tuning YAML), mode, batch, device, threads, seed."""

    def __init__(self, spec: dict):
        from timm.optim import param_groups_weight_decay

        from engine.steps import build_optimizer
        from finetune.config import FinetuneConfig
        from models.multimodal import MultimodalModel
        self.start(spec)
        cfg = load_config(FinetuneConfig, spec["config"])
        self.model_cfg = dataclasses.replace(cfg.model, fusion="concat", task=CLASSIFICATION.name,
                                             clinical_dim=CLINICAL_DIM)
        enc = self.model_cfg.encoder
        self.model = MultimodalModel(self.model_cfg).to(self.device)
        self.mode, self.batch, self.clip = spec["mode"], spec["batch"], cfg.optim.clip_grad
        self.amp = self.device.type == "cuda"
        s, b = enc.img_size, self.batch
        self.x = torch.randn(b, enc.in_channels, s, s, s, device=self.device)  # [B, 2, S, S, S] image, mask
        self.x[:, 1] = (self.x[:, 1] > 1.0).float()                          # a binary "lesion mask" channel
        self.clinical = torch.randn(b, CLINICAL_DIM, device=self.device)     # [B, F]
        self.y = (torch.arange(b, device=self.device) % 2).float()            # [B]
        if self.mode == "train":
            self.model.train()
            groups = param_groups_weight_decay(self.model, cfg.optim.weight_decay,
                                               no_weight_decay_list=self.model.no_weight_decay())
            self.optimizer = build_optimizer(groups, cfg.optim)
        else:
            self.model.eval()

    def step(self) -> dict[str, float]:
        sync(self.device)
        t = time.perf_counter()
        if self.mode == "train":
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp):
                logit = self.model(self.x, self.clinical)["logit"]  # [B]
            loss = torch.nn.functional.binary_cross_entropy_with_logits(logit.float(), self.y)
            loss.backward()
            if self.clip:
                torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.clip)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        else:
            with torch.inference_mode(), torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp):
                self.model(self.x, self.clinical)
        sync(self.device)
        return {"step": time.perf_counter() - t}

    def info(self) -> dict:
        return {"volumes": self.batch}


def loader_rows(size: int, n: int, repeats: int, workers: int) -> list[tuple[str, str, float]]:
    """(label, what, volumes/s) from benchmarks.speed.loader's readers on n synthetic size^3 volumes."""
    ls = loader_speed
    with tempfile.TemporaryDirectory(prefix="throughput_loader_") as tmp:
        nii, npy = ls.make_files(Path(tmp), size, n)
        rows = [("data: cache (.npy), 1 process", "read into a float32 tensor",
                 ls.serial_rate(npy, ls.read_cache, repeats)),
                ("data: .nii.gz, 1 process", "decode into a float32 tensor",
                 ls.serial_rate(nii, ls.read_nii, repeats))]
        if workers > 0:
            what = f"DataLoader, {workers} workers, read in the worker"
            rows += [("data: cache (.npy), DataLoader", what,
                      ls.loader_rate(npy, ls.read_cache_in_worker, repeats, workers)),
                     ("data: .nii.gz, DataLoader", what,
                      ls.loader_rate(nii, ls.read_nii_in_worker, repeats, workers))]
    return rows


def parse_args(argv=None):
    p = argparse.ArgumentParser(allow_abbrev=False, prog="python -m benchmarks.speed.throughput", description=__doc__.split("\n\n")[0])
    add_run_args(p, rows="model row")
    p.add_argument("--preset", choices=sorted(PRETRAIN_PRESETS), default=None,
                   help="model sizes (default: tiny on CPU, base on CUDA)")
    p.add_argument("--pretrain-batch", type=int, default=0,
                   help="level-1 crops per pretraining step (default: the preset's)")
    p.add_argument("--crop-size", type=int, default=0, help="pretraining level-1 crop edge (default: the preset's)")
    p.add_argument("--batch", type=int, default=8, help="fine-tuning and inference batch")
    p.add_argument("--loader-size", type=int, default=96, help="data rows: volume side in voxels")
    p.add_argument("--loader-n", type=int, default=8, help="data rows: number of volumes")
    p.add_argument("--loader-repeats", type=int, default=3)
    p.add_argument("--loader-workers", type=int, default=None, help="data rows: DataLoader workers (default nproc)")
    args = p.parse_args(argv)
    args.device = resolve_device(args.device)
    args.preset = args.preset or ("base" if args.device == "cuda" else "tiny")
    if args.loader_workers is None:
        args.loader_workers = os.cpu_count() or 1
    return args


def run(args) -> Table:
    cpu = args.device == "cpu"
    isolated = cpu and args.isolate
    pcfg = load_preset(PRETRAIN_PRESETS[args.preset])
    level1 = args.pretrain_batch or pcfg.batch_size * pcfg.crops_per_volume
    crop = args.crop_size or pcfg.crop_size
    mim_row = Row("pretraining", "mim", pcfg.model.masks.levels)
    ft = {"config": str(FINETUNE_PRESETS[args.preset]), "batch": args.batch, "device": args.device,
          "threads": args.threads, "seed": 0}
    contenders = {
        "pretraining": (PRETRAIN_RUNNER, spec_for(mim_row, pcfg.model, level1, config=PRETRAIN_PRESETS[args.preset],
                                                  device=args.device, crop_size=args.crop_size,
                                                  threads=args.threads)),
        "fine-tuning": (FINETUNE_RUNNER, {**ft, "mode": "train"}),
        "inference": (FINETUNE_RUNNER, {**ft, "mode": "infer"}),
    }
    res = measure(contenders, args.repeats, args.warmup, isolate=isolated, interleave=cpu, progress=not args.quiet)
    loader = loader_rows(args.loader_size, args.loader_n, args.loader_repeats, args.loader_workers)

    from finetune.config import FinetuneConfig
    fenc = load_config(FinetuneConfig, FINETUNE_PRESETS[args.preset]).model.encoder
    penc, masks = pcfg.model.encoder, pcfg.model.masks
    table = Table(["stage", "what is timed", "batch", "median ms", "throughput", "peak memory MiB"])
    m = res["pretraining"]
    n = m.info["subvolumes"]
    table.add(f"pretraining (MiM, L={masks.levels})",
              "fwd + bwd + AdamW; hierarchy + targets built beside it (loader thread)",
              f"{level1} crops of {crop}^3 -> {n} sub-vols of {penc.img_size}^3",
              f"{m.median() * 1e3:.0f}", f"{n / m.median():.1f} sub-vol/s",
              format_memory(m.memory, args.device, isolated))
    vol = f"{args.batch} x [{fenc.in_channels}, {fenc.img_size}^3] + {CLINICAL_DIM} clinical"
    for name, what in (("fine-tuning", "fwd + bwd + AdamW, fusion concat"), ("inference", "eval, no grad")):
        m = res[name]
        table.add(name, what, vol, f"{m.median() * 1e3:.0f}", f"{args.batch / m.median():.1f} vol/s",
                  format_memory(m.memory, args.device, isolated))
    for label, what, rate in loader:
        table.add(label, what, f"1 x {args.loader_size}^3", f"{1e3 / rate:.1f}", f"{rate:.1f} vol/s", "—")
    table.notes = [
        f"models: pretraining {PRETRAIN_PRESETS[args.preset].name} (encoder dim {penc.dim}, depth {penc.depth}, "
        f"patch {penc.patch_size}^3; decoder dim {pcfg.model.decoder_dim}, depth {pcfg.model.decoder_depth}; "
        f"L={masks.levels}, K={masks.children}: {subvolumes_per_crop(masks)} sub-volumes per level-1 crop); "
        f"fine-tuning/inference {FINETUNE_PRESETS[args.preset].name} (dim {fenc.dim}, depth {fenc.depth}, "
        f"input {fenc.img_size}^3, patch {fenc.patch_size}^3), fusion concat, classification head",
        f"model rows: median of {args.repeats} steps after {args.warmup} warm-up steps, "
        + ("each row in its own process, timed round-robin" if isolated else
           "timed round-robin in one process" if cpu else "rows one after another")
        + ("; fp32" if cpu else "; bf16 autocast"),
        f"data rows: benchmarks.speed.loader's readers, {args.loader_n} synthetic volumes of {args.loader_size}^3 "
        f"from a warm page cache, median of {args.loader_repeats} passes; median ms = 1000 / (vol/s)",
        memory_note(args.device, isolated),
    ]
    return table


@cli_entry
def main(argv=None) -> Table:
    args = parse_args(argv)
    heading = f"Speed table ({'GPU' if args.device == 'cuda' else 'CPU'})"
    return run_and_report(args, run, command_line("benchmarks.speed.throughput", argv), heading)


if __name__ == "__main__":
    main()
