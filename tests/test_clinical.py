import json

import numpy as np
import pandas as pd
import pytest
from sklearn.preprocessing import OneHotEncoder, StandardScaler

from core.errors import ClinicalError
from finetune.clinical import ClinicalSchema, UnseenCategoryWarning


def _table(n, rng, age_mean=60.0):
    return pd.DataFrame({
        "subject_id": [f"s{i:03d}" for i in range(n)],
        "age": rng.normal(age_mean, 10, n),
        "kps": rng.integers(50, 101, n).astype(float),
        "smoker": rng.integers(0, 2, n),
        "histology": rng.choice(["lung", "breast", "melanoma"], n),
    })


def _cols(schema, X, names):
    return X[:, [schema.feature_names.index(n) for n in names]]


def test_detects_types_and_layout():
    df = _table(30, np.random.default_rng(0))
    s = ClinicalSchema.fit(df, ["age", "kps", "smoker", "histology"])
    assert s.numeric == ["age", "kps", "smoker"]  # a 0/1 flag stays numeric
    assert s.categorical == ["histology"]
    assert s.feature_names == ["age", "age__missing", "kps", "kps__missing", "smoker", "smoker__missing",
                               "histology=breast", "histology=lung", "histology=melanoma", "histology__missing"]
    X = s.transform(df)
    assert X.dtype == np.float32 and X.shape == (30, s.n_features)


def test_matches_sklearn_scaler_and_onehot_without_missing():
    rng = np.random.default_rng(1)
    train, val = _table(40, rng), _table(15, rng)
    val.loc[3, "histology"] = "sarcoma"  # unseen in training
    s = ClinicalSchema.fit(train, ["age", "kps", "histology"])
    with pytest.warns(UnseenCategoryWarning, match="s003"):
        X = s.transform(val)

    scaler = StandardScaler().fit(train[["age", "kps"]])
    ref_num = scaler.transform(val[["age", "kps"]])
    np.testing.assert_allclose(_cols(s, X, ["age", "kps"]), ref_num, rtol=1e-5, atol=1e-5)

    enc = OneHotEncoder(handle_unknown="ignore").fit(train[["histology"]])
    ref_cat = enc.transform(val[["histology"]]).toarray()
    ours = _cols(s, X, [f"histology={c}" for c in enc.categories_[0]])
    np.testing.assert_array_equal(ours, ref_cat)
    assert ours[3].sum() == 0  # the unseen category is all zeros
    assert not _cols(s, X, ["age__missing", "kps__missing", "histology__missing"]).any()


def test_standardises_with_training_rows_only():
    rng = np.random.default_rng(2)
    train, val = _table(50, rng, age_mean=50), _table(50, rng, age_mean=80)
    s = ClinicalSchema.fit(train, ["age"])
    assert s.means["age"] == pytest.approx(train["age"].mean())
    assert np.mean(s.transform(train)[:, 0]) == pytest.approx(0, abs=1e-5)
    # Validation rows are ~3 training SDs older: fitting on them would have hidden that.
    assert np.mean(s.transform(val)[:, 0]) > 2.0


def test_missing_values_get_indicator_and_training_median():
    train = pd.DataFrame({"subject_id": ["a", "b", "c", "d"], "age": [40, 50, None, 70],
                          "grade": ["II", None, "III", "II"]})
    s = ClinicalSchema.fit(train, ["age", "grade"])
    assert s.medians["age"] == 50 and s.means["age"] == pytest.approx(160 / 3)
    test = pd.DataFrame({"subject_id": ["x", "y"], "age": [np.nan, "  "], "grade": ["", "III"]})
    X = s.transform(test)
    expected_age = (50 - 160 / 3) / np.std([40, 50, 70])
    np.testing.assert_allclose(_cols(s, X, ["age"])[:, 0], [expected_age] * 2, rtol=1e-5)
    np.testing.assert_array_equal(_cols(s, X, ["age__missing"])[:, 0], [1, 1])
    np.testing.assert_array_equal(_cols(s, X, ["grade=II", "grade=III", "grade__missing"]),
                                  [[0, 0, 1], [0, 1, 0]])


