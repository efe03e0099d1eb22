"""Issue 35, measured before it is built: a lesion-candidate score learned on validation heads, against the hand's.

Does it tell a lesion from the rest better than the hand-made score (finetune/lesion/candidates.py: p_mean x
in-region share x a volume factor)?

Reads a finished `python -m benchmarks.research.lesion_finder --out FINDER` folder: each set's
`heads.csv`, `heads_scored.csv`, `predicted_masks/candidates.csv` and label maps (voxel value = the candidate's
rank). On the validation heads only it fits a logistic regression (sklearn, standardised features, the penalty by
inner CV grouped by head) whose target is "the candidate touches one of the patient's lesions", once over each
candidate's own numbers (FEATURES: `learned`) and once with what the image shows of it beside them
(IMAGE_FEATURES: `learned_image`). Then, for each:
- each validation head's candidates are scored by a model fitted on the other validation heads (grouped
  K-fold), so the confidence threshold, chosen by lesion_finder's rules on each head's best candidate, is not
  chosen on the rows its model was fitted on;
- the model fitted on every validation head scores the reported sets; each head's index lesion becomes its best
  candidate by that score.
Every score is summarised as lesion_finder summarises them (found, confident, silent wrong, false positives,
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
# what the image shows of it (image_features): its intensity against a shell around it, against the head's,
# and how much of its bounding box it fills
IMAGE_FEATURES = ("contrast", "rel_intensity", "extent")
FEATURE_SETS = {"learned": FEATURES, "learned_image": FEATURES + IMAGE_FEATURES}
SHELL_VOXELS = 2  # the surround: this many voxels around the candidate, other candidates left out
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


def image_features(image_path: str, labels_path: str) -> dict[int, dict[str, float]]:
    """rank -> IMAGE_FEATURES of that candidate on the source image's first volume: contrast = (mean inside - mean
    of the shell around it) / the head's intensity spread (interquartile range of voxels above 0), rel_intensity =
    mean inside / the head's median, extent = its voxels / its bounding box's."""
    import nibabel as nib
    from scipy import ndimage
    if not labels_path:
        return {}
    image = np.asanyarray(nib.load(image_path).dataobj, dtype=np.float32)
    image = image.reshape(image.shape[:3] + (-1,))[..., 0]  # [X, Y, Z]
    labels = np.asanyarray(nib.load(labels_path).dataobj).astype(np.int64)  # [X, Y, Z]
    head = image[image > 0]
    q1, median, q3 = np.percentile(head, [25, 50, 75]) if head.size else (0.0, 1.0, 1.0)
    spread = max(float(q3 - q1), 1e-6)
    out = {}
    for r, box in enumerate(ndimage.find_objects(labels), start=1):
        if box is None:
            continue
        grown = tuple(slice(max(b.start - SHELL_VOXELS, 0), b.stop + SHELL_VOXELS) for b in box)
        inside = labels[grown] == r
        shell = ndimage.binary_dilation(inside, iterations=SHELL_VOXELS) & (labels[grown] == 0)
        crop = image[grown]
        mean_in = float(crop[inside].mean())
        mean_shell = float(crop[shell].mean()) if shell.any() else mean_in
        out[r] = {"contrast": (mean_in - mean_shell) / spread, "rel_intensity": mean_in / max(float(median), 1e-6),
                  "extent": float(inside.sum() / (labels[box] >= 0).sum())}
    return out


def candidate_table(set_dir: Path) -> pd.DataFrame:
    """Every candidate of a searched set with its FEATURES, whether it touches a lesion of the patient, and its
    Dice with the drawn lesion (subject_id, rank: the hand score's rank, the label map's voxel value)."""
    heads = read_heads(set_dir)
    images = pd.read_csv(set_dir / "heads.csv", dtype=str).set_index("subject_id")["image"]
    cand = pd.read_csv(set_dir / "predicted_masks" / "candidates.csv", dtype={"subject_id": str})
    parts = []
    for _, h in heads.iterrows():
        # heads_scored lists every candidate of candidates.csv in rank order, and ranks run 1..K: position i is rank i+1
        touches = {i + 1: bool(t) for i, (_, t) in enumerate(json.loads(h["candidates"]))}
        dice = dice_by_rank(h["labels"], h["mask"])
        seen = image_features(images[h["subject_id"]], h["labels"])
        c = cand[cand["subject_id"] == h["subject_id"]].copy()
        ranks = c["rank"].astype(int)
        c["touches"] = ranks.map(touches).fillna(False).astype(bool)
        c["dice_drawn"] = ranks.map(dice).fillna(0.0)
        for name in IMAGE_FEATURES:  # a candidate lost from the label map has none: the set's median below
            c[name] = ranks.map({r: f[name] for r, f in seen.items()})
        parts.append(c)
    table = pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(columns=[*cand.columns, "touches"])
    table["log_volume_ml"] = np.log(table["volume_ml"].astype(float).clip(lower=1e-6))
    return table


def fit_scorer(train: pd.DataFrame, fill: dict, features=FEATURES):
    """LogisticRegressionCV over the standardised `features`, touches as the target, folds grouped by head."""
    from sklearn.linear_model import LogisticRegressionCV
    from sklearn.model_selection import GroupKFold
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    y, groups = train["touches"].to_numpy(int), train["subject_id"].to_numpy()
    if len(set(y)) < 2:
        raise InputError(f"{len(train)} validation candidates, all {'touching' if y.any() else 'off'} a lesion: "
                         "nothing to learn a score from")
    folds = min(VAL_FOLDS, len(set(groups[y == 1])))
    if folds < 2:
        raise InputError(f"{len(train)} validation candidates touch a lesion in {folds} head(s): inner CV needs 2")
    cv = list(GroupKFold(folds).split(train, y, groups))
    model = make_pipeline(StandardScaler(), LogisticRegressionCV(Cs=list(C_GRID), cv=cv, scoring="neg_log_loss",
                                                                 max_iter=2000))
    return model.fit(_x(train, fill, features), y)


def _x(table: pd.DataFrame, fill: dict, features) -> np.ndarray:
    """The candidates' `features` [N, F]; a missing value (no depth, a candidate lost from the label map) takes
    the validation candidates' median (`fill`)."""
    return table[list(features)].astype(float).fillna(fill).to_numpy()


