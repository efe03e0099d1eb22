"""What ZeRO buys: memory per rank of a ViT encoder under DDP, ZeRO-2 and ZeRO-3, 2 ranks.

    python -m benchmarks.speed.zero_memory [--model base] [--zero3_config launch/deepspeed/zero3.json]
                                           [--steps 3] [--img_size 32] [--write-docs]

Each mode is one `accelerate launch` of 2 ranks with the shipped configs (DDP: gloo ranks on a CPU
host, launch/accelerate/multi_gpu_ddp.yaml on GPUs; ZeRO: launch/accelerate/deepspeed_zero{2,3}.yaml,
the ZeRO-3 rows with the JSON `--zero3_config` names), running this module's worker. Every rank builds
the encoder `--model` names (tiny: launch/pretrain_tiny_cpu.yaml's; base: launch/pretrain_base_gpu.yaml's
ViT-B; small and large: models.vit3d's presets, large being ViT-L, 307 M parameters), AdamW, prepares
them and takes `--steps` training steps on one small input (`--img_size`, two patches a side by default:
so that weights, gradients and optimizer state dominate, not activations), batch 1, fp32. ZeRO-3 runs twice: with the model
built whole and then partitioned by `accelerator.prepare`, and built partitioned from the start
(`engine.distributed.zero3_init`, deepspeed.zero.Init), so that no rank ever holds the whole weights.

Memory per rank, on a CPU host, is resident memory read from /proc (after `malloc_trim`, so freed
heap is given back first): the growth from the rank's baseline (imports done, process group up,
nothing built) to after the steps is what the model, its gradients, the optimizer state and the
engine's buffers hold. The peak is the process's resident high-water mark (VmHWM), per phase: restarted
(/proc/self/clear_refs) before the build, before `prepare` and before every step; the peak column is
the highest of them. Every rank runs with glibc's mmap threshold fixed (`--mmap_threshold`, 128 KiB),
so that a freed tensor's memory goes back to the system at once and the peak counts what tensors hold;
with glibc's sliding threshold, blocks freed in one thread's arena (the backward runs on autograd's
thread) stay resident and add to the peak. On CUDA the same columns are torch's allocated memory.

The ZeRO-3 JSON (`--zero3_config`) decides ZeRO-3's peak in the steps: launch/deepspeed/zero3.json
explains each of its values in its "_comment".
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

from benchmarks.common import DOC, Table, load_average, machine, today, update_section
from core.errors import ConfigError, cli_entry

ROOT = Path(__file__).resolve().parents[2]
HEADING = "What ZeRO buys: memory per rank (ViT-B, 2 ranks)"
MODES = ("ddp", "zero2", "zero3", "zero3_init")
LABELS = {"ddp": "DDP", "zero2": "ZeRO-2", "zero3": "ZeRO-3, model built whole", "zero3_init": "ZeRO-3 + zero.Init"}
MODELS = ("tiny", "small", "base", "large")
ZERO3_JSON = ROOT / "launch" / "deepspeed" / "zero3.json"
# DDP's peak per rank, in fp32 copies of the weights (weights, gradients, DDP's gradient buckets, AdamW's
# two moments, the step's temporaries: ViT-B measured 5.3 above its baseline), plus about 1 GiB of imports
# and process group per rank.
DDP_COPIES, RANK_BASELINE_MIB = 5.5, 1024


def encoder_config(model: str, img_size: int | None):
    """The ViT3DConfig `--model` names, at input edge `img_size` (None: two patches a side), no drop path."""
    import dataclasses

    from core.config import load_config
    from models.vit3d import PRESETS
    from pretrain.config import PretrainConfig
    if model in ("tiny", "base"):
        preset = {"tiny": "pretrain_tiny_cpu.yaml", "base": "pretrain_base_gpu.yaml"}[model]
        enc = load_config(PretrainConfig, ROOT / "launch" / preset).model.encoder
    elif model in PRESETS:
        enc = PRESETS[model]
    else:
        raise ConfigError(f"--model: unknown encoder {model!r}; known: {', '.join(MODELS)}")
    size = 2 * enc.patch_size if img_size is None else img_size
    if size <= 0 or size % enc.patch_size:
        raise ConfigError(f"--img_size: {size} is not a positive multiple of the {model} encoder's patch size "
                          f"{enc.patch_size}")
    return dataclasses.replace(enc, img_size=size, drop_path=0.0)


def trained_params(enc) -> int:
    """The encoder's parameter count, from builds of depth 1 and 2 (its blocks are alike), so that checking
    a ViT-L costs two blocks' memory; ViT3D cannot be built on the meta device (its init reads values)."""
    import dataclasses

    from models.vit3d import ViT3D
    one, two = (sum(p.numel() for p in ViT3D(dataclasses.replace(enc, depth=d)).parameters() if p.requires_grad)
                for d in (1, 2))
    return one + (enc.depth - 1) * (two - one)


