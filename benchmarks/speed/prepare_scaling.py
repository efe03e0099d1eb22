"""Preparing a corpus on a cold cache with 1 and 2 ranks, and the projection to 8 nodes x 8 GPUs (issue 36).

    python -m benchmarks.speed.prepare_scaling [--volumes 48] [--shape 180 216 176] [--source_mm 1]
        [--ranks 1 2] [--corpus 10000 100000] [--gpus 64] [--cores_per_gpu 12 16] [--out scaling.json]

Writes --volumes distinct synthetic heads (an ellipsoid of noisy tissue, each seed its own bytes) of --shape
voxels at --source_mm, as .nii.gz. Then, for each --ranks, on an empty cache: that many processes meet in a
gloo process group and run data.shard.prepare_shared, the code a pretraining or fine-tuning run prepares its
volumes with (rank r hashes and prepares rows r::world, then one all_gather_object, as accelerate's
gather_object). Each rank prepares in its own process (--prep_workers 1: one core per rank). Timed from a
barrier after start-up until prepare_shared returns, the gather included: wall time, CPU time of all ranks,
and each rank's share, counted from what its prepare_rows built (the payload it hands the gather). The SHA-256
rate is timed apart, over the same files, with data.cache.file_digest.

The projection scales the one-rank run's CPU seconds per volume by voxel count to the issue's 1-mm
180x216x176 volume, splits it into hashing (serial on a rank, before its pool starts) and preparing (over the
rank's --cores_per_gpu cores), and gives, for each --corpus size, one rank's share on --gpus ranks against
NCCL's 600 s timeout and --dist_timeout_min's default, rank 0 alone (before issue 36), and the separate
`data.prepare --shard I/N` array job; none of them faster than a shared file system of --storage_gb_s reads
every file twice (hashing, preparing) and writes every entry (sizes scaled by voxel count as well).
Prints markdown tables; --out writes them and every input as JSON.
"""
from __future__ import annotations

import argparse
import json
import math
import multiprocessing as mp
import os
import socket
import tempfile
import time
from dataclasses import asdict, dataclass
from datetime import timedelta
from pathlib import Path

import numpy as np

from benchmarks.common import Table, machine, today
from core.atomic import write_text

ISSUE_SHAPE = (180, 216, 176)  # the 1-mm volume issue 36 timed at about 0.35 s per core
NCCL_TIMEOUT_S = 600.0  # accelerate's and NCCL's default process-group timeout
RESULT_KEYS = {"measured", "projection_inputs", "projection"}  # what marks --out as this benchmark's JSON


def write_corpus(folder: Path, n: int, shape, source_mm: float) -> list[Path]:
    """n distinct MRI-like heads of `shape` voxels at `source_mm` mm (an ellipsoid of tissue with noise on a zero
    background; the seed makes each file's bytes, and so its cache entry, its own)."""
    from data.nifti import save_volume
    folder.mkdir(parents=True, exist_ok=True)
    axes = np.ogrid[tuple(slice(0, s) for s in shape)]
    radii = [max(s / 2 - 3, 1.0) for s in shape]
    inside = sum(((a - (s - 1) / 2) / r) ** 2 for a, s, r in zip(axes, shape, radii)) <= 1  # [X, Y, Z] bool
    affine = np.diag([source_mm] * 3 + [1.0])
    paths = []
    for i in range(n):
        noise = np.random.default_rng(i).normal(100, 5, shape).astype(np.float32)
        paths.append(folder / f"vol{i:04d}.nii.gz")
        save_volume(paths[-1], np.where(inside, noise, np.float32(0)), affine)
    return paths


def hash_rate(files: list[Path]) -> dict:
    """SHA-256 of every file as the cache keys them (data.cache.file_digest, one core): bytes, seconds, MB/s."""
    from data.cache import file_digest
    size = sum(f.stat().st_size for f in files)
    t = time.perf_counter()
    for f in files:
        file_digest(f)
    seconds = time.perf_counter() - t
    return {"bytes": size, "seconds": seconds, "mb_per_s": size / 1e6 / seconds}


