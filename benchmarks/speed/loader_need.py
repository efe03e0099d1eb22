"""The pretraining loader against the GPU it must feed (issue 36, item 6).

    python -m benchmarks.speed.loader_need [--config launch/pretrain_base_gpu.yaml] [--repeats 5] [--steps 2]
    python -m benchmarks.speed.loader --preset base_gpu      # the same, from the loader benchmark

Two numbers, and their ratio:
- supply: level-1 views per second per loader core. Pretraining's DataLoader workers only read and cut:
  `data.views.PretrainCrops` items (memory-mapped cache reads, crops, lesion-centred boxes) stacked by
  `pretrain.batches.CropCollate`. One process, one torch thread, does that for each micro-batch. The cache
  holds synthetic head-sized volumes at the preset's spacing (180 x 216 x 176 mm), warm in the page cache.
- demand: the level-1 views per second a GPU consumes at a model-FLOPs utilisation (default 40%, bf16,
  H100 SXM dense peak 989 TFLOP/s), from `mim_forward_flops` (matmul FLOPs, 2 m n k; attention's QK^T and
  AV included; training = 3x forward). A level-1 view brings 1 + K + ... + K^(L-1) sub-volumes.

Loader cores per GPU = demand / supply.

What the training loop then does on its device, `pretrain.batches.LevelBuilder` (every level's cut, trilinear
resize to the encoder input, masks, per-patch loss targets), is timed too, part by part, here on the CPU:
CPU time per view, not a GPU figure.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[2]
DEFAULT_CONFIG = ROOT / "launch" / "pretrain_base_gpu.yaml"
H100_BF16_DENSE = 989e12   # H100 SXM, dense bf16 (no sparsity), FLOP/s
TRAIN_PER_FORWARD = 3      # forward + backward = 3x forward
HEAD_MM = (180.0, 216.0, 176.0)  # an adult head's field of view (the 1-mm volumes of issue 36)


# --- demand: FLOPs ---------------------------------------------------------------------------------------

def linear_flops(tokens: int, d_in: int, d_out: int) -> int:
    return 2 * tokens * d_in * d_out


def block_flops(tokens: int, dim: int, mlp_dim: int) -> int:
    """One transformer block's forward matmuls: qkv, QK^T, AV, output projection, the MLP's two layers."""
    return (linear_flops(tokens, dim, 3 * dim)
            + 2 * tokens * tokens * dim      # QK^T: heads x (t x hd) @ (hd x t), summed over heads
            + 2 * tokens * tokens * dim      # AV:   heads x (t x t) @ (t x hd)
            + linear_flops(tokens, dim, dim)
            + linear_flops(tokens, dim, mlp_dim) + linear_flops(tokens, mlp_dim, dim))


def subvolume_forward_flops(cfg, ratio: float, child: bool) -> int:
    """Forward matmul FLOPs of one sub-volume through models.mim.MiMModel: the patch embedding of the visible
    patches only (ViT3D.embed), the encoder on the visible tokens, the decoder embedding, the decoder on all
    N tokens, the prediction layer; a child also goes through the projection head once (pooled feature)."""
    from models.mim_masks import masked_count
    enc = cfg.encoder
    n = enc.num_patches
    vis = n - masked_count(ratio, n)
    p_vals = enc.in_channels * enc.patch_size**3
    mlp, dmlp = int(enc.dim * enc.mlp_ratio), int(cfg.decoder_dim * enc.mlp_ratio)
    f = (linear_flops(vis, p_vals, enc.dim)
         + enc.depth * block_flops(vis, enc.dim, mlp)
         + linear_flops(vis, enc.dim, cfg.decoder_dim)
         + cfg.decoder_depth * block_flops(n, cfg.decoder_dim, dmlp)
         + linear_flops(n, cfg.decoder_dim, p_vals))
    if child:  # models.mim.MiMModel.projector: Mlp(Dd -> proj_dim -> Dd) on one pooled token
        f += linear_flops(1, cfg.decoder_dim, cfg.proj_dim) + linear_flops(1, cfg.proj_dim, cfg.decoder_dim)
    return f


def mim_forward_flops(cfg) -> int:
    """Forward matmul FLOPs per level-1 view of a MiMConfig: level l has K^(l-1) sub-volumes, each at that
    level's mask ratio (no distillation or contrast: the presets leave them off)."""
    m = cfg.masks
    return sum(m.children**(lvl - 1) * subvolume_forward_flops(cfg, r, child=lvl > 1)
               for lvl, r in enumerate(m.ratios(), start=1))


