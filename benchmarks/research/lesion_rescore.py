"""Issue 35, measured before it is built: does a candidate score learned on validation heads tell a lesion from
the rest better than the hand-made one (finetune/lesion/candidates.py: p_mean x in-region share x a volume
factor)?

Reads a finished `python -m benchmarks.research.lesion_finder --out FINDER` folder: each set's
`heads_scored.csv`, `predicted_masks/candidates.csv` and label maps (voxel value = the candidate's rank). On the
validation heads only it fits a logistic regression (sklearn, standardised FEATURES, the penalty by inner CV
grouped by head) whose target is "the candidate touches one of the patient's lesions". Then:
- each validation head's candidates are scored by a model fitted on the other validation heads (grouped
  K-fold), so the confidence threshold, chosen by lesion_finder's rules on each head's best candidate, is not
  chosen on the rows its model was fitted on;
- the model fitted on every validation head scores the reported sets; each head's index lesion becomes its best
  candidate by that score.
Both scores are summarised as lesion_finder summarises them (found, confident, silent wrong, false positives,
Dice and HD95 of what predict would write) on the same heads. The reported sets are never fitted on.

    python -m benchmarks.research.lesion_rescore --finder FINDER --val val --sets test_large external_large
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pandas as pd

from benchmarks.research.lesion_finder import FOUND_DICE, THRESHOLD_RULES, choose_threshold, summarise
from core.atomic import write_json
from core.errors import InputError, cli_entry

# a candidate's own numbers (candidates.csv), and the hand-made score built from them
FEATURES = ("log_volume_ml", "p_max", "p_mean", "depth_mm", "in_region", "score")
C_GRID = np.logspace(-3, 2, 11)
VAL_FOLDS = 5
SEED = 0


def dice_by_rank(labels_path: str, mask_path: str) -> dict[int, float]:
    """rank -> Dice of that candidate's voxels with the drawn lesion, on the source grid."""
    import nibabel as nib
    drawn = np.asanyarray(nib.load(mask_path).dataobj) > 0.5
    if not labels_path:
        return {}
    labels = np.asanyarray(nib.load(labels_path).dataobj).astype(np.int64)  # [X, Y, Z], 0 = no candidate
    size, inter = np.bincount(labels.ravel()), np.bincount(labels[drawn], minlength=labels.max() + 1)
    return {r: float(2 * inter[r] / (size[r] + drawn.sum())) for r in range(1, len(size)) if size[r]}


def candidate_table(set_dir: Path) -> pd.DataFrame:
    """Every candidate of a searched set with its FEATURES, whether it touches a lesion of the patient, and its
    Dice with the drawn lesion (subject_id, rank: the hand score's rank, the label map's voxel value)."""
    heads = pd.read_csv(set_dir / "heads_scored.csv", dtype={"subject_id": str}, keep_default_na=False)
    cand = pd.read_csv(set_dir / "predicted_masks" / "candidates.csv", dtype={"subject_id": str})
    parts = []
    for _, h in heads.iterrows():
        touches = {i + 1: bool(t) for i, (_, t) in enumerate(json.loads(h["candidates"]))}  # listed by rank
        dice = dice_by_rank(h["labels"], h["mask"])
        c = cand[cand["subject_id"] == h["subject_id"]].copy()
        c["touches"] = c["rank"].astype(int).map(touches).fillna(False).astype(bool)
        c["dice_drawn"] = c["rank"].astype(int).map(dice).fillna(0.0)
        parts.append(c)
    table = pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(columns=[*cand.columns, "touches"])
    table["log_volume_ml"] = np.log(table["volume_ml"].astype(float).clip(lower=1e-6))
    return table


def fit_scorer(train: pd.DataFrame, depth_fill: float):
    """LogisticRegressionCV over the standardised FEATURES, touches as the target, folds grouped by head."""
    from sklearn.linear_model import LogisticRegressionCV
    from sklearn.model_selection import GroupKFold
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    y, groups = train["touches"].to_numpy(int), train["subject_id"].to_numpy()
    if len(set(y)) < 2:
        raise InputError(f"{len(train)} validation candidates, all {'touching' if y.any() else 'off'} a lesion: "
                         "nothing to learn a score from")
    folds = min(VAL_FOLDS, len(set(groups[y == 1])))
    cv = list(GroupKFold(folds).split(train, y, groups))
    model = make_pipeline(StandardScaler(), LogisticRegressionCV(Cs=list(C_GRID), cv=cv, scoring="neg_log_loss",
                                                                 max_iter=2000))
    return model.fit(_x(train, depth_fill), y)


def _x(table: pd.DataFrame, depth_fill: float) -> np.ndarray:
    return table[list(FEATURES)].astype(float).fillna({"depth_mm": depth_fill}).to_numpy()