# ---- the ranks -----------------------------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank(rank: int, world: int, port: int, folder: str, cache_dir: str, prep, results) -> None:
    """One rank: join the gloo group, then time prepare_shared over the folder from a barrier to its return."""
    import torch
    import torch.distributed as dist

    from data.manifest import scan_folder
    from data.shard import Shard, prepare_shared
    torch.set_num_threads(1)
    try:
        table = scan_folder(folder)
        if world > 1:
            dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                                    timeout=timedelta(minutes=60))
            dist.barrier()
        wall0, cpu0, mine = time.perf_counter(), time.process_time(), {}

        def gather(payload: list) -> list:
            mine.update(payload[0], arrived_s=time.perf_counter() - wall0)  # this rank's share is done here
            if world == 1:
                return payload
            joined = [None] * world
            dist.all_gather_object(joined, payload)  # what accelerate's gather_object does
            return [item for share in joined for item in share]

        prepared, _ = prepare_shared(table, prep, cache_dir, shard=Shard(rank, world, show=False), gather=gather,
                                     workers=1, require_lesion=False)
        results.put({"rank": rank, "wall_s": time.perf_counter() - wall0, "cpu_s": time.process_time() - cpu0,
                     "own_s": mine["arrived_s"], "built": mine["built"],
                     "rows": len(Shard(rank, world).rows(len(table))),
                     "indexed": len(prepared)})
        if world > 1:
            dist.destroy_process_group()
    except Exception as e:  # noqa: BLE001 - handed to the parent, which names the rank
        results.put({"rank": rank, "error": f"{type(e).__name__}: {e}".splitlines()[0]})


def run_ranks(world: int, folder: Path, cache_dir: Path, prep, wait_s: float = 3600) -> list[dict]:
    """`world` processes preparing `folder` into the empty `cache_dir` -> each rank's result, by rank."""
    ctx = mp.get_context("fork")  # the parent's imports come along: start-up is not what is timed here
    results, port = ctx.Queue(), _free_port()
    procs = [ctx.Process(target=_rank, args=(r, world, port, str(folder), str(cache_dir), prep, results))
             for r in range(world)]
    for p in procs:
        p.start()
    got = sorted((results.get(timeout=wait_s) for _ in procs), key=lambda r: r["rank"])
    for p in procs:
        p.join()
    failed = [r for r in got if "error" in r]
    if failed:
        raise RuntimeError(f"{world} ranks: rank {failed[0]['rank']} failed: {failed[0]['error']}")
    return got


def summarise(world: int, ranks: list[dict], n: int) -> dict:
    """One row of the measured table: the slowest rank's wall time, every rank's CPU time, the shares."""
    wall = max(r["wall_s"] for r in ranks)
    cpu = sum(r["cpu_s"] for r in ranks)
    return {"ranks": world, "volumes": n, "wall_s": wall, "cpu_s": cpu, "wall_per_volume_s": wall / n,
            "cpu_per_volume_s": cpu / n, "built": [r["built"] for r in ranks], "rows": [r["rows"] for r in ranks],
            "own_s": [r["own_s"] for r in ranks], "indexed": [r["indexed"] for r in ranks]}


def measured_table(rows: list[dict]) -> Table:
    t = Table(["ranks", "volumes", "wall s", "CPU s (all ranks)", "wall s / volume", "CPU s / volume",
               "speed-up (wall)", "prepared by each rank", "each rank's own share, s"])
    base = rows[0]["wall_s"]
    for r in rows:
        t.add(r["ranks"], r["volumes"], f"{r['wall_s']:.1f}", f"{r['cpu_s']:.1f}", f"{r['wall_per_volume_s']:.3f}",
              f"{r['cpu_per_volume_s']:.3f}", f"{base / r['wall_s']:.2f}x", " + ".join(map(str, r["built"])),
              " / ".join(f"{s:.1f}" for s in r["own_s"]))
    return t


