"""Pretraining throughput: our MiM ViT vs MONAI's MaskedAutoEncoderViT at the same sizes, in one run.

    python -m benchmarks.speed.pretrain [--preset tiny|base] [--device cpu|cuda] [--repeats 5] [--write-docs]

One training step = forward + loss + backward + gradient clipping + AdamW step, as pretrain/train.py
does it. Ours also builds the MiM hierarchy and its loss targets inside every step, on the step's device, as
pretrain/train.py's loop does (pretrain.batches.LevelBuilder: cut, resize and mask all levels from the
level-1 crops; `loader ms` column). Only the crops come from beside the step: there from DataLoader
workers (pretrain.batches.CropCollate), here from a thread running the same CropCollate for the next step
while this step runs (a benchmark row lives in a daemon process, which may not start DataLoader workers).
A step ends when both are done, so crops slower than the step show as `data wait`. Both models see the
same number of sub-volumes of the encoder input size: a batch of B level-1 crops with L levels and K children
is B (1 + K + ... + K^(L-1)) sub-volumes (B + 2B + 4B for L=3, K=2), so MONAI gets that many volumes.
Our L=1 row (plain MAE) gets the same count of level-1 crops. Sizes come from the pretraining presets
(launch/pretrain_tiny_cpu.yaml, launch/pretrain_base_gpu.yaml): MONAI gets hidden_size=dim,
num_layers=depth, num_heads=heads, mlp_dim=dim*mlp_ratio, masking_ratio 0.75, qkv_bias=True, and our
decoder's width/depth/heads. The loss is the same normalised-pixel MSE on masked patches for both.

On CUDA: bf16 autocast, model FLOPs utilisation (analytic encoder+decoder FLOPs, training = 3x
forward, against the GPU's dense bf16 peak), our rows with and without gradient checkpointing, and the
largest batch that fits (doubling, then bisection on OOM).
"""
from __future__ import annotations

import argparse
import dataclasses
import statistics
import time
from pathlib import Path

import torch

from benchmarks.common import (TRAIN_FLOPS_PER_FORWARD, Measured, Runner, Table, add_run_args, command_line,
                               format_flops, format_memory, mae_forward_flops, measure, memory_note, paired_ratio,
                               peak_bf16_flops, release_memory, resolve_device, run_and_report, sync)
from core.config import load_config
from core.errors import cli_entry

ROOT = Path(__file__).resolve().parents[2]
PRESETS = {"tiny": ROOT / "launch" / "pretrain_tiny_cpu.yaml", "cpu": ROOT / "launch" / "pretrain_cpu.yaml",
           "base": ROOT / "launch" / "pretrain_base_gpu.yaml"}
RUNNER = "benchmarks.speed.pretrain:PretrainRunner"
MONAI = "MONAI MaskedAutoEncoderViT"
MONAI_SDPA = "MONAI MaskedAutoEncoderViT, SDPA"


def load_preset(path):
    from pretrain.config import PretrainConfig
    return load_config(PretrainConfig, path)


def mim_config(model, levels: int, grad_checkpointing: bool = False):
    """The preset's MiMConfig with `levels` levels (1 = plain MAE: first mask ratio and level weight)."""
    enc = dataclasses.replace(model.encoder, grad_checkpointing=grad_checkpointing)
    if levels == model.masks.levels:
        return dataclasses.replace(model, encoder=enc)
    masks = dataclasses.replace(model.masks, levels=levels, mask_ratio=model.masks.mask_ratio[:1])
    return dataclasses.replace(model, encoder=enc, masks=masks, level_weights=model.level_weights[:1])


def subvolumes_per_crop(masks) -> int:
    """Sub-volumes a level-1 crop brings to the encoder: 1 + K + ... + K^(L-1)."""
    return sum(masks.children**lvl for lvl in range(masks.levels))


def monai_mae(model, sdpa: bool = False):
    """MONAI's MAE at the sizes of our MiMConfig `model` (sdpa: its attention blocks use F.scaled_dot_product_attention)."""
    from monai.networks.nets import MaskedAutoEncoderViT
    enc = model.encoder
    net = MaskedAutoEncoderViT(
        in_channels=enc.in_channels, img_size=enc.img_size, patch_size=enc.patch_size, hidden_size=enc.dim,
        mlp_dim=int(enc.dim * enc.mlp_ratio), num_layers=enc.depth, num_heads=enc.heads,
        masking_ratio=model.masks.ratios()[0], decoder_hidden_size=model.decoder_dim,
        decoder_mlp_dim=int(model.decoder_dim * enc.mlp_ratio), decoder_num_layers=model.decoder_depth,
        decoder_num_heads=model.decoder_heads, proj_type="conv", pos_embed_type="sincos",
        decoder_pos_embed_type="sincos", qkv_bias=True,
    )
    if sdpa:  # MONAI builds these blocks without use_flash_attention; the flag is read in forward
        for m in net.modules():
            if hasattr(m, "use_flash_attention"):
                m.use_flash_attention = True
    return net