def out_of_fold_scores(val: pd.DataFrame, depth_fill: float) -> np.ndarray:
    """Each validation candidate's learned score from a model fitted on the other heads' candidates."""
    from sklearn.model_selection import GroupKFold
    heads = val["subject_id"].to_numpy()
    out = np.full(len(val), np.nan)
    for fit_rows, held in GroupKFold(min(VAL_FOLDS, len(set(heads)))).split(val, groups=heads):
        model = fit_scorer(val.iloc[fit_rows], depth_fill)
        out[held] = model.predict_proba(_x(val.iloc[held], depth_fill))[:, 1]
    return out


def rescored_heads(heads: pd.DataFrame, table: pd.DataFrame, scores: np.ndarray) -> pd.DataFrame:
    """heads_scored.csv's rows with the index lesion chosen by `scores` (one per row of `table`): best_rank is
    the chosen candidate's voxel value in the label map, best_score its score, found its Dice with the drawn
    lesion > FOUND_DICE, candidates [[score, touches], ...] best first."""
    table = table.assign(learned=scores)
    rows = []
    for _, h in heads.iterrows():
        c = table[table["subject_id"] == h["subject_id"]].sort_values("learned", ascending=False, kind="stable")
        row = h.to_dict()
        if len(c):
            best = c.iloc[0]
            row |= {"best_rank": int(best["rank"]), "best_score": float(best["learned"]),
                    "found": bool(best["dice_drawn"] > FOUND_DICE), "dice_best": float(best["dice_drawn"]),
                    "candidates": json.dumps([[float(s), bool(t)] for s, t in zip(c["learned"], c["touches"])])}
        else:
            row |= {"best_rank": 1, "best_score": 0.0}
        rows.append(row)
    return pd.DataFrame(rows)


def read_heads(set_dir: Path) -> pd.DataFrame:
    return pd.read_csv(set_dir / "heads_scored.csv", dtype={"subject_id": str}, keep_default_na=False)


def seconds(set_dir: Path) -> float:
    return json.loads((set_dir / "timing.json").read_text())["seconds"]


def parse_args(argv):
    ap = argparse.ArgumentParser(prog="python -m benchmarks.research.lesion_rescore",
                                 description=__doc__.splitlines()[0], epilog=__doc__.split("\n\n", 1)[1],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--finder", required=True, help="a finished lesion_finder --out folder")
    ap.add_argument("--val", default="val", help="the set the score and its threshold are fitted on (default: val)")
    ap.add_argument("--sets", nargs="+", required=True, help="the sets reported (never fitted on)")
    ap.add_argument("--out", default="", help="results.json goes here (default: FINDER/rescore)")
    return ap.parse_args(argv)


@cli_entry
def main(argv=None) -> int:
    args = parse_args(argv)
    finder = Path(args.finder)
    for name in [args.val, *args.sets]:
        if not (finder / name / "heads_scored.csv").is_file():
            raise InputError(f"--finder {finder}: no searched set {name!r} (its heads_scored.csv); run "
                             "benchmarks.research.lesion_finder first")
    val = candidate_table(finder / args.val)
    depth_fill = float(val["depth_mm"].median())
    val_heads = rescored_heads(read_heads(finder / args.val), val, out_of_fold_scores(val, depth_fill))
    model = fit_scorer(val, depth_fill)
    hand = {name: read_heads(finder / name) for name in args.sets}
    learned = {}
    for name in args.sets:
        table = candidate_table(finder / name)
        learned[name] = rescored_heads(hand[name], table, model.predict_proba(_x(table, depth_fill))[:, 1])
    results = {"features": list(FEATURES), "target": "the candidate touches one of the patient's lesions",
               "val_candidates": int(len(val)), "val_positives": int(val["touches"].sum()),
               "coef": dict(zip(FEATURES, model[-1].coef_[0].tolist())), "C": float(model[-1].C_[0]), "scores": {}}
    for score, val_rows, sets in (("hand", read_heads(finder / args.val), hand), ("learned", val_heads, learned)):
        results["scores"][score] = {}
        for rule in THRESHOLD_RULES:
            t = choose_threshold(val_rows, rule)
            figures = {name: summarise(rows, t["threshold"], seconds(finder / name)) for name, rows in sets.items()}
            val_figures = summarise(val_rows, t["threshold"], seconds(finder / args.val))
            results["scores"][score][rule] = {"threshold": t, "val": val_figures} | figures
    out = Path(args.out) if args.out else finder / "rescore"
    write_json(out / "results.json", results)
    keys = ("found_best", "detected", "silent_wrong", "silent_wrong_tissue", "flagged", "fp_per_head_confident",
            "median_dice")
    for score, rules in results["scores"].items():
        for rule, r in rules.items():
            for name in [args.val, *args.sets]:
                s = r["val" if name == args.val else name]
                print(f"{score:8s} {rule:9s} {name:15s} " + " ".join(f"{k}={s[k]:.3g}" if isinstance(s[k], float)
                                                                         else f"{k}={s[k]}" for k in keys))
    print(f"results: {out / 'results.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
