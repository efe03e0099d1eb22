"""Patient-level, stratified train/val/test splits, saved as JSON so a rerun reuses them.

A held-out test set is drawn first; the rest is divided into `folds` cross-validation folds.
All subjects of a patient land in the same split, so no patient leaks between train and evaluation.

    {"seed": 0, "stratify": "label", "test_fraction": 0.2, "subjects_hash": "...",
     "test": [subject ids], "folds": [{"train": [...], "val": [...]}, ...]}
"""
from __future__ import annotations

import hashlib
import json
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.model_selection import StratifiedGroupKFold

from core.atomic import write_json
from core.errors import ConfigError, InputError


def _subjects_and_patients(df: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    if "subject_id" not in df.columns:
        raise InputError(f"splits: the table has no subject_id column; found {list(df.columns)}")
    subjects = df["subject_id"].astype(str).to_numpy()
    dupes = sorted(pd.Series(subjects).value_counts().loc[lambda c: c > 1].index)
    if dupes:
        raise InputError(f"splits: duplicate subject_id(s) {dupes[:5]}")
    if "patient_id" in df.columns:
        pid = df["patient_id"]
        patients = np.where(pid.isna() | (pid.astype(str) == ""), subjects, pid.astype(str)).astype(str)
    else:
        patients = subjects.copy()
    return subjects, patients


def subjects_hash(df: pd.DataFrame) -> str:
    """Hash of the (subject, patient) pairs: a saved split is reused only for the same cohort."""
    subjects, patients = _subjects_and_patients(df)
    pairs = sorted(zip(subjects.tolist(), patients.tolist()))
    return hashlib.sha256(json.dumps(pairs).encode()).hexdigest()


def _strata(df: pd.DataFrame, stratify: str | None, subjects: np.ndarray) -> np.ndarray:
    if stratify is None:
        return np.zeros(len(df), dtype=np.int64)
    if stratify not in df.columns:
        raise InputError(f"splits: stratify column {stratify!r} not in the table; found {list(df.columns)}")
    values = df[stratify]
    bad = subjects[values.isna().to_numpy()]
    if len(bad):
        raise InputError(f"splits: column {stratify!r} is empty for subject(s) {bad[:5].tolist()}; "
                         f"fill it or use stratify=None")
    return pd.factorize(values, sort=True)[0]


def make_splits(df: pd.DataFrame, *, test_fraction: float = 0.2, folds: int = 5, stratify: str | None = "label",
                seed: int = 0) -> dict:
    """Patient-level stratified test split plus `folds` CV folds over the rest; see the module docstring."""
    if not 0 <= test_fraction < 1:
        raise ConfigError(f"test_fraction: expected 0 <= fraction < 1, got {test_fraction}")
    if folds < 2:
        raise ConfigError(f"folds: expected at least 2, got {folds}")
    subjects, patients = _subjects_and_patients(df)
    strata = _strata(df, stratify, subjects)  # [N] class code per subject
    # A patient's stratum: its highest class (binary: positive if any of its subjects is).
    patient_stratum = pd.Series(strata).groupby(patients).max()

    # sklearn has no stratified *group* shuffle split, so the test draw is by hand: within each
    # stratum, shuffle the patients and hold out round(fraction * n) of them.
    rng = np.random.default_rng(seed)
    test_patients: set[str] = set()
    for _, group in patient_stratum.groupby(patient_stratum):
        names = np.array(sorted(group.index))
        rng.shuffle(names)
        test_patients.update(names[: int(round(test_fraction * len(names)))].tolist())
    in_test = np.isin(patients, list(test_patients))

    dev = ~in_test
    dev_classes = pd.Series(patient_stratum[~patient_stratum.index.isin(test_patients)])
    counts = dev_classes.value_counts()
    label = f"stratify={stratify!r}" if stratify else "no stratification"
    if len(dev_classes) < folds:
        raise InputError(f"splits: only {len(dev_classes)} patients outside the test set, fewer than folds={folds}; "
                         f"lower folds or test_fraction")
    if stratify and counts.min() < folds:
        values = pd.factorize(df[stratify], sort=True)[1]
        small = {str(values[k]): int(v) for k, v in counts.items() if v < folds}
        raise InputError(f"splits: with {label}, class(es) {small} have fewer patients than folds={folds} outside "
                         f"the test set (patients per class: "
                         f"{ {str(values[k]): int(v) for k, v in counts.items()} }); lower folds or collect more data")

    dev_idx = np.flatnonzero(dev)
    cv = StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=seed)
    fold_list = []
    for k, (tr, va) in enumerate(cv.split(np.zeros(len(dev_idx)), strata[dev_idx], patients[dev_idx])):
        if stratify and len(np.unique(strata[dev_idx][va])) < 2:
            raise InputError(f"splits: validation fold {k} would hold a single class of {stratify!r}; "
                             f"lower folds (now {folds}) or collect more data")
        fold_list.append({"train": subjects[dev_idx[tr]].tolist(), "val": subjects[dev_idx[va]].tolist()})
    if stratify and in_test.any() and len(np.unique(strata[in_test])) < 2:
        warnings.warn(f"splits: the test set ({int(in_test.sum())} subjects) holds a single class of {stratify!r}; "
                      f"its AUC is undefined. Raise test_fraction or collect more data.", stacklevel=2)

    return {
        "seed": int(seed),
        "stratify": stratify,
        "test_fraction": float(test_fraction),
        "subjects_hash": subjects_hash(df),
        "test": subjects[in_test].tolist(),
        "folds": fold_list,
    }


