"""What ZeRO buys: memory per rank of the base preset's ViT-B under DDP, ZeRO-2 and ZeRO-3, 2 ranks.

    python -m benchmarks.speed.zero_memory [--steps 3] [--img_size 32] [--write-docs]

Each mode is one `accelerate launch` of 2 ranks with the shipped configs (DDP: gloo ranks on a CPU
host, launch/accelerate/multi_gpu_ddp.yaml on GPUs; ZeRO: launch/accelerate/deepspeed_zero{2,3}.yaml),
running this module's worker. Every rank builds the encoder of launch/pretrain_base_gpu.yaml, AdamW,
prepares them and takes `--steps` training steps on one small input (`--img_size`: so that weights,
gradients and optimizer state dominate, not activations), fp32. ZeRO-3 runs twice: with the model
built whole and then partitioned by `accelerator.prepare`, and built partitioned from the start
(`engine.distributed.zero3_init`, deepspeed.zero.Init), so that no rank ever holds the whole weights.

Memory per rank, on a CPU host, is resident memory read from /proc (after `malloc_trim`, so freed
heap is given back first): the growth from the rank's baseline (imports done, process group up,
nothing built) to after the steps is what the model, its gradients, the optimizer state and the
engine's buffers hold. Peaks (VmHWM) are per phase, the high-water mark restarted (/proc/self/clear_refs)
before the build, before `prepare` and before every step; the peak column is the highest of them. On
CUDA the same columns are torch's allocated memory.
"""
from __future__ import annotations

import argparse
import ctypes
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

import torch

from benchmarks.common import DOC, Table, machine, today, update_section
from core.errors import cli_entry

ROOT = Path(__file__).resolve().parents[2]
HEADING = "What ZeRO buys: memory per rank (ViT-B, 2 ranks)"
MODES = ("ddp", "zero2", "zero3", "zero3_init")
LABELS = {"ddp": "DDP", "zero2": "ZeRO-2", "zero3": "ZeRO-3, model built whole", "zero3_init": "ZeRO-3 + zero.Init"}


