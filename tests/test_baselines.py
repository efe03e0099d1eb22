"""finetune.baselines.clinical_models: the clinical-only and radiomics + clinical baselines give the predictions
of the same models fitted by hand with sklearn / sksurv, and their inner-CV selection never sees the outer fold."""
import numpy as np
import pandas as pd
import pytest
from sklearn.compose import ColumnTransformer
from sklearn.feature_selection import SelectKBest
from sklearn.impute import SimpleImputer
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import GridSearchCV, StratifiedKFold
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import OneHotEncoder, StandardScaler
from sksurv.linear_model import CoxnetSurvivalAnalysis
from sksurv.metrics import concordance_index_censored
from sksurv.util import Surv

from core.errors import InputError
from finetune.baselines.clinical_models import ClinicalModel, RadiomicsClinicalModel, make_baseline
from finetune.baselines.radiomics import predict_splits

NUMERIC, CATEGORICAL = ["age", "kps"], ["histology"]
CLINICAL = NUMERIC + CATEGORICAL
RADIOMICS = [f"r{j}" for j in range(4)]


def _table(n: int = 40, seed: int = 0) -> tuple[pd.DataFrame, np.ndarray, np.ndarray]:
    """Radiomics + clinical columns indexed by subject_id, a label, and a survival target (no missing values)."""
    rng = np.random.default_rng(seed)
    label = np.tile([0, 1], n // 2)
    X = pd.DataFrame({"age": rng.normal(60, 10, n).round(1), "kps": rng.choice([60, 70, 80, 90, 100], n),
                      "histology": rng.choice(["lung", "breast", "melanoma"], n)},
                     index=pd.Index([f"s{i:02d}" for i in range(n)], name="subject_id"))
    for j, col in enumerate(RADIOMICS):
        X[col] = rng.normal(size=n) + (0.8 * label if j < 2 else 0.0)
    X = X[RADIOMICS + CLINICAL]
    risk = 0.8 * label + 0.03 * (X["age"].to_numpy() - 60)
    time = rng.exponential(np.exp(-risk)) * 50 + 1
    event = np.tile([True, True, False, True], n // 4)
    return X, label, Surv.from_arrays(event=event, time=time)


def _clinical_by_hand() -> ColumnTransformer:
    # One-hot and z-score with sklearn, then one more StandardScaler: every column on one footing.
    return Pipeline([("ct", ColumnTransformer([("num", StandardScaler(), NUMERIC),
                                               ("cat", OneHotEncoder(), CATEGORICAL)])), ("scale", StandardScaler())])


def _search(pipe, grid, X, y, strata, scoring, folds=5):
    cv = list(StratifiedKFold(folds, shuffle=True, random_state=0).split(X, strata))
    return GridSearchCV(pipe, grid, cv=cv, scoring=scoring, error_score=np.nan).fit(X, y)


def _hand_label(features: ColumnTransformer, X, y) -> np.ndarray:
    pipe = Pipeline([("f", features), ("model", LogisticRegression(solver="newton-cholesky", max_iter=1000))])
    return _search(pipe, {"model__C": list(np.logspace(-3, 2, 6))}, X, y, y, "neg_log_loss")


def _hand_cox(features, X, y, l1_ratio, k_grid=None):
    path = Pipeline([("f", features(None)), ("model", CoxnetSurvivalAnalysis(
        l1_ratio=l1_ratio, alpha_min_ratio=0.05, n_alphas=30))]).fit(X, y)
    grid = {"model__alphas": [[a] for a in path.named_steps["model"].alphas_[::3]]}
    if k_grid:
        grid["f__rad__select__k"] = k_grid
    pipe = Pipeline([("f", features("all" if k_grid else None)), ("model", CoxnetSurvivalAnalysis(l1_ratio=l1_ratio))])
    return _search(pipe, grid, X, y, y["event"].astype(int), None, folds=3)


def _c_scores(X, y):
    """|Harrell's C - 0.5| per column, straight from sksurv."""
    return np.array([abs(concordance_index_censored(y["event"], y["time"], X[:, j])[0] - 0.5)
                     for j in range(X.shape[1])])


def test_clinical_only_logistic_matches_sklearn_by_hand():
    X, label, _ = _table()
    ours = ClinicalModel("classification", CLINICAL).fit(X, label)
    hand = _hand_label(_clinical_by_hand(), X[CLINICAL], label)
    assert ours.best_params_["C"] == pytest.approx(hand.best_params_["model__C"])
    np.testing.assert_allclose(ours.predict(X), hand.predict_proba(X[CLINICAL])[:, 1], atol=1e-8)
    assert ours.model_inputs()[:2] == ["age", "age__missing"]


def test_clinical_only_cox_matches_sksurv_by_hand():
    X, _, y = _table()
    ours = ClinicalModel("survival", CLINICAL, inner_folds=3).fit(X, y)
    hand = _hand_cox(lambda k: _clinical_by_hand(), X[CLINICAL], y, l1_ratio=0.5)
    np.testing.assert_allclose(ours.predict(X), hand.predict(X[CLINICAL]), atol=1e-8)


def _radiomics_clinical_by_hand(k=None):
    radiomics = [("impute", SimpleImputer(strategy="median")), ("scale", StandardScaler())]
    if k is not None:
        radiomics.append(("select", SelectKBest(_c_scores, k=k)))
    return ColumnTransformer([("rad", Pipeline(radiomics), RADIOMICS), ("clin", _clinical_by_hand(), CLINICAL)])


def test_radiomics_clinical_logistic_matches_sklearn_by_hand():
    X, label, _ = _table()
    ours = RadiomicsClinicalModel("classification", CLINICAL).fit(X, label)
    hand = _hand_label(_radiomics_clinical_by_hand(), X, label)
    np.testing.assert_allclose(ours.predict(X), hand.predict_proba(X)[:, 1], atol=1e-8)
    assert ours.model_inputs()[:len(RADIOMICS)] == RADIOMICS and "histology=lung" in ours.model_inputs()


def test_radiomics_clinical_cox_matches_sksurv_by_hand():
    """Survival's default recipe: univariate |C - 0.5| filter on the radiomics columns, clinical columns kept,
    one Coxnet (l1_ratio 0.95) over both; k and alpha by inner CV."""
    X, _, y = _table()
    ours = RadiomicsClinicalModel("survival", CLINICAL, inner_folds=3).fit(X, y)
    assert ours.selection == "univariate_l1"
    with pytest.warns(UserWarning):  # k above the 4 radiomics columns keeps them all, as ours does
        hand = _hand_cox(_radiomics_clinical_by_hand, X, y, l1_ratio=0.95, k_grid=[5, 10, 20, "all"])
    np.testing.assert_allclose(ours.predict(X), hand.predict(X), atol=1e-8)
    assert ours.best_params_["alpha"] == pytest.approx(hand.best_params_["model__alphas"][0])


@pytest.mark.parametrize("name,task", [("clinical_only", "survival"), ("radiomics_clinical", "classification")])
def test_selection_never_sees_the_outer_fold(name, task):
    """A clinical column that holds the outcome on a fold's validation rows and a constant on its training
    rows. predict_splits' fold model (every step and the inner CV) must see the training rows only: its
    validation predictions equal a model fitted by hand on those rows. The positive control, a model that
    also saw the validation rows, reads the leak and predicts otherwise, so a leak fails this test."""
    X, label, y = _table()
    train_idx, val_idx = next(StratifiedKFold(2, shuffle=True, random_state=1).split(X, label))
    train, val = list(X.index[train_idx]), list(X.index[val_idx])
    leaked = X.assign(leak=0.0)
    leaked.loc[val, "leak"] = label[val_idx] * 10.0
    targets = pd.DataFrame({"label": label, "time": y["time"], "event": y["event"]}, index=X.index)
    make = make_baseline(name, CLINICAL + ["leak"])
    pred, _ = predict_splits(leaked, targets, {"folds": [{"train": train, "val": val}], "test": []}, task,
                             make_model=make)
    score = "prob" if task == "classification" else "risk"
    fold0 = pred[(pred["split"] == "val") & (pred["fold"] == 0)].set_index("subject_id").loc[val, score]

    def target(idx):
        return label[idx] if task == "classification" else y[idx]

    by_hand = make(task, 0).fit(leaked.loc[train], target(train_idx)).predict(leaked.loc[val])
    np.testing.assert_allclose(fold0, by_hand, atol=1e-10)
    both = np.concatenate([train_idx, val_idx])
    seen = make(task, 0).fit(leaked.iloc[both], target(both)).predict(leaked.loc[val])
    assert np.max(np.abs(seen - fold0.to_numpy())) > 1e-3  # a leak would have moved them


def test_bad_input_names_the_column():
    X, label, _ = _table()
    with pytest.raises(InputError, match=r"clinical_only: clinical column\(s\) \['stage'\] missing"):
        ClinicalModel("classification", ["stage"]).fit(X, label)
    with pytest.raises(InputError, match="radiomics_clinical: the table has the clinical columns only"):
        RadiomicsClinicalModel("classification", CLINICAL).fit(X[CLINICAL], label)
    with pytest.raises(InputError, match="no clinical columns"):
        make_baseline("clinical_only", [])
    with pytest.raises(InputError, match="baseline 'deep'"):
        make_baseline("deep", CLINICAL)


def test_cli_fits_every_baseline_on_the_shared_splits_and_evaluate_reads_them(tmp_path, capsys):
    """python -m finetune.baselines writes <name>/predictions.csv per baseline on one splits file; its
    clinical_only rows are predict_splits' with a ClinicalModel; finetune.evaluate --baselines reads the folder."""
    import json

    from finetune.baselines.__main__ import main
    from finetune.evaluate import main as evaluate_main
    from tests.test_radiomics import _write_cohort

    manifest = _write_cohort(tmp_path, 16, np.random.default_rng(7))
    table = pd.read_csv(manifest, dtype={"subject_id": str})
    table["age"] = np.random.default_rng(1).normal(60, 10, len(table)).round(1)
    table.to_csv(manifest, index=False)
    out = tmp_path / "baselines"
    assert main(["--manifest", str(manifest), "--cache", str(tmp_path / "cache"), "--out", str(out), "--folds", "2",
                 "--splits", str(tmp_path / "splits.json"), "--task", "classification", "--clinical_columns", "age",
                 "--test_fraction", "0.2"]) == 0
    splits = json.loads((tmp_path / "splits.json").read_text())
    for name in ("clinical_only", "radiomics", "radiomics_clinical"):
        pred = pd.read_csv(out / name / "predictions.csv", dtype={"subject_id": str})
        assert sorted(pred[pred.split == "test"].subject_id) == sorted(splits["test"])
        assert json.loads((out / name / "baseline.json").read_text())["clinical_columns"] == ["age"]
    by_hand, _ = predict_splits(table.set_index("subject_id")[["age"]], table.set_index("subject_id")[["label"]],
                                splits, "classification", make_model=make_baseline("clinical_only", ["age"]))
    ours = pd.read_csv(out / "clinical_only" / "predictions.csv", dtype={"subject_id": str})
    np.testing.assert_allclose(ours["prob"], by_hand["prob"], atol=1e-12)
    capsys.readouterr()
    assert evaluate_main(["--predictions", str(out / "radiomics" / "predictions.csv"), "--manifest", str(manifest),
                          "--baselines", f"clinical_only={out / 'clinical_only' / 'predictions.csv'}",
                          "--n_boot", "0", "--out", str(tmp_path / "eval")]) == 0
    assert "baseline clinical_only" in capsys.readouterr().out


def test_the_baselines_reuse_a_default_fine_tuning_runs_splits(tmp_path):
    """python -m finetune.baselines --splits run/splits.json with default flags asks for the splits a default
    fine-tuning run made: the same folds, test fraction and stratification (the label whenever there is one,
    a survival cohort's included)."""
    import argparse

    from data.splits import stratify_of
    from finetune.baselines.radiomics import add_arguments
    from finetune.config import FinetuneConfig
    p = argparse.ArgumentParser()
    add_arguments(p)
    args = p.parse_args(["--manifest", "m.csv", "--cache", "c", "--splits", "s.json", "--task", "survival",
                         "--out", "o"])
    assert (args.folds, args.test_fraction) == (FinetuneConfig().folds, FinetuneConfig().test_fraction)
    labelled = pd.DataFrame({"label": [0, 1, 1], "event": [1, 0, 1]})
    assert stratify_of(labelled) == "label" and stratify_of(labelled.drop(columns="label")) == "event"
