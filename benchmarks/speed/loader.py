"""Loader speed: decoding .nii.gz with nibabel vs reading the uncompressed .npy cache.

    python -m benchmarks.speed.loader [--size 160] [--n 16] [--repeats 3]
    python -m benchmarks.speed.loader --preset base_gpu [--repeats 5]   # level-1 views/s per core vs a GPU's need

Writes `n` synthetic size^3 volumes both ways (int16 .nii.gz as scanners export them; the cache's
float32 [1, X, Y, Z] .npy), then times a full read into a float32 tensor, one process and
`--workers` processes (monai.data.DataLoader). Files are read from a warm page cache, as in
training after the first epoch. Prints a markdown table and puts it in docs/BENCHMARKS.md under
"Data loader" (a rerun on the same machine replaces its own subsection).

`--preset base_gpu` (or `cpu`, `tiny`) measures instead what a pretraining loader worker does at that
preset's sizes (reads and crops), in level-1 views per second per core, beside the views per second a GPU
needs at 40% MFU, and times what the loop then builds on its device (every MiM level's resize, masks and
targets) on the CPU: benchmarks/speed/loader_need.py.
"""
from __future__ import annotations

import argparse
import datetime
import os
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from monai.data import DataLoader
from scipy.ndimage import zoom
from torch.utils.data import Dataset

from benchmarks.common import cpu_model
from core.atomic import write_text
from data.nifti import save_volume

HEADING = "## Data loader"
LAUNCH = Path(__file__).resolve().parents[2] / "launch"
PRESETS = {"base_gpu": LAUNCH / "pretrain_base_gpu.yaml", "cpu": LAUNCH / "pretrain_cpu.yaml",
           "tiny": LAUNCH / "pretrain_tiny_cpu.yaml"}


def read_nii(path: str) -> torch.Tensor:
    return torch.from_numpy(nib.load(path).get_fdata(dtype=np.float32))  # [X, Y, Z], as data.nifti loads it


def read_cache(path: str) -> torch.Tensor:
    # Copy out of the memory map so the whole volume is really read, as a training step would.
    return torch.from_numpy(np.array(np.load(path, mmap_mode="r"), dtype=np.float32, copy=True))  # [1, X, Y, Z]


def read_nii_in_worker(path: str) -> torch.Tensor:
    return read_nii(path).mean()  # the volume is fully read; only a scalar crosses to the main process


def read_cache_in_worker(path: str) -> torch.Tensor:
    return read_cache(path).mean()


class Reader(Dataset):
    def __init__(self, paths, read):
        self.paths, self.read = paths, read

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        return self.read(self.paths[i])


def synthetic_volume(size: int, rng: np.random.Generator) -> np.ndarray:
    """Head-like int16 volume: smooth tissue contrast inside an ellipsoid, zero air, scanner noise."""
    coarse = rng.normal(size=(8, 8, 8))
    tissue = zoom(coarse, size / 8, order=3)[:size, :size, :size]  # [S, S, S] smooth structure
    g = (np.indices((size,) * 3) - (size - 1) / 2) / (0.42 * size)
    head = (g ** 2).sum(0) <= 1
    vol = np.where(head, 600 + 150 * tissue + rng.normal(0, 20, (size,) * 3), rng.rayleigh(8, (size,) * 3))
    return np.clip(vol, 0, 32767).astype(np.int16)


def make_files(root: Path, size: int, n: int) -> tuple[list[str], list[str]]:
    rng = np.random.default_rng(0)
    base = synthetic_volume(size, rng)
    nii, npy = [], []
    for k in range(n):
        vol = (base + rng.normal(0, 20, base.shape)).clip(0, 32767).astype(np.int16)  # distinct noise per file
        save_volume(root / f"v{k}.nii.gz", vol, np.eye(4), dtype=np.int16)
        np.save(root / f"v{k}.npy", vol.astype(np.float32)[None])
        nii.append(str(root / f"v{k}.nii.gz"))
        npy.append(str(root / f"v{k}.npy"))
    for p in nii + npy:  # warm the page cache for both formats alike
        Path(p).read_bytes()
    return nii, npy


def serial_rate(paths, read, repeats) -> float:
    rates = []
    for _ in range(repeats):
        t = time.perf_counter()
        for p in paths:
            read(p)
        rates.append(len(paths) / (time.perf_counter() - t))
    return statistics.median(rates)


def loader_rate(paths, read, repeats, workers) -> float:
    loader = DataLoader(Reader(paths, read), batch_size=1, num_workers=workers, persistent_workers=True)
    for _ in loader:  # start the workers and warm up
        pass
    rates = []
    for _ in range(repeats):
        t = time.perf_counter()
        for _ in loader:
            pass
        rates.append(len(paths) / (time.perf_counter() - t))
    return statistics.median(rates)


