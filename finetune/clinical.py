"""Clinical tabular encoder: a schema fitted on the training fold, turning a table into a float matrix.

Numeric columns are standardised with training-fold statistics; categorical columns are one-hot
encoded over the categories seen in training. Every column also gets a `<col>__missing` indicator,
so the feature layout never depends on which rows happen to be missing in a later table.

The fitted schema is a plain dict (JSON), not a pickled sklearn object: it travels inside an HF
model folder, and nothing from such a folder is ever unpickled.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import sys
import warnings
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from core.errors import ClinicalError

SCHEMA_VERSION = 1
_MAX_LISTED = 5  # subjects named in an error message before it says "and N more"


@dataclass
class ClinicalSchema:
    numeric: list[str] = field(default_factory=list)
    categorical: list[str] = field(default_factory=list)
    means: dict[str, float] = field(default_factory=dict)
    stds: dict[str, float] = field(default_factory=dict)
    medians: dict[str, float] = field(default_factory=dict)
    categories: dict[str, list[str]] = field(default_factory=dict)
    feature_names: list[str] = field(default_factory=list)

    @property
    def columns(self) -> list[str]:
        return self.numeric + self.categorical

    @property
    def n_features(self) -> int:
        return len(self.feature_names)

    @classmethod
    def fit(cls, df: pd.DataFrame, columns: list[str] | None = None, *,
            categorical: list[str] | None = None) -> "ClinicalSchema":
        """Fit on the training rows only. `columns=None` takes the manifest's clinical columns.

        A column is numeric when every non-missing value parses as a number (0/1 flags stay
        numeric), otherwise categorical; `categorical` forces columns to be categorical.
        """
        if columns is None:
            from data.manifest import clinical_columns  # only needed for the default
            columns = clinical_columns(df)
        columns = list(columns)
        forced = list(categorical or [])
        _require_columns(df, columns + [c for c in forced if c not in columns])
        columns += [c for c in forced if c not in columns]
        if len(df) == 0:
            raise ClinicalError("clinical schema: the training table has no rows")

        numeric, cats = [], []
        for col in columns:
            values = df[col]
            missing = _is_missing(values)
            if missing.all():
                raise ClinicalError(f"clinical column '{col}': every training value is missing; "
                                    f"drop the column or provide values")
            if col not in forced and _parses_as_numbers(values[~missing]):
                numeric.append(col)
            else:
                cats.append(col)

        means, stds, medians, categories = {}, {}, {}, {}
        for col in numeric:
            x = _numeric_values(df, col)
            x = x[~np.isnan(x)]
            means[col] = float(x.mean())
            std = float(x.std())  # population std, as sklearn's StandardScaler
            stds[col] = std if std > 0 else 1.0  # a constant column maps to 0, not NaN
            medians[col] = float(np.median(x))
        for col in cats:
            labels = _category_labels(df[col])
            categories[col] = sorted({v for v in labels if v is not None})

        names = [n for col in numeric for n in (col, f"{col}__missing")]
        for col in cats:
            names += [f"{col}={c}" for c in categories[col]] + [f"{col}__missing"]
        return cls(numeric, cats, means, stds, medians, categories, names)

    def transform(self, df: pd.DataFrame) -> np.ndarray:
        """[N, F] float32 in the order of `feature_names`."""
        _require_columns(df, self.columns)
        blocks = []
        for col in self.numeric:
            x = _numeric_values(df, col)
            missing = np.isnan(x)
            z = (np.where(missing, self.medians[col], x) - self.means[col]) / self.stds[col]
            blocks += [z[:, None], missing[:, None].astype(np.float64)]
        for col in self.categorical:
            labels = _category_labels(df[col])
            known = self.categories[col]
            index = {c: i for i, c in enumerate(known)}
            onehot = np.zeros((len(df), len(known) + 1))
            unseen = []
            for row, v in enumerate(labels):
                if v is None:
                    onehot[row, -1] = 1.0
                elif v in index:
                    onehot[row, index[v]] = 1.0
                else:
                    unseen.append(row)
            if unseen:
                # An unseen category is no evidence for any known one: all zeros, and say so.
                warnings.warn(f"clinical column '{col}': categories unseen in training encoded as all "
                              f"zeros for {_name_rows(df, unseen)} "
                              f"(values {sorted({labels[r] for r in unseen})[:_MAX_LISTED]})",
                              UnseenCategoryWarning, stacklevel=2)
            blocks.append(onehot)
        if not blocks:
            return np.zeros((len(df), 0), dtype=np.float32)
        return np.concatenate(blocks, axis=1).astype(np.float32)

    def to_dict(self) -> dict:
        return {"version": SCHEMA_VERSION, **dataclasses.asdict(self)}

    @classmethod
    def from_dict(cls, d: dict) -> "ClinicalSchema":
        if not isinstance(d, dict):
            raise ClinicalError(f"clinical schema: expected a mapping, got {type(d).__name__}")
        d = dict(d)
        version = d.pop("version", SCHEMA_VERSION)
        if version != SCHEMA_VERSION:
            raise ClinicalError(f"clinical schema: version {version} is not supported (expected {SCHEMA_VERSION})")
        names = {f.name for f in dataclasses.fields(cls)}
        if set(d) != names:
            raise ClinicalError(f"clinical schema: keys {sorted(d)} do not match the expected {sorted(names)}")
        schema = cls(**d)
        for col in schema.numeric:
            if not all(col in getattr(schema, k) for k in ("means", "stds", "medians")):
                raise ClinicalError(f"clinical schema: numeric column '{col}' lacks mean/std/median")
        for col in schema.categorical:
            if col not in schema.categories:
                raise ClinicalError(f"clinical schema: categorical column '{col}' lacks its categories")
        return schema


class UnseenCategoryWarning(UserWarning):
    """A categorical value not seen in training was encoded as all zeros."""


def _require_columns(df: pd.DataFrame, columns: list[str]) -> None:
    absent = [c for c in columns if c not in df.columns]
    if absent:
        raise ClinicalError(f"clinical column(s) {absent} missing from the table "
                            f"(it has {[str(c) for c in df.columns]})")


def _is_missing(values: pd.Series) -> np.ndarray:
    # Blank strings count as missing: a CSV cell with spaces is no answer.
    blank = values.map(lambda v: isinstance(v, str) and v.strip() == "").to_numpy(bool)
    return values.isna().to_numpy(bool) | blank


def _to_number(v) -> float:
    if isinstance(v, (bool, np.bool_)):
        return float(v)
    if isinstance(v, str):
        v = v.strip()
    return float(v)  # ValueError/TypeError for anything that is not a number


def _parses_as_numbers(values: pd.Series) -> bool:
    try:
        for v in values:
            _to_number(v)
    except (TypeError, ValueError):
        return False
    return True


def _numeric_values(df: pd.DataFrame, col: str) -> np.ndarray:
    """Float64 column with NaN for missing; non-numbers and infinities are errors naming the subjects."""
    values = df[col]
    missing = _is_missing(values)
    out = np.full(len(values), np.nan)
    bad = []
    for row, (v, m) in enumerate(zip(values, missing)):
        if m:
            continue
        try:
            out[row] = _to_number(v)
        except (TypeError, ValueError):
            bad.append(row)
    if bad:
        shown = [values.iloc[r] for r in bad[:_MAX_LISTED]]
        raise ClinicalError(f"clinical column '{col}': non-numeric value(s) {shown} for "
                            f"{_name_rows(df, bad)}; expected numbers")
    infinite = np.flatnonzero(np.isinf(out))
    if len(infinite):
        raise ClinicalError(f"clinical column '{col}': infinite value(s) for {_name_rows(df, list(infinite))}")
    return out


def _category_labels(values: pd.Series) -> list[str | None]:
    """Categories as strings (None for missing); 2.0 and "2" are the same category."""
    missing = _is_missing(values)
    out: list[str | None] = []
    for v, m in zip(values, missing):
        if m:
            out.append(None)
        elif isinstance(v, (float, np.floating)) and math.isfinite(v) and float(v).is_integer():
            out.append(str(int(v)))  # a CSV integer column with a gap is read as float
        else:
            out.append(str(v).strip())
    return out


def _name_rows(df: pd.DataFrame, rows: list[int]) -> str:
    if "subject_id" in df.columns:
        ids = [str(df["subject_id"].iloc[r]) for r in rows]
        what = "subject(s)"
    else:
        ids = [str(r) for r in rows]
        what = "row(s)"
    more = f" and {len(ids) - _MAX_LISTED} more" if len(ids) > _MAX_LISTED else ""
    return f"{what} {', '.join(ids[:_MAX_LISTED])}{more}"


@contextlib.contextmanager
def unseen_categories_reported_once():
    """Collect UnseenCategoryWarnings (one per fold model and row otherwise) and print each distinct
    message once, plainly, on stderr, without Python's source line."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", UnseenCategoryWarning)
        try:
            yield
        finally:
            others = [w for w in caught if not issubclass(w.category, UnseenCategoryWarning)]
            for w in others:  # everything else goes on as it would have
                warnings.showwarning(w.message, w.category, w.filename, w.lineno)
            for message in dict.fromkeys(str(w.message) for w in caught if w not in others):
                print(f"warning: {message}", file=sys.stderr)

