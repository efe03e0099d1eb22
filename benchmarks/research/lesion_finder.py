"""The lesion finder measured as a user deploys it (issue 35): whole heads, no drawn mask, from the source grid.

    python -m benchmarks.research.lesion_finder --seg_model RUN/model --val val=VAL.csv \\
        --sets test_large=TEST.csv external_large=EXT.csv --n_heads 40 --cache_dir CACHE --out OUT \\
        [--outcome_model RUN/model] [--tta]

For each set, `n_heads` rows are drawn (seeded) and `finetune.predict --segment_all --accept_low_confidence`
runs on them with the segmenter, so every head's candidates are scored and written (candidates.csv, and
each head's label map, voxel value = rank). Then, per head, against its drawn mask:
- found: the best-ranked candidate overlaps the drawn lesion with Dice > FOUND_DICE;
- confident: its score reaches the threshold; a confident head that is not found is a wrong lesion that
  predict would score without a word ("silent wrong"). Of those, "other lesion" counts the heads whose best
  candidate is another lesion of the same patient (a real lesion, not the drawn one), and "wrong tissue"
  those whose best candidate touches none of the patient's lesions;
- false positives: candidates that touch none of the patient's lesions (the built-in cohort gives some
  patients two: each is one subject row of the same patient_id, and the other lesion is no false positive);
- Dice and HD95 (seg_metrics, on the source grid in mm, per axis) of the chosen lesion, a flagged or missed
  head counted as Dice 0 and HD95 at the grid's diagonal rather than dropped;
- seconds per head of the whole search (prepare from cache, sliding window, region, candidates, writing).
The confidence threshold is chosen on the `--val` heads only and then applied, unchanged, to the other sets,
which are for reporting only. Two rules (THRESHOLD_RULES) over the best candidate's score, found against not
found: `no_silent` (the default), the lowest threshold above every not-found validation head, so no wrong
lesion is confident there; `youden`, Youden's J. results.json reports the chosen rule's figures, the other
rule's under `other_rules`, and `predict_flag`: the finetune.predict --confidence_threshold that deploys it.
With `--outcome_model`, predict also scores each set's outcome from the drawn masks and from the found
ones, over the heads that get one (AUC and Harrell's C; the bootstrap resamples patients, both masks alike).
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import pandas as pd

from core.atomic import write_json
from core.errors import InputError, cli_entry

FOUND_DICE = 0.1  # the detection criterion: the chosen candidate overlaps the drawn lesion this much
THRESHOLD_RULES = ("no_silent", "youden")
SAMPLE_SEED = 0


def read_set(spec: str) -> tuple[str, Path]:
    name, sep, csv = spec.partition("=")
    if not sep or not name or not Path(csv).is_file():
        raise InputError(f"{spec!r}: expected NAME=CSV with an existing CSV")
    return name, Path(csv)


def draw_heads(csv: Path, n: int, out: Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(the n drawn rows, the whole table) of `csv`; the drawn rows are written to `out` with absolute paths."""
    table = pd.read_csv(csv, dtype=str, keep_default_na=False)
    for col in ("subject_id", "patient_id", "image", "mask"):
        if col not in table.columns:
            raise InputError(f"{csv}: needs a {col} column (the drawn masks are the reference; a patient's other "
                             "lesions are no false positives)")
    from finetune.lesion.search import CENTRE_COLUMNS  # a given centre would pick the lesion for the search
    table = table.drop(columns=[c for c in CENTRE_COLUMNS if c in table.columns])
    for col in ("image", "mask"):
        table[col] = [str((csv.parent / p).resolve()) if p else "" for p in table[col]]
    heads = table.sample(min(n, len(table)), random_state=SAMPLE_SEED).sort_values("subject_id", kind="stable")
    out.parent.mkdir(parents=True, exist_ok=True)
    heads.to_csv(out, index=False)
    return heads, table


def run_predict(args: list[str]) -> float:
    """finetune.predict in this process; its wall seconds."""
    from finetune.predict import main as predict
    t0 = time.perf_counter()
    if predict(args) not in (0, None):
        raise RuntimeError(f"finetune.predict {' '.join(args)} failed")
    return time.perf_counter() - t0


