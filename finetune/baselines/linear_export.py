"""A fitted first-level baseline (radiomics, clinical-only, radiomics + clinical) as numbers in JSON, no pickle.

Each baseline (finetune.baselines.radiomics.RadiomicsModel and finetune.baselines.clinical_models) is an sklearn
pipeline: median imputation -> standardisation -> constant/correlation filter -> [k best] on the radiomics
columns, ClinicalSchema -> standardisation on the clinical ones, then one penalised linear model. Once fitted,
every step before the model is a per-column shift and scale of the columns the model keeps, so the whole
pipeline reduces to those columns' medians, means and scales, the clinical schema and its scaler, and the
coefficients. `LinearBaseline.predict` applies them by hand (one dot product; expit for the label), as
finetune.baselines.hybrid.Stacker does, and gives the pipeline's own predictions (tests/test_linear_export.py).
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from scipy.special import expit

from core.atomic import write_json
from core.errors import InputError
from finetune.clinical import ClinicalSchema
from models.tasks import get_task

FORMAT = "mimfm.linear_baseline/1"
NAMES = ("clinical_only", "radiomics", "radiomics_clinical")  # clinical_models.BASELINES, without the import cycle


@dataclass
class LinearBaseline:
    """A fitted baseline: everything its prediction needs, saved as JSON (no pickle)."""
    name: str                       # the baseline, as python -m finetune.baselines names it
    task: str                       # classification (P(y=1)) or survival (Cox linear predictor)
    radiomics_columns: list[str]    # the radiomics features the linear model reads (after filter + select)
    radiomics_medians: list[float]  # their imputation values, fitted on the training rows
    radiomics_mean: list[float]     # their standardisation
    radiomics_scale: list[float]
    clinical_columns: list[str]     # raw clinical columns ([] = none)
    clinical_schema: dict | None    # finetune.clinical.ClinicalSchema.to_dict() of those columns
    clinical_mean: list[float]      # standardisation of the encoded clinical columns
    clinical_scale: list[float]
    coef: list[float]               # radiomics columns first, then the encoded clinical ones
    intercept: float                # Cox: minus Coxnet's offset (its centring of the features)
    format: str = FORMAT

    @property
    def score(self) -> str:
        return "prob" if get_task(self.task).label else "risk"

    def columns(self) -> list[str]:
        """The table columns predict reads."""
        return self.radiomics_columns + self.clinical_columns

    def design(self, table: pd.DataFrame) -> np.ndarray:
        """The linear model's standardised inputs [N, F] from the raw radiomics features and clinical values."""
        absent = [c for c in self.columns() if c not in table.columns]
        if absent:
            raise InputError(f"{self.name} baseline: column(s) {absent[:5]} missing from the table it is applied to")
        blocks = [np.zeros((len(table), 0))]
        if self.radiomics_columns:
            x = table[self.radiomics_columns].to_numpy(np.float64)  # [N, R]
            x = np.where(np.isnan(x), np.asarray(self.radiomics_medians), x)
            blocks.append((x - np.asarray(self.radiomics_mean)) / np.asarray(self.radiomics_scale))
        if self.clinical_columns:
            schema = ClinicalSchema.from_dict(self.clinical_schema)
            z = schema.transform(table[self.clinical_columns]).astype(np.float64)  # [N, C] as ClinicalEncoder
            blocks.append((z - np.asarray(self.clinical_mean)) / np.asarray(self.clinical_scale))
        return np.hstack(blocks)

    def predict(self, table: pd.DataFrame) -> np.ndarray:
        """P(y=1) for the label, the Cox linear predictor for survival: the fitted pipeline's predict."""
        eta = self.design(table) @ np.asarray(self.coef) + self.intercept
        return expit(eta) if self.score == "prob" else eta

    def to_dict(self) -> dict:
        return asdict(self)

    def save(self, path) -> None:
        write_json(Path(path), self.to_dict())

    @classmethod
    def load(cls, path) -> "LinearBaseline":
        return cls(**read_model_json(path, "baseline model", FORMAT, set(cls.__dataclass_fields__), _shape_problem))


def read_model_json(path, what: str, fmt: str, fields: set[str], shape_problem, optional: set[str] = frozenset()) -> dict:
    """A saved linear model's JSON (a LinearBaseline's, a hybrid Stacker's) as a dict, checked: it reads, its
    `format` is `fmt`, its keys are `fields` (those in `optional` may be absent: they came later) and
    `shape_problem(d)` finds nothing. InputError naming `what` and the file otherwise: a hand-edited or truncated
    file would broadcast, or fail deep in numpy."""
    path = Path(path)
    try:
        d = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise InputError(f"{what} {path}: cannot read ({type(e).__name__}: {e})") from None
    if not isinstance(d, dict) or d.get("format") != fmt:
        raise InputError(f"{what} {path}: not a {fmt} file")
    odd = (fields - set(optional) - set(d)) | (set(d) - fields)
    if odd:
        raise InputError(f"{what} {path}: keys {sorted(odd)} differ from a {fmt} file's")
    problem = shape_problem(d)
    if problem:
        raise InputError(f"{what} {path}: {problem}")
    return d