def nested_patient_subsets(df: pd.DataFrame, sizes, *, seed: int = 0,
                           stratify: str | None = "label") -> dict[int, list[str]]:
    """{n: subject ids of n patients} for each n in `sizes`: nested (each smaller set lies inside every
    larger one), patient-level (a patient's subjects stay together), fixed by `seed`, and stratified:
    every prefix keeps each class's share of patients as closely as whole patients allow.

    One seeded order of all patients is drawn and each subset is a prefix of it: within a class the
    patients are shuffled, and the i-th of a class's m patients is placed at (i + 0.5) / m along the
    order, so the classes interleave in proportion.
    """
    subjects, patients = _subjects_and_patients(df)
    strata = _strata(df, stratify, subjects)
    patient_stratum = pd.Series(strata).groupby(patients).max()  # a patient's highest class
    sizes = sorted({int(n) for n in sizes})
    if not sizes or sizes[0] < 1 or sizes[-1] > len(patient_stratum):
        raise InputError(f"label subsets: sizes {sizes} must lie between 1 and the {len(patient_stratum)} "
                         f"patients available")
    rng = np.random.default_rng(seed)
    keys: dict[str, tuple[float, float]] = {}
    for _, group in patient_stratum.groupby(patient_stratum):
        names = np.array(sorted(group.index))
        rng.shuffle(names)
        for i, name in enumerate(names):
            keys[name] = ((i + 0.5) / len(names), rng.random())  # position in the order, random tie-break
    order = sorted(keys, key=keys.get)
    rank = {p: i for i, p in enumerate(order)}
    patient_rank = np.array([rank[p] for p in patients])  # [N] per subject
    return {n: subjects[patient_rank < n].tolist() for n in sizes}


def all_subjects(splits: dict) -> set[str]:
    """Every subject a split file covers: the test set plus fold 0's train and val."""
    first = splits["folds"][0] if splits.get("folds") else {"train": [], "val": []}
    return set(splits.get("test", [])) | set(first["train"]) | set(first["val"])


def stratify_of(df: pd.DataFrame) -> str:
    """The column splits are stratified by: the label whenever the cohort has one (0/1), else the event, so
    the classification and survival runs of one cohort, and the baselines, share one splits file."""
    has_label = "label" in df.columns and bool(pd.to_numeric(df["label"], errors="coerce").isin([0, 1]).all())
    return "label" if has_label else "event"


def load_or_make_splits(path, df: pd.DataFrame, *, test_fraction: float = 0.2, folds: int = 5,
                        stratify: str | None = "label", seed: int = 0) -> dict:
    """Reuse the splits saved at `path` if they were made for this cohort and these settings; else make and save."""
    path = Path(path)
    if not path.exists():
        splits = make_splits(df, test_fraction=test_fraction, folds=folds, stratify=stratify, seed=seed)
        write_json(path, splits)
        return splits
    try:
        saved = json.loads(path.read_text())
        saved_folds = len(saved["folds"])
        saved_settings = (saved["seed"], saved["stratify"], float(saved["test_fraction"]))
        saved_hash = saved["subjects_hash"]
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as e:
        raise InputError(f"splits {path}: not a valid splits file ({type(e).__name__}: {e}); delete it to make new splits") from None
    if saved_hash != subjects_hash(df):
        now = set(df["subject_id"].astype(str))
        before = all_subjects(saved)
        added, removed = sorted(now - before), sorted(before - now)
        what = ", ".join(x for x in (f"added {added[:5]}" if added else "", f"removed {removed[:5]}" if removed else "") if x)
        raise InputError(f"splits {path}: made for a different set of subjects (the manifest changed: "
                         f"{what or 'patient ids changed'}); delete the file to make new splits, or use the old manifest")
    if saved_settings != (seed, stratify, float(test_fraction)) or saved_folds != folds:
        raise InputError(f"splits {path}: made with seed={saved['seed']}, stratify={saved['stratify']!r}, "
                         f"test_fraction={saved['test_fraction']}, folds={saved_folds}; asked for seed={seed}, "
                         f"stratify={stratify!r}, test_fraction={test_fraction}, folds={folds}; "
                         f"delete the file or choose another path")
    return saved


def splits_content(splits: dict) -> tuple:
    """What makes two splits the same: each fold's train and val subjects, and the test subjects."""
    return ([(sorted(map(str, f["train"])), sorted(map(str, f["val"]))) for f in splits["folds"]],
            sorted(map(str, splits["test"])))


def splits_digest(splits: dict) -> str:
    """A short fingerprint of the splits' content, saved with each baseline so a refit can tell whether to reuse it."""
    return hashlib.sha1(json.dumps(splits_content(splits)).encode()).hexdigest()[:16]
