"""Issue 33, item 3, measured before it is built: would a stacked hybrid (deep image score + radiomics +
clinical) beat radiomics + clinical on the large evaluation sets?

Reads the predictions of one `python -m benchmarks.research.ssl_gain` seed and fits, on the pooled out-of-fold
`val` rows only (each row predicted by a model that never saw it), a second-level model:

- label: standardised L2 logistic regression over [the image run's logit, radiomics + clinical's logit]
  (variant "+clinical": the clinical columns encoded by finetune.clinical.ClinicalSchema beside them);
- survival: ridge Cox (sksurv CoxPHSurvivalAnalysis) over [the image run's risk, the clinical Cox risk,
  radiomics + clinical's risk] (and the same "+clinical" variant).

The penalty is chosen by patient-grouped inner CV on those val rows. The fitted stacker is applied to each
held-out set (the image run's fold ensemble, the baselines' all-training-rows model) and scored there with
finetune.baselines.compare: its AUC (DeLong CI) / Harrell's C (patient-bootstrap CI) and its paired
patient-bootstrap difference to every first-level model. Held-out sets are for reporting only: nothing
is chosen on them.

    python -m benchmarks.research.hybrid_stack --ssl_gain runs/ssl_gain_cpu_s0 --seed 0 --out runs/hybrid_stack
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import shlex
import sys
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
from scipy.special import logit
from sklearn.compose import ColumnTransformer
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import GridSearchCV, StratifiedGroupKFold
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler
from sksurv.linear_model import CoxPHSurvivalAnalysis

from benchmarks.research.ssl_gain.presets import LARGE_DIR, LARGE_SETS
from core.atomic import write_json, write_text
from core.errors import InputError, cli_entry
from data.manifest import clinical_columns
from finetune.baselines.clinical_models import ClinicalEncoder
from finetune.baselines.compare import compare_baselines
from finetune.baselines.radiomics import survival_target
from finetune.evaluate import one_row_per_subject, read_predictions
from models.tasks import MULTITASK

FIT_SPLIT = "val"  # the only rows a stacker is fitted on: pooled out-of-fold predictions
IMAGE_RUN = "ft_mim_concat"
# task -> (score column, {input name: run folder, None = the image run}); the first-level models
TASKS = {
    "label": ("prob", {"image": None, "radiomics_clinical": "radiomics_clinical_classification"}),
    "survival": ("risk", {"image": None, "clinical_linear": "clinical_linear_survival",
                          "radiomics_clinical": "radiomics_clinical_survival"}),
}
C_GRID = np.logspace(-3, 2, 11)      # inverse L2 strength of the label stacker
ALPHA_GRID = np.logspace(-2, 3, 11)  # ridge strength of the Cox stacker (on the summed partial likelihood)
PROB_EPS = 1e-6                      # probabilities are clipped before the logit, so 0 or 1 stays finite
OUTCOME_FILES = ("cohort/manifest.csv", "cohort/external.csv", f"{LARGE_DIR}/test_large.csv",
                 f"{LARGE_DIR}/external_large.csv")


# ---------------------------------------------------------------- inputs

def read_outcomes(root: Path) -> tuple[pd.DataFrame, list[str]]:
    """(subject_id, patient_id, label, time, event and the clinical columns of every cohort file present;
    the clinical columns' names). Image and mask paths are left out: their names are not the stacker's."""
    files = [root / f for f in OUTCOME_FILES if (root / f).is_file()]
    if not files:
        raise InputError(f"--ssl_gain {root}: none of {list(OUTCOME_FILES)} found")
    out = pd.concat([MULTITASK.read_manifest(f, check_files=False) for f in files], ignore_index=True)
    out["subject_id"] = out["subject_id"].astype(str)
    out["patient_id"] = out["patient_id"].astype(str)
    clinical = [c for c in clinical_columns(out) if c != "patient_id"]
    return out[["subject_id", "patient_id", "label", "time", "event"] + clinical], clinical


def read_runs(seed_dir: Path, image_run: str) -> dict[str, pd.DataFrame]:
    """{run folder: predictions} of every first-level model; InputError naming a missing folder or file."""
    runs = {image_run} | {r for _, inputs in TASKS.values() for r in inputs.values() if r}
    out = {}
    for run in sorted(runs):
        folder = seed_dir / run
        if not folder.is_dir():
            raise InputError(f"run folder {folder}: not found (expected the ssl_gain run {run!r})")
        out[run] = read_predictions(folder / "predictions.csv")
    return out


def first_level(preds: dict[str, pd.DataFrame], inputs: dict[str, str], score: str, split: str) -> pd.DataFrame:
    """subject_id and one column per input: its `score` on `split`, one row per subject.

    On val each subject must have exactly one row (its out-of-fold prediction) in every input, and every
    input the same subjects: a stacker fitted on val must never see an in-fold or held-out prediction."""
    table, seen = None, []
    for name, run in inputs.items():
        rows = preds[run][preds[run]["split"] == split]
        if score not in rows.columns or rows.empty:
            raise InputError(f"run {run}: no {split!r} rows with a {score!r} column")
        if split == FIT_SPLIT:
            twice = sorted(rows["subject_id"][rows["subject_id"].duplicated()].unique())
            if twice:
                raise InputError(f"run {run}: {split} rows are not out-of-fold, subject(s) {twice[:5]} appear "
                                 f"more than once (a stacker is fitted on one out-of-fold row per subject)")
        else:
            rows = one_row_per_subject(rows)[0]
        col = rows[["subject_id", score]].rename(columns={score: name})
        if table is not None:
            _same_subjects(table, col, run, split, seen)
            col = table.merge(col, on="subject_id", validate="one_to_one")
        table, seen = col, seen + [run]
    return table.sort_values("subject_id", kind="stable").reset_index(drop=True)


def _same_subjects(table: pd.DataFrame, col: pd.DataFrame, run: str, split: str, seen: list[str]) -> None:
    """InputError naming the run that lacks a subject the others have (every input scores the same rows)."""
    have, new = set(table["subject_id"]), set(col["subject_id"])
    if have - new:
        raise InputError(f"run {run}: {split} rows missing for subject(s) {sorted(have - new)[:5]} that "
                         f"{', '.join(seen)} has")
    if new - have:
        raise InputError(f"run {', '.join(seen)}: {split} rows missing for subject(s) {sorted(new - have)[:5]} "
                         f"that {run} has")


def features(table: pd.DataFrame, inputs: dict, score: str) -> pd.DataFrame:
    """The stacker's score inputs: a probability as its logit (the scale a logistic model is linear in)."""
    out = table.copy()
    if score == "prob":
        for name in inputs:
            out[name] = logit(np.clip(out[name].to_numpy(float), PROB_EPS, 1 - PROB_EPS))
    return out


# ---------------------------------------------------------------- the stacker

def _pipeline(model, score_cols: list[str], clinical: list[str]) -> Pipeline:
    parts = [("scores", StandardScaler(), score_cols)]
    if clinical:
        # encoded as every mimfm model encodes them, then scaled with the scores under one penalty
        parts.append(("clinical", Pipeline([("encode", ClinicalEncoder(clinical)), ("scale", StandardScaler())]),
                      clinical))
    return Pipeline([("features", ColumnTransformer(parts)), ("model", model)])


def fit_stacker(train: pd.DataFrame, task: str, score_cols: list[str], clinical: list[str], seed: int,
                inner_folds: int = 5) -> dict:
    """Fit the task's stacker on `train` (val rows, with outcomes and patient_id); the penalty by
    patient-grouped, outcome-stratified inner CV (log loss / Harrell's C). Returns the fitted pipeline,
    its penalty, inner-CV score and coefficients."""
    label = task == "label"
    strata = train["label" if label else "event"].to_numpy(int)
    y = strata if label else survival_target(train["event"], train["time"])
    model = LogisticRegression(solver="lbfgs", max_iter=2000) if label else CoxPHSurvivalAnalysis()
    grid = {"model__C": list(C_GRID)} if label else {"model__alpha": list(ALPHA_GRID)}
    counts = np.bincount(strata, minlength=2)
    # logistic needs both classes in every inner fold; Cox needs events (all-event data is fine)
    n_splits = min(inner_folds, int(counts.min() if label else counts[1]))
    if n_splits < 2:
        raise InputError(f"{task} stacker: needs at least 2 {'rows of each class' if label else 'events'} "
                         f"among the {FIT_SPLIT} rows (counts {counts.tolist()})")
    cv = list(StratifiedGroupKFold(n_splits, shuffle=True, random_state=seed)
              .split(train, strata, train["patient_id"]))
    search = GridSearchCV(_pipeline(model, score_cols, clinical), grid, cv=cv,
                          scoring="neg_log_loss" if label else None, error_score=np.nan, refit=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a near-separable inner fold warns; it scores on and may lose
        search.fit(train[score_cols + clinical], y)
    pipe = search.best_estimator_
    parts = pipe.named_steps["features"].named_transformers_
    names = score_cols + (list(parts["clinical"].named_steps["encode"].schema_.feature_names) if clinical else [])
    return {"pipeline": pipe, "penalty": {k.split("__")[1]: float(v) for k, v in search.best_params_.items()},
            "inner_cv": {"score": float(search.best_score_), "scoring": "neg_log_loss" if label else "harrell_c",
                         "folds": n_splits, "grouped_by": "patient_id"},
            "coef": dict(zip(names, np.ravel(pipe.named_steps["model"].coef_).astype(float).tolist())),
            "n_fit": int(len(train)), "fit_split": FIT_SPLIT}


def apply_stacker(fitted: dict, table: pd.DataFrame, task: str, cols: list[str], split: str) -> pd.DataFrame:
    """The stacker's predictions as a predictions table (subject_id, split, fold -1, prob | risk)."""
    pipe = fitted["pipeline"]
    score = pipe.predict_proba(table[cols])[:, 1] if task == "label" else pipe.predict(table[cols])
    return pd.DataFrame({"subject_id": table["subject_id"], "split": split, "fold": -1,
                         "prob" if task == "label" else "risk": score})


# ---------------------------------------------------------------- one task

def stack_task(task: str, preds: dict, outcomes: pd.DataFrame, image_run: str, sets: list[str],
               clinical: list[str], n_boot: int, seed: int) -> dict:
    """Fit both stackers of `task` on val rows, score them and every first-level model on each set."""
    score, inputs = TASKS[task]
    inputs = {name: run or image_run for name, run in inputs.items()}
    score_cols = list(inputs)
    val = features(first_level(preds, inputs, score, FIT_SPLIT), inputs, score)
    val = val.merge(outcomes, on="subject_id", how="left", validate="one_to_one")
    unknown = val["subject_id"][val["patient_id"].isna()].tolist()
    if unknown:
        raise InputError(f"{FIT_SPLIT} subject(s) {unknown[:5]} not in the cohort's manifests")
    variants = {"hybrid": []} | ({"hybrid+clinical": clinical} if clinical else {})
    fitted = {v: fit_stacker(val, task, score_cols, extra, seed) for v, extra in variants.items()}
    result = {"inputs": inputs, "score": score, "stackers": {}, "sets": {}}
    for v, f in fitted.items():
        result["stackers"][v] = {k: f[k] for k in ("penalty", "inner_cv", "coef", "n_fit", "fit_split")}
    first = {name: preds[run][preds[run]["split"].isin(sets)][["subject_id", "split", "fold", score]]
             for name, run in inputs.items()}
    for split in sets:
        held = features(first_level(preds, inputs, score, split), inputs, score)
        held = held.merge(outcomes.drop(columns=["label", "time", "event"]), on="subject_id", how="left")
        result["sets"][split] = {}
        for v, f in fitted.items():
            cols = score_cols + variants[v]
            rows = apply_stacker(f, held, task, cols, split)
            joined = rows.merge(outcomes[["subject_id", "patient_id", "label", "time", "event"]], on="subject_id")
            cmp = compare_baselines({split: joined}, {v: rows} | first, outcomes, n_boot, seed)["splits"][split]
            result["sets"][split][v] = _entries(cmp, v)
    return result


def _entries(cmp: dict, stacker: str) -> dict:
    """compare_baselines' entries as {"value", "ci", "vs": {model: stacker - model}}: the stacker's own
    entry gives its value and CI (its difference to itself is dropped)."""
    metric = next(iter(cmp[stacker]))
    own = cmp[stacker][metric]
    return {"metric": metric, "value": own["value"], "ci": own["ci"],
            "first_level": {m: {"value": e[metric]["value"], "ci": e[metric]["ci"]}
                            for m, e in cmp.items() if m != stacker},
            "vs": {m: e[metric]["model_minus_baseline"] for m, e in cmp.items() if m != stacker}}


# ---------------------------------------------------------------- CLI

def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.research.hybrid_stack", allow_abbrev=False,
                                 description=__doc__.split("\n\n")[0])
    ap.add_argument("--ssl_gain", required=True, type=Path,
                    help="an ssl_gain --out folder (cohort/, cohort_large/, seed<N>/ with its runs' predictions)")
    ap.add_argument("--seed", type=int, default=0,
                    help="which seed<N> folder to read; also seeds the inner CV and the bootstrap")
    ap.add_argument("--out", required=True, type=Path, help="folder for hybrid_stack.json and hybrid_stack.md")
    ap.add_argument("--image_run", default=IMAGE_RUN,
                    help="the fine-tuning run whose prob (label) and risk (survival) is the image input")
    ap.add_argument("--sets", default=",".join(LARGE_SETS),
                    help="comma-separated held-out splits to score on (never fitted on)")
    ap.add_argument("--n_boot", type=int, default=1000, help="patient resamples of the paired bootstrap")
    ap.add_argument("--clinical", choices=("auto", "none"), default="auto",
                    help="auto: also the +clinical variant over the manifest's clinical columns; none: skip it")
    return ap.parse_args(argv)


def run(args: argparse.Namespace, command: str) -> dict:
    root = Path(args.ssl_gain)
    if not root.is_dir():
        raise InputError(f"--ssl_gain {root}: folder not found")
    seed_dir = root / f"seed{args.seed}"
    if not seed_dir.is_dir():
        raise InputError(f"run folder {seed_dir}: not found (--seed {args.seed})")
    sets = [s.strip() for s in args.sets.split(",") if s.strip()]
    if not sets or FIT_SPLIT in sets:
        raise InputError(f"--sets {args.sets!r}: name held-out splits, never {FIT_SPLIT!r} (the stackers' fit)")
    outcomes, clinical = read_outcomes(root)
    preds = read_runs(seed_dir, args.image_run)
    clinical = [] if args.clinical == "none" else clinical
    tasks = {t: stack_task(t, preds, outcomes, args.image_run, sets, clinical, args.n_boot, args.seed)
             for t in TASKS}
    return {"command": command, "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "machine": {"node": platform.node(), "platform": platform.platform(), "cpus": os.cpu_count()},
            "ssl_gain": str(root), "seed": args.seed, "image_run": args.image_run, "sets": sets,
            "n_boot": args.n_boot, "clinical_columns": clinical, "tasks": tasks}


def _fmt(v, ci=None, sign="") -> str:
    if v is None:
        return "n/a"
    return f"{v:{sign}.3f}" + (f" [{ci[0]:{sign}.3f}, {ci[1]:{sign}.3f}]" if ci else "")


def format_table(result: dict) -> str:
    """One table: per set and task, each stacker's value and its paired difference to each first-level model."""
    lines = ["| set | task | stacker | stacker AUC / C [95% CI] | first-level model: its value; stacker - it "
             "[paired 95% CI] |", "| --- | --- | --- | --- | --- |"]
    for task, t in result["tasks"].items():
        for split, stackers in t["sets"].items():
            for name, e in stackers.items():
                cells = "; ".join(f"{m}: {_fmt(fl['value'], fl['ci'])}; "
                                  f"{_fmt(e['vs'][m]['diff'], e['vs'][m]['ci'], '+')}"
                                  for m, fl in e["first_level"].items())
                lines.append(f"| {split} | {task} ({e['metric']}) | {name} | {_fmt(e['value'], e['ci'])} | {cells} |")
    head = (f"Stackers fitted on the {FIT_SPLIT} rows only (out-of-fold, n = "
            f"{result['tasks']['label']['stackers']['hybrid']['n_fit']}), seed {result['seed']}, image run "
            f"{result['image_run']}, {result['n_boot']} patient resamples. Command: `{result['command']}`")
    return head + "\n\n" + "\n".join(lines) + "\n"


@cli_entry
def main(argv=None) -> int:
    args = parse_args(argv)
    command = "python -m benchmarks.research.hybrid_stack " + shlex.join(sys.argv[1:] if argv is None else argv)
    result = run(args, command)
    write_json(Path(args.out) / "hybrid_stack.json", result)
    table = format_table(result)
    write_text(Path(args.out) / "hybrid_stack.md", table)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