# ---- the projection ------------------------------------------------------------------------------

@dataclass
class ProjectionInputs:
    """What the projection assumes; every figure of its table follows from these by `project`."""
    prepare_s: float          # core-seconds to prepare one issue-sized volume (load, resample, normalise, write)
    hash_s: float             # core-seconds to SHA-256 one issue-sized file
    file_mb: float = 0.0      # one issue-sized source file, MB (read once to hash, once to prepare)
    entry_mb: float = 0.0     # its cache entry, MB (written once)
    storage_gb_s: float = 10.0  # the shared file system's aggregate bandwidth, GB/s
    gpus: int = 64            # ranks of the run: 8 nodes x 8 GPUs
    array_tasks: int = 64     # tasks of the separate `data.prepare --shard I/N` array job
    dist_timeout_min: float = 30.0  # our --dist_timeout_min default


def project(inputs: ProjectionInputs, volumes: int, cores: int) -> dict:
    """Seconds for `volumes` on `inputs.gpus` ranks of `cores` cores each: a rank hashes its share on one core
    (prepare_rows hashes before its pool starts), then prepares it over its pool; rank 0 alone on one core
    did both for every volume before issue 36; the array job's tasks do what a rank does, holding no GPU. No
    one finishes before the shared file system has read every file twice and written every entry (`storage_s`)."""
    storage_s = volumes * (2 * inputs.file_mb + inputs.entry_mb) / 1000 / inputs.storage_gb_s

    def compute_s(workers: int, cores_each: int) -> float:
        share = math.ceil(volumes / workers)
        return share * inputs.hash_s + math.ceil(share / cores_each) * inputs.prepare_s

    in_run = max(compute_s(inputs.gpus, cores), storage_s)
    return {"volumes": volumes, "cores_per_rank": cores, "share": math.ceil(volumes / inputs.gpus),
            "serial_rank0_s": max(compute_s(1, 1), storage_s), "storage_s": storage_s,
            "rank_compute_s": compute_s(inputs.gpus, cores), "in_run_s": in_run,
            "within_nccl_600s": in_run <= NCCL_TIMEOUT_S, "within_dist_timeout": in_run <= inputs.dist_timeout_min * 60,
            "gpu_hours_waiting": in_run * inputs.gpus / 3600,
            "array_s": max(compute_s(inputs.array_tasks, cores), storage_s)}


def _duration(s: float) -> str:
    return f"{s:.0f} s" if s < 120 else f"{s / 60:.1f} min" if s < 7200 else f"{s / 3600:.1f} h"


def projection_table(inputs: ProjectionInputs, corpus: list[int], cores: list[int]) -> tuple[Table, list[dict]]:
    t = Table(["volumes", "cores per rank", "share per rank", "rank 0 alone, 1 core (before)",
               f"storage floor at {inputs.storage_gb_s:g} GB/s", "a rank's compute",
               f"in the run, {inputs.gpus} ranks", "within NCCL's 600 s",
               f"within --dist_timeout_min {inputs.dist_timeout_min:g}", "GPU-hours waiting",
               f"--shard array, {inputs.array_tasks} CPU tasks"])
    rows = [project(inputs, n, c) for n in corpus for c in cores]
    for r in rows:
        t.add(f"{r['volumes']:,}", r["cores_per_rank"], r["share"], _duration(r["serial_rank0_s"]),
              _duration(r["storage_s"]), _duration(r["rank_compute_s"]),
              _duration(r["in_run_s"]), "yes" if r["within_nccl_600s"] else "no",
              "yes" if r["within_dist_timeout"] else "no", f"{r['gpu_hours_waiting']:.1f}", _duration(r["array_s"]))
    return t, rows