def head_metrics(labels: np.ndarray, drawn: np.ndarray, lesions: np.ndarray, voxel_mm) -> dict:
    """One head: `labels` [X, Y, Z] its candidates (value = rank, 0 = none), `drawn` [X, Y, Z] bool the drawn
    lesion, `lesions` [X, Y, Z] bool every lesion of the patient, `voxel_mm` (3,) -> found (the rank-1
    candidate's Dice with the drawn lesion > FOUND_DICE), dice_best, and per rank whether it touches a lesion."""
    ranks = np.unique(labels[labels > 0])
    best = labels == 1
    inter = np.logical_and(best, drawn).sum()
    dice_best = 2.0 * inter / max(1, best.sum() + drawn.sum())
    touches = {int(r): bool(np.logical_and(labels == r, lesions).any()) for r in ranks}
    return {"found": bool(dice_best > FOUND_DICE), "dice_best": float(dice_best), "touches": touches,
            "voxel_mm": [float(v) for v in voxel_mm]}


def chosen_metrics(labels: np.ndarray, drawn: np.ndarray, voxel_mm, confident: bool, rank: int = 1) -> dict:
    """Dice and HD95 (mm) of what predict would write for the head: the candidate of `rank` (the best by the
    score in use) when confident, else nothing (a flagged head is a miss here: Dice 0, HD95 the grid's
    diagonal)."""
    import torch
    from finetune.lesion.seg_metrics import segmentation_metrics
    pred = (labels == rank) if confident else np.zeros_like(drawn)
    m = segmentation_metrics(torch.from_numpy(pred)[None, None], torch.from_numpy(drawn)[None, None],
                             np.asarray(voxel_mm, dtype=np.float64)[None])
    return {"dice": float(m["dice"][0]), "hd95_mm": float(m["hd95_mm"][0])}


def score_heads(heads: pd.DataFrame, table: pd.DataFrame, candidates: pd.DataFrame, masks_dir: Path) -> pd.DataFrame:
    """One row per head: subject_id, found, dice_best, best_score, n_candidates, and per-candidate lesion
    contact (JSON) for the false-positive count at any threshold."""
    import nibabel as nib
    rows = []
    for _, h in heads.iterrows():
        sid = h["subject_id"]
        drawn_img = nib.load(h["mask"])
        drawn = np.asanyarray(drawn_img.dataobj) > 0.5
        lesions = drawn.copy()
        for other in table.loc[(table["patient_id"] == h["patient_id"]) & (table["subject_id"] != sid), "mask"]:
            img = nib.load(other)  # the patient's other lesion(s): on the head's grid, or no one's
            if img.shape[:3] != drawn.shape or not np.allclose(img.affine, drawn_img.affine, atol=1e-3):
                raise InputError(f"{other}: not on the grid of {h['mask']} (same patient {h['patient_id']})")
            lesions |= np.asanyarray(img.dataobj) > 0.5
        path = masks_dir / f"{sid}_candidates.nii.gz"
        labels = np.asanyarray(nib.load(path).dataobj).astype(np.int32) if path.is_file() else np.zeros(drawn.shape, np.int32)
        voxel_mm = np.linalg.norm(drawn_img.affine[:3, :3], axis=0)
        m = head_metrics(labels, drawn, lesions, voxel_mm)
        cand = candidates[candidates["subject_id"] == sid].sort_values("rank")
        scores = dict(zip(cand["rank"].astype(int), cand["score"].astype(float)))
        rows.append({"subject_id": sid, "found": m["found"], "dice_best": m["dice_best"],
                     "best_score": scores.get(1, 0.0), "n_candidates": len(scores),
                     # every candidate the CSV reports, as the user sees them: one whose voxels were lost when
                     # its mask went back to the source grid touches no lesion there and counts as a false positive
                     "candidates": json.dumps([[s, m["touches"].get(r, False)] for r, s in sorted(scores.items())]),
                     "mask": h["mask"], "labels": str(path) if path.is_file() else "",
                     "voxel_mm": json.dumps(m["voxel_mm"])})
    return pd.DataFrame(rows)


