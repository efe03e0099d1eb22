"""Which radiomics model: the plain penalised model or the papers' univariate filter + L1? Out of fold only.

    python -m benchmarks.research.radiomics_selection --out runs/radiomics_selection [--repeats 3]

On the labelled part of a development cohort (generator seed 4242, the one benchmarks.research.finetune_recipe
uses; never an ssl_gain or probe set), each selection of finetune.baselines.radiomics.RadiomicsModel is fitted on
patient-grouped 5-fold training folds and scored on the held-out fold (AUC for the label, Harrell's C
for survival), repeated; it prints per-fold means and the paired difference. RadiomicsModel's
DEFAULT_SELECTION follows this table.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from models.tasks import Task

COHORT_SEED = 4242


def fold_scores(feats, df, task: Task, selection: str, repeats: int) -> np.ndarray:
    """[repeats * 5] held-out fold scores of one selection."""
    from sklearn.metrics import roc_auc_score
    from sklearn.model_selection import StratifiedGroupKFold
    from sksurv.metrics import concordance_index_censored

    from finetune.baselines.radiomics import RadiomicsModel, survival_target
    scores = []
    y_surv = survival_target(df["event"], df["time"])
    label = df["label"].to_numpy()
    strata = label if task.label else df["event"].to_numpy()
    for rep in range(repeats):
        cv = StratifiedGroupKFold(5, shuffle=True, random_state=rep)
        for tr, va in cv.split(feats, strata, df["patient_id"].to_numpy()):
            y = label if task.label else y_surv
            model = RadiomicsModel(task, seed=rep, selection=selection).fit(feats.iloc[tr], y[tr])
            pred = model.predict(feats.iloc[va])
            scores.append(roc_auc_score(label[va], pred) if task.label
                          else concordance_index_censored(y[va]["event"], y[va]["time"], pred)[0])
    return np.asarray(scores)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.research.radiomics_selection", allow_abbrev=False,
                                 description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, help="working folder (cohort, cache, features)")
    ap.add_argument("--repeats", type=int, default=3, help="repeats of the patient-grouped 5-fold CV")
    args = ap.parse_args(argv)
    from core.config import load_config
    from data.prepare import prepare_table
    from data.synth import generate_cohort
    from finetune.config import FinetuneConfig
    from finetune.baselines.radiomics import extract_table
    from models.tasks import CLASSIFICATION, MULTITASK, SURVIVAL
    out = Path(args.out).resolve()
    if not (out / "cohort" / "cohort.json").is_file():
        generate_cohort(out / "cohort", 0, 109, 0, seed=COHORT_SEED, workers=2)
    prep = load_config(FinetuneConfig, Path(__file__).resolve().parents[2] / "launch" / "finetune_tiny_cpu.yaml").prep
    df, _ = prepare_table(MULTITASK.read_manifest(out / "cohort" / "manifest.csv"), prep, out / "cache",
                          progress=False)  # ssl_gain's cpu preprocessing
    feats = extract_table(df, "internal", 5.0, 32, out / "features.csv", progress=False)
    df = df.set_index(df["subject_id"].astype(str)).loc[feats.index]
    print(f"{len(df)} lesions of {df['patient_id'].nunique()} patients, {feats.shape[1]} features")
    for task in (CLASSIFICATION, SURVIVAL):
        res = {sel: fold_scores(feats, df, task, sel, args.repeats) for sel in ("none", "univariate_l1")}
        for sel, s in res.items():
            print(f"{task.name:14s} {sel:14s} mean {s.mean():.3f} sd(fold) {s.std(ddof=1):.3f}")
        d = res["univariate_l1"] - res["none"]
        print(f"{task.name:14s} univariate_l1 - none: {d.mean():+.3f} (SE {d.std(ddof=1) / np.sqrt(len(d)):.3f}, "
              f"{len(d)} paired folds)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
