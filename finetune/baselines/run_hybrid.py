"""The hybrid inside a fine-tuning run: `python -m finetune ...` (FinetuneConfig.hybrid: auto, the default, true or
false).

Where the hybrid is wanted and can be fitted (resolve_hybrid), after the folds the run fits the baselines and the
hybrid on its own splits and seed, exactly as `python -m finetune.baselines --out <output_dir>/hybrid --baselines
hybrid --image_run <output_dir>` would (with the run's --external, --eval_sets and clinical columns), and copies
the export to <output_dir>/model/hybrid/, where `python -m finetune.predict --model <output_dir>/model` finds it.
With --hybrid true, what the hybrid cannot be fitted on is refused before the first fold trains
(check_run_hybrid); with auto, the run goes on without it.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pandas as pd

from core.atomic import atomic_dir, write_json
from core.errors import InputError

BASELINES_DIR = "hybrid"  # <output_dir>/hybrid/: the baselines' and the hybrid's folders, as OUT of finetune.baselines
MODEL_DIR = "hybrid"      # <output_dir>/model/hybrid/: the export, beside the fold models


def hybrid_applies(cfg) -> bool:
    """--hybrid is not false and the task has one score to stack (a multitask or segmentation run has none: auto
    leaves the hybrid out without a word, and FinetuneConfig refuses true)."""
    return cfg.hybrid is not False and cfg.task.label != cfg.task.survival


def resolve_hybrid(cfg, df: pd.DataFrame, splits: dict, clinical: list[str],
                   held_out: dict[str, pd.DataFrame] | None = None, show: bool = True) -> bool:
    """Whether this run fits the hybrid, decided before any fold trains, where hybrid_applies: --hybrid true
    (InputError where it cannot be fitted), or auto (the default): where it can be fitted, else one line
    (`show`) says why not and the run goes on without it."""
    if not hybrid_applies(cfg):
        return False
    try:
        check_run_hybrid(cfg, df, splits, clinical, held_out)
    except InputError as e:
        if cfg.hybrid is True:
            raise
        if show:
            reason = str(e).removeprefix("--hybrid: ")
            print(f"hybrid (--hybrid auto): not fitted: {reason}. The run goes on without it (--hybrid true "
                  f"refuses such a run, --hybrid false never fits it)")
        return False
    return True


def check_run_hybrid(cfg, df: pd.DataFrame, splits: dict, clinical: list[str],
                     held_out: dict[str, pd.DataFrame] | None = None) -> None:
    """Before any fold trains: InputError unless the hybrid can be fitted on this run (clinical columns for its
    baselines, in every held-out cohort too, the image column the radiomics read, enough val rows of each class /
    events for every stacker). held_out: split name -> table (--external as external, each --eval_sets)."""
    from finetune.baselines.hybrid import check_stackable, val_folds
    from finetune.baselines.radiomics import baseline_prep
    if not clinical:
        raise InputError(f"--hybrid: {cfg.manifest} has no clinical columns; the hybrid's baselines need them")
    absent = [c for c in baseline_prep().image_columns() if c not in df.columns]
    if absent:
        raise InputError(f"--hybrid: {cfg.manifest} has no {absent} column; the hybrid's radiomics read it (with the "
                         f"lesion mask)")
    for name, table in (held_out or {}).items():
        absent = [c for c in clinical if c not in table.columns]
        if absent:
            raise InputError(f"--hybrid: the {name!r} cohort has no clinical column(s) {absent}; the hybrid's "
                             f"baselines predict it from its own values")
        absent = [c for c in baseline_prep().image_columns() if c not in table.columns]
        if absent:
            raise InputError(f"--hybrid: the {name!r} cohort has no {absent} column; the hybrid's radiomics read "
                             f"it (with the lesion mask)")
    _check_baseline_rows(df, splits, cfg.task)
    check_stackable(df, val_folds(splits), cfg.task)


def _check_baseline_rows(df: pd.DataFrame, splits: dict, task) -> None:
    """The first-level baselines' own rule (RadiomicsModel.fit): each model (one per fold, on its train rows, and
    one on all non-test rows) needs at least 2 training rows of each class, or of events and of censored rows."""
    strata = df.set_index(df["subject_id"].astype(str))["label" if task.label else "event"].astype(int)
    non_test = [s for fold in splits["folds"] for part in ("train", "val") for s in fold[part]]
    fits = [(f"fold {k}'s train rows", fold["train"]) for k, fold in enumerate(splits["folds"])]
    for where, ids in fits + [("the non-test rows", non_test)]:
        counts = np.bincount(strata.loc[[str(s) for s in ids]], minlength=2)
        if counts.min() < 2:
            what = "rows of each class" if task.label else "events and 2 censored rows"
            raise InputError(f"--hybrid: the baselines fitted on {where} need at least 2 {what} (counts "
                             f"{counts.tolist()}); the hybrid cannot be fitted on this cohort's splits")


def fit_run_hybrid(cfg, clinical: list[str]) -> Path:
    """The baselines and the hybrid of the finished run into <output_dir>/hybrid/, the export copied to
    <output_dir>/model/hybrid/ (returned)."""
    from finetune.baselines.__main__ import main
    from finetune.baselines.compare import HYBRID
    out = Path(cfg.output_dir)
    argv = ["--out", str(out / BASELINES_DIR), "--baselines", "hybrid", "--image_run", str(out),
            "--clinical_columns", ",".join(clinical)]
    argv += ["--external", cfg.external] if cfg.external else []
    argv += ["--eval_sets", *cfg.eval_sets] if cfg.eval_sets else []
    main.__wrapped__(argv)  # InputError reaches the fine-tuning CLI's own one-line handler
    target = out / "model" / MODEL_DIR
    with atomic_dir(target) as tmp:
        shutil.copytree(out / BASELINES_DIR / HYBRID / "export", tmp, dirs_exist_ok=True)
    print(f"hybrid: {target} (python -m finetune.predict --model {out / 'model'} adds its score)")
    return target


def report_run_hybrid(cfg, outcomes: pd.DataFrame, metrics: dict) -> dict:
    """The run's model against the baselines and the hybrid just fitted, as `python -m finetune.evaluate
    --baselines <output_dir>/hybrid` reports them: each one's AUC / Harrell's C per split and the model's paired
    difference to it. Added to <output_dir>/metrics.json as "baselines" and printed, so the run shows what the
    model a user gets by default scores. outcomes: every cohort's rows (subject_id and the outcome); metrics:
    the run's, as it wrote them. Returns the section."""
    from finetune.baselines.compare import compare_baselines, format_lines, read_baselines
    from finetune.evaluate import check_predictions, join_outcomes, one_row_per_subject, read_predictions
    out = Path(cfg.output_dir)
    pred = join_outcomes(check_predictions(read_predictions(out / "predictions.csv")), outcomes)
    rows = {split: one_row_per_subject(pred[pred["split"] == split])[0] for split in pred["split"].unique()}
    result = compare_baselines(rows, read_baselines([out / BASELINES_DIR]), outcomes, cfg.n_boot, cfg.seed)
    write_json(out / "metrics.json", metrics | {"baselines": result})
    print("\n".join(["the model against its baselines and the hybrid (metrics.json, \"baselines\"):",
                     *format_lines(result)]))
    return result


def fit_and_report_hybrid(cfg, clinical: list[str], outcomes: pd.DataFrame, metrics: dict) -> dict | None:
    """fit_run_hybrid, then report_run_hybrid (its "baselines" section, or None where it was not fitted). The
    checks before training cover what the hybrid needs, so a failure here is unexpected; under --hybrid auto it
    is one line and the run keeps its fine-tuned model (nothing half-written: the export is written whole or
    not at all), under --hybrid true it is the run's error."""
    from core.errors import first_line
    try:
        fit_run_hybrid(cfg, clinical)
        return report_run_hybrid(cfg, outcomes, metrics)
    except (InputError, ValueError) as e:
        if cfg.hybrid is True:
            raise
        print(f"hybrid (--hybrid auto): not fitted: {first_line(e, typed=True)}. The fine-tuned model is saved; "
              f"python -m finetune.baselines --out {Path(cfg.output_dir) / BASELINES_DIR} --baselines hybrid "
              f"--image_run {cfg.output_dir} fits it on its own")
        return None
