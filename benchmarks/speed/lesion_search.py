"""Whole-head lesion search: where the seconds of one head go (predict without a drawn mask).

    python -m benchmarks.speed.lesion_search [--segmenters vit-unetr dynunet-16 dynunet-32] [--crop_mm 40 0]
        [--folds 1 3] [--overlap 0.25 0] [--repeats 3] [--threads 1] [--manifest heads.csv] [--json out.json]

It times the deployed path, finetune.lesion.search.search_lesion (what `finetune.predict --seg_model` runs
on each row without a mask), on prepared heads: a synthetic head of the built-in cohort (data.synth), a
small noisy ball (--synthetic ball, for smoke tests), or the NIfTI heads of a manifest (--manifest: subject_id,
image). Heads are prepared first with the contract's preprocessing, untimed (predict prepares every row
before it searches). Then, per segmenter x view scale x overlap x fold count, the search runs --repeats
times per head and each stage's median CPU seconds is reported: the search region (brain mask), resampling
up to the model's voxel and back down, the sliding window (all folds; its window count, per fold, and
seconds per window), the candidates and the writing.

The segmenters are built by the repo's own builders (finetune.train.resolve_inputs, finetune.fold.new_model)
from launch/finetune_tiny_cpu.yaml with --task segmentation: `vit-unetr` and `vit-primus` are the tiny ViT
with that segmentation head, `dynunet-W` and `segresnet-W` MONAI's CNNs with W channels at the finest stage.
Their weights are untrained (a fold's seeded initialisation): the compute of a window does not depend on the
weights, but what the candidates and writing stages cost does (an untrained model's p > 0.5 components are
not a trained one's).

A multi-fold row costs the one-fold row plus (folds - 1) more sliding windows (one pass per fold model). With
--budget_s, a multi-fold row whose one-fold row took longer than budget_s / folds is not run: its seconds are
that row's with the sliding window times folds, marked "est." in the table.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import statistics
import tempfile
import time
from collections import defaultdict
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from benchmarks.common import Table, machine, today

RECIPE = Path(__file__).resolve().parents[2] / "launch" / "finetune_tiny_cpu.yaml"
STAGES = ("search region", "resample up", "sliding window", "resample down", "candidates", "writing")
GOAL_S = 10.0  # issue 35: the search of one head, all folds together, on one CPU core
SEGMENTERS = {"vit-unetr": "tiny ViT + UNETR-style head", "vit-primus": "tiny ViT + Primus head",
              "dynunet": "DynUNet", "segresnet": "SegResNet"}


@dataclass
class Row:
    segmenter: str
    crop_mm: float
    overlap: float
    folds: int
    voxel_mm: float = math.nan
    box: tuple = ()               # the searched box on the prepared grid (voxels), first head
    windows: int = 0              # sliding windows per fold, first head (counted as the models are called)
    windows_whole_head: int = 0   # per fold, were the whole head crop searched (MONAI's scan formula)
    seconds: dict | None = None   # stage -> median CPU seconds per head (this process: one core at 1 thread)
    wall: float = math.nan        # median wall seconds per head, all stages
    estimated: bool = False

    @property
    def total(self) -> float:
        return sum(self.seconds.values())

    @property
    def per_window(self) -> float:
        return self.seconds["sliding window"] / (self.windows * self.folds)


class StageTimer:
    """search_lesion's `timer`: the CPU seconds of each stage of one search (time.process_time: what this
    process spent, so other jobs on a shared machine inflate it far less than wall time), and the wall
    seconds of all stages."""
    def __init__(self):
        self.seconds: dict[str, float] = defaultdict(float)
        self.wall = 0.0

    @contextlib.contextmanager
    def __call__(self, stage: str):
        t, w = time.process_time(), time.perf_counter()
        yield
        self.seconds[stage] += time.process_time() - t
        self.wall += time.perf_counter() - w


class Counted:
    """A segmenter that counts the windows it is called on (its `segment` contract unchanged)."""
    def __init__(self, model):
        self.model, self.windows = model, 0

    def segment(self, x: torch.Tensor) -> torch.Tensor:
        self.windows += x.shape[0]
        return self.model.segment(x)


def windows_per_axis(n: int, roi: int, overlap: float) -> int:
    """MONAI's sliding windows along one axis of n voxels (monai.inferers.utils._get_scan_interval, then
    monai.data.utils.dense_patch_slices): one window when it covers the axis, else a step of
    int(roi (1 - overlap)) voxels (at least 1) and a last window flush with the far edge."""
    if n <= roi:
        return 1
    step = max(1, int(roi * (1 - overlap)))
    return math.ceil((n - roi) / step) + 1


def window_count(shape, roi: int, overlap: float) -> int:
    return math.prod(windows_per_axis(int(n), roi, overlap) for n in shape)


def build_segmenters(name: str, crop_mm: float, folds: int, img_size: int, seed: int):
    """(fold models in eval mode, the input contract) of segmenter `name` at the view scale `crop_mm`: the recipe's
    config with --task segmentation, through fine-tuning's own builders, each fold seeded as fine-tuning seeds it."""
    from core.config import load_config
    from engine.steps import reseed_torch
    from finetune.config import FinetuneConfig
    from finetune.fold import FoldSeeds, new_model
    from finetune.train import resolve_inputs
    arch, _, option = name.partition("-")
    cfg = load_config(FinetuneConfig, RECIPE)
    model = replace(cfg.model, task="segmentation", encoder=replace(cfg.model.encoder, img_size=img_size))
    if arch == "vit":
        model = replace(model, seg_head=option)
    else:
        model = replace(model, seg_width=int(option))
    cfg = replace(cfg, seg_arch=arch, crop_mm=crop_mm, model=model, encoder_blr="auto")
    model_cfg, spec = resolve_inputs(cfg)
    model_cfg = replace(model_cfg, clinical_dim=0, voxel_mm=spec.spacing_mm)  # as finetune.fold.build_fold
    models = []
    for k in range(folds):
        reseed_torch(seed, FoldSeeds.of(seed, k).init_phase)
        models.append(new_model(cfg, model_cfg, spec).eval())
    return models, spec