def subvolumes_per_view(masks) -> int:
    return sum(masks.children**lvl for lvl in range(masks.levels))


def views_needed(cfg, mfu: float = 0.4, peak: float = H100_BF16_DENSE) -> float:
    """Level-1 views per second one GPU trains on at `mfu` of `peak`."""
    return mfu * peak / (TRAIN_PER_FORWARD * mim_forward_flops(cfg))


# --- supply: the loader ----------------------------------------------------------------------------------

def write_cache(root: Path, n: int, spacing, seed: int = 0) -> list[Path]:
    """`n` head-like float32 [1, X, Y, Z] volumes in the cache's layout (<entry>/image.npy + meta.json)."""
    import json

    from scipy.ndimage import zoom
    shape = tuple(int(round(mm / s)) for mm, s in zip(HEAD_MM, spacing))
    rng = np.random.default_rng(seed)
    g = np.stack(np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij"))
    head = (g**2).sum(0) <= 0.85
    tissue = zoom(rng.normal(size=(8, 8, 8)), [s / 8 for s in shape], order=1)[: shape[0], : shape[1], : shape[2]]
    paths = []
    for k in range(n):
        vol = np.where(head, tissue + rng.normal(0, 0.2, shape), -2.0).astype(np.float32)[None]  # [1, X, Y, Z]
        d = root / f"entry{k}"
        d.mkdir()
        np.save(d / "image.npy", vol)
        (d / "meta.json").write_text(json.dumps({"pad_values": [-2.0]}))
        paths.append(d / "image.npy")
    for p in paths:  # warm page cache, as in training after the first epoch
        p.read_bytes()
    return paths


class Timers:
    """Wraps module-level functions so each call's time adds to a named bucket."""

    def __init__(self):
        self.s: dict[str, float] = {}
        self._undo = []

    def wrap(self, module, name: str, bucket):
        """bucket: a name, or a function of the call's arguments that returns one."""
        orig = getattr(module, name)

        def timed(*a, **k):
            key = bucket(*a, **k) if callable(bucket) else bucket
            t = time.perf_counter()
            try:
                return orig(*a, **k)
            finally:
                self.s[key] = self.s.get(key, 0.0) + time.perf_counter() - t
        setattr(module, name, timed)
        self._undo.append((module, name, orig))

    def restore(self):
        for module, name, orig in reversed(self._undo):
            setattr(module, name, orig)


def measure_loader(cfg, paths, steps: int, repeats: int, seed: int = 0) -> dict:
    """Per repeat: `steps` micro-batches of cfg.batch_size volumes x cfg.crops_per_volume views, in this process
    with one thread: what a worker does (items + CropCollate), then what the loop does (LevelBuilder, on the CPU).
    Returns the medians of views/s (wall-clock and per CPU-second) of each half and of seconds per view of each part."""
    import models.mim_masks as mm
    import pretrain.batches as pb
    from data.views import PretrainCrops, anchor_fractions
    from pretrain.batches import CropCollate, LevelBuilder

    model = cfg.model
    fractions, jitter = anchor_fractions(model.encoder.grid, model.masks.child_patches, model.masks.levels)
    shape = np.load(paths[0], mmap_mode="r").shape[1:]
    rng = np.random.default_rng(seed)
    # Lesion centres as data.candidates would give them: a few per volume, inside the head.
    centres = [rng.uniform(0.3, 0.7, size=(3, 3)) * np.array(shape) for _ in paths]
    ds = PretrainCrops(paths, cfg.crop_size, cfg.crops_per_volume, seed, lesion_fraction=cfg.lesion_view_fraction,
                       lesion_centres=centres if cfg.lesion_view_fraction else None,
                       anchor_fractions=fractions, anchor_jitter=jitter)
    collate, build = CropCollate(), LevelBuilder(model, seed, rank=0)
    b = cfg.batch_size
    views_per_step = b * cfg.crops_per_volume
    timers = Timers()

    def resize_bucket(crops, root, boxes, size):  # level 1: whole crops; deeper levels: children's boxes
        whole = bool((boxes[:, 0] == 0).all()) and bool((boxes[:, 1] == torch.tensor(crops.shape[2:])).all())
        return "resize1" if whole else "resize_children"

    timers.wrap(mm, "cut_and_resize", resize_bucket)    # level 1's resize and the children's cut + resize
    timers.wrap(pb, "patch_targets", "targets")         # per-patch normalised loss targets
    timers.wrap(pb, "build_hierarchy", "hierarchy")     # resizes + masks + cube choice
    runs = {k: [] for k in ("worker_views_s", "worker_cpu_views_s", "build_views_s", "build_cpu_views_s")}
    parts = {k: [] for k in ("read", "resize1", "resize_children", "masks", "targets")}
    m = 0
    try:
        for rep in range(repeats + 1):  # the first pass warms up
            timers.s.clear()
            clock = {"worker": [0.0, 0.0], "build": [0.0, 0.0]}  # [wall s, CPU s]
            for _ in range(steps):
                with _timed(clock["worker"]):
                    batch = collate(m, [ds[(m * b + j) % len(ds)] for j in range(b)])
                with _timed(clock["build"]):
                    build(batch, "cpu")
                m += 1
            if rep == 0:
                continue
            n = steps * views_per_step
            for half, (wall, cpu) in clock.items():
                runs[f"{half}_views_s"].append(n / wall)
                runs[f"{half}_cpu_views_s"].append(n / cpu)
            resize = timers.s["resize1"] + timers.s.get("resize_children", 0.0)
            parts["read"].append(clock["worker"][0] / n)
            parts["resize1"].append(timers.s["resize1"] / n)
            parts["resize_children"].append(timers.s.get("resize_children", 0.0) / n)
            parts["masks"].append((timers.s["hierarchy"] - resize) / n)
            parts["targets"].append(timers.s["targets"] / n)
    finally:
        timers.restore()
    return {**{k: statistics.median(v) for k, v in runs.items()}, "all": runs,
            "parts_s": {k: statistics.median(v) for k, v in parts.items()},
            "views_per_step": views_per_step, "volume_shape": shape}


@contextlib.contextmanager
def _timed(acc: list[float]):
    """Adds the block's wall-clock and CPU seconds (this process) to acc = [wall, cpu]."""
    t, c = time.perf_counter(), time.process_time()
    yield
    acc[0] += time.perf_counter() - t
    acc[1] += time.process_time() - c


def bytes_per_view(cfg) -> tuple[int, int]:
    """(bytes of one level-1 crop: what a worker sends per view; bytes of every level's input and target built
    from it on the device, float32)."""
    enc = cfg.model.encoder
    crop = enc.in_channels * cfg.crop_size**3 * 4
    level = enc.in_channels * enc.img_size**3 * 4  # x [C, I, I, I] float32; its target [N, C p^3] is as large
    return crop, 2 * level * subvolumes_per_view(cfg.model.masks)


PART_NAMES = {
    "read": "workers: read + crop from the memory-mapped cache (PretrainCrops), stacked (CropCollate)",
    "resize1": "loop: level 1's trilinear resize of the crop to the encoder input (cut_and_resize, F.interpolate)",
    "resize_children": "loop: levels 2..L, the children's cut + separable trilinear resize (cut_and_resize)",
    "masks": "loop: masks and children's boxes (rest of build_hierarchy)",
    "targets": "loop: per-patch normalised loss targets (patch_targets)",
}


def _runs(values) -> str:
    return f"median of {len(values)}: {', '.join(f'{r:.1f}' for r in values)}"


def report(cfg, config_path, meas, mfu, peak, node_cores=(12, 16)) -> str:
    from benchmarks.common import cpu_model
    model = cfg.model
    fwd = mim_forward_flops(model)
    need = views_needed(model, mfu, peak)
    cores = need / meas["worker_cpu_views_s"]
    cores_wall = need / meas["worker_views_s"]
    crop_b, levels_b = bytes_per_view(cfg)
    p = meas["parts_s"]
    tot = sum(p.values())
    enc = model.encoder
    shown = Path(config_path).resolve()
    shown = shown.relative_to(ROOT) if shown.is_relative_to(ROOT) else shown
    lines = [
        f"- config: `{shown}`: "
        f"ViT dim {enc.dim}, depth {enc.depth}, input {enc.img_size}^3, patch {enc.patch_size}^3 ({enc.num_patches} "
        f"tokens); decoder {model.decoder_dim} x {model.decoder_depth}; L={model.masks.levels}, "
        f"K={model.masks.children}, children of {model.masks.child_patches}^3 patches, mask ratios "
        f"{list(model.masks.ratios())}; level-1 crops of {cfg.crop_size}^3 voxels at {list(cfg.prep.spacing)} mm; "
        f"{subvolumes_per_view(model.masks)} sub-volumes per level-1 view; "
        f"lesion-view share {cfg.lesion_view_fraction}",
        f"- machine: {os.cpu_count()} cores (`nproc`), {cpu_model()}, shared with other jobs (1-minute load "
        f"{os.getloadavg()[0]:.1f} at the end); one process, one torch thread; torch {torch.__version__}",
        f"- date: {datetime.date.today().isoformat()}",
        "",
        "| quantity | value |",
        "|---|---:|",
        f"| forward FLOPs per level-1 view (matmuls, 2mnk, attention included) | {fwd / 1e9:.1f} GFLOP |",
        f"| training FLOPs per view (3x forward) | {TRAIN_PER_FORWARD * fwd / 1e9:.1f} GFLOP |",
        f"| views/s one GPU needs at {mfu:.0%} MFU of {peak / 1e12:.0f} TFLOP/s (H100 SXM, dense bf16) | {need:,.0f} |",
        f"| loader worker (read + crop + stack): views per CPU-second of one core "
        f"({_runs(meas['all']['worker_cpu_views_s'])}) | {meas['worker_cpu_views_s']:,.0f} |",
        f"| loader worker: views per wall-clock second, one process on the shared host "
        f"({_runs(meas['all']['worker_views_s'])}) | {meas['worker_views_s']:,.0f} |",
        f"| **loader cores per GPU** (from CPU-seconds; from wall-clock: {cores_wall:.1f}) | **{cores:.1f}** |",
        f"| the loop's level building (LevelBuilder) timed on this CPU, not a GPU: views per CPU-second of one core "
        f"({_runs(meas['all']['build_cpu_views_s'])}) | {meas['build_cpu_views_s']:.1f} |",
        f"| bytes a worker sends per view: one level-1 crop (float32) | {crop_b / 2**20:.2f} MiB "
        f"({crop_b * need / 1e9:.1f} GB/s at the rate above) |",
        f"| bytes the device builds from it: every level's input and target (float32) | "
        f"{levels_b / 2**20:.1f} MiB ({levels_b * need / 1e9:.0f} GB/s if they were sent instead) |",
        "",
        "Where the time goes (ms per level-1 view, median; the loop's parts timed on this CPU):",
        "",
        "| part | ms/view | share |",
        "|---|---:|---:|",
    ]
    lines += [f"| {PART_NAMES[k]} | {1e3 * v:.2f} | {v / tot:.0%} |" for k, v in p.items()]
    lines.append("(wall-clock ms inside one process; the workers' part is their whole work, the loop's parts add up "
                 "to LevelBuilder)")
    verdict = (f"{cores:.1f} loader cores per GPU is {'more' if cores > node_cores[1] else 'no more'} than the "
               f"{node_cores[0]}-{node_cores[1]} a GPU node usually has per GPU.")
    return "\n".join(lines) + "\n\n" + verdict + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(allow_abbrev=False, prog="python -m benchmarks.speed.loader_need",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default=str(DEFAULT_CONFIG), help="pretraining preset (YAML)")
    p.add_argument("--volumes", type=int, default=8, help="synthetic cache volumes")
    p.add_argument("--steps", type=int, default=2, help="micro-batches per timed pass")
    p.add_argument("--repeats", type=int, default=5, help="timed passes (one more warms up); the median is reported")
    p.add_argument("--mfu", type=float, default=0.4)
    p.add_argument("--peak_tflops", type=float, default=H100_BF16_DENSE / 1e12)
    p.add_argument("--profile", action="store_true", help="also print cProfile's top functions of one pass")
    args = p.parse_args(argv)
    from benchmarks.speed.pretrain import load_preset
    torch.set_num_threads(1)
    cfg = load_preset(args.config)
    with tempfile.TemporaryDirectory(prefix="loader_need_") as tmp:
        paths = write_cache(Path(tmp), args.volumes, cfg.prep.spacing)
        meas = measure_loader(cfg, paths, args.steps, args.repeats)
        if args.profile:
            import cProfile
            import pstats
            prof = cProfile.Profile()
            prof.enable()
            measure_loader(cfg, paths, 1, 1)
            prof.disable()
            pstats.Stats(prof).sort_stats("tottime").print_stats(12)
    print(f"(cache volumes {meas['volume_shape']} at {list(cfg.prep.spacing)} mm; {meas['views_per_step']} views "
          f"per micro-batch, {args.steps} per pass)")
    print(report(cfg, args.config, meas, args.mfu, args.peak_tflops * 1e12))
    return 0


if __name__ == "__main__":
    sys.exit(main())