def inputs_from(one_rank: dict, hashing: dict, entry_bytes: int, shape, *, gpus: int, array_tasks: int,
                storage_gb_s: float) -> ProjectionInputs:
    """The one-rank run's CPU seconds per volume, less its hashing, scaled by voxel count to the issue's volume;
    hashing and the file and entry sizes scaled in the same ratio (the same noisy float32 heads, larger)."""
    from engine.config import LoopConfig
    n, scale = one_rank["volumes"], math.prod(ISSUE_SHAPE) / math.prod(shape)
    hash_s = hashing["seconds"] / n
    prepare_s = max(one_rank["cpu_per_volume_s"] - hash_s, 0.0)
    return ProjectionInputs(prepare_s=prepare_s * scale, hash_s=hash_s * scale,
                            file_mb=hashing["bytes"] / 1e6 / n * scale, entry_mb=entry_bytes / 1e6 / n * scale,
                            storage_gb_s=storage_gb_s, gpus=gpus, array_tasks=array_tasks,
                            dist_timeout_min=LoopConfig.dist_timeout_min)


def folder_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


# ---- command -------------------------------------------------------------------------------------

def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.speed.prepare_scaling", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--volumes", type=int, default=48, help="distinct synthetic volumes in the corpus (default 48)")
    p.add_argument("--shape", type=int, nargs=3, default=list(ISSUE_SHAPE), metavar=("X", "Y", "Z"),
                   help="voxels of each volume (default: the issue's 1-mm 180 216 176)")
    p.add_argument("--source_mm", type=float, default=1.0,
                   help="voxel size of the written volumes, mm (default 1; preparing resamples to the prep spacing)")
    p.add_argument("--ranks", type=int, nargs="+", default=[1, 2], help="rank counts to time, each on an empty cache")
    p.add_argument("--corpus", type=int, nargs="+", default=[10000, 100000], help="corpus sizes to project to")
    p.add_argument("--gpus", type=int, default=64, help="ranks of the projected run (default 64: 8 nodes x 8 GPUs)")
    p.add_argument("--cores_per_gpu", type=int, nargs="+", default=[12, 16],
                   help="cores per rank in the projection (--prep_workers; default 12 and 16, a GPU node's usual)")
    p.add_argument("--array_tasks", type=int, default=64, help="tasks of the projected --shard I/N array job")
    p.add_argument("--storage_gb_s", type=float, default=10.0,
                   help="the projected cluster's shared file system, aggregate GB/s (default 10)")
    p.add_argument("--workdir", help="a new or empty folder for the volumes and caches (default: a temporary one)")
    p.add_argument("--out", help="write the inputs, the measurements and the projection here as JSON (its folder "
                                 "must exist; an existing file is replaced only if it is an earlier result of this "
                                 "benchmark; checked before the work starts)")
    return p


def check_args(p: argparse.ArgumentParser, args) -> None:
    """One line naming the flag, before anything is written."""
    for flag in ("volumes", "gpus", "array_tasks"):
        if getattr(args, flag) < 1:
            p.error(f"--{flag}: expected >= 1, got {getattr(args, flag)}")
    for flag in ("shape", "ranks", "corpus", "cores_per_gpu"):
        if min(getattr(args, flag)) < 1:
            p.error(f"--{flag}: expected values >= 1, got {getattr(args, flag)}")
    if args.ranks[0] != 1:
        p.error(f"--ranks: the first must be 1 (the speed-up and the projection are relative to it), got {args.ranks}")
    if max(args.ranks) > args.volumes:
        p.error(f"--ranks {max(args.ranks)}: more ranks than --volumes {args.volumes}")
    if args.workdir and Path(args.workdir).exists() and any(Path(args.workdir).iterdir()):
        p.error(f"--workdir {args.workdir}: not empty; the caches must start cold")
    for flag in ("source_mm", "storage_gb_s"):
        if not getattr(args, flag) > 0:
            p.error(f"--{flag}: expected > 0, got {getattr(args, flag)}")
    if args.out:
        problem = out_problem(Path(args.out))
        if problem:  # checked before minutes of work, not when the JSON is written
            p.error(f"--out {args.out}: {problem}")