def check_segmenter(name: str) -> str:
    arch, _, option = name.partition("-")
    ok = (arch == "vit" and option in ("unetr", "primus")) or (arch in ("dynunet", "segresnet") and option.isdigit())
    if not ok:
        raise argparse.ArgumentTypeError(f"{name!r}: expected vit-unetr, vit-primus, dynunet-W or segresnet-W "
                                         "(W: channels of the finest stage, e.g. dynunet-16)")
    return name


def head_images(args, folder: Path) -> list[tuple[str, str]]:
    """(subject_id, NIfTI path) of the heads to search."""
    import pandas as pd
    if args.manifest:
        df = pd.read_csv(args.manifest, dtype={"subject_id": str}) if Path(args.manifest).is_file() else None
        if df is None or not {"subject_id", "image"} <= set(df.columns):
            raise SystemExit(f"error: --manifest {args.manifest}: expected a CSV with columns subject_id and image")
        base = Path(args.manifest).resolve().parent
        paths = [p if Path(p).is_absolute() else str(base / p) for p in df["image"]]
        return list(zip(df["subject_id"], paths))[: args.heads]
    if args.synthetic == "ball":
        from benchmarks.speed.startup import write_volumes
        return [(p.name.split(".")[0], str(p)) for p in write_volumes(folder / "ball", args.heads, args.ball_size)]
    from data.synth.cohort import generate_cohort
    root = generate_cohort(folder / "synth", 0, args.heads, 0, seed=args.seed, progress=False)
    df = pd.read_csv(root / "manifest.csv", dtype={"subject_id": str})
    return [(s, str(root / p)) for s, p in zip(df["subject_id"], df["image"])]


def prepared_rows(heads, prep, cache: Path):
    """The heads prepared as predict prepares a row without a mask (untimed)."""
    import pandas as pd
    from data.prepare import prepare_table
    df = pd.DataFrame({"subject_id": [s for s, _ in heads], "image": [p for _, p in heads]})
    good, rejected = prepare_table(df, prep, str(cache), require_lesion=False, on_error="collect", progress=False)
    if rejected:
        raise SystemExit(f"error: could not prepare {rejected[0][0]}: {rejected[0][1]}")
    return [good.iloc[i] for i in range(len(good))]