def check_zero3_json(path: Path) -> Path:
    """`--zero3_config` as an absolute path, refused in one line unless a run accepts it and it is stage 3."""
    from engine.distributed import check_deepspeed_json
    if not path.is_file():
        raise ConfigError(f"--zero3_config: {path} is not a file")
    stage = check_deepspeed_json(path).get("zero_optimization", {}).get("stage")
    if stage != 3:
        raise ConfigError(f"--zero3_config: {path} has zero_optimization.stage {stage!r}; the ZeRO-3 rows need 3")
    return path.resolve()


def check_memory_fits(params: int, model: str) -> None:
    """Refuse, before any rank starts, a model whose DDP row would not fit this host's available memory."""
    need = 2 * (DDP_COPIES * params * 4 / 2**20 + RANK_BASELINE_MIB)
    available = _meminfo_mib("MemAvailable")
    if need > available:
        raise ConfigError(f"--model {model}: 2 DDP ranks need about {need:,.0f} MiB, this host has "
                          f"{available:,.0f} MiB available")


def _meminfo_mib(field: str) -> float:
    return _proc_mib("/proc/meminfo", field, float("inf"))  # no /proc: nothing to refuse on


def _proc_mib(path: str, field: str, missing: float) -> float:
    """MiB of a `field:  N kB` line of a /proc file (status, meminfo); `missing` where there is none."""
    for line in Path(path).read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return missing


def _status_mib(field: str) -> float:
    return _proc_mib("/proc/self/status", field, float("nan"))


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


def worker(mode: str, model_name: str, steps: int, img_size: int, out: Path) -> None:
    """One rank: baseline, build + prepare, `steps` steps; writes its readings to out/<mode>-rank<r>.json."""
    import deepspeed  # noqa: F401  imported in every mode, so the baselines hold the same libraries
    from engine.config import LoopConfig, OptimConfig
    from engine.distributed import configure_deepspeed, make_accelerator, prepare, weight_decay_groups, zero3_init
    from engine.steps import NonFiniteGuard, build_optimizer, optimizer_step
    from models.vit3d import ViT3D

    accelerator = make_accelerator(LoopConfig(mixed_precision="no", report_to="none"))
    device = accelerator.device
    base_now, _ = resident_mib(device)
    reset_peak(device)  # each phase's peak is its own: build, prepare, every step
    enc = encoder_config(model_name, img_size)
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
           "peak_mib": peak, "step_peaks_mib": step_peaks, "step_s": seconds, "device": device.type,
           "ds_config": os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE", "")}
    (out / f"{mode}-rank{row['rank']}.json").write_text(json.dumps(row))
    accelerator.wait_for_everyone()