def forward_flops(model, monai: bool) -> float:
    """Analytic forward FLOPs per sub-volume (MONAI carries a class token through encoder and decoder)."""
    from models.mim_masks import masked_count
    enc = model.encoder
    n = enc.num_patches
    return mae_forward_flops(
        num_patches=n, visible=n - masked_count(model.masks.ratios()[0], n),
        patch_values=enc.patch_size**3 * enc.in_channels, dim=enc.dim, depth=enc.depth,
        mlp_dim=int(enc.dim * enc.mlp_ratio), decoder_dim=model.decoder_dim, decoder_depth=model.decoder_depth,
        decoder_mlp_dim=int(model.decoder_dim * enc.mlp_ratio), extra_tokens=1 if monai else 0)


class PretrainRunner(Runner):
    """One contender, built from a picklable spec:
    config (preset path), kind ("mim" | "monai" | "monai_sdpa"), levels, batch (level-1 crops for "mim",
    volumes for MONAI), crop_size, device, amp, grad_checkpointing, threads, seed."""

    def __init__(self, spec: dict):
        # Everything either kind needs is imported before the idle RSS is read, so "growth" is the same
        # thing (weights, optimizer state, data, activations) for every row.
        import monai.networks.nets  # noqa: F401
        from timm.optim import param_groups_weight_decay

        import models.mim_masks  # noqa: F401
        from engine.steps import build_optimizer
        from models.mim import MiMModel
        self.start(spec)
        cfg = load_preset(spec["config"])
        self.kind = spec["kind"]
        self.model_cfg = mim_config(cfg.model, spec.get("levels", cfg.model.masks.levels),
                                    spec.get("grad_checkpointing", False))
        if spec.get("distill"):  # self-distillation beside reconstruction (models/distill.py), its defaults
            from models.distill import DistillConfig  # spec["distill"]: what the teacher's head reads
            distill = DistillConfig(weight=1.0, teacher_features=spec["distill"])
            self.model_cfg = dataclasses.replace(self.model_cfg, distill=distill)
        enc = self.model_cfg.encoder
        self.amp = bool(spec.get("amp", self.device.type == "cuda"))
        self.clip = cfg.optim.clip_grad
        batch = spec["batch"]
        if self.kind == "mim":
            from concurrent.futures import ThreadPoolExecutor

            from pretrain.batches import CropCollate, LevelBuilder
            self.model = MiMModel(self.model_cfg)
            self.model.encoder.set_grad_checkpointing(enc.grad_checkpointing)
            if spec.get("compile"):  # as pretrain/train.py's --torch_compile does it
                self.model.encoder.compile()
                for blk in self.model.decoder_blocks:
                    blk.compile()
            crop = spec.get("crop_size") or cfg.crop_size
            crops = torch.randn(batch, enc.in_channels, crop, crop, crop)  # [B, C, S, S, S], on the CPU like a loader's
            # PretrainCrops-like items: one view each, no lesion anchor.
            self.items = [{"crops": crops[i:i + 1], "anchors": torch.full((1, 3), float("nan")), "index": i}
                          for i in range(batch)]
            self.crops = CropCollate()
            self.build_levels = LevelBuilder(self.model_cfg, spec.get("seed", 0), 0)
            self.loader = ThreadPoolExecutor(1)  # the DataLoader worker's stand-in: it runs CropCollate only
            self.m = 0
            self.ready = self._next_crops(0)
            self.subvolumes = batch * subvolumes_per_crop(self.model_cfg.masks)
        else:
            self.model = monai_mae(self.model_cfg, sdpa=self.kind == "monai_sdpa")
            s = enc.img_size
            # The same memory layout as build_hierarchy's output (channels last): on CPU, oneDNN computes the
            # patch-embedding Conv3d's weight gradient several times faster from it than from plain NCDHW.
            x = torch.randn(batch, s, s, s, enc.in_channels, device=self.device)  # [B, I, I, I, C]
            self.x = x.permute(0, 4, 1, 2, 3)  # [B, C, I, I, I], channels-last strides
            self.subvolumes = batch
        self.model.to(self.device).train()
        # MONAI's MAE has no no_weight_decay(); its mask token is exempt as ours is (its sincos position
        # embeddings are frozen). Biases and norms are exempt for both (timm's 1-D rule).
        skip = self.model.no_weight_decay() if self.kind == "mim" else {"mask_tokens"}
        groups = param_groups_weight_decay(self.model, cfg.optim.weight_decay, no_weight_decay_list=skip)
        self.optimizer = build_optimizer(groups, cfg.optim)
        self.flops = TRAIN_FLOPS_PER_FORWARD * forward_flops(self.model_cfg, self.kind != "mim") * self.subvolumes

    def _next_crops(self, m: int) -> dict:
        """Micro-batch m's crops as the loader hands them over: CropCollate, then pinned on CUDA
        (engine.batches.ResumableBatches pins when CUDA is there), so the copy in LevelBuilder is asynchronous."""
        batch = self.crops(m, self.items)
        if self.device.type == "cuda":
            batch["crops"] = batch["crops"].pin_memory()
        return batch

    def _levels(self) -> tuple[list, float]:
        """(this step's MiM levels with their targets, on the device; seconds to build them, the kernels waited
        for: the benchmark times each step whole, where pretrain/train.py's StepClock reads CUDA events)."""
        t = time.perf_counter()
        levels = self.build_levels(self.batch, self.device)  # [Level, ...] on self.device
        sync(self.device)
        return levels, time.perf_counter() - t

    def _loss(self, levels: list | None) -> torch.Tensor:
        from models.mim import masked_mse, normalised_patches
        from models.vit3d import patchify
        if self.kind == "mim":
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp):
                return self.model(levels).losses["loss"]
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp):
            pred, mask = self.model(self.x)  # [B, N, C p^3], [B, N] int (1 = masked)
            target = patchify(self.x, self.model_cfg.encoder.patch_size)  # [B, N, C p^3]
            return masked_mse(pred, normalised_patches(target, self.model_cfg.norm_pix_loss), mask.bool())

    def step(self) -> dict[str, float]:
        sync(self.device)
        t = time.perf_counter()
        pending, levels, build_s = None, None, 0.0
        if self.kind == "mim":  # this step's crops are ready; the next step's are collated beside it
            self.batch = self.ready
            self.m = self.batch["m"]
            pending = self.loader.submit(self._next_crops, self.m + 1)
            self.model.training_step_started(self.m)
            levels, build_s = self._levels()
        loss = self._loss(levels)
        loss.backward()
        if self.clip:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.kind == "mim":  # the EMA teacher's update is part of a distilled step's cost
            self.model.training_step_done(self.m, 1000)
        sync(self.device)
        t_model = time.perf_counter()
        if pending is not None:
            self.ready = pending.result()  # waiting here is the step waiting for data
        t_end = time.perf_counter()
        return {"step": t_end - t, "wait": t_end - t_model, "levels": build_s}

    def info(self) -> dict:
        return {"subvolumes": self.subvolumes, "flops": self.flops,
                "params": sum(p.numel() for p in self.model.parameters() if p.requires_grad)}


