"""The clinical baselines a user fits first: clinical-only, and radiomics + clinical in one penalised model.

- ClinicalModel: the clinical variables alone, encoded as every mimfm model encodes them
  (finetune.clinical.ClinicalSchema: standardised numbers, one-hot categories, missing indicators),
  then an L2 LogisticRegression (label) or an elastic-net Coxnet (survival; sksurv).
- RadiomicsClinicalModel: the radiomics signature's steps (finetune.baselines.radiomics: impute, standardise,
  constant/correlation filter, [univariate k best]) on the radiomics columns, beside the encoded clinical
  columns, into one penalised LogisticRegression / Coxnet.

Both tune their penalty (and the radiomics k) by the same inner CV as RadiomicsModel, with every step
fitted on the training rows of each inner fold only, and predict P(y=1) or a Cox risk.
"""
from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pandas as pd
from sklearn.base import BaseEstimator, TransformerMixin
from sklearn.compose import ColumnTransformer
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler

from core.errors import InputError
from finetune.clinical import ClinicalSchema
from finetune.baselines.radiomics import RadiomicsModel
from models.tasks import CLASSIFICATION, Task


class ClinicalEncoder(BaseEstimator, TransformerMixin):
    """ClinicalSchema as an sklearn step: fitted on the rows it is given, so inner CV sees no leak."""

    def __init__(self, columns=None):
        self.columns = columns

    def fit(self, X: pd.DataFrame, y=None):
        self.schema_ = ClinicalSchema.fit(X, list(self.columns))
        return self

    def transform(self, X: pd.DataFrame) -> np.ndarray:
        return self.schema_.transform(X).astype(np.float64)  # [N, F] float64 for the linear solvers


def _clinical_steps(columns: list[str]) -> list:
    # The schema z-scores numbers only; scaling again puts one-hot and indicator columns on the same
    # footing under one penalty (an already z-scored column is unchanged, a constant one stays 0).
    return [("encode", ClinicalEncoder(columns)), ("scale", StandardScaler())]


def _checked_columns(columns, name: str) -> list[str]:
    columns = list(columns or [])
    if not columns:
        raise InputError(f"{name}: no clinical columns given; a clinical baseline needs at least one")
    return columns


class ClinicalModel(RadiomicsModel):
    """Clinical variables only: ClinicalSchema -> standardise -> L2 logistic / elastic-net Cox, tuned by inner CV."""

    NAME = "clinical_only"

    def __init__(self, task: Task | str = CLASSIFICATION, clinical_columns=(), seed: int = 0, inner_folds: int = 5):
        # "none": no univariate filter, the few clinical variables all enter the penalised model.
        super().__init__(task, seed, inner_folds, selection="none")
        self.clinical_columns = _checked_columns(clinical_columns, self.NAME)

    def _feature_steps(self, k=None) -> list:
        return _clinical_steps(self.clinical_columns)

    def _as_input(self, X) -> pd.DataFrame:
        _require(X, self.clinical_columns, self.NAME)
        return X[self.clinical_columns]

    def _selection_steps(self) -> dict:
        return {}

    def model_inputs(self) -> list:
        return list(self.pipeline_.named_steps["encode"].schema_.feature_names)


class RadiomicsClinicalModel(RadiomicsModel):
    """The radiomics signature's steps on the radiomics columns beside the encoded clinical columns, one
    penalised model over both. The radiomics columns are every column of X that is not clinical."""

    NAME = "radiomics_clinical"
    SELECT_PARAM = "features__radiomics__select__k"

    def __init__(self, task: Task | str = CLASSIFICATION, clinical_columns=(), seed: int = 0, inner_folds: int = 5,
                 selection: str | None = None):
        super().__init__(task, seed, inner_folds, selection)
        self.clinical_columns = _checked_columns(clinical_columns, self.NAME)

    def fit(self, X, y) -> "RadiomicsClinicalModel":
        self.__dict__.pop("columns_", None)  # a refit reads its own table's columns
        return super().fit(X, y)

    def _feature_steps(self, k=None) -> list:
        radiomics = [c for c in self.columns_ if c not in self.clinical_columns]
        parts = ColumnTransformer([("radiomics", Pipeline(self._radiomics_steps(k)), radiomics),
                                   ("clinical", Pipeline(_clinical_steps(self.clinical_columns)),
                                    self.clinical_columns)])
        return [("features", parts)]

    def _as_input(self, X) -> pd.DataFrame:
        _require(X, self.clinical_columns, self.NAME)
        if not hasattr(self, "columns_"):  # fixed at fit: prediction reads the same columns in the same order
            self.columns_ = list(X.columns)
            if len(self.columns_) == len(self.clinical_columns):
                raise InputError(f"{self.NAME}: the table has the clinical columns only; no radiomics features")
        return X[self.columns_]

    def _selection_steps(self) -> dict:
        return self.pipeline_.named_steps["features"].named_transformers_["radiomics"].named_steps

    def model_inputs(self) -> list:
        radiomics = [c for c in self.columns_ if c not in self.clinical_columns]
        steps = self._selection_steps()
        cols = steps["filter"].keep_
        if "select" in steps:
            cols = cols[steps["select"].get_support()]
        clinical = self.pipeline_.named_steps["features"].named_transformers_["clinical"]
        return [radiomics[c] for c in cols] + list(clinical.named_steps["encode"].schema_.feature_names)


def _require(X, columns: list[str], name: str) -> None:
    if not isinstance(X, pd.DataFrame):
        raise InputError(f"{name}: needs a table with named columns (the clinical columns {columns[:5]})")
    absent = [c for c in columns if c not in X.columns]
    if absent:
        raise InputError(f"{name}: clinical column(s) {absent[:5]} missing from the table")


BASELINES = ("clinical_only", "radiomics", "radiomics_clinical")


def make_baseline(name: str, clinical_columns=()) -> Callable[[Task, int], RadiomicsModel]:
    """make_model(task, seed) for finetune.baselines.radiomics.predict_splits: the baseline called `name`."""
    if name not in BASELINES:
        raise InputError(f"baseline {name!r}: expected one of {list(BASELINES)}")
    if name == "radiomics":
        return lambda task, seed: RadiomicsModel(task, seed)
    model = ClinicalModel if name == "clinical_only" else RadiomicsClinicalModel
    columns = _checked_columns(clinical_columns, name)
    return lambda task, seed: model(task, columns, seed)
