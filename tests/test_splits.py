"""Splits: patient-level, stratified, seeded, saved and reused, and refused for a changed cohort."""
import json
import os

import numpy as np
import pandas as pd
import pytest

from core.errors import ConfigError, InputError
from data.splits import load_or_make_splits, make_splits


def _cohort(n_patients=50, seed=0):
    """Patients with 1-3 subjects each (follow-up scans); ~30% positive labels, set per patient."""
    rng = np.random.default_rng(seed)
    rows = []
    for p in range(n_patients):
        label = int(rng.random() < 0.3)
        for v in range(int(rng.integers(1, 4))):
            rows.append({"subject_id": f"P{p:03d}_v{v}", "patient_id": f"P{p:03d}", "label": label,
                         "event": int(rng.random() < 0.6)})
    return pd.DataFrame(rows)


def _patient(subject):
    return subject.split("_")[0]


def test_splits_are_patient_level_and_complete():
    df = _cohort()
    s = make_splits(df, test_fraction=0.2, folds=5, stratify="label", seed=0)
    everyone = set(df["subject_id"])
    test = set(s["test"])
    vals = [set(f["val"]) for f in s["folds"]]
    assert len(s["folds"]) == 5
    # test and the five validation folds partition the cohort: every subject exactly once.
    assert sum(len(v) for v in vals) + len(test) == len(everyone)
    assert set().union(test, *vals) == everyone
    for f in s["folds"]:
        train, val = set(f["train"]), set(f["val"])
        assert train | val | test == everyone and not (train & val) and not (train & test) and not (val & test)
        # No patient on two sides.
        pt, pv, ps = ({_patient(x) for x in part} for part in (train, val, test))
        assert not (pt & pv) and not (pt & ps) and not (pv & ps)
    test_patients = {_patient(x) for x in test}
    assert abs(len(test_patients) - 0.2 * df["patient_id"].nunique()) <= 2


def test_splits_are_stratified():
    df = _cohort(n_patients=80, seed=1)
    s = make_splits(df, stratify="label", seed=3)
    rate = df["label"].mean()
    label = dict(zip(df["subject_id"], df["label"]))
    for part in [s["test"]] + [f["val"] for f in s["folds"]]:
        assert abs(np.mean([label[x] for x in part]) - rate) < 0.12
    ev = make_splits(df, stratify="event", seed=3)
    assert ev["stratify"] == "event" and ev["test"] != s["test"]


def test_splits_are_seeded():
    df = _cohort()
    assert make_splits(df, seed=5) == make_splits(df, seed=5)
    assert make_splits(df, seed=5)["test"] != make_splits(df, seed=6)["test"]
    # Row order does not matter for which patients go where.
    shuffled = df.sample(frac=1, random_state=0)
    assert sorted(make_splits(shuffled, seed=5)["test"]) == sorted(make_splits(df, seed=5)["test"])
    plain = make_splits(df, stratify=None, seed=5)
    assert plain["stratify"] is None and len(plain["folds"]) == 5


def test_too_few_patients_per_class_is_a_clear_error():
    df = _cohort(n_patients=20, seed=2)
    df["label"] = 0
    df.loc[df["patient_id"].isin(["P000", "P001", "P002"]), "label"] = 1  # 3 positive patients
    with pytest.raises(InputError, match=r"folds=5"):
        make_splits(df, test_fraction=0.0, folds=5)
    with pytest.raises(InputError, match="only .* patients"):
        make_splits(df, test_fraction=0.0, folds=30, stratify=None)
    with pytest.raises(ConfigError):
        make_splits(df, folds=1)
    df.loc[0, "label"] = np.nan
    with pytest.raises(InputError, match="'label' is empty"):
        make_splits(df)


def test_load_or_make_reuses_saved_splits_and_refuses_a_changed_manifest(tmp_path):
    df = _cohort()
    path = tmp_path / "splits.json"
    made = load_or_make_splits(path, df, seed=1)
    assert json.loads(path.read_text()) == made
    stamp = os.stat(path).st_mtime_ns
    assert load_or_make_splits(path, df.sample(frac=1, random_state=1), seed=1) == made  # reused, not remade
    assert os.stat(path).st_mtime_ns == stamp

    grown = pd.concat([df, pd.DataFrame([{"subject_id": "NEW_v0", "patient_id": "NEW", "label": 0, "event": 1}])])
    with pytest.raises(InputError, match=r"manifest changed: added \['NEW_v0'\]"):
        load_or_make_splits(path, grown, seed=1)
    with pytest.raises(InputError, match=r"removed \['P000_v0'\]"):
        load_or_make_splits(path, df[df["subject_id"] != "P000_v0"], seed=1)
    with pytest.raises(InputError, match="seed=1.*asked for seed=2"):
        load_or_make_splits(path, df, seed=2)
    path.write_text("{not json")
    with pytest.raises(InputError, match="not a valid splits file"):
        load_or_make_splits(path, df, seed=1)


def test_label_subsets_are_nested_patient_level_stratified_and_seeded():
    from data.splits import nested_patient_subsets
    df = _cohort(n_patients=60)
    subsets = nested_patient_subsets(df, [40, 10, 20], seed=3)
    assert list(subsets) == [10, 20, 40]
    by_patient = df.groupby("patient_id")["subject_id"].apply(set)
    label = df.groupby("patient_id")["label"].max()
    share = label.mean()
    previous: set = set()
    for n, ids in subsets.items():
        ids = set(ids)
        patients = {_patient(s) for s in ids}
        assert len(patients) == n
        assert ids == set().union(*(by_patient[p] for p in patients))  # whole patients only
        assert previous <= ids  # nested
        # stratified: within one patient of the cohort's class share
        assert abs(label[list(patients)].sum() - share * n) <= 1
        previous = ids
    assert nested_patient_subsets(df, [10, 20, 40], seed=3) == subsets  # deterministic
    assert nested_patient_subsets(df, [20], seed=4)[20] != subsets[20]  # and the seed matters
    with pytest.raises(InputError, match="between 1 and the 60 patients"):
        nested_patient_subsets(df, [61], seed=0)
