"""finetune.baselines.linear_export: a fitted first-level baseline as JSON numbers predicts what its sklearn /
sksurv pipeline predicts, before and after save/load and with missing values, and a hand-edited file is refused
in one line naming it."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from sksurv.util import Surv

from core.errors import InputError
from finetune.baselines.clinical_models import ClinicalModel, RadiomicsClinicalModel
from finetune.baselines.linear_export import LinearBaseline, export_model
from finetune.baselines.radiomics import RadiomicsModel

CLINICAL = ["age", "histology"]


def _table(n: int, seed: int) -> tuple[pd.DataFrame, dict]:
    """Six radiomics columns (two carry the label, one constant, one a copy: the filter drops those two) and a
    numeric and a categorical clinical column; the label and a survival target."""
    rng = np.random.default_rng(seed)
    label = np.tile([0, 1], n // 2)
    X = pd.DataFrame({f"r{j}": rng.normal(size=n) + (0.9 * label if j < 2 else 0.0) for j in range(4)})
    X["r_const"], X["r_copy"] = 3.0, X["r2"] * 2 + 1
    X["age"] = rng.normal(60, 10, n).round(1)
    X["histology"] = rng.choice(["lung", "breast", "melanoma"], n)
    time = rng.exponential(np.exp(-0.8 * label)) * 50 + 1
    event = np.tile([True, True, False, True], n // 4)
    return X, {"classification": label, "survival": Surv.from_arrays(event=event, time=time)}


def _with_missing(X: pd.DataFrame) -> pd.DataFrame:
    X = X.copy()
    X.loc[X.index[::3], "r0"] = np.nan
    X.loc[X.index[1::4], "r1"] = np.nan
    X.loc[X.index[::5], "age"] = np.nan
    X.loc[X.index[2::5], "histology"] = None
    return X


def _model(kind: str, task: str):
    if kind == "radiomics":
        return RadiomicsModel(task, seed=0, inner_folds=3)
    cls = ClinicalModel if kind == "clinical_only" else RadiomicsClinicalModel
    return cls(task, CLINICAL, seed=0, inner_folds=3)


def _inputs(kind: str, X: pd.DataFrame) -> pd.DataFrame:
    return X.drop(columns=CLINICAL) if kind == "radiomics" else X


@pytest.mark.parametrize("task", ["classification", "survival"])
@pytest.mark.parametrize("kind", ["radiomics", "clinical_only", "radiomics_clinical"])
def test_the_json_model_predicts_what_the_fitted_pipeline_predicts(tmp_path, kind, task):
    X, y = _table(40, 0)
    fit_rows = _with_missing(X)  # the imputer's medians and the schema's missing indicators are fitted too
    model = _model(kind, task).fit(_inputs(kind, fit_rows), y[task])
    ours = export_model(model)
    assert (ours.name, ours.task) == (kind, task)
    if kind != "clinical_only":
        assert ours.radiomics_columns == [c for c in model.model_inputs() if c.startswith("r")]
        assert "r_const" not in ours.radiomics_columns and "r_copy" not in ours.radiomics_columns
    new, _ = _table(24, 1)
    for rows in (new, _with_missing(new)):
        np.testing.assert_allclose(ours.predict(rows), model.predict(_inputs(kind, rows)), rtol=0, atol=1e-9)
    ours.save(tmp_path / "model.json")
    back = LinearBaseline.load(tmp_path / "model.json")
    assert back == ours
    np.testing.assert_allclose(back.predict(_with_missing(new)), model.predict(_inputs(kind, _with_missing(new))),
                               rtol=0, atol=1e-9)


@pytest.fixture(scope="module")
def saved_dict() -> dict:
    X, y = _table(40, 0)
    return export_model(_model("radiomics_clinical", "classification").fit(X, y["classification"])).to_dict()


@pytest.mark.parametrize("edit,names", [
    (lambda d: d.update(coef=d["coef"][:-1]), "coef has"),
    (lambda d: d.update(radiomics_mean=d["radiomics_mean"][:1]), "lengths"),
    (lambda d: d.update(clinical_columns=["age"]), "clinical_schema encodes"),
    (lambda d: d.update(radiomics_scale=[0.0] * len(d["radiomics_scale"])), "scales must be positive"),
    (lambda d: d.pop("intercept"), "keys ['intercept']"),
    (lambda d: d.update(format="other"), "not a mimfm.linear_baseline/1 file"),
])
def test_a_hand_edited_model_is_refused_in_one_line_naming_the_file(tmp_path, saved_dict, edit, names):
    saved = json.loads(json.dumps(saved_dict))
    edit(saved)
    (tmp_path / "m.json").write_text(json.dumps(saved))
    with pytest.raises(InputError) as e:
        LinearBaseline.load(tmp_path / "m.json")
    msg = str(e.value)
    assert msg.startswith(f"baseline model {tmp_path / 'm.json'}: ") and names in msg and "\n" not in msg


def test_predict_splits_hands_back_the_model_that_scored_the_test_rows():
    from finetune.baselines.radiomics import predict_splits
    X, y = _table(40, 2)
    X.index = pd.Index([f"s{i:02d}" for i in range(40)], name="subject_id")
    ids = list(X.index)
    splits = {"folds": [{"train": ids[:16], "val": ids[16:32]}, {"train": ids[16:32], "val": ids[:16]}],
              "test": ids[32:]}
    targets = pd.DataFrame({"label": y["classification"]}, index=X.index)
    final = []
    pred, _ = predict_splits(X, targets, splits, "classification", keep_final=final.append,
                             make_model=lambda task, seed: _model("radiomics_clinical", task))
    test = pred[pred.split == "test"].set_index("subject_id")["prob"]
    assert len(final) == 1  # the all-non-test-rows model only, not a fold model
    np.testing.assert_allclose(export_model(final[0]).predict(X.loc[test.index]), test.to_numpy(), rtol=0, atol=1e-9)