def launch_command(mode: str, args, out: Path) -> tuple[list[str], dict]:
    """The `accelerate launch` command line and environment that run the worker for `mode` on 2 ranks."""
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"), "PYTHONPATH": str(ROOT)}
    env.pop("MALLOC_MMAP_THRESHOLD_", None)
    if args.mmap_threshold:
        env["MALLOC_MMAP_THRESHOLD_"] = str(args.mmap_threshold)
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "2", "--num_machines", "1",
           "--main_process_port", str(args.port)]
    if mode == "ddp" and not torch.cuda.is_available():
        env["ACCELERATE_USE_CPU"] = "1"
        cmd += ["--multi_gpu", "--mixed_precision", "no"]
    elif mode == "ddp":
        cmd += ["--config_file", str(ROOT / "launch" / "accelerate" / "multi_gpu_ddp.yaml")]
    else:
        cmd += ["--config_file", str(ROOT / "launch" / "accelerate" / f"deepspeed_{mode.split('_')[0]}.yaml")]
    if mode.startswith("zero3"):
        cmd += ["--deepspeed_config_file", str(args.zero3_config)]  # over the YAML's launch/deepspeed/zero3.json
    cmd += ["-m", "benchmarks.speed.zero_memory", "--worker", mode, "--model", args.model, "--steps",
            str(args.steps), "--img_size", str(args.img_size), "--out", str(out)]
    return cmd, env


def launch(mode: str, args, out: Path) -> None:
    """Run the worker for `mode` on 2 ranks through `accelerate launch`."""
    cmd, env = launch_command(mode, args, out)
    res = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True)
    if res.returncode != 0:
        raise SystemExit(f"error: {mode} run failed (exit {res.returncode}):\n{res.stderr[-3000:]}")