def choose_threshold(val: pd.DataFrame, rule: str = "youden") -> dict:
    """The threshold on the validation heads' best scores, found heads as positives (sklearn's roc_curve):
    `youden`, Youden's J; `no_silent`, the highest true-positive rate with no not-found head at or above it
    (a score above every found head's, so everything is flagged, when a not-found head outscores them all).
    The candidates module's default when the heads are all found or none is."""
    from sklearn.metrics import roc_curve
    from finetune.lesion.candidates import CONFIDENCE_THRESHOLD
    if rule not in THRESHOLD_RULES:
        raise InputError(f"--threshold_rule {rule!r}: expected one of {list(THRESHOLD_RULES)}")
    y, s = val["found"].to_numpy(bool), val["best_score"].to_numpy(float)
    if y.all() or not y.any():
        return {"threshold": CONFIDENCE_THRESHOLD, "rule": "default (validation heads are all one kind)",
                "n": int(len(y)), "found": int(y.sum())}
    fpr, tpr, thr = roc_curve(y, s)
    if rule == "youden":
        best, name = int(np.argmax(tpr - fpr)), "Youden's J on the validation heads"
    else:  # roc_curve's thresholds fall, so the last with fpr 0 has the highest tpr
        best, name = int(np.flatnonzero(fpr == 0)[-1]), "no not-found validation head confident"
    if not np.isfinite(thr[best]):  # tpr 0: only a score above every head's flags nothing wrongly
        return {"threshold": float(np.nextafter(s.max(), np.inf)), "rule": name, "tpr": 0.0, "fpr": 0.0,
                "n": int(len(y)), "found": int(y.sum())}
    return {"threshold": float(min(thr[best], 1.0)), "rule": name,
            "tpr": float(tpr[best]), "fpr": float(fpr[best]), "n": int(len(y)), "found": int(y.sum())}


def predict_flag(threshold: float) -> str:
    """The finetune.predict flag that deploys `threshold`: its exact float (repr), since a rounded one can fall
    below a not-found head's score (no_silent's nextafter) and make that head confident."""
    return f"--confidence_threshold {float(threshold)!r}"


def summarise(scored: pd.DataFrame, threshold: float, seconds: float) -> dict:
    """The set's detection figures at `threshold` (module docstring). `scored` lists each head's candidates best
    first; its index lesion is the candidate of value `best_rank` in the label map (1, the hand score's best,
    where the column is absent)."""
    confident = scored["best_score"].to_numpy(float) >= threshold
    found = scored["found"].to_numpy(bool)
    # the best candidate touches one of the patient's lesions (the drawn one or another)
    on_lesion = np.array([bool(json.loads(c)[0][1]) if json.loads(c) else False for c in scored["candidates"]])
    chosen = [chosen_metrics(*_arrays(r), c, int(r.get("best_rank", 1)))
              for (_, r), c in zip(scored.iterrows(), confident)]
    dice = np.array([c["dice"] for c in chosen])
    hd = np.array([c["hd95_mm"] for c in chosen])
    fp_all = [sum(1 for _, touch in json.loads(c) if not touch) for c in scored["candidates"]]
    fp_conf = [sum(1 for s, touch in json.loads(c) if not touch and s >= threshold) for c in scored["candidates"]]
    n = len(scored)
    return {"heads": n, "threshold": threshold,
            "found_best": int(found.sum()), "detected": int((found & confident).sum()),
            "detection_rate": float((found & confident).mean()) if n else None,
            "flagged": int((~confident).sum()), "flagged_but_found": int((~confident & found).sum()),
            "silent_wrong": int((confident & ~found).sum()),
            "silent_other_lesion": int((confident & ~found & on_lesion).sum()),
            "silent_wrong_tissue": int((confident & ~on_lesion).sum()),
            "fp_per_head_confident": float(np.mean(fp_conf)) if n else None,
            "fp_per_head_all": float(np.mean(fp_all)) if n else None,
            "median_dice": float(np.median(dice)) if n else None, "mean_dice": float(dice.mean()) if n else None,
            "median_dice_found": float(np.median(dice[found & confident])) if (found & confident).any() else None,
            "median_hd95_mm": float(np.median(hd)) if n else None,
            "seconds_per_head": seconds / max(1, n)}