def measure_row(row: Row, rows, models, spec, out: Path, repeats: int) -> Row:
    """Search every head `repeats` times: each stage's median seconds per head, the windows of the first head."""
    from data.cache import CacheEntry
    from finetune.lesion import search
    counted = [Counted(m) for m in models]
    samples: dict[str, list[float]] = defaultdict(list)
    walls: list[float] = []
    for i, head in enumerate(rows):
        for r in range(repeats):
            timer = StageTimer()
            search.search_lesion(counted, head, spec, out, overlap=row.overlap, timer=timer)
            for stage in STAGES:
                samples[stage].append(timer.seconds[stage])
            walls.append(timer.wall)
            if i == 0 and r == 0:
                entry = CacheEntry.from_path(head["cache_image"])
                shape = entry.image().shape[1:]
                region = search.search_region(entry, head, spec.prep)
                box = search.search_box(region.mask, spec.prep.spacing, shape, search.window_mm(spec))
                row.box = tuple(b.stop - b.start for b in box)
                row.windows = counted[0].windows
                factor = spec.spacing_mm / search.model_voxel_mm(spec)
                row.windows_whole_head = window_count([max(1, round(n * factor)) for n in shape],
                                                      spec.input_size, row.overlap)
    row.voxel_mm = search.model_voxel_mm(spec)
    row.seconds = {stage: statistics.median(v) for stage, v in samples.items()}
    row.wall = statistics.median(walls)
    return row


def estimate_row(row: Row, one_fold: Row) -> Row:
    """A multi-fold row from its one-fold row: the sliding window is one pass per fold model."""
    seconds = dict(one_fold.seconds, **{"sliding window": one_fold.seconds["sliding window"] * row.folds})
    wall = one_fold.wall * sum(seconds.values()) / one_fold.total
    return replace(row, voxel_mm=one_fold.voxel_mm, box=one_fold.box, windows=one_fold.windows,
                   windows_whole_head=one_fold.windows_whole_head, seconds=seconds, wall=wall, estimated=True)


def run(args) -> tuple[Table, list[Row]]:
    torch.set_num_threads(args.threads)
    results: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="lesion-search-") as tmp:
        tmp = Path(tmp)
        heads = head_images(args, tmp)
        prepared: dict = {}
        for name in args.segmenters:
            for crop_mm in args.crop_mm:
                for overlap in args.overlap:
                    one = None
                    for folds in sorted(args.folds):
                        row = Row(name, crop_mm, overlap, folds)
                        if one is not None and args.budget_s and one.total * folds > args.budget_s:
                            results.append(estimate_row(row, one))
                            continue
                        models, spec = build_segmenters(name, crop_mm, folds, args.img_size, args.seed)
                        key = repr(spec.prep)
                        if key not in prepared:
                            prepared[key] = prepared_rows(heads, spec.prep, tmp / f"cache{len(prepared)}")
                        row = measure_row(row, prepared[key], models, spec, tmp / "masks", args.repeats)
                        one = row if folds == 1 else one
                        results.append(row)
                        if not args.quiet:
                            print(f"{name} crop_mm {crop_mm:g} overlap {overlap:g} folds {folds}: "
                                  f"{row.total:.1f} CPU s/head, {row.wall:.1f} wall s", flush=True)
    return table_of(results, len(heads), args), results