# --- contenders, largest batch, table ------------------------------------------------------------------

@dataclasses.dataclass
class Row:
    name: str
    kind: str
    levels: int
    grad_checkpointing: bool = False
    compile: bool = False
    distill: str = ""  # "": no distillation; else the teacher's features, "encoder" | "decoder"


def rows_for(model, checkpointing: str, compile: bool = False) -> list[Row]:
    ckpt = {"off": [False], "on": [True], "both": [False, True]}[checkpointing]
    rows = [Row(MONAI, "monai", 1), Row(MONAI_SDPA, "monai_sdpa", 1)]
    for ck in ckpt:
        suffix = ", grad ckpt" if ck else ""
        rows.append(Row(f"mimfm MiM{suffix}", "mim", model.masks.levels, ck))
        rows.append(Row(f"mimfm MiM L=1 (MAE){suffix}", "mim", 1, ck))
    rows.append(Row("mimfm MiM + self-distillation", "mim", model.masks.levels, distill="encoder"))
    rows.append(Row("mimfm MiM + self-distillation, decoder teacher", "mim", model.masks.levels, distill="decoder"))
    if compile:
        rows.append(Row("mimfm MiM, torch.compile", "mim", model.masks.levels, compile=True))
    return rows


def spec_for(row: Row, model, level1: int, *, config, device: str, crop_size: int = 0, threads: int = 0) -> dict:
    """PretrainRunner's spec for `row`, for `level1` level-1 crops of our full hierarchy. Every row gets the
    same number of sub-volumes: MONAI takes them as volumes, our L=1 as level-1 crops."""
    total = level1 * subvolumes_per_crop(model.masks)
    batch = level1 if (row.kind == "mim" and row.levels == model.masks.levels) else total
    return {"config": str(config), "kind": row.kind, "levels": row.levels, "batch": batch, "crop_size": crop_size,
            "device": device, "grad_checkpointing": row.grad_checkpointing, "compile": row.compile,
            "distill": row.distill,
            "threads": threads, "seed": 0}