def _arrays(row) -> tuple[np.ndarray, np.ndarray, list]:
    import nibabel as nib
    drawn = np.asanyarray(nib.load(row["mask"]).dataobj) > 0.5
    labels = np.asanyarray(nib.load(row["labels"]).dataobj).astype(np.int32) if row["labels"] else np.zeros(drawn.shape, np.int32)
    return labels, drawn, json.loads(row["voxel_mm"])


def outcome_pair(name: str, heads_csv: Path, scored: pd.DataFrame, threshold: float, outcome_model: str,
                 cache: str, out: Path, n_boot: int) -> dict:
    """The outcome from the drawn masks against the found ones, over the heads that get one (confident)."""
    from finetune.evaluate import paired_bootstrap_diff
    from finetune.metrics import auc_kernel, harrell_kernel
    heads = pd.read_csv(heads_csv, dtype=str, keep_default_na=False)
    drawn_csv, found_csv = out / "outcome_drawn.csv", out / "outcome_found.csv"
    run_predict(["--model", outcome_model, "--manifest", str(heads_csv), "--out", str(drawn_csv), "--cache_dir", cache])
    keep = scored.loc[scored["best_score"] >= threshold, "subject_id"]
    found = heads[heads["subject_id"].isin(keep)].copy()
    if not len(found):
        return {"scored_heads": 0}
    found["mask"] = [str((out / "predicted_masks" / f"{sid}_pred_mask.nii.gz").resolve()) for sid in found["subject_id"]]
    found.to_csv(out / "heads_found.csv", index=False)
    run_predict(["--model", outcome_model, "--manifest", str(out / "heads_found.csv"), "--out", str(found_csv),
                 "--cache_dir", cache])
    a = pd.read_csv(found_csv, dtype={"subject_id": str}).set_index("subject_id")
    b = pd.read_csv(drawn_csv, dtype={"subject_id": str}).set_index("subject_id").loc[a.index]
    rows = heads.set_index("subject_id").loc[a.index]
    groups = [rows["patient_id"].tolist()]  # a patient's lesions are resampled together
    out = {"scored_heads": int(len(a))}
    for score, metric, kernel, cols in (("prob", "auc", auc_kernel, ["label"]),
                                        ("risk", "c_index", harrell_kernel, ["time", "event"])):
        if score in a and score in b and all(c in rows and (rows[c] != "").all() for c in cols):
            y = [pd.to_numeric(rows[c]).to_numpy() for c in cols]
            k = [kernel(*y, r[score].to_numpy()) for r in (a, b)]
            out[f"{metric}_found_minus_drawn"] = paired_bootstrap_diff([k[0]], [k[1]], groups, n_boot, SAMPLE_SEED)
    return out


def search_set(name: str, csv: Path, args, out: Path) -> pd.DataFrame:
    """Draw the set's heads, search them (or reuse a finished search in `out`), score every head."""
    heads_csv = out / "heads.csv"
    heads, table = draw_heads(csv, args.n_heads, heads_csv)
    predicted, masks = out / "predicted.csv", out / "predicted_masks"
    timing = out / "timing.json"
    if not (predicted.is_file() and timing.is_file()):
        cmd = ["--model", args.seg_model, "--manifest", str(heads_csv), "--out", str(predicted), "--segment_all",
               "--accept_low_confidence", "--cache_dir", args.cache_dir] + (["--tta"] if args.tta else [])
        write_json(timing, {"seconds": run_predict(cmd), "heads": int(len(heads))})
    candidates = pd.read_csv(masks / "candidates.csv", dtype={"subject_id": str})
    scored = score_heads(heads, table, candidates, masks)
    scored.to_csv(out / "heads_scored.csv", index=False)
    return scored


