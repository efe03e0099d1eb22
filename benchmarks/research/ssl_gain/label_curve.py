"""Label efficiency, and which model to use: every model on fewer labelled patients, scored on the large sets.

For each seed and each n in the preset's `label_sizes`, n patients are drawn from that seed's training
pool (the non-test patients of splits.json) as a nested, stratified subset fixed by the seed
(data.splits.nested_patient_subsets). The three image models are fine-tuned on them with the same
recipe, the same test set and K folds inside the subset, and the baselines a user fits first
(presets.BASELINES: radiomics, clinical-only, radiomics + clinical) are fitted on the same splits, and the
hybrid stacks the MiM ViT's score with them on those splits' out-of-fold rows (finetune.baselines.hybrid). The
whole pool is the main runs (plus the default model, the MiM ViT with clinical fusion). Each model is
compared on test_large and external_large, AUC and Harrell's C, by the paired patient bootstrap
(paired.PairedBootstrap) with scratch and with the best baseline at the same n; the best baseline is
chosen on the pooled out-of-fold val rows, never on a held-out set. label_curve.png draws AUC against n.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from benchmarks.research.ssl_gain.paired import METRICS, PairedBootstrap
from benchmarks.research.ssl_gain.presets import BASELINES, LARGE_SETS, Preset, Run, default_model
from core.atomic import atomic_path, write_json
from finetune.metrics import auc_kernel, harrell_kernel, kernel_values
from models.tasks import CLASSIFICATION, LABEL_REPORT, MULTITASK, SURVIVAL, SURVIVAL_REPORT

CURVE_MODELS = {"mim": "mim", "mae": "mae", "scratch": ""}  # model -> the pretrained encoder it fine-tunes
BASELINE = "scratch"
CHOOSE_ON = "val"  # the best baseline is picked on out-of-fold rows, as finetune.baselines.compare picks it


def run_name(model: str, n: int | None) -> str:
    """The fine-tuning run of `model` on n patients; None: the whole pool (the main run)."""
    return f"ft_{model}_none" + (f"_n{n}" if n else "")


def baseline_run(model: str, task: str, n: int | None) -> str:
    """The folder of baseline `model` (presets.BASELINES) fitted for `task` on n patients; None: the whole pool."""
    return f"{model}_{task}" + (f"_n{n}" if n else "")


def hybrid_run(task: str, n: int | None) -> str:
    """The folder of the hybrid (the MiM ViT's score stacked with the baselines) for `task` on n patients."""
    return f"hybrid_{task}" + (f"_n{n}" if n else "")


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
    sd = out / f"seed{seed}"
    parts = []
    for key, n in sizes.items():
        k = None if key == "all" else n
        # model -> {report task: (run folder, score column)}
        runs = {m: {LABEL_REPORT: (run_name(m, k), "prob"), SURVIVAL_REPORT: (run_name(m, k), "risk")}
                for m in CURVE_MODELS}
        runs |= {m: {LABEL_REPORT: (baseline_run(m, CLASSIFICATION.name, k), "prob"),
                     SURVIVAL_REPORT: (baseline_run(m, SURVIVAL.name, k), "risk")} for m in BASELINES}
        runs["hybrid"] = {LABEL_REPORT: (hybrid_run(CLASSIFICATION.name, k), "prob"),
                          SURVIVAL_REPORT: (hybrid_run(SURVIVAL.name, k), "risk")}
        if k is None:  # the model a user gets without a flag is trained on the whole pool only
            runs[default_model()] = {t: (f"ft_{default_model()}", c) for t, (_, c) in runs["mim"].items()}
        for model, tasks in runs.items():
            for task, (folder, score) in tasks.items():
                pred = _predictions(sd / folder)
                for split in (*LARGE_SETS, CHOOSE_ON):
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
    points, best = [], {}
    for key in sizes[0]:
        models = list(dict.fromkeys(m.split("@")[0] for m in tables[0]["model"] if m.endswith(f"@{key}")))
        for metric in METRICS:
            best[f"{key}/{metric}"] = best_baseline(list(tables), key, metric)
        for model in models:
            for split in LARGE_SETS:
                for metric in METRICS:
                    cmp = boot.compare(f"{model}@{key}", f"{BASELINE}@{key}", split, metric)
                    top = best[f"{key}/{metric}"]
                    vs_best = None if top in (None, model) else boot.compare(f"{model}@{key}", f"{top}@{key}",
                                                                              split, metric)
                    points.append({"n_key": key, "n_patients": [s[key] for s in sizes], "model": model,
                                   "split": split, "metric": metric, "value": cmp["a"],
                                   "vs_scratch": None if model == BASELINE else _diff(cmp),
                                   "vs_best_baseline": None if vs_best is None else _diff(vs_best)})
    result = {"seeds": seeds, "label_sizes": list(preset.label_sizes), "baseline": BASELINE,
              "n_boot": preset.n_boot, "best_baseline": best, "best_chosen_on": CHOOSE_ON, "points": points}
    label_curve_figure(result, out / "label_curve.png")
    return result


def _diff(cmp: dict) -> dict:
    return {"diff": cmp["diff"], "ci": cmp["ci"], "reason": cmp.get("reason")}


def best_baseline(tables: list[pd.DataFrame], key: str, metric: str) -> str | None:
    """The baseline with the highest seed-mean value on the out-of-fold val rows at label size `key`."""
    means = {}
    for model in BASELINES:
        values = []
        for df in tables:
            rows = df[(df["model"] == f"{model}@{key}") & (df["task"] == METRICS[metric])
                      & (df["split"] == CHOOSE_ON)]
            if rows.empty:
                break
            kernel = auc_kernel(rows["label"].astype(int), rows["score"]) if metric == "auc" else \
                harrell_kernel(rows["time"], rows["event"].astype(int), rows["score"])
            values.append(kernel_values(kernel, np.ones(len(rows)))[0])
        if len(values) == len(tables) and np.all(np.isfinite(values)):
            means[model] = float(np.mean(values))
    return max(means, key=means.get) if means else None


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
    """results.md's label-efficiency section (the image models against scratch) and its "which model" table
    (every model against the best baseline at the same n)."""
    lines = ["", f"Label efficiency (fine-tuning on nested patient subsets of the training pool; seeds "
             f"{result['seeds']}; Δ = model − scratch at the same n, paired bootstrap 95% CI over patients, "
             f"{result['n_boot']} resamples; figure label_curve.png):", ""]
    lines += _table(result, list(CURVE_MODELS), "vs_scratch", "Δ vs scratch")
    lines += ["", "Which model should I use? Every model against the best baseline at the same n (chosen on the "
              f"out-of-fold {result.get('best_chosen_on', CHOOSE_ON)} rows, per metric; marked *):", ""]
    models = list(dict.fromkeys(p["model"] for p in result["points"]))
    return lines + _table(result, models, "vs_best_baseline", "Δ vs best baseline")


def _table(result: dict, models: list[str], field: str, title: str) -> list[str]:
    lines = ["| labelled patients | model | " + " | ".join(f"{s} AUC ({title})" for s in LARGE_SETS) + " | "
             + " | ".join(f"{s} C-index ({title})" for s in LARGE_SETS) + " |",
             "| --- " * (2 + 2 * len(LARGE_SETS)) + "|"]
    for key in dict.fromkeys(p["n_key"] for p in result["points"]):
        for model in models:
            cells = []
            for metric in METRICS:
                for split in LARGE_SETS:
                    p = next((q for q in result["points"] if (q["n_key"], q["model"], q["split"], q["metric"])
                              == (key, model, split, metric)), None)
                    star = "*" if result.get("best_baseline", {}).get(f"{key}/{metric}") == model else ""
                    cells.append("–" if p is None else _cell(p, field) + star)
            if all(c == "–" for c in cells):
                continue
            n = next(q["n_patients"] for q in result["points"] if q["n_key"] == key)  # per seed
            lines.append(f"| {key} ({'/'.join(map(str, sorted(set(n))))}) | {model} | " + " | ".join(cells) + " |")
    return lines


def _cell(p: dict, field: str) -> str:
    if p["value"] is None:
        return "n/a"
    v = p.get(field)
    if not v or v["diff"] is None:
        return f"{p['value']:.3f}"
    ci = v["ci"]
    return f"{p['value']:.3f} ({v['diff']:+.3f}" + (f" [{ci[0]:+.3f}, {ci[1]:+.3f}])" if ci else ")")