def _spec(row: Row, args, model, level1: int) -> dict:
    return spec_for(row, model, level1, config=args.config, device=args.device, crop_size=args.crop_size,
                    threads=args.threads)


def fits(spec: dict, steps: int = 2) -> bool:
    """Whether `steps` training steps at this batch run without CUDA running out of memory."""
    runner, ok = None, True
    try:
        runner = PretrainRunner(spec)
        for _ in range(steps):
            runner.step()
    except torch.OutOfMemoryError:
        ok = False
    runner = None  # noqa: F841 (drop every tensor before the next try)
    release_memory(spec["device"])
    return ok


def largest_batch(spec: dict, limit: int = 1 << 14) -> int:
    """Largest `batch` (level-1 crops for ours at L>1, volumes otherwise) that fits: doubling, then bisection."""
    lo, hi = 0, 1
    while hi <= limit and fits({**spec, "batch": hi}):
        lo, hi = hi, hi * 2
    if hi > limit:
        return lo
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits({**spec, "batch": mid}) else (lo, mid)
    return lo


def measure_rows(args, model, rows: list[Row], level1: int) -> dict[str, Measured]:
    contenders = {r.name: (RUNNER, _spec(r, args, model, level1)) for r in rows}
    cpu = args.device == "cpu"
    return measure(contenders, args.repeats, args.warmup, isolate=cpu and args.isolate, interleave=cpu,
                   progress=not args.quiet)


def build_table(args, model, rows: list[Row], results: dict[str, Measured],
                largest: dict[str, tuple[int, float]] | None) -> Table:
    cuda = args.device == "cuda"
    peak = peak_bf16_flops() if cuda else None
    columns = ["model", "levels", "sub-vols/step", "loader ms", "data wait", "step ms", "sub-vol/s",
               "ours ÷ MONAI", "model FLOP/s"]
    if cuda:
        columns += ["MFU"]
    columns += ["peak memory MiB"]
    if cuda:
        columns += ["largest batch (sub-vols)", "sub-vol/s at largest"]
    table = Table(columns)
    ref = results[MONAI]
    ref_n = ref.info["subvolumes"]
    for r in rows:
        m = results[r.name]
        n, step = m.info["subvolumes"], m.median()
        levels_ms = f"{m.median('levels') * 1e3:.0f}" if r.kind == "mim" else "—"
        wait = f"{100 * sum(s.get('wait', 0.0) for s in m.samples) / sum(s['step'] for s in m.samples):.1f}%" \
            if r.kind == "mim" else "—"
        ratio = paired_ratio(m, ref, n, ref_n)
        flops = m.info["flops"] / step
        cells = [r.name, r.levels, n, levels_ms, wait, f"{step * 1e3:.0f}", f"{n / step:.1f}", f"{ratio:.2f}x",
                 format_flops(flops)]
        if cuda:
            cells += [f"{100 * flops / peak:.1f}%" if peak else "—"]
        cells += [format_memory(m.memory, args.device, args.device == "cpu" and args.isolate)]
        if cuda:
            if largest and r.name in largest:
                size, rate = largest[r.name]
                cells += [size, f"{rate:.1f}"]
            else:
                cells += ["—", "—"]
        table.add(*cells)
    enc = model.encoder
    table.notes = [
        f"encoder ViT: dim {enc.dim}, depth {enc.depth}, heads {enc.heads}, mlp x{enc.mlp_ratio:g}, input "
        f"{enc.img_size}^3, patch {enc.patch_size}^3 ({enc.num_patches} tokens, mask ratio "
        f"{model.masks.ratios()[0]:g}); decoder dim {model.decoder_dim}, depth {model.decoder_depth}, heads "
        f"{model.decoder_heads}; MiM: L={model.masks.levels}, K={model.masks.children}, children of "
        f"{model.masks.child_patches}^3 patches; level-1 crops {args.crop_size or load_preset(args.config).crop_size}^3 "
        f"voxels, resized to {enc.img_size}^3",
        f"step ms: median of {args.repeats} steps after {args.warmup} warm-up steps; forward + loss + backward "
        f"+ grad clipping + AdamW; {'bf16 autocast' if cuda else 'fp32'}",
        "loader ms: ours only, median time to build a step's MiM levels and loss targets from its level-1 "
        "crops (pretrain.batches.LevelBuilder; build_hierarchy, the level-1 resize, per-patch targets) inside "
        "the step, on its device, as pretrain/train.py's loop does (part of step ms); data wait: the share of "
        "our step spent waiting for the next step's crops (pretrain.batches.CropCollate, in a thread beside the "
        "step, as in pretrain/train.py's DataLoader workers) after the model step was done (sum over timed "
        "steps); MONAI is handed ready volumes of the encoder size (no loader)",
        "ours ÷ MONAI: sub-volumes/s over plain MONAI's; "
        + ("median of per-round ratios (all rows timed round-robin in the same rounds)" if not cuda
           else "ratio of medians (rows run one after another)") + "; above 1 = faster than MONAI",
        "MONAI, SDPA: the same MONAI model with `use_flash_attention` switched on in its attention blocks "
        "(MONAI's MAE builds them with explicit softmax attention)",
        "model FLOP/s: analytic matmul FLOPs of encoder (visible tokens) + decoder (all tokens), training = 3x "
        "forward" + (f"; MFU against {peak / 1e12:.0f} TFLOP/s dense bf16" if peak else ""),
        memory_note(args.device, args.device == "cpu" and args.isolate),
    ]
    if cuda:
        table.notes.append("largest batch: most sub-volumes per step that train without OOM (doubling, then "
                           "bisection; ours at L>1 in whole level-1 crops); MONAI has no gradient-checkpointing "
                           "option, so only our rows have a checkpointed variant")
    return table