def out_problem(out: Path) -> str:
    """Why --out cannot take this benchmark's JSON, or "": its folder must exist and be writable, and a file
    already there must be an earlier result of this benchmark (another run's file is never overwritten)."""
    if not out.parent.is_dir():
        return f"its folder {out.parent} does not exist"
    if not os.access(out.parent, os.W_OK):
        return f"its folder {out.parent} is not writable"
    if out.is_dir():
        return "is a folder; expected a JSON file path"
    if out.exists():
        try:
            earlier = json.loads(out.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            earlier = None
        if not (isinstance(earlier, dict) and RESULT_KEYS <= set(earlier)):
            return "exists and is not a result of this benchmark; choose another path"
        if not os.access(out, os.W_OK):
            return "exists and is not writable"
    return ""


def run(args) -> dict:
    if args.workdir:
        return measure(args, Path(args.workdir))
    with tempfile.TemporaryDirectory(prefix="prepare-scaling-") as root:  # gigabytes of volumes and caches
        return measure(args, Path(root))


def measure(args, root: Path) -> dict:
    from core.config import load_config
    from pretrain.config import PretrainConfig
    prep = load_config(PretrainConfig, Path(__file__).resolve().parents[2] / "launch" / "pretrain_cpu.yaml").prep
    load_before = os.getloadavg()
    files = write_corpus(root / "volumes", args.volumes, args.shape, args.source_mm)
    hashing = hash_rate(files)
    measured = []
    for world in args.ranks:
        ranks = run_ranks(world, root / "volumes", root / f"cache-{world}", prep)
        measured.append(summarise(world, ranks, args.volumes))
    entry_bytes = folder_bytes(root / "cache-1")  # its entries, and a hash memo of a few KB
    inputs = inputs_from(measured[0], hashing, entry_bytes, args.shape, gpus=args.gpus, array_tasks=args.array_tasks,
                         storage_gb_s=args.storage_gb_s)
    proj_table, proj_rows = projection_table(inputs, args.corpus, args.cores_per_gpu)
    return {"date": today(), "machine": machine("cpu"), "load_before": load_before, "load_after": os.getloadavg(),
            "args": vars(args), "prep_spacing_mm": list(prep.spacing), "file_mb": hashing["bytes"] / 1e6 / args.volumes,
            "hashing": hashing, "measured": measured, "projection_inputs": asdict(inputs), "projection": proj_rows,
            "tables": {"measured": measured_table(measured).markdown(), "projection": proj_table.markdown()}}


def main(argv=None) -> dict:
    p = parser()
    args = p.parse_args(argv)
    check_args(p, args)
    result = run(args)
    load = " ".join(f"{x:.2f}" for x in result["load_before"]), " ".join(f"{x:.2f}" for x in result["load_after"])
    print(f"{result['machine']}; {result['date']}; load (1/5/15 min) {load[0]} before, {load[1]} after\n"
          f"{args.volumes} volumes of {'x'.join(map(str, args.shape))} at {args.source_mm:g} mm, "
          f"{result['file_mb']:.1f} MB each, prepared to {result['prep_spacing_mm']} mm; "
          f"SHA-256 {result['hashing']['mb_per_s']:.0f} MB/s on one core\n")
    print(result["tables"]["measured"] + "\n")
    i = result["projection_inputs"]
    print(f"projection per issue-sized volume: {i['prepare_s']:.3f} core-s preparing + {i['hash_s']:.3f} core-s "
          f"hashing; {i['file_mb']:.1f} MB read twice, {i['entry_mb']:.1f} MB written\n\n"
          + result["tables"]["projection"])
    if args.out:
        write_text(args.out, json.dumps(result, indent=1, default=str))
    return result


if __name__ == "__main__":
    main()
