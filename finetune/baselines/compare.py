"""A model against the baselines a user fits first, in finetune.evaluate's report.

Per split and baseline: the baseline's AUC (DeLong CI) and Harrell's C (patient-bootstrap CI), and the
model's difference to it on the subjects both scored: a paired DeLong p for the AUC, and a paired
patient-bootstrap CI of the AUC and C-index differences (finetune.evaluate.paired_bootstrap_diff: one
resample scores both). The best baseline of each metric is picked on the pooled out-of-fold "val" rows,
never on a held-out set, and the model is judged against it on every split.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from core.errors import InputError
from finetune.evaluate import (bootstrap_counts, check_predictions, join_outcomes, one_row_per_subject,
                               paired_bootstrap_diff, paired_delong)
from finetune.metrics import auc_delong, auc_kernel, harrell_kernel, kernel_values, try_metric

# metric -> (score column, outcome columns, pair kernel)
METRICS = {"auc": ("prob", ("label",), auc_kernel), "harrell_c": ("risk", ("time", "event"), harrell_kernel)}
CHOOSE_ON = "val"  # the split the best baseline is picked on: out-of-fold rows, never a held-out set
HYBRID = "hybrid"  # python -m finetune.baselines' name of the stacked model


def read_baselines(entries) -> dict[str, pd.DataFrame]:
    """{name: predictions} from `--baselines` entries: a folder (each subfolder with a predictions.csv, as
    `python -m finetune.baselines` writes it, named after the subfolder) or name=predictions.csv."""
    from finetune.evaluate import read_predictions
    out = {}
    for entry in entries:
        name, sep, path = str(entry).partition("=")
        if sep:
            found = {name: Path(path)}
        else:
            folder = Path(entry)
            found = {p.parent.name: p for p in sorted(folder.glob("*/predictions.csv"))}
            if not found:
                raise InputError(f"--baselines {folder}: no <baseline>/predictions.csv in this folder")
        for key, path in found.items():
            if key in out:
                raise InputError(f"--baselines: baseline {key!r} given twice")
            out[key] = read_predictions(path)
    return out


def _groups(rows: pd.DataFrame) -> np.ndarray:
    return rows["patient_id" if "patient_id" in rows.columns else "subject_id"].astype(str).to_numpy()


def _alone(rows: pd.DataFrame, metric: str, n_boot: int, seed: int) -> dict:
    """The baseline's own value and 95% CI (DeLong for the AUC; patient bootstrap for Harrell's C)."""
    score, outcome, kernel = METRICS[metric]
    if metric == "auc":
        res, reason = try_metric(auc_delong, rows["label"].to_numpy(int), rows[score].to_numpy(float))
        if res is None:
            return {"value": None, "ci": None, "reason": reason}
        return {"value": res["auc"], "ci": None if res["ci_low"] is None else [res["ci_low"], res["ci_high"]]}
    k = kernel(*(rows[c].to_numpy() for c in outcome), rows[score].to_numpy(float))
    value = float(kernel_values(k, np.ones(len(rows)))[0])
    if not np.isfinite(value):
        return {"value": None, "ci": None, "reason": "no comparable pair"}
    boot = kernel_values(k, bootstrap_counts([_groups(rows)], n_boot, seed)[0]) if n_boot else np.array([])
    ok = boot[np.isfinite(boot)]
    ci = [float(q) for q in np.quantile(ok, [0.025, 0.975])] if len(ok) >= max(2, n_boot / 2) else None
    return {"value": value, "ci": ci}


def _versus(model: pd.DataFrame, base: pd.DataFrame, metric: str, n_boot: int, seed: int) -> dict:
    """model - baseline on the subjects both scored: paired bootstrap (and paired DeLong for the AUC)."""
    score, outcome, kernel = METRICS[metric]
    both = model.merge(base[["subject_id", score]], on="subject_id", suffixes=("", "_base"))
    both = both.sort_values("subject_id", kind="stable")
    if both.empty:
        return {"n_common": 0, "diff": None, "ci": None, "reason": "no common subjects"}
    arrays = [both[c].to_numpy() for c in outcome]
    res = paired_bootstrap_diff([kernel(*arrays, both[score].to_numpy(float))],
                                [kernel(*arrays, both[f"{score}_base"].to_numpy(float))], [_groups(both)],
                                n_boot, seed)
    out = {"n_common": int(len(both)), "diff": res["diff"], "ci": res["ci"]}
    if res.get("reason"):
        out["reason"] = res["reason"]
    if metric == "auc":
        out["delong_p"] = paired_delong(model, base, score).get("p")
    return out


def compare_baselines(selected: dict, baselines: dict, outcomes: pd.DataFrame, n_boot: int, seed: int) -> dict:
    """selected: split -> the model's one row per subject, with outcomes; baselines: name -> predictions."""
    joined = {name: join_outcomes(check_predictions(df, f"baseline {name}"), outcomes)
              for name, df in baselines.items()}
    splits: dict = {}
    for split, rows in selected.items():
        splits[split] = {}
        for name, pred in joined.items():
            other = pred[pred["split"] == split]
            if other.empty:
                continue
            base = one_row_per_subject(other)[0]
            entry = {}
            for metric, (score, _, _) in METRICS.items():
                if score in rows.columns and score in base.columns:
                    entry[metric] = _alone(base, metric, n_boot, seed) | {
                        "model_minus_baseline": _versus(rows, base, metric, n_boot, seed)}
            splits[split][name] = entry
    return {"models": list(baselines), "splits": splits, "best": _best(splits), "chosen_on": CHOOSE_ON}


def _best(splits: dict) -> dict:
    """metric -> the baseline with the highest value on CHOOSE_ON (None where not every one has it there). The
    hybrid is reported but never the reference: it stacks the judged model's own score."""
    best = {}
    for metric in METRICS:
        values = {name: e[metric]["value"] for name, e in splits.get(CHOOSE_ON, {}).items()
                  if metric in e and e[metric]["value"] is not None and name != HYBRID}
        best[metric] = max(values, key=values.get) if values else None
    return best


def format_lines(result: dict) -> list[str]:
    """The report's baseline lines: each baseline's value and the model's paired difference to it."""
    lines = []
    best = result["best"]
    for split, entries in result["splits"].items():
        for name, entry in entries.items():
            cells = []
            for metric, e in entry.items():
                v, d = e["value"], e["model_minus_baseline"]
                shown = "n/a" if v is None else f"{v:.3f}" + (
                    f" [{e['ci'][0]:.3f}, {e['ci'][1]:.3f}]" if e["ci"] else "")
                diff = "n/a" if d["diff"] is None else f"{d['diff']:+.3f}" + (
                    f" [{d['ci'][0]:+.3f}, {d['ci'][1]:+.3f}]" if d["ci"] else "")
                star = " (best on val)" if best.get(metric) == name else ""
                cells.append(f"{metric} {shown}{star}, model - baseline {diff}")
            lines.append(f"baseline {name:<20} {split:<10} " + "; ".join(cells))
    return lines