def parse_args(argv):
    ap = argparse.ArgumentParser(prog="python -m benchmarks.research.lesion_finder", description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    ap.add_argument("--seg_model", required=True, help="the segmenter: a run's model/ folder (fold ensemble) or one "
                    "fold, ViT or CNN (finetune --task segmentation)")
    ap.add_argument("--val", required=True, help="NAME=CSV: the heads the confidence threshold is chosen on "
                    "(a manifest with image and mask; never a set reported below)")
    ap.add_argument("--sets", nargs="+", required=True, help="NAME=CSV ...: the sets reported, with the threshold "
                    "chosen on --val")
    ap.add_argument("--n_heads", type=int, default=40, help="heads drawn from each set (seeded; default 40)")
    ap.add_argument("--cache_dir", required=True, help="the preprocessing cache (finetune.predict --cache_dir)")
    ap.add_argument("--outcome_model", default="", help="an outcome model's folder: also score the outcome from "
                    "the drawn and the found masks, a bootstrap over patients")
    ap.add_argument("--tta", action="store_true", help="search with test-time flips (finetune.predict --tta)")
    ap.add_argument("--threshold_rule", default="no_silent", choices=THRESHOLD_RULES, help="how the confidence "
                    "threshold is chosen on the --val heads: no_silent (default), the lowest found head's score above "
                    "every not-found one, so no not-found validation head is confident; youden, Youden's J. The "
                    "other rule is reported too")
    ap.add_argument("--n_boot", type=int, default=1000, help="bootstrap replicates of the paired outcome CIs")
    ap.add_argument("--out", required=True, help="output folder (each set's searches, results.json); a finished "
                    "search in it is reused when the settings match")
    args = ap.parse_args(argv)
    if args.n_heads < 1:
        raise InputError(f"--n_heads {args.n_heads}: must be >= 1")
    return args


@cli_entry
def main(argv=None) -> int:
    args = parse_args(argv)
    val, sets = read_set(args.val), [read_set(s) for s in args.sets]
    for p in [args.seg_model] + ([args.outcome_model] if args.outcome_model else []):
        if not Path(p).is_dir():
            raise InputError(f"{p}: not a model folder")
    out = Path(args.out)
    settings = {"seg_model": str(Path(args.seg_model).resolve()), "n_heads": args.n_heads, "tta": args.tta,
                "sets": {n: str(c.resolve()) for n, c in [val, *sets]}}
    saved = out / "settings.json"
    if saved.is_file() and json.loads(saved.read_text()) != settings:
        raise InputError(f"--out {out}: holds a measurement with other settings ({saved}); choose another folder")
    out.mkdir(parents=True, exist_ok=True)
    write_json(saved, settings)
    val_scored = search_set(val[0], val[1], args, out / val[0])
    seconds = lambda name: json.loads((out / name / "timing.json").read_text())["seconds"]  # noqa: E731
    rules = {rule: choose_threshold(val_scored, rule) for rule in THRESHOLD_RULES}
    choice = rules[args.threshold_rule]
    results = {"threshold": choice, "val": summarise(val_scored, choice["threshold"], seconds(val[0])), "sets": {},
               "other_rules": {rule: {"threshold": c, "sets": {}} for rule, c in rules.items()
                               if rule != args.threshold_rule}}
    for name, csv in sets:
        scored = search_set(name, csv, args, out / name)
        results["sets"][name] = summarise(scored, choice["threshold"], seconds(name))
        for other in results["other_rules"].values():
            other["sets"][name] = summarise(scored, other["threshold"]["threshold"], seconds(name))
        if args.outcome_model:
            results["sets"][name]["outcome"] = outcome_pair(name, out / name / "heads.csv", scored, choice["threshold"],
                                                            args.outcome_model, args.cache_dir, out / name, args.n_boot)
    results["predict_flag"] = predict_flag(choice["threshold"])
    write_json(out / "results.json", results)
    print(json.dumps(results, indent=1))
    print(f"finetune.predict with this segmenter, as measured here: {results['predict_flag']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