def out_of_fold_scores(val: pd.DataFrame, fill: dict, features=FEATURES) -> np.ndarray:
    """Each validation candidate's learned score from a model fitted on the other heads' candidates."""
    from sklearn.model_selection import GroupKFold
    heads = val["subject_id"].to_numpy()
    out = np.full(len(val), np.nan)
    for fit_rows, held in GroupKFold(min(VAL_FOLDS, len(set(heads)))).split(val, groups=heads):
        model = fit_scorer(val.iloc[fit_rows], fill, features)
        out[held] = model.predict_proba(_x(val.iloc[held], fill, features))[:, 1]
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


def learned_scores(val: pd.DataFrame, tables: dict[str, pd.DataFrame], heads: dict[str, pd.DataFrame],
                   val_heads: pd.DataFrame, features) -> tuple[pd.DataFrame, dict, dict]:
    """(validation heads rescored out of fold, each reported set's heads rescored by the model fitted on every
    validation head, that model's summary) for one feature set."""
    fill = val[list(features)].astype(float).median().to_dict()
    val_rows = rescored_heads(val_heads, val, out_of_fold_scores(val, fill, features))
    model = fit_scorer(val, fill, features)
    sets = {name: rescored_heads(heads[name], t, model.predict_proba(_x(t, fill, features))[:, 1])
            for name, t in tables.items()}
    return val_rows, sets, {"features": list(features), "coef": dict(zip(features, model[-1].coef_[0].tolist())),
                            "C": float(model[-1].C_[0])}


def _print(results: dict, names: list[str]) -> None:
    keys = ("found_best", "detected", "silent_wrong", "silent_wrong_tissue", "flagged", "fp_per_head_confident",
            "median_dice")
    for score, rules in results["scores"].items():
        for rule, r in rules.items():
            for i, name in enumerate(names):
                s = r["val" if i == 0 else name]
                print(f"{score:13s} {rule:9s} {name:15s} " + " ".join(
                    f"{k}={s[k]:.3g}" if isinstance(s[k], float) else f"{k}={s[k]}" for k in keys))


@cli_entry
def main(argv=None) -> int:
    args = parse_args(argv)
    finder = Path(args.finder)
    for name in [args.val, *args.sets]:
        if not (finder / name / "heads_scored.csv").is_file():
            raise InputError(f"--finder {finder}: no searched set {name!r} (its heads_scored.csv); run "
                             "benchmarks.research.lesion_finder first")
    val, val_heads = candidate_table(finder / args.val), read_heads(finder / args.val)
    tables = {name: candidate_table(finder / name) for name in args.sets}
    heads = {name: read_heads(finder / name) for name in args.sets}
    results = {"target": "the candidate touches one of the patient's lesions", "val_candidates": int(len(val)),
               "val_positives": int(val["touches"].sum()), "models": {}, "scores": {}}
    scored = {"hand": (val_heads, heads)}
    for score, features in FEATURE_SETS.items():
        val_rows, sets, results["models"][score] = learned_scores(val, tables, heads, val_heads, features)
        scored[score] = (val_rows, sets)
    for score, (val_rows, sets) in scored.items():
        results["scores"][score] = {}
        for rule in THRESHOLD_RULES:
            t = choose_threshold(val_rows, rule)
            figures = {name: summarise(rows, t["threshold"], seconds(finder / name)) for name, rows in sets.items()}
            val_figures = summarise(val_rows, t["threshold"], seconds(finder / args.val))
            results["scores"][score][rule] = {"threshold": t, "val": val_figures} | figures
    out = Path(args.out) if args.out else finder / "rescore"
    write_json(out / "results.json", results)
    _print(results, [args.val, *args.sets])
    print(f"results: {out / 'results.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