def table(rows: list[dict]) -> Table:
    """One row per mode: the median over its ranks; the growth and the peak, each against DDP's."""
    t = Table(["mode", "ranks", "trained params", "baseline MiB", "after build MiB", "after prepare MiB",
               "after steps MiB", "model + optimizer MiB", "÷ DDP", "peak at prepare MiB", "peak MiB",
               "peak ÷ DDP", "peak − baseline ÷ DDP", "step s"])
    modes = [m for m in MODES if any(r["mode"] == m for r in rows)]
    by_mode = {m: [r for r in rows if r["mode"] == m] for m in modes}
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


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", choices=MODELS, default="base",
                   help="the encoder: tiny (launch/pretrain_tiny_cpu.yaml's, 0.5 M parameters), small (ViT-S, "
                        "models.vit3d), base (launch/pretrain_base_gpu.yaml's ViT-B, 88 M), large (ViT-L, dim 1024, "
                        "depth 24, 307 M: about 7.5 GiB per DDP rank; refused where the host lacks the memory)")
    p.add_argument("--zero3_config", type=Path, default=ZERO3_JSON,
                   help="the DeepSpeed JSON of the ZeRO-3 rows (stage 3, checked as a run checks it; default: the "
                        "shipped launch/deepspeed/zero3.json); DDP and ZeRO-2 rows keep their shipped configs")
    p.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES),
                   help="the rows to run, DDP always among them (the ratios are to DDP's, in the same run)")
    p.add_argument("--mmap_threshold", type=int, default=131072,
                   help="bytes: every rank's glibc serves blocks from this size up with mmap and returns them to the "
                        "system when freed (MALLOC_MMAP_THRESHOLD_), so that the resident peak counts what tensors "
                        "hold, as torch.cuda's allocated memory does on a GPU, not freed heap that glibc keeps in "
                        "its per-thread arenas; 0: glibc's own sliding threshold (up to 32 MiB)")
    p.add_argument("--steps", type=int, default=3, help="training steps per mode before the steady reading")
    p.add_argument("--img_size", type=int, default=None,
                   help="input edge in voxels, a multiple of the encoder's patch size (default: two patches, "
                        "8 tokens): small, so activations stay small")
    p.add_argument("--port", type=int, default=29561, help="the ranks' rendezvous port")
    p.add_argument("--write-docs", action="store_true", help=f"put the table in docs/BENCHMARKS.md ('{HEADING}')")
    p.add_argument("--doc", default=str(DOC), help="the markdown file --write-docs updates")
    p.add_argument("--worker", choices=MODES, help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def check_args(args: argparse.Namespace) -> argparse.Namespace:
    """Every flag checked, in one line each, before any rank starts; fills the default --img_size."""
    if args.steps < 1:
        raise ConfigError(f"--steps: expected at least 1, got {args.steps}")
    if args.mmap_threshold < 0:
        raise ConfigError(f"--mmap_threshold: expected bytes >= 0, got {args.mmap_threshold}")
    enc = encoder_config(args.model, args.img_size)
    args.img_size = enc.img_size
    args.modes = [m for m in MODES if m in args.modes]
    if "ddp" not in args.modes:
        raise ConfigError("--modes: include ddp; every ratio is to DDP's row of the same run")
    args.zero3_config = check_zero3_json(args.zero3_config)
    if args.write_docs and args.model != "base":  # the docs section is ViT-B's; another model's would replace it
        raise ConfigError(f"--write-docs: writes the '{HEADING}' section, so it needs --model base "
                          f"(got {args.model}); paste another model's table by hand")
    check_memory_fits(trained_params(enc), args.model)
    return args


def docs_body(args, rows: list[dict], t: Table, argv, minutes: float, load: float) -> str:
    what = "resident memory (/proc VmRSS, after malloc_trim)" if rows[0]["device"] == "cpu" else \
        "torch.cuda allocated memory"
    return "\n".join([
        f"- command: `python -m benchmarks.speed.zero_memory {' '.join(argv if argv is not None else sys.argv[1:])}`",
        f"- machine: {machine(rows[0]['device'])}; 2 ranks (gloo on a CPU host), fp32; load average "
        f"{load:.1f} at the start",
        f"- date: {today()}; whole command {minutes:.1f} min",
        f"- model: the {args.model} encoder ({rows[0]['params']:,} trained parameters), input "
        f"{args.img_size}^3 (small, so activations do not count), AdamW, batch 1, {args.steps} steps; "
        f"ZeRO-3 JSON: {os.path.relpath(args.zero3_config, ROOT)}; glibc mmap threshold: "
        f"{args.mmap_threshold or 'its own'}",
        f"- memory per rank: {what}, median of the 2 ranks. baseline: imports done and the process group up; "
        "model + optimizer: after the steps minus the baseline (weights, gradients, AdamW state, the engine's "
        "buffers); peak at prepare: the high-water mark while `prepare` runs (DeepSpeed's start-up copies); "
        "peak: the process's resident high-water mark (VmHWM), the highest of the build's, prepare's and every "
        "step's; peak − baseline ÷ DDP: the peak above the baseline, against DDP's",
        "- ZeRO-3 + zero.Init: the model built under `engine.distributed.zero3_init`, as "
        "`pretrain.train.build_model` builds it under ZeRO-3",
        "", t.markdown()])


@cli_entry
def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker:
        worker(args.worker, args.model, args.steps, args.img_size, Path(args.out))
        return 0
    args = check_args(args)
    t0, load = time.perf_counter(), load_average()
    with tempfile.TemporaryDirectory() as tmp:
        for mode in args.modes:
            print(f"{mode}: 2 ranks ...", flush=True)
            launch(mode, args, Path(tmp))
        rows = [json.loads(f.read_text()) for f in sorted(Path(tmp).glob("*.json"))]
    if len(rows) != 2 * len(args.modes) or any(r["world_size"] != 2 for r in rows):
        raise SystemExit(f"error: expected 2 ranks per mode, got {[(r['mode'], r['world_size']) for r in rows]}")
    stray = sorted({r["ds_config"] for r in rows if r["mode"].startswith("zero3")} - {str(args.zero3_config)})
    if stray:
        raise SystemExit(f"error: the ZeRO-3 rows ran {stray[0]}, not --zero3_config {args.zero3_config}")
    t = table(rows)
    print(t.markdown())
    if args.write_docs:
        update_section(args.doc, HEADING, docs_body(args, rows, t, argv, (time.perf_counter() - t0) / 60, load))
        print(f"updated {args.doc}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