def update_doc(doc: Path, subsection: str, body: str) -> None:
    """Put `body` under `subsection` inside the "Data loader" section of `doc`, leaving other sections alone."""
    text = doc.read_text() if doc.exists() else "# Benchmarks\n"
    block = f"{subsection}\n\n{body.strip()}\n"
    section = re.search(rf"^{re.escape(HEADING)}\n.*?(?=^## |\Z)", text, flags=re.S | re.M)
    if section is None:
        intro = ("Reading a volume for training: decoding `.nii.gz` with nibabel vs the uncompressed, "
                 "memory-mapped `.npy` cache written by `data.prepare`. Measured by "
                 "`benchmarks/speed/loader.py`.")
        text = text.rstrip("\n") + f"\n\n{HEADING}\n\n{intro}\n\n{block}"
    else:
        old = section.group(0)
        same = re.search(rf"^{re.escape(subsection)}\n.*?(?=^### |\Z)", old, flags=re.S | re.M)
        new = old.replace(same.group(0), block + "\n") if same else old.rstrip("\n") + f"\n\n{block}\n"
        text = text[: section.start()] + new + text[section.end():]
    write_text(doc, text.rstrip("\n") + "\n")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(allow_abbrev=False, prog="python -m benchmarks.speed.loader", description=__doc__.split("\n\n")[0])
    p.add_argument("--size", type=int, default=160, help="volume side in voxels (128-192 is typical)")
    p.add_argument("--n", type=int, default=16, help="number of volumes")
    p.add_argument("--repeats", type=int, default=3, help="timed passes; the median is reported")
    p.add_argument("--workers", type=int, default=os.cpu_count(), help="DataLoader workers for the parallel rows")
    p.add_argument("--doc", default=str(Path(__file__).resolve().parents[2] / "docs" / "BENCHMARKS.md"))
    p.add_argument("--no-doc", action="store_true", help="only print the table")
    p.add_argument("--preset", choices=sorted(PRESETS), default=None,
                   help="measure the pretraining loader's workers (read + crop) at this preset's crop size against "
                        "a GPU's need, and the loop's level building on the CPU (benchmarks.speed.loader_need; "
                        "prints, writes no doc)")
    args = p.parse_args(argv)
    if args.preset:
        from benchmarks.speed import loader_need
        return loader_need.main(["--config", str(PRESETS[args.preset]), "--repeats", str(args.repeats)])
    torch.set_num_threads(1)
    load = os.getloadavg()[0]

    with tempfile.TemporaryDirectory(prefix="loader_speed_") as tmp:
        t = time.perf_counter()
        nii, npy = make_files(Path(tmp), args.size, args.n)
        setup = time.perf_counter() - t
        nii_mb = sum(os.path.getsize(x) for x in nii) / len(nii) / 2**20
        npy_mb = sum(os.path.getsize(x) for x in npy) / len(npy) / 2**20
        w = args.workers
        rows = [
            ("1 process", serial_rate(nii, read_nii, args.repeats), serial_rate(npy, read_cache, args.repeats)),
            (f"DataLoader, {w} workers, volume sent to the main process",
             loader_rate(nii, read_nii, args.repeats, w), loader_rate(npy, read_cache, args.repeats, w)),
            # As in training, where workers read a volume but send back only crops: the format's own cost.
            (f"DataLoader, {w} workers, volume read in the worker (a scalar sent back)",
             loader_rate(nii, read_nii_in_worker, args.repeats, w),
             loader_rate(npy, read_cache_in_worker, args.repeats, w)),
        ]

    table = [
        "| reader | .nii.gz vol/s | cache vol/s | cache / .nii.gz |",
        "|---|---:|---:|---:|",
    ] + [f"| {label} | {a:.1f} | {b:.1f} | {b / a:.1f}x |" for label, a, b in rows]
    table = "\n".join(table)
    print(table)
    print(f"({args.n} volumes of {args.size}^3, .nii.gz {nii_mb:.1f} MiB int16, cache {npy_mb:.1f} MiB float32; "
          f"medians of {args.repeats}; files written in {setup:.0f} s)")
    if args.no_doc:
        return 0

    nproc = os.cpu_count()
    command = "python -m benchmarks.speed.loader " + " ".join(argv if argv is not None else sys.argv[1:])
    body = (
        f"- command: `{command.strip()}`\n"
        f"- machine: {nproc} cores (`nproc`), {cpu_model()}; torch {torch.__version__}, nibabel {nib.__version__}\n"
        f"- date: {datetime.date.today().isoformat()}\n"
        f"- data: {args.n} synthetic head-like volumes of {args.size}^3; `.nii.gz` int16 (nibabel's default gzip level 1, "
        f"{nii_mb:.1f} MiB each) read with `nib.load(...).get_fdata(dtype=float32)`; cache float32 `[1, X, Y, Z]` "
        f".npy ({npy_mb:.1f} MiB each) read with `np.load(mmap_mode=\"r\")` and a full copy into a tensor; warm "
        f"page cache; median of {args.repeats} passes; parallel rows include passing each volume from the "
        f"worker to the main process ({npy_mb:.0f} MiB per volume through shared memory), so the last row, where "
        f"only a scalar comes back, shows the cost of the read itself\n"
        f"- 1-minute load average at the start: {load:.1f} (other jobs share this machine when it is above 0)\n\n"
        f"{table}\n"
    )
    update_doc(Path(args.doc), f"### {nproc} cores, {cpu_model()}", body)
    print(f"updated {args.doc}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