def _shape_problem(d: dict) -> str:
    """Why a baseline JSON's numbers cannot be one linear model over its columns, or ""."""
    lists = ("radiomics_columns", "radiomics_medians", "radiomics_mean", "radiomics_scale", "clinical_columns",
             "clinical_mean", "clinical_scale", "coef")
    bad = [k for k in lists if not isinstance(d[k], list)]
    if bad:
        return f"{bad} must be lists"
    if d["name"] not in NAMES or d["task"] not in ("classification", "survival"):
        return f"name {d['name']!r} / task {d['task']!r}: expected one of {list(NAMES)} / classification or survival"
    n_radiomics = len(d["radiomics_columns"])
    lengths = {k: len(d[k]) for k in ("radiomics_medians", "radiomics_mean", "radiomics_scale")}
    if set(lengths.values()) - {n_radiomics}:
        return f"lengths {lengths} differ from its {n_radiomics} radiomics_columns"
    n_clinical = 0
    try:
        if d["clinical_columns"]:
            schema = ClinicalSchema.from_dict(d["clinical_schema"])
            if sorted(schema.columns) != sorted(d["clinical_columns"]):
                return f"clinical_schema encodes {schema.columns}, not clinical_columns {d['clinical_columns']}"
            n_clinical = schema.n_features
        elif d["clinical_schema"] is not None:
            return "a clinical_schema without clinical_columns"
    except (InputError, KeyError, TypeError, ValueError) as e:
        return f"clinical_schema unreadable ({type(e).__name__}: {e})"
    lengths = {k: len(d[k]) for k in ("clinical_mean", "clinical_scale")}
    if set(lengths.values()) - {n_clinical}:
        return f"lengths {lengths} differ from its {n_clinical} encoded clinical columns"
    if len(d["coef"]) != n_radiomics + n_clinical:
        return (f"coef has {len(d['coef'])} values for {n_radiomics} radiomics and {n_clinical} encoded clinical "
                f"columns")
    numbers = [x for k in lists if k not in ("radiomics_columns", "clinical_columns") for x in d[k]] + [d["intercept"]]
    if not all(type(x) in (int, float) and np.isfinite(x) for x in numbers):
        return "medians, means, scales, coef and intercept must be finite numbers"
    if min(d["radiomics_scale"] + d["clinical_scale"], default=1.0) <= 0:
        return "scales must be positive"
    return ""


# ---------------------------------------------------------------- from a fitted model

def export_model(model) -> LinearBaseline:
    """A fitted RadiomicsModel / ClinicalModel / RadiomicsClinicalModel (fitted on a DataFrame) as numbers."""
    steps = model.pipeline_.named_steps
    if "features" in steps:  # radiomics + clinical: a ColumnTransformer of the two parts
        parts = steps["features"].named_transformers_
        radiomics = parts["radiomics"].named_steps
        clinical = parts["clinical"].named_steps
        names = [c for c in model.columns_ if c not in model.clinical_columns]
    elif "encode" in steps:  # clinical only
        radiomics, clinical, names = None, steps, []
    else:
        if model.feature_names_ is None:
            raise InputError(f"{model.NAME}: fitted on a matrix without column names; refit it on a table to export")
        radiomics, clinical, names = steps, None, model.feature_names_
    out = {"name": model.NAME, "task": model.task.name} | _radiomics_part(radiomics, names) | _clinical_part(clinical)
    fitted = steps["model"]
    if model.task.label:
        coef, intercept = np.ravel(fitted.coef_), float(np.ravel(fitted.intercept_)[0])
    else:  # Coxnet predicts X @ coef_[:, -1] - offset_[-1] (one alpha: the tuned one)
        coef, intercept = fitted.coef_[:, -1], -float(fitted.offset_[-1])
    return LinearBaseline(**out, coef=np.asarray(coef, np.float64).tolist(), intercept=intercept)


def _radiomics_part(steps, names: list[str]) -> dict:
    if steps is None:
        return {"radiomics_columns": [], "radiomics_medians": [], "radiomics_mean": [], "radiomics_scale": []}
    kept = steps["filter"].keep_  # indices into `names`, after the constant/correlation filter
    if "select" in steps:
        kept = kept[steps["select"].get_support()]
    return {"radiomics_columns": [str(names[i]) for i in kept],
            "radiomics_medians": steps["impute"].statistics_[kept].astype(float).tolist(),
            "radiomics_mean": steps["scale"].mean_[kept].astype(float).tolist(),
            "radiomics_scale": steps["scale"].scale_[kept].astype(float).tolist()}


def _clinical_part(steps) -> dict:
    if steps is None:
        return {"clinical_columns": [], "clinical_schema": None, "clinical_mean": [], "clinical_scale": []}
    schema = steps["encode"].schema_
    return {"clinical_columns": list(steps["encode"].columns), "clinical_schema": schema.to_dict(),
            "clinical_mean": steps["scale"].mean_.astype(float).tolist(),
            "clinical_scale": steps["scale"].scale_.astype(float).tolist()}
