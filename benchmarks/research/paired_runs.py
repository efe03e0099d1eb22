"""Two fine-tuning runs compared on their held-out sets, paired by patient: AUC and Harrell's C of the
fold ensembles (predictions.csv), and mean Dice (segmentation.csv). Each bootstrap replicate resamples
patients and scores both runs on that same resample (finetune.evaluate.paired_bootstrap_diff).

    python -m benchmarks.research.paired_runs --a runs/seg_gain/mim_n20 --b runs/seg_gain/scratch_n20 \\
        --splits test test_large --outcomes cohort/manifest.csv cohort_large/test_large.csv --out cmp.json

The runs must have scored the same patients under each split name (the same splits file and eval sets).
"""
from __future__ import annotations

import argparse
from pathlib import Path

import pandas as pd

from core.atomic import write_json
from core.errors import InputError, cli_entry
from finetune.evaluate import bootstrap_counts, paired_bootstrap_diff, paired_diff_summary
from finetune.metrics import auc_kernel, harrell_kernel


def ensemble_rows(run: Path, split: str) -> pd.DataFrame | None:
    """The fold ensemble's scores of one split (subject_id, prob and/or risk), or None without predictions."""
    path = run / "predictions.csv"
    if not path.is_file():
        return None
    df = pd.read_csv(path, dtype={"subject_id": str})
    rows = df[(df["split"] == split) & (df["fold"] == -1)]
    return rows.set_index("subject_id")


def outcome_diffs(a: pd.DataFrame, b: pd.DataFrame, outcomes: pd.DataFrame, n_boot: int, seed: int) -> dict:
    ids = sorted(set(a.index) & set(b.index))
    if len(ids) != len(a) or len(ids) != len(b):
        raise InputError(f"the runs scored different subjects ({len(a)} and {len(b)}, {len(ids)} in common)")
    y = outcomes.loc[ids]
    out = {"n": len(ids)}
    if "prob" in a and "prob" in b:
        k = [auc_kernel(y["label"].to_numpy(), r.loc[ids, "prob"].to_numpy()) for r in (a, b)]
        out["auc"] = paired_bootstrap_diff([k[0]], [k[1]], [ids], n_boot, seed)
    if "risk" in a and "risk" in b:
        k = [harrell_kernel(y["time"].to_numpy(), y["event"].to_numpy(), r.loc[ids, "risk"].to_numpy()) for r in (a, b)]
        out["c_index"] = paired_bootstrap_diff([k[0]], [k[1]], [ids], n_boot, seed)
    return out


def dice_diff(run_a: Path, run_b: Path, split: str, n_boot: int, seed: int) -> dict | None:
    tables = [run / "segmentation.csv" for run in (run_a, run_b)]
    if not all(t.is_file() for t in tables):
        return None
    a, b = (pd.read_csv(t, dtype={"subject_id": str}) for t in tables)
    a, b = (t[(t["split"] == split) & (t["fold"] == -1)].set_index("subject_id")["dice"] for t in (a, b))
    ids = sorted(set(a.index) & set(b.index))
    if not ids:
        return None
    counts = bootstrap_counts([ids], n_boot, seed)[0]  # [B, n]
    va, vb = a.loc[ids].to_numpy(), b.loc[ids].to_numpy()
    boot = [(counts @ v) / counts.sum(1) for v in (va, vb)]  # [B] each
    return {"n": len(ids), **paired_diff_summary([va.mean()], [vb.mean()], [boot[0]], [boot[1]], n_boot)}


def compare(run_a: Path, run_b: Path, splits: list[str], outcomes: pd.DataFrame, n_boot: int, seed: int) -> dict:
    result = {"a": str(run_a), "b": str(run_b), "n_boot": n_boot, "splits": {}}
    for split in splits:
        entry = {}
        a, b = ensemble_rows(run_a, split), ensemble_rows(run_b, split)
        if a is not None and b is not None and len(a) and len(b):
            entry |= outcome_diffs(a, b, outcomes, n_boot, seed)
        dice = dice_diff(run_a, run_b, split, n_boot, seed)
        if dice is not None:
            entry["dice"] = dice
        if not entry:
            raise InputError(f"split {split!r}: neither run pair has ensemble predictions or segmentation rows for it")
        result["splits"][split] = entry
    return result


def _line(name: str, d: dict) -> str:
    if d.get("diff") is None:
        return f"  {name}: n/a ({d.get('reason')})"
    ci = f" [{d['ci'][0]:+.3f}, {d['ci'][1]:+.3f}]" if d.get("ci") else ""
    return f"  {name}: a {d['a']:.3f}, b {d['b']:.3f}, a - b {d['diff']:+.3f}{ci}"


@cli_entry
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.research.paired_runs", description=__doc__.splitlines()[0],
                                 allow_abbrev=False)
    ap.add_argument("--a", required=True, help="fine-tuning run folder (model a)")
    ap.add_argument("--b", required=True, help="fine-tuning run folder (model b)")
    ap.add_argument("--splits", nargs="+", required=True, help="split names to compare (test, external, eval set names)")
    ap.add_argument("--outcomes", nargs="*", default=[], help="CSVs holding the subjects' label / time / event")
    ap.add_argument("--n_boot", type=int, default=1000, help="bootstrap replicates (default 1000)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the replicates (default 0)")
    ap.add_argument("--out", default="", help="JSON to write (default: print only)")
    args = ap.parse_args(argv)
    frames = [pd.read_csv(p, dtype={"subject_id": str}) for p in args.outcomes]
    outcomes = (pd.concat(frames).drop_duplicates("subject_id").set_index("subject_id") if frames
                else pd.DataFrame(columns=["label", "time", "event"]))
    result = compare(Path(args.a), Path(args.b), args.splits, outcomes, args.n_boot, args.seed)
    for split, entry in result["splits"].items():
        print(f"{split} (n = {entry.get('n', entry.get('dice', {}).get('n'))}):")
        for name in ("auc", "c_index", "dice"):
            if name in entry:
                print(_line(name, entry[name]))
    if args.out:
        write_json(Path(args.out), result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