def parse_args(argv=None):
    p = argparse.ArgumentParser(allow_abbrev=False, prog="python -m benchmarks.speed.pretrain", description=__doc__.split("\n\n")[0])
    add_run_args(p)
    p.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    p.add_argument("--config", default=None, help="a pretraining YAML instead of --preset")
    p.add_argument("--batch", type=int, default=0, help="level-1 crops per step (default: the preset's "
                   "batch_size x crops_per_volume)")
    p.add_argument("--crop-size", type=int, default=0, help="level-1 crop edge in voxels (default: the preset's)")
    p.add_argument("--checkpointing", choices=["off", "on", "both"], default=None,
                   help="our rows with gradient checkpointing (default: both on CUDA, off on CPU)")
    p.add_argument("--compile", action="store_true",
                   help="add a row of our MiM with torch.compile (pretrain's --torch_compile); compiles first")
    p.add_argument("--largest-batch", action=argparse.BooleanOptionalAction, default=None,
                   help="search the largest batch that fits (CUDA only; default on there)")
    args = p.parse_args(argv)
    args.device = resolve_device(args.device)
    args.label = Path(args.config).stem if args.config else args.preset
    args.config = Path(args.config) if args.config else PRESETS[args.preset]
    if args.checkpointing is None:
        args.checkpointing = "both" if args.device == "cuda" else "off"
    if args.largest_batch is None:
        args.largest_batch = args.device == "cuda"
    return args


def run(args) -> Table:
    cfg = load_preset(args.config)
    model = cfg.model
    level1 = args.batch or cfg.batch_size * cfg.crops_per_volume
    rows = rows_for(model, args.checkpointing, args.compile)
    results = measure_rows(args, model, rows, level1)
    largest = None
    if args.largest_batch and args.device == "cuda":
        largest = {}
        for r in rows:
            spec = _spec(r, args, model, level1)
            size = largest_batch(spec)
            if size == 0:
                continue
            runner = PretrainRunner({**spec, "batch": size})
            step, _ = _median_steps(runner, args)
            largest[r.name] = (runner.subvolumes, runner.subvolumes / step)
            runner = None
            release_memory(args.device)
    return build_table(args, model, rows, results, largest)


def _median_steps(runner: PretrainRunner, args) -> tuple[float, list[float]]:
    for _ in range(args.warmup):
        runner.step()
    times = [runner.step()["step"] for _ in range(args.repeats)]
    return statistics.median(times), times


def heading(args) -> str:
    return f"Pretraining throughput ({'GPU' if args.device == 'cuda' else 'CPU'}, {args.label})"


@cli_entry
def main(argv=None) -> Table:
    args = parse_args(argv)
    return run_and_report(args, run, command_line("benchmarks.speed.pretrain", argv), heading(args),
                          load_note=" (the ratios come from steps timed in the same rounds)")


if __name__ == "__main__":
    main()
