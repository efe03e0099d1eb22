"""Start-up cost at scale: what a pretraining rank does before step 0 over a large table, with a warm cache.

    python -m benchmarks.speed.startup [--rows 10000 100000] [--files 300] [--size 48] [--out DIR]

Writes --files synthetic volumes and, for each --rows, that many symbolic links spread over them (a row per
link, as a corpus of distinct files has a row per file) in a folder that `--data` reads. The cache is filled
once, untimed (links to one file share one content-addressed entry). Then, in this process and phase by phase,
it times what pretrain.train.load_training_volumes does on one rank: reading the folder, hashing and looking
up every row (data.shard.prepare_shared: memoised digests, so a stat per row), the per-volume lesion
candidates (read from the cache), building the views dataset (PretrainCrops), and the first item. The
dataset's memory is what its construction allocates (tracemalloc) and its pickled size (what each loader
worker receives). Seconds and bytes are also given per row: a per-row figure that rises with --rows is a
cost growing faster than the row count. Prints a markdown table.
"""
from __future__ import annotations

import argparse
import os
import pickle
import subprocess
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

import numpy as np


def write_volumes(folder: Path, n: int, size: int) -> list[Path]:
    """n distinct size^3 MRI-like volumes at 2 mm (a noisy ball of tissue on a zero background)."""
    from data.nifti import save_volume
    folder.mkdir(parents=True, exist_ok=True)
    g = np.linalg.norm(np.indices((size,) * 3) - (size - 1) / 2, axis=0)  # [S, S, S] voxels from the centre
    paths = []
    for i in range(n):
        rng = np.random.default_rng(i)
        image = np.where(g < size * 0.4, 100 + rng.normal(0, 5, g.shape), 0).astype(np.float32)
        paths.append(folder / f"vol{i:04d}.nii.gz")
        save_volume(paths[-1], image, np.diag([2.0, 2.0, 2.0, 1.0]))
    return paths


def link_rows(folder: Path, files: list[Path], rows: int) -> Path:
    """`rows` links named row000000.nii.gz..., link k -> files[k % len(files)]."""
    folder.mkdir(parents=True, exist_ok=True)
    for k in range(rows):
        link = folder / f"row{k:06d}.nii.gz"
        if not link.is_symlink():
            os.symlink(files[k % len(files)], link)
    return folder


def import_seconds() -> float:
    """A fresh interpreter importing the pretraining loop: the part of start-up that no row count changes."""
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import pretrain.train"], check=True, cwd=Path(__file__).resolve().parents[2])
    return time.perf_counter() - t0


def phases(cfg, rows_folder: Path) -> dict:
    """Seconds of each start-up phase and the dataset's bytes, for one rank over rows_folder."""
    from data.manifest import read_any
    from data.shard import prepare_shared
    from data.views import PretrainCrops
    from pretrain.train import lesion_centres
    out = {}
    t = time.perf_counter()
    table = read_any(rows_folder, cfg.prep)
    out["read table"] = time.perf_counter() - t
    t = time.perf_counter()
    prepared, _ = prepare_shared(table, cfg.prep, cfg.cache_dir, workers=1, require_lesion=False)
    out["hash + cache lookup"] = time.perf_counter() - t
    t = time.perf_counter()
    centres = lesion_centres(prepared, cfg, use_masks=False, show_progress=False)
    out["lesion candidates"] = time.perf_counter() - t
    tracemalloc.start()
    t = time.perf_counter()
    dataset = PretrainCrops(list(prepared["cache_image"]), crop_size=cfg.crop_size, crops_per_volume=1,
                            seed=0, lesion_fraction=cfg.lesion_view_fraction, lesion_centres=centres)
    out["views dataset"] = time.perf_counter() - t
    out["dataset bytes"] = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    out["dataset pickled bytes"] = len(pickle.dumps(dataset))
    t = time.perf_counter()
    dataset[0]
    out["first item"] = time.perf_counter() - t
    return out


def table(results: dict[int, dict], imports: float | None) -> str:
    keys = list(next(iter(results.values())))
    lines = ["| phase | " + " | ".join(f"{n:,} rows | per row" for n in results) + " |",
             "|---|" + "---|---|" * len(results)]
    for k in keys:
        unit = "B" if "bytes" in k else "s"
        cells = []
        for n, r in results.items():
            cells += [f"{r[k]:,.0f} B" if unit == "B" else f"{r[k]:.2f} s",
                      f"{r[k] / n:,.0f} B" if unit == "B" else f"{r[k] / n * 1e6:.0f} µs"]
        lines.append(f"| {k} | " + " | ".join(cells) + " |")
    if imports is not None:
        lines.append(f"| import pretrain.train (fresh interpreter) | {imports:.1f} s |" + " |" * (2 * len(results) - 1))
    return "\n".join(lines)


def main(argv=None) -> str:
    p = argparse.ArgumentParser(prog="python -m benchmarks.speed.startup", description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, nargs="+", default=[10000, 100000], help="table sizes to time")
    p.add_argument("--files", type=int, default=300, help="distinct volumes the rows link to")
    p.add_argument("--size", type=int, default=48, help="edge of each volume in voxels (2 mm)")
    p.add_argument("--out", help="working folder (default: a temporary one)")
    p.add_argument("--skip_import", action="store_true", help="do not time a fresh interpreter's imports")
    args = p.parse_args(argv)
    from core.config import load_config
    from pretrain.config import PretrainConfig
    root = Path(args.out or tempfile.mkdtemp(prefix="startup-"))
    cfg = load_config(PretrainConfig, Path(__file__).resolve().parents[2] / "launch" / "pretrain_cpu.yaml")
    cfg.cache_dir = str(root / "cache")
    files = write_volumes(root / "volumes", args.files, args.size)
    results = {}
    for n in args.rows:
        folder = link_rows(root / f"rows{n}", files, n)
        if not results:  # fills the cache, the digests' memo and the candidates of every file: the warm state
            phases(cfg, folder)
        results[n] = phases(cfg, folder)
    text = table(results, None if args.skip_import else import_seconds())
    print(text)
    return text


if __name__ == "__main__":
    main()