def _status_mib(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def resident_mib(device: torch.device) -> tuple[float, float]:
    """(now, peak) MiB: resident memory on a CPU host (freed heap trimmed first), allocated memory on CUDA."""
    import gc
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize()
        return torch.cuda.memory_allocated() / 2**20, torch.cuda.max_memory_allocated() / 2**20
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass
    return _status_mib("VmRSS"), _status_mib("VmHWM")


def reset_peak(device: torch.device) -> None:
    """Start a new high-water mark, so that each phase's peak is its own (Linux: /proc/self/clear_refs 5)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        return
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def worker(mode: str, steps: int, img_size: int, out: Path) -> None:
    """One rank: baseline, build + prepare, `steps` steps; writes its readings to out/<mode>-rank<r>.json."""
    import deepspeed  # noqa: F401  imported in every mode, so the baselines hold the same libraries
    from core.config import load_config
    from engine.config import LoopConfig, OptimConfig
    from engine.distributed import configure_deepspeed, make_accelerator, prepare, weight_decay_groups, zero3_init
    from engine.steps import NonFiniteGuard, build_optimizer, optimizer_step
    from models.vit3d import ViT3D
    from pretrain.config import PretrainConfig

    accelerator = make_accelerator(LoopConfig(mixed_precision="no", report_to="none"))
    device = accelerator.device
    base_now, _ = resident_mib(device)
    reset_peak(device)  # each phase's peak is its own: build, prepare, every step
    enc = load_config(PretrainConfig, ROOT / "launch" / "pretrain_base_gpu.yaml").model.encoder
    enc.img_size, enc.drop_path = img_size, 0.0
    optim = OptimConfig()
    configure_deepspeed(accelerator, micro_batch=1, clip_grad=optim.clip_grad, width=enc.dim, mixed_precision="no")
    torch.manual_seed(0)
    # zero3_init: each module partitioned as soon as it is built, as pretraining builds under ZeRO-3
    with zero3_init(accelerator) if mode == "zero3_init" else nullcontext():
        model = ViT3D(enc)
    built_now, built_peak = resident_mib(device)
    reset_peak(device)
    n_params = sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters() if p.requires_grad)
    optimizer = build_optimizer(weight_decay_groups(model, optim.weight_decay), optim)
    model, optimizer = prepare(accelerator, model, optimizer)
    prepared_now, prepared_peak = resident_mib(device)
    x = torch.randn(1, enc.in_channels, img_size, img_size, img_size, device=device)  # [1, C, S, S, S]
    guard = NonFiniteGuard(3)
    step_peaks = []
    t0 = time.perf_counter()
    for _ in range(steps):
        reset_peak(device)
        optimizer_step(accelerator, model, optimizer, guard, optim.clip_grad, [x],
                       lambda batch: {"loss": model(batch).float().pow(2).mean()})
        step_peaks.append(resident_mib(device)[1])
    seconds = (time.perf_counter() - t0) / max(steps, 1)
    steady, _ = resident_mib(device)
    peak = max([built_peak, prepared_peak, *step_peaks])
    row = {"mode": mode, "rank": accelerator.process_index, "world_size": accelerator.num_processes,
           "params": n_params, "baseline_mib": base_now, "built_mib": built_now, "built_peak_mib": built_peak,
           "prepared_mib": prepared_now, "prepared_peak_mib": prepared_peak, "steady_mib": steady,
           "peak_mib": peak, "step_peaks_mib": step_peaks, "step_s": seconds, "device": device.type}
    (out / f"{mode}-rank{row['rank']}.json").write_text(json.dumps(row))
    accelerator.wait_for_everyone()


def launch(mode: str, args, out: Path) -> None:
    """Run the worker for `mode` on 2 ranks through `accelerate launch` with the shipped config."""
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"), "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "2", "--num_machines", "1",
           "--main_process_port", str(args.port)]
    if mode == "ddp" and not torch.cuda.is_available():
        env["ACCELERATE_USE_CPU"] = "1"
        cmd += ["--multi_gpu", "--mixed_precision", "no"]
    elif mode == "ddp":
        cmd += ["--config_file", str(ROOT / "launch" / "accelerate" / "multi_gpu_ddp.yaml")]
    else:
        cmd += ["--config_file", str(ROOT / "launch" / "accelerate" / f"deepspeed_{mode.split('_')[0]}.yaml")]
    cmd += ["-m", "benchmarks.speed.zero_memory", "--worker", mode, "--steps", str(args.steps),
            "--img_size", str(args.img_size), "--out", str(out)]
    res = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True)
    if res.returncode != 0:
        raise SystemExit(f"error: {mode} run failed (exit {res.returncode}):\n{res.stderr[-3000:]}")


def table(rows: list[dict]) -> Table:
    """One row per mode: the median over its ranks; the growth and its ratio to DDP's."""
    t = Table(["mode", "ranks", "trained params", "baseline MiB", "after build MiB", "after prepare MiB",
               "after steps MiB", "model + optimizer MiB", "÷ DDP", "peak at prepare MiB", "peak MiB",
               "peak ÷ DDP", "peak − baseline ÷ DDP", "step s"])
    by_mode = {m: [r for r in rows if r["mode"] == m] for m in MODES}
    growth = {m: statistics.median(r["steady_mib"] - r["baseline_mib"] for r in rs) for m, rs in by_mode.items()}
    peak = {m: statistics.median(r["peak_mib"] for r in rs) for m, rs in by_mode.items()}
    above = {m: statistics.median(r["peak_mib"] - r["baseline_mib"] for r in rs) for m, rs in by_mode.items()}
    for m, rs in by_mode.items():
        med = lambda k: statistics.median(r[k] for r in rs)  # noqa: E731
        t.add(LABELS[m], rs[0]["world_size"], f"{rs[0]['params']:,}", f"{med('baseline_mib'):,.0f}",
              f"{med('built_mib'):,.0f}", f"{med('prepared_mib'):,.0f}", f"{med('steady_mib'):,.0f}",
              f"{growth[m]:,.0f}", f"{growth[m] / growth['ddp']:.2f}x", f"{med('prepared_peak_mib'):,.0f}",
              f"{peak[m]:,.0f}", f"{peak[m] / peak['ddp']:.2f}x", f"{above[m] / above['ddp']:.2f}x",
              f"{med('step_s'):.2f}")
    return t


@cli_entry
def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=3, help="training steps per mode before the steady reading")
    p.add_argument("--img_size", type=int, default=32,
                   help="input edge in voxels (a multiple of the patch size, 16): small, so activations stay small")
    p.add_argument("--port", type=int, default=29561, help="the ranks' rendezvous port")
    p.add_argument("--write-docs", action="store_true", help=f"put the table in docs/BENCHMARKS.md ('{HEADING}')")
    p.add_argument("--doc", default=str(DOC), help="the markdown file --write-docs updates")
    p.add_argument("--worker", choices=MODES, help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        worker(args.worker, args.steps, args.img_size, Path(args.out))
        return 0
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        for mode in MODES:
            print(f"{mode}: 2 ranks ...", flush=True)
            launch(mode, args, Path(tmp))
        rows = [json.loads(f.read_text()) for f in sorted(Path(tmp).glob("*.json"))]
    if len(rows) != 2 * len(MODES) or any(r["world_size"] != 2 for r in rows):
        raise SystemExit(f"error: expected 2 ranks per mode, got {[(r['mode'], r['world_size']) for r in rows]}")
    t = table(rows)
    print(t.markdown())
    if args.write_docs:
        what = "resident memory (/proc VmRSS, after malloc_trim)" if rows[0]["device"] == "cpu" else \
            "torch.cuda allocated memory"
        body = "\n".join([
            f"- command: `python -m benchmarks.speed.zero_memory {' '.join(argv if argv is not None else sys.argv[1:])}`",
            f"- machine: {machine(rows[0]['device'])}; 2 ranks (gloo on a CPU host), fp32",
            f"- date: {today()}; whole command {(time.perf_counter() - t0) / 60:.1f} min",
            f"- model: the encoder of launch/pretrain_base_gpu.yaml (ViT-B: dim 768, depth 12), input "
            f"{args.img_size}^3 (small, so activations do not count), AdamW, {args.steps} steps",
            f"- memory per rank: {what}, median of the 2 ranks. baseline: imports done and the process group up; "
            "model + optimizer: after the steps minus the baseline (weights, gradients, AdamW state, the engine's "
            "buffers); peak at prepare: the high-water mark while `prepare` runs (DeepSpeed's start-up copies); "
            "peak: the highest of the build's, prepare's and every step's high-water marks; "
            "peak − baseline ÷ DDP: the peak above the baseline, against DDP's",
            "- ZeRO-3 + zero.Init: the model built under `engine.distributed.zero3_init` (each module partitioned "
            "as soon as it is built; its init runs module by module through `Module.apply`), as "
            "`pretrain.train.build_model` builds it under ZeRO-3",
            "", t.markdown()])
        update_section(args.doc, HEADING, body)
        print(f"updated {args.doc}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