def table_of(results: list[Row], n_heads: int, args) -> Table:
    table = Table(["segmenter", "voxel mm", "overlap", "folds", "box (prepared voxels)", "windows/fold",
                   "whole head", "s/window", *[f"{s} s" for s in STAGES], "s/head", f"<= {GOAL_S:g} s",
                   "wall s/head"])
    for r in results:
        mark = " est." if r.estimated else ""
        table.add(r.segmenter, f"{r.voxel_mm:.2f}", f"{r.overlap:g}", r.folds, "x".join(map(str, r.box)), r.windows,
                  r.windows_whole_head, f"{r.per_window:.3f}", *[f"{r.seconds[s]:.2f}" for s in STAGES],
                  f"{r.total:.1f}{mark}", "yes" if r.total <= GOAL_S else "no", f"{r.wall:.1f}{mark}")
    table.notes += [
        f"{n_heads} head(s) x {args.repeats} repeat(s), medians per head; {args.threads} torch thread(s); "
        f"untrained weights; input {args.img_size}^3 voxels",
        "seconds are CPU seconds of the benchmark's process (time.process_time; with one thread, one core's), "
        "except wall s/head, which other jobs on the machine inflate",
        "windows/fold: sliding windows per fold model over the box (the search region's bounding box grown by "
        "BOX_MARGIN_MM); whole head: as many, had the whole head crop been searched",
        "est.: not run; the one-fold row with its sliding window times the folds (--budget_s)"]
    return table


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.speed.lesion_search", description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False,
                                epilog="\n".join(__doc__.splitlines()[4:]))
    p.add_argument("--segmenters", nargs="+", type=check_segmenter, default=["vit-unetr", "dynunet-16", "dynunet-32"],
                   help="vit-unetr | vit-primus (the tiny ViT with that segmentation head), dynunet-W | segresnet-W "
                        "(MONAI CNN, W channels at the finest stage) (default: vit-unetr dynunet-16 dynunet-32)")
    p.add_argument("--crop_mm", nargs="+", type=float, default=[40.0, 0.0],
                   help="view scales: the lesion view's cube in mm over the input size is the model voxel (40: "
                        "0.83 mm, the recipe's); 0: native scale, the prepared 2 mm voxel (default: 40 0)")
    p.add_argument("--folds", nargs="+", type=int, default=[1, 3], help="fold models averaged (default: 1 3)")
    p.add_argument("--overlap", nargs="+", type=float, default=[0.25, 0.0],
                   help="sliding-window overlaps (predict's is finetune.lesion.search.OVERLAP, 0.25) (default: 0.25 0)")
    p.add_argument("--img_size", type=int, default=48, help="the model input edge in voxels (default: 48, the recipe's)")
    p.add_argument("--repeats", type=int, default=3, help="searches per head and row; medians are reported (default: 3)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default: 1, the goal's one core; with "
                   "more, CPU seconds add up over the threads)")
    p.add_argument("--budget_s", type=float, default=0.0,
                   help="estimate, rather than run, a multi-fold row whose one-fold row times its folds exceeds "
                        "this many seconds per head (default: 0, run every row)")
    p.add_argument("--manifest", default="", help="CSV of heads to search (subject_id, image: NIfTI path, "
                   "absolute or relative to the CSV); default: synthetic heads")
    p.add_argument("--synthetic", choices=["cohort", "ball"], default="cohort",
                   help="without --manifest: a head of the built-in synthetic cohort (data.synth), or a noisy ball "
                        "of --ball_size voxels at 2 mm (fast, for smoke tests) (default: cohort)")
    p.add_argument("--ball_size", type=int, default=48, help="--synthetic ball: the volume's edge in voxels (default: 48)")
    p.add_argument("--heads", type=int, default=1, help="heads to search (synthetic, or the manifest's first) (default: 1)")
    p.add_argument("--seed", type=int, default=0, help="the synthetic heads' and the fold initialisations' seed")
    p.add_argument("--json", default="", help="also write the rows (with every stage's seconds) to this JSON file")
    p.add_argument("--quiet", action="store_true", help="print the table only")
    return p


def main(argv=None) -> list[Row]:
    args = build_parser().parse_args(argv)
    if min(args.folds) < 1 or args.repeats < 1 or args.heads < 1 or not all(0 <= o < 1 for o in args.overlap):
        raise SystemExit("error: --folds, --repeats and --heads must be >= 1, and each --overlap in [0, 1)")
    table, rows = run(args)
    print(table.markdown())
    for n in table.notes:
        print(f"- {n}")
    if not args.quiet:
        print(f"- machine: {machine('cpu')}; date: {today()}")
    if args.json:
        Path(args.json).write_text(json.dumps([{**r.__dict__, "box": list(r.box), "total_s": r.total,
                                                "s_per_window": r.per_window} for r in rows], indent=2) + "\n")
    return rows


if __name__ == "__main__":
    main()
