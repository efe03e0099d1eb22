"""The fine-tuning run the hybrid stacks (`python -m finetune.baselines --baselines hybrid --image_run RUN`): what it
was given, as the baselines CLI's flags (run_inputs), and its predictions, read and checked against the baselines'
splits before anything is fitted (read_image_run)."""
from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from core.errors import InputError
from data.splits import splits_content
from finetune.baselines.hybrid import FIT_SPLIT, score_of
from models.tasks import Task, get_task

RUN_FILES = ("config.yaml", "predictions.csv")  # what python -m finetune writes; the run's splits.json beside them


def read_image_run(run, task: Task | str, splits_path, held_out: dict[str, tuple] | None = None) -> dict:
    """The fine-tuning run's predictions for `task`, checked before anything is fitted: it is a run, it predicts
    `task`, its splits are the baselines' (`splits_path`), its val rows are those splits' out-of-fold rows and it
    predicted every subject of the test set and of each held-out manifest in `held_out` (split name -> the flag
    that names it and its CSV, e.g. {"external": ("--external", path)}). Returns {"predictions", "splits", "path"};
    InputError naming the flag or file."""
    from finetune.evaluate import read_predictions, run_config

    run, task = Path(run), get_task(task) if isinstance(task, str) else task
    _is_run(run)
    cfg, cfg_path = run_config(run)
    run_task = cfg.get("model", {}).get("task") if isinstance(cfg.get("model"), dict) else None
    try:
        run_task = get_task(run_task)
    except (InputError, KeyError, TypeError, ValueError):
        raise InputError(f"--image_run {run}: {cfg_path} names no task (model.task); not a fine-tuning run's config")
    if not (run_task.label if task.label else run_task.survival):
        raise InputError(f"--task {task.name}: the fine-tuning run {run} was --task {run_task.name} ({cfg_path}), "
                         f"with no {score_of(task)!r} predictions")
    splits = _same_splits(run, cfg, splits_path)
    pred = read_predictions(run / "predictions.csv")
    where = f"--image_run {run / 'predictions.csv'}"
    if score_of(task) not in pred.columns:
        raise InputError(f"{where}: no {score_of(task)!r} column for --task {task.name}")
    _out_of_fold(pred, splits, where)
    held = {"test": ("--splits", list(splits["test"]))}
    for split, (flag, csv) in (held_out or {}).items():
        try:
            ids = pd.read_csv(csv, usecols=["subject_id"], dtype={"subject_id": str})["subject_id"]
        except (OSError, ValueError) as e:
            raise InputError(f"{flag} {csv}: cannot read its subject_id column ({type(e).__name__})") from None
        held[split] = (flag, list(ids))
    for split, (flag, ids) in held.items():
        have = set(pred["subject_id"][(pred["split"] == split) & (pred["fold"] == -1)])
        lacking = sorted(set(ids) - have)
        if lacking:
            raise InputError(f"{flag}: the fine-tuning run {run} has no fold-ensemble {split!r} prediction for "
                             f"subject(s) {lacking[:5]}")
    return {"predictions": pred[pred["split"].isin([FIT_SPLIT, *held])], "splits": splits, "path": run}


def _is_run(run: Path) -> None:
    absent = [f for f in RUN_FILES if not (run / f).is_file()]
    if absent:
        raise InputError(f"--image_run {run}: not a fine-tuning run (no {' or '.join(absent)}; python -m finetune "
                         f"writes {' and '.join(RUN_FILES)})")


def run_inputs(run) -> dict:
    """What the fine-tuning run in folder `run` was given, as python -m finetune.baselines flags (read from its
    saved config through finetune.evaluate.run_config): manifest, cache, splits, folds, test_fraction, seed, and
    task where the run's names one baseline task (a multitask run predicts both: no default). Keys it lacks are
    left out; InputError where `run` is not a fine-tuning run's folder."""
    from finetune.evaluate import run_config
    run = Path(run)
    _is_run(run)
    cfg, _ = run_config(run)
    model = cfg.get("model") if isinstance(cfg.get("model"), dict) else {}
    out = {"manifest": cfg.get("manifest") or None, "splits": str(_run_splits_path(run, cfg)),
           "cache": _run_cache(run, cfg),
           "task": model.get("task") if model.get("task") in ("classification", "survival") else None}
    out |= {k: cfg[k] for k in ("folds", "test_fraction", "seed") if isinstance(cfg.get(k), (int, float))}
    return {k: v for k, v in out.items() if v is not None}


def _run_cache(run: Path, cfg: dict) -> str:
    """The cache a fine-tuning run read: its --cache_dir, else the cache/ beside its output folder where
    fine-tuning puts it when given none (finetune.train.load_cohort), as config.yaml recorded that folder; where
    that cache/ is gone (the run was moved, with its cache beside it), the cache/ beside the run's folder now."""
    if cfg.get("cache_dir"):
        return str(cfg["cache_dir"])
    recorded = Path(cfg.get("output_dir") or run).parent / "cache"
    return str(recorded if recorded.is_dir() else run.resolve().parent / "cache")


def _run_splits_path(run: Path, cfg: dict) -> Path:
    """The splits file a fine-tuning run used: its --splits, else splits.json in its folder."""
    return Path(cfg["splits"]) if cfg.get("splits") else run / "splits.json"


def _same_splits(run: Path, cfg: dict, splits_path) -> dict:
    """The baselines' splits, refused unless they are the fine-tuning run's."""
    run_path = _run_splits_path(run, cfg)
    ours = Path(splits_path)
    for path, flag in ((run_path, f"--image_run {run}"), (ours, "--splits")):
        if not path.is_file():
            raise InputError(f"{flag}: splits {path} not found (the hybrid fits on the fine-tuning run's splits: "
                             f"pass --splits {run_path})")
    read = []
    for path in (run_path, ours):
        try:
            read.append(json.loads(path.read_text()))
            splits_content(read[-1])
        except (OSError, json.JSONDecodeError, KeyError, TypeError) as e:
            raise InputError(f"splits {path}: not a valid splits file ({type(e).__name__}: {e})") from None
    if splits_content(read[0]) != splits_content(read[1]):
        raise InputError(f"--splits {ours}: differ from the fine-tuning run's {run_path}; the hybrid's first-level "
                         f"models must share the run's folds (pass --splits {run_path})")
    return read[1]


def _out_of_fold(pred: pd.DataFrame, splits: dict, where: str) -> None:
    """InputError unless the val rows are one per subject, each from the fold model that held it out."""
    val = pred[pred["split"] == FIT_SPLIT]
    expected = {(str(s), k) for k, f in enumerate(splits["folds"]) for s in f["val"]}
    got = set(zip(val["subject_id"], val["fold"].astype(int)))
    if len(val) != len(got) or got != expected:
        wrong = sorted(got ^ expected)[:5]
        raise InputError(f"{where}: {FIT_SPLIT} rows are not the splits' out-of-fold predictions (one per subject, "
                         f"by the fold that held it out); (subject, fold) differing: {wrong}")
