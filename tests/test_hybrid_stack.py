"""benchmarks.research.hybrid_stack, the research caller of finetune.baselines.hybrid: the stacker is fitted on
out-of-fold val rows only, and scores what its inputs determine, on tiny synthetic prediction tables in
ssl_gain's layout."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import roc_auc_score

from benchmarks.research import hybrid_stack as hs
from core.errors import InputError
from finetune.baselines import hybrid

RUNS = ("ft_mim_concat", "radiomics_clinical_classification", "clinical_linear_survival",
        "radiomics_clinical_survival")


def _manifest(ids, label, time, event, rng) -> pd.DataFrame:
    n = len(ids)
    return pd.DataFrame({"subject_id": ids, "patient_id": ["P" + i for i in ids], "site": "siteA",
                         "image": [f"{i}.nii.gz" for i in ids], "mask": [f"{i}_m.nii.gz" for i in ids],
                         "label": label, "time": time, "event": event,
                         "age": rng.integers(40, 80, n), "sex": rng.choice(["F", "M"], n)})


def _prob(x):
    return 1 / (1 + np.exp(-np.asarray(x, float)))


def write_layout(root, val: dict, held: dict):
    """ssl_gain's layout under root: val / held dicts of arrays (label, time, event, image, rc, cl as
    first-level logits or risks); val rows out of fold (folds 0-2), test_large as fold -1 (+ fold 0 rows
    for the image run, as a fine-tuning run writes them)."""
    rng = np.random.default_rng(1)
    nv, nh = len(val["label"]), len(held["label"])
    vid, hid = [f"A{i:04d}" for i in range(nv)], [f"LA{i:04d}" for i in range(nh)]
    (root / "cohort").mkdir(parents=True)
    (root / "cohort_large").mkdir()
    _manifest(vid, val["label"], val["time"], val["event"], rng).to_csv(root / "cohort/manifest.csv", index=False)
    _manifest(hid, held["label"], held["time"], held["event"], rng).to_csv(root / "cohort_large/test_large.csv",
                                                                           index=False)
    fold = np.arange(nv) % 3
    cols = {"ft_mim_concat": {"prob": "image", "risk": "image"}, "radiomics_clinical_classification": {"prob": "rc"},
            "clinical_linear_survival": {"risk": "cl"}, "radiomics_clinical_survival": {"risk": "rc"}}
    for run, scores in cols.items():
        parts = []
        for ids, d, split, folds in ((vid, val, "val", fold), (hid, held, "test_large", np.full(nh, -1))):
            parts.append(pd.DataFrame({"subject_id": ids, "split": split, "fold": folds} |
                                      {s: (_prob(d[k]) if s == "prob" else d[k]) for s, k in scores.items()}))
        if run == "ft_mim_concat":  # one fold model's own rows on the held-out set: never a stacker input
            parts.append(parts[-1].assign(fold=0))
        (root / "seed0" / run).mkdir(parents=True)
        pd.concat(parts).to_csv(root / "seed0" / run / "predictions.csv", index=False)


def _exact(n, rng) -> dict:
    """Label = [image + rc > 0], time decreasing in image + rc, all events, points kept 1 away from the boundary
    (both weights positive: a stacker never inverts a first-level score)."""
    image, rc = rng.uniform(-3, 3, 4 * n), rng.uniform(-3, 3, 4 * n)
    keep = np.flatnonzero(np.abs(image + rc) > 1)[:n]
    image, rc = image[keep], rc[keep]
    return {"image": image, "rc": rc, "cl": rng.normal(size=n), "label": (image + rc > 0).astype(int),
            "time": np.exp(-(image + rc)), "event": np.ones(n, int)}


def _run(tmp_path, *extra, clinical="none"):
    out = tmp_path / "out"
    hs.main(["--ssl_gain", str(tmp_path / "ssl"), "--seed", "0", "--out", str(out), "--sets", "test_large",
             "--n_boot", "20", "--clinical", clinical, *extra])
    return json.loads((out / "hybrid_stack.json").read_text())


def test_stacker_recovers_an_exact_function_of_its_inputs(tmp_path):
    rng = np.random.default_rng(0)
    write_layout(tmp_path / "ssl", _exact(60, rng), _exact(60, rng))
    res = _run(tmp_path, clinical="auto")
    label, surv = res["tasks"]["label"], res["tasks"]["survival"]
    assert label["sets"]["test_large"]["hybrid"]["value"] == 1.0
    coef = label["stackers"]["hybrid"]["coef"]
    assert coef["image"] > 0 and coef["radiomics_clinical"] > 0
    # the +clinical variant reads the clinical columns as ClinicalSchema encodes them (age, sex one-hot)
    assert res["clinical_columns"] == ["age", "sex"]
    wide = label["stackers"]["hybrid+clinical"]["coef"]
    assert list(wide)[:2] == ["image", "radiomics_clinical"] and any(k.startswith("sex") for k in wide)
    assert label["sets"]["test_large"]["hybrid+clinical"]["value"] > 0.95
    # the survival stacker: risk rises with image + rc; the noise input (clinical Cox) barely counts, or is
    # dropped when its weight comes out below 0
    c = surv["stackers"]["hybrid"]["coef"]
    assert c["image"] > 0 and c["radiomics_clinical"] > 0
    assert abs(c.get("clinical_linear", 0.0)) < min(c["image"], c["radiomics_clinical"])
    assert surv["sets"]["test_large"]["hybrid"]["value"] > 0.95
    # the paired comparison is against each first-level model on the same subjects
    assert set(label["sets"]["test_large"]["hybrid"]["vs"]) == {"image", "radiomics_clinical"}
    assert (tmp_path / "out" / "hybrid_stack.md").read_text().count("| test_large |") == 4


def _leak_layout(root, rng, n_val=90, n_held=300):
    """rc carries the label on val and is noise on test_large; `image` is noise on val and, on test_large,
    a small-valued exact copy of the label (logit +-0.01)."""
    y_val, y_held = rng.integers(0, 2, n_val), rng.integers(0, 2, n_held)
    val = {"label": y_val, "rc": 2.0 * (2 * y_val - 1) + rng.normal(size=n_val), "image": rng.normal(size=n_val)}
    held = {"label": y_held, "rc": rng.normal(size=n_held), "image": 0.01 * (2 * y_held - 1)}
    for d, n in ((val, n_val), (held, n_held)):
        d |= {"cl": rng.normal(size=n), "time": rng.uniform(1, 10, n), "event": rng.integers(0, 2, n)}
    write_layout(root, val, held)
    return held


def test_a_leaked_column_does_not_reach_the_held_out_auc(tmp_path):
    rng = np.random.default_rng(3)
    held = _leak_layout(tmp_path / "ssl", rng)
    # the control: the same stacker fitted on the held-out rows reads the leak and scores them perfectly
    table = pd.DataFrame({"subject_id": [f"LA{i:04d}" for i in range(len(held["label"]))],
                          "patient_id": [f"PLA{i:04d}" for i in range(len(held["label"]))],
                          "image": _prob(held["image"]), "radiomics_clinical": _prob(held["rc"]),
                          "label": held["label"]})
    leaky = hybrid.fit_stacker(table, "classification", ["image", "radiomics_clinical"], [], seed=0)
    prob = hybrid.prediction_rows(leaky, table, "test_large")["prob"]
    assert roc_auc_score(held["label"], prob) == 1.0
    # fitted on val rows only, as the module does, the leak is noise to it
    res = _run(tmp_path)
    e = res["tasks"]["label"]["sets"]["test_large"]["hybrid"]
    assert e["first_level"]["image"]["value"] == 1.0  # the leaked column alone is perfect on held-out rows
    assert abs(e["value"] - 0.5) < 0.1
    assert res["tasks"]["label"]["stackers"]["hybrid"]["n_fit"] == 90


def test_val_rows_must_be_one_out_of_fold_row_per_subject_in_every_model(tmp_path, capsys):
    rng = np.random.default_rng(4)
    _leak_layout(tmp_path / "ssl", rng, n_val=30, n_held=20)
    path = tmp_path / "ssl/seed0/radiomics_clinical_classification/predictions.csv"
    pred = pd.read_csv(path, dtype={"subject_id": str})
    pred[~((pred["split"] == "val") & (pred["subject_id"] == "A0007"))].to_csv(path, index=False)
    with pytest.raises(SystemExit) as e:
        _run(tmp_path)
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and len(err.splitlines()) == 1
    assert "radiomics_clinical" in err and "A0007" in err and "val" in err
    # in-fold predictions: a subject scored on val by a second fold model
    dup = pred[(pred["split"] == "val") & (pred["subject_id"] == "A0007")].assign(fold=1 - pred["fold"].iloc[7] % 2)
    pd.concat([pred, dup]).to_csv(path, index=False)
    with pytest.raises(InputError, match=r"radiomics_clinical: val rows are not out-of-fold.*A0007"):
        hs.run(hs.parse_args(["--ssl_gain", str(tmp_path / "ssl"), "--out", str(tmp_path / "o")]), "cmd")


def test_cli_refuses_a_missing_run_folder_in_one_line(tmp_path, capsys):
    rng = np.random.default_rng(5)
    _leak_layout(tmp_path / "ssl", rng, n_val=12, n_held=10)
    with pytest.raises(SystemExit) as e:
        _run(tmp_path, "--image_run", "ft_mim_film")
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and len(err.splitlines()) == 1
    assert str(tmp_path / "ssl" / "seed0" / "ft_mim_film") in err
    assert not (tmp_path / "out").exists()  # nothing half-written
