"""Evaluation of one seed: every model's AUC (DeLong CI) and Harrell's C (bootstrap CI) on val, both test sets
and both large evaluation sets; each model's per-subject scores go to scores.csv for the paired bootstrap.

Rows are chosen, and models compared, exactly as `finetune.evaluate` does it (one row per subject:
the fold ensemble on test sets, pooled out-of-fold rows on val; paired DeLong on common subjects),
so the benchmark and a fine-tuning run's metrics.json agree on the same predictions.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from benchmarks.research.ssl_gain.presets import (BASELINES, CLS_RUN, EVAL_SETS, LARGE_DIR, LARGE_SETS, MODELS, REFERENCE,
                                                  Preset, finetune_runs, large_manifests, surv_run)
from core.atomic import atomic_path
from finetune.evaluate import bootstrap_counts, one_row_per_subject, paired_delong, read_predictions
from finetune.metrics import auc_delong, bootstrap_ci, harrell_c, harrell_kernel, kernel_values, try_metric
from models.tasks import CLASSIFICATION, LABEL_REPORT, MULTITASK, SURVIVAL, SURVIVAL_REPORT

SETS = ("val",) + EVAL_SETS
SCORE_COLUMNS = ["model", "task", "split", "subject_id", "patient_id", "label", "time", "event", "score"]


# ---------------------------------------------------------------- inputs

def _outcomes(preset: Preset, out: Path) -> pd.DataFrame:
    cohort = out / "cohort"
    csvs = [cohort / "manifest.csv", cohort / "external.csv", *large_manifests(preset, out).values()]
    outcomes = pd.concat([MULTITASK.read_manifest(f, check_files=False) for f in csvs], ignore_index=True)
    outcomes["subject_id"] = outcomes["subject_id"].astype(str)
    oracles = [cohort / "oracle.csv"] + ([out / LARGE_DIR / "oracle_large.csv"] if large_manifests(preset, out) else [])
    oracle = pd.concat([pd.read_csv(f, dtype={"subject_id": str})[["subject_id", "true_prob", "true_risk"]]
                        for f in oracles], ignore_index=True)
    return outcomes[["subject_id", "patient_id", "label", "time", "event"]].merge(oracle, on="subject_id", how="left")


def _predictions(folder: Path) -> pd.DataFrame | None:
    path = folder / "predictions.csv"
    return read_predictions(path) if path.is_file() else None


def subject_rows(pred: pd.DataFrame | None, split: str, score: str, outcomes: pd.DataFrame) -> pd.DataFrame:
    """One row per subject of `split` (finetune.evaluate's choice), its `score` as 'score', with its outcomes."""
    rows = pd.DataFrame() if pred is None or score not in pred.columns else pred[pred["split"] == split]
    if rows.empty:
        return pd.DataFrame(columns=["subject_id", "score", *outcomes.columns[1:]])
    chosen = one_row_per_subject(rows)[0][["subject_id", score]].rename(columns={score: "score"})
    return chosen.merge(outcomes, on="subject_id", how="left")


def _oracle_rows(outcomes: pd.DataFrame, ref_pred: pd.DataFrame | None, split: str, truth: str) -> pd.DataFrame:
    """The generative model's own `truth` as the score, for the subjects the reference model saw in `split`."""
    ids = [] if ref_pred is None else sorted(set(ref_pred.loc[ref_pred["split"] == split, "subject_id"]))
    return outcomes[outcomes["subject_id"].isin(ids)].assign(score=lambda d: d[truth])


# ---------------------------------------------------------------- metric entries

def _auc_entry(y, score) -> dict:
    y = np.asarray(y, dtype=int)
    entry = {"n": int(len(y)), "n_pos": int(y.sum())}
    if len(y) == 0:
        return entry | {"auc": None, "reason": "no predictions for this set"}
    res, reason = try_metric(auc_delong, y, np.asarray(score, float))
    if res is None:
        return entry | {"auc": None, "reason": reason}
    entry |= {"auc": res["auc"], "ci": None if res["ci_low"] is None else [res["ci_low"], res["ci_high"]]}
    if res.get("note"):
        entry["ci_reason"] = res["note"]
    return entry


def _kernel_ci(arrays, groups, n_boot: int, seed: int, alpha: float = 0.05) -> tuple:
    """bootstrap_ci(harrell_c, ...)'s percentile patient bootstrap, scored through the pair kernel: on the
    large sets (~550 patients) the per-resample sksurv call would cost minutes per seed on 2 cores."""
    values = kernel_values(harrell_kernel(*arrays), bootstrap_counts([groups], n_boot, seed)[0])
    ok = values[np.isfinite(values)]
    if len(ok) < max(2, int(np.ceil(n_boot / 2))):
        return None, None
    return tuple(float(q) for q in np.quantile(ok, [alpha / 2, 1 - alpha / 2]))


def _cindex_entry(time_, event, risk, groups, n_boot: int, seed: int, large: bool = False) -> dict:
    entry = {"n": int(len(time_)), "n_events": int(np.sum(event))}
    if len(time_) == 0:
        return entry | {"c_index": None, "reason": "no predictions for this set"}
    arrays = (np.asarray(time_, float), np.asarray(event).astype(bool), np.asarray(risk, float))
    c, reason = try_metric(harrell_c, *arrays)
    if c is None:
        return entry | {"c_index": None, "reason": reason}
    if not n_boot:
        ci = (None, None)
    else:
        ci = _kernel_ci(arrays, groups, n_boot, seed) if large else \
            bootstrap_ci(harrell_c, *arrays, n_boot=n_boot, seed=seed, groups=groups)
    entry |= {"c_index": float(c), "ci": None if ci[0] is None else [ci[0], ci[1]]}
    if ci[0] is None:
        entry["ci_reason"] = "bootstrap disabled" if not n_boot else "too few resamples with a defined C-index"
    return entry


def _vs_reference(ref: pd.DataFrame, rows: pd.DataFrame) -> dict:
    """finetune.evaluate's paired DeLong of the reference model (a) against this one (b), in the table's terms."""
    res = paired_delong(ref, rows, score="score")
    if res["n_common"] == 0:
        return {"p": None, "reason": "no common subjects"}
    if res["p"] is None:
        return {"p": None, "n": res["n_common"], "reason": res["note"]}
    return {"p": res["p"], "diff_vs_ref": -res["diff"], "n": res["n"]}


# ---------------------------------------------------------------- one seed

def evaluate_seed(preset: Preset, out: Path, seed: int) -> dict:
    sd = out / f"seed{seed}"
    outcomes = _outcomes(preset, out)
    preds = {run.name: _predictions(sd / run.name) for run in finetune_runs(preset)}
    preds |= {f"{m}_{t.name}": _predictions(sd / f"{m}_{t.name}")  # a hybrid not fitted has no predictions
              for m in [*BASELINES, "hybrid"] for t in (CLASSIFICATION, SURVIVAL)}

    fusion_val, chosen = _choose_fusion(preset, preds, outcomes)
    cls_run = CLS_RUN | {"multimodal": f"ft_mim_{chosen}"}
    cls_run |= {f"mim_{f}": f"ft_mim_{f}" for f in preset.fusions}  # every fusion, for transparency

    result = {"seed": seed, "chosen_fusion": chosen, "fusion_val_auc": fusion_val, "models": {}}
    ref_pred = preds.get(cls_run[REFERENCE])
    ref_rows = {split: None if ref_pred is None else subject_rows(ref_pred, split, "prob", outcomes)
                for split in EVAL_SETS}
    scores = []  # per-subject scores of every model, task and held-out set (the paired bootstrap's input)
    for model in list(MODELS) + [f"mim_{f}" for f in preset.fusions]:
        if model == "oracle":
            runs = {LABEL_REPORT: "oracle.csv true_prob", SURVIVAL_REPORT: "oracle.csv true_risk"}
        else:
            srun = surv_run(model, preset, chosen) if not model.startswith("mim_") else (
                cls_run[model] if preset.survival == MULTITASK.name else None)
            runs = {LABEL_REPORT: cls_run.get(model), SURVIVAL_REPORT: srun}
        entry = {"run": runs}
        for split in SETS:
            if model == "oracle":
                rows = _oracle_rows(outcomes, preds[cls_run[REFERENCE]], split, "true_prob")
                # survival models may use their own (event-stratified) splits: score the same people
                rows_s = _oracle_rows(outcomes, preds.get(surv_run(REFERENCE, preset, chosen)), split, "true_risk")
            else:
                rows = subject_rows(preds.get(runs[LABEL_REPORT]), split, "prob", outcomes)
                ps = preds.get(runs[SURVIVAL_REPORT]) if runs[SURVIVAL_REPORT] else None
                rows_s = subject_rows(ps, split, "risk", outcomes) if ps is not None else None
            entry[split] = _split_entry(model, split, runs, rows, rows_s, ref_rows, preset.n_boot, seed)
            if split in EVAL_SETS:
                scores += [r.assign(model=model, task=task, split=split)[SCORE_COLUMNS]
                           for task, r in ((LABEL_REPORT, rows), (SURVIVAL_REPORT, rows_s)) if r is not None and len(r)]
        result["models"][model] = entry
    result["curves"] = _curves(preds, cls_run, outcomes)
    table = pd.concat(scores, ignore_index=True) if scores else pd.DataFrame(columns=SCORE_COLUMNS)
    with atomic_path(sd / "scores.csv") as tmp:
        table.to_csv(tmp, index=False)
    return result


def _choose_fusion(preset: Preset, preds: dict, outcomes: pd.DataFrame) -> tuple[dict, str]:
    """The fusion is chosen on validation only: pooled out-of-fold val AUC of each fusion run."""
    fusion_val = {}
    for f in preset.fusions:
        p = preds[f"ft_mim_{f}"]
        rows = subject_rows(p, "val", "prob", outcomes)
        fusion_val[f] = _auc_entry(rows["label"], rows["score"]) if p is not None \
            else {"auc": None, "reason": "run missing"}
    defined = {f: v["auc"] for f, v in fusion_val.items() if v.get("auc") is not None}
    return fusion_val, max(defined, key=defined.get) if defined else preset.fusions[0]


def _split_entry(model: str, split: str, runs: dict, rows: pd.DataFrame, rows_s: pd.DataFrame | None,
                 ref_rows: dict, n_boot: int, seed: int) -> dict:
    """One model on one set: classification (AUC, and vs the reference on test sets) and survival (C-index)."""
    e = {LABEL_REPORT: _auc_entry(rows["label"], rows["score"]) if len(rows) else
         {"auc": None, "reason": f"no {split} predictions (run {runs.get(LABEL_REPORT)} missing)"}}
    if split in EVAL_SETS and model != REFERENCE and len(rows) and ref_rows[split] is not None:
        e[LABEL_REPORT]["vs_" + REFERENCE] = _vs_reference(ref_rows[split], rows)
    if rows_s is None or not len(rows_s):
        e[SURVIVAL_REPORT] = {"c_index": None, "reason": "survival not run for this model"
                              if runs.get(SURVIVAL_REPORT) is None else f"no {split} risk predictions"}
    else:
        groups = rows_s["patient_id"].astype(str).to_numpy()
        e[SURVIVAL_REPORT] = _cindex_entry(rows_s["time"], rows_s["event"], rows_s["score"], groups,
                                      n_boot if split in EVAL_SETS else 0, seed, large=split in LARGE_SETS)
    return e


def _curves(preds: dict, cls_run: dict, outcomes: pd.DataFrame) -> dict:
    """Per test set: {model: {"label", "score"}} for the ROC figures."""
    curves = {}
    for split in EVAL_SETS:
        curves[split] = {}
        for model in MODELS:
            if model == "oracle":
                rows = _oracle_rows(outcomes, preds.get(cls_run[REFERENCE]), split, "true_prob")
            elif preds.get(cls_run[model]) is None:
                continue
            else:
                rows = subject_rows(preds[cls_run[model]], split, "prob", outcomes)
            curves[split][model] = {"label": rows["label"].astype(int).tolist(),
                                    "score": rows["score"].astype(float).tolist()}
    return curves
