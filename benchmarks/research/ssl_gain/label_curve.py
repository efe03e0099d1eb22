"""Label efficiency: MiM, MAE and scratch fine-tuned on fewer labelled patients, scored on the large sets.

For each seed and each n in the preset's `label_sizes`, n patients are drawn from that seed's training
pool (the non-test patients of splits.json) as a nested, stratified subset fixed by the seed
(data.splits.nested_patient_subsets), and the three image models are fine-tuned on them with the same
recipe, the same test set and K folds inside the subset. The whole pool is the main runs. Each model
is compared with scratch at the same n by the paired patient bootstrap (paired.PairedBootstrap) on
test_large and external_large, AUC and Harrell's C; label_curve.png draws AUC against n.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from benchmarks.research.ssl_gain.paired import METRICS, PairedBootstrap
from benchmarks.research.ssl_gain.presets import LARGE_SETS, Preset, Run
from core.atomic import atomic_path, write_json
from models.tasks import CLASSIFICATION, LABEL_REPORT, MULTITASK, SURVIVAL_REPORT

CURVE_MODELS = {"mim": "mim", "mae": "mae", "scratch": ""}  # model -> the pretrained encoder it fine-tunes
BASELINE = "scratch"


def run_name(model: str, n: int | None) -> str:
    """The fine-tuning run of `model` on n patients; None: the whole pool (the main run)."""
    return f"ft_{model}_none" + (f"_n{n}" if n else "")


def label_runs(preset: Preset) -> list[Run]:
    task = (MULTITASK if preset.survival == MULTITASK.name else CLASSIFICATION).name
    return [Run(run_name(m, n), pre, "none", task, f"n{n}") for n in preset.label_sizes
            for m, pre in CURVE_MODELS.items()]


def subset_paths(out: Path, seed: int, n: int) -> tuple[Path, Path]:
    """(manifest, splits) of seed's n-patient subset; the manifest sits beside the cohort's, so its
    relative image paths hold."""
    return out / "cohort" / f"manifest_n{n}_seed{seed}.csv", out / f"seed{seed}" / f"splits_n{n}.json"


def make_subset(preset: Preset, out: Path, seed: int, n: int) -> None:
    """The n-patient manifest (subset + the seed's test set) and its splits: the seed's own test set, and
    K stratified folds inside the subset."""
    from data.splits import make_splits, nested_patient_subsets, subjects_hash
    from models.tasks import MULTITASK
    manifest, split_path = subset_paths(out, seed, n)
    main = json.loads((out / f"seed{seed}" / "splits.json").read_text())
    df = MULTITASK.read_manifest(out / "cohort" / "manifest.csv", check_files=False)
    df["subject_id"] = df["subject_id"].astype(str)
    pool = df[~df["subject_id"].isin(main["test"])]
    keep = set(nested_patient_subsets(pool, [n], seed=seed)[n])
    chosen = keep | set(main["test"])
    raw = pd.read_csv(out / "cohort" / "manifest.csv", dtype=str, keep_default_na=False)
    with atomic_path(manifest) as tmp:  # every cell as written in the cohort's manifest
        raw[raw["subject_id"].isin(chosen)].to_csv(tmp, index=False, lineterminator="\n")
    folds = make_splits(pool[pool["subject_id"].isin(keep)], test_fraction=0.0, folds=preset.folds, seed=seed)
    write_json(split_path, {"seed": seed, "stratify": "label", "test_fraction": preset.test_fraction,
                            "subjects_hash": subjects_hash(df[df["subject_id"].isin(chosen)]),
                            "test": main["test"], "folds": folds["folds"], "label_subset": n})


def _pool_patients(out: Path, seed: int) -> int:
    from models.tasks import MULTITASK
    main = json.loads((out / f"seed{seed}" / "splits.json").read_text())
    df = MULTITASK.read_manifest(out / "cohort" / "manifest.csv", check_files=False)
    return int(df.loc[~df["subject_id"].astype(str).isin(main["test"]), "patient_id"].nunique())


def curve_scores(preset: Preset, out: Path, seed: int) -> tuple[pd.DataFrame, dict[str, int]]:
    """Per-subject large-set scores of every (model, n) of one seed as evaluation.SCORE_COLUMNS rows, the
    model named "<model>@<n>"; and {n key: labelled patients}, the pool under "all"."""
    from benchmarks.research.ssl_gain.evaluation import SCORE_COLUMNS, _outcomes, _predictions, subject_rows
    outcomes = _outcomes(preset, out)
    sizes = {f"n{n}": n for n in preset.label_sizes} | {"all": _pool_patients(out, seed)}
    parts = []
    for key, n in sizes.items():
        for model in CURVE_MODELS:
            pred = _predictions(out / f"seed{seed}" / run_name(model, None if key == "all" else n))
            for split in LARGE_SETS:
                for task, score in ((LABEL_REPORT, "prob"), (SURVIVAL_REPORT, "risk")):
                    rows = subject_rows(pred, split, score, outcomes)
                    if len(rows):
                        parts.append(rows.assign(model=f"{model}@{key}", task=task, split=split)[SCORE_COLUMNS])
    table = pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(columns=SCORE_COLUMNS)
    return table, sizes


def evaluate_label_curve(preset: Preset, out: Path) -> dict:
    """label_curve.json's content: per (n, model, set, metric) the seed-mean value and, against scratch at
    the same n, the paired bootstrap difference with its 95% CI; and the figure."""
    seeds = list(preset.seeds)
    tables, sizes = zip(*(curve_scores(preset, out, s) for s in seeds))
    boot = PairedBootstrap(list(tables), seeds, preset.n_boot)
    points = []
    for key in sizes[0]:
        for model in CURVE_MODELS:
            for split in LARGE_SETS:
                for metric in METRICS:
                    cmp = boot.compare(f"{model}@{key}", f"{BASELINE}@{key}", split, metric)
                    points.append({"n_key": key, "n_patients": [s[key] for s in sizes], "model": model,
                                   "split": split, "metric": metric, "value": cmp["a"],
                                   "vs_scratch": None if model == BASELINE else
                                   {"diff": cmp["diff"], "ci": cmp["ci"], "reason": cmp.get("reason")}})
    result = {"seeds": seeds, "label_sizes": list(preset.label_sizes), "baseline": BASELINE,
              "n_boot": preset.n_boot, "points": points}
    label_curve_figure(result, out / "label_curve.png")
    return result


def label_curve_figure(result: dict, path: Path) -> None:
    """AUC against the number of labelled patients, one line per model, one panel per large set."""
    from matplotlib.figure import Figure

    from core.atomic import write_png
    fig = Figure(figsize=(9, 3.8))
    axes = fig.subplots(1, len(LARGE_SETS), sharey=True)
    for ax, split in zip(np.atleast_1d(axes), LARGE_SETS):
        for model in CURVE_MODELS:
            pts = [p for p in result["points"] if p["model"] == model and p["split"] == split
                   and p["metric"] == "auc" and p["value"] is not None]
            pts.sort(key=lambda p: np.mean(p["n_patients"]))
            ax.plot([np.mean(p["n_patients"]) for p in pts], [p["value"] for p in pts], marker="o", label=model)
        ax.set_title(split)
        ax.set_xlabel("labelled patients (fine-tuning pool)")
        ax.grid(alpha=0.3)
    np.atleast_1d(axes)[0].set_ylabel(f"AUC (mean of {len(result['seeds'])} seed(s))")
    np.atleast_1d(axes)[0].legend()
    fig.suptitle("Label efficiency: pretrained vs scratch fine-tuning")
    fig.tight_layout()
    write_png(path, fig)


def markdown(result: dict) -> list[str]:
    """results.md's label-efficiency section."""
    lines = ["", f"Label efficiency (fine-tuning on nested patient subsets of the training pool; seeds "
             f"{result['seeds']}; Δ = model − scratch at the same n, paired bootstrap 95% CI over patients, "
             f"{result['n_boot']} resamples; figure label_curve.png):", "",
             "| labelled patients | model | " + " | ".join(f"{s} AUC (Δ vs scratch)" for s in LARGE_SETS) + " | "
             + " | ".join(f"{s} C-index (Δ vs scratch)" for s in LARGE_SETS) + " |",
             "| --- " * (2 + 2 * len(LARGE_SETS)) + "|"]
    keys = list(dict.fromkeys(p["n_key"] for p in result["points"]))
    for key in keys:
        for model in CURVE_MODELS:
            cells = []
            for metric in METRICS:
                for split in LARGE_SETS:
                    p = next(q for q in result["points"] if (q["n_key"], q["model"], q["split"], q["metric"])
                             == (key, model, split, metric))
                    cells.append(_cell(p))
            n = next(q["n_patients"] for q in result["points"] if q["n_key"] == key)  # per seed
            lines.append(f"| {key} ({'/'.join(map(str, sorted(set(n))))}) | {model} | " + " | ".join(cells) + " |")
    return lines


def _cell(p: dict) -> str:
    if p["value"] is None:
        return "n/a"
    v = p["vs_scratch"]
    if not v or v["diff"] is None:
        return f"{p['value']:.3f}"
    ci = v["ci"]
    return f"{p['value']:.3f} ({v['diff']:+.3f}" + (f" [{ci[0]:+.3f}, {ci[1]:+.3f}])" if ci else ")")