def test_roundtrip_through_json_transforms_identically():
    rng = np.random.default_rng(3)
    df = _table(25, rng)
    df.loc[[2, 7], "age"] = np.nan
    df.loc[5, "histology"] = None
    s = ClinicalSchema.fit(df, ["age", "kps", "smoker", "histology"])
    loaded = ClinicalSchema.from_dict(json.loads(json.dumps(s.to_dict())))
    assert loaded == s
    new = _table(10, rng)
    new.loc[1, "kps"] = None
    np.testing.assert_array_equal(loaded.transform(new), s.transform(new))


def test_from_dict_rejects_a_malformed_schema():
    s = ClinicalSchema.fit(pd.DataFrame({"age": [1.0, 2.0]}), ["age"])
    d = s.to_dict()
    del d["medians"]
    with pytest.raises(ClinicalError, match="medians"):
        ClinicalSchema.from_dict(d)


def test_non_numeric_value_names_column_and_subjects():
    train = pd.DataFrame({"subject_id": ["a", "b", "c"], "age": [40, 50, 60]})
    s = ClinicalSchema.fit(train, ["age"])
    bad = pd.DataFrame({"subject_id": ["p1", "p2", "p3"], "age": ["55", "abc", "?"]})
    with pytest.raises(ClinicalError, match=r"'age'.*'abc'.*p2, p3"):
        s.transform(bad)
    with pytest.raises(ClinicalError, match=r"'age'.*infinite.*p9"):
        s.transform(pd.DataFrame({"subject_id": ["p9"], "age": [np.inf]}))


def test_forced_numeric_rejects_text_but_auto_detect_makes_it_categorical():
    df = pd.DataFrame({"subject_id": ["a", "b"], "stage": ["1", "IV"]})
    assert ClinicalSchema.fit(df, ["stage"]).categorical == ["stage"]
    s = ClinicalSchema.fit(df, [], categorical=["stage"])
    assert s.categories["stage"] == ["1", "IV"]
    # An integer column read back as floats (a gap makes pandas use float) keeps its categories.
    s = ClinicalSchema.fit(pd.DataFrame({"g": [1, 2, 3]}), [], categorical=["g"])
    X = s.transform(pd.DataFrame({"g": [2.0, np.nan]}))
    np.testing.assert_array_equal(X, [[0, 1, 0, 0], [0, 0, 0, 1]])


def test_missing_column_and_all_missing_column_are_errors():
    train = pd.DataFrame({"subject_id": ["a", "b"], "age": [1.0, 2.0], "ldh": [None, None]})
    with pytest.raises(ClinicalError, match="'ldh'.*every training value is missing"):
        ClinicalSchema.fit(train, ["age", "ldh"])
    with pytest.raises(ClinicalError, match=r"\['sex'\] missing"):
        ClinicalSchema.fit(train, ["age", "sex"])
    s = ClinicalSchema.fit(train, ["age"])
    with pytest.raises(ClinicalError, match=r"\['age'\] missing"):
        s.transform(train.drop(columns="age"))


def test_no_columns_gives_zero_features():
    s = ClinicalSchema.fit(pd.DataFrame({"x": [1, 2]}), [])
    assert s.n_features == 0 and s.transform(pd.DataFrame({"x": [3]})).shape == (1, 0)


def test_default_columns_are_the_manifest_clinical_columns():
    df = pd.DataFrame({"subject_id": ["a", "b"], "patient_id": ["a", "b"], "site": ["x", "y"], "image": ["i", "j"],
                       "mask": ["m", "n"], "label": [0, 1], "age": [50, 60], "sex": ["F", "M"]})
    s = ClinicalSchema.fit(df)
    assert (s.numeric, s.categorical) == (["age"], ["sex"])
