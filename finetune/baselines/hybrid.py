"""The hybrid (issue 33): a stacked second-level model over first-level models' out-of-fold predictions.

First level: the fine-tuning run's image score and the baselines a user fits first (radiomics + clinical for the
label; the clinical Cox model and radiomics + clinical for survival). Second level, fitted on the pooled `val`
rows only (each row predicted by a fold model that never saw it):

- label: standardised L2 logistic regression over the inputs' logits (sklearn LogisticRegression);
- survival: ridge Cox over the inputs' risks (sksurv CoxPHSurvivalAnalysis);

optionally with the clinical columns beside them (encoded as every mimfm model encodes them). The penalty is
chosen by patient-grouped, outcome-stratified inner CV on those rows. No first-level score gets a negative
weight (Breiman's non-negative stacking): on a few dozen val rows a useful score can rank them the wrong way by
chance, and inverted it is wrong for every new patient (ssl_gain seed 1, 40 patients: the image's weight -0.81,
test_large AUC about 0.45), so the stacker is the best subset of inputs, by inner CV, whose weights are all
non-negative (fit_stacker). The fitted stacker is saved as
JSON (inputs, standardisation, coefficients, penalty, task, the predictions it reads) and applied from it.

`stack_predictions` writes the hybrid as every baseline is written: each fold's `val` rows by a stacker fitted on
the other folds' `val` rows (so no stacker sees its own fold), held-out sets by the stacker fitted on all of them.
`python -m finetune.baselines --baselines hybrid --image_run RUN` is its command.
"""
from __future__ import annotations

import itertools
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from scipy.special import expit, logit
from sklearn.compose import ColumnTransformer
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import GridSearchCV, StratifiedGroupKFold
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler
from sksurv.linear_model import CoxPHSurvivalAnalysis

from core.atomic import write_json
from core.errors import InputError
from finetune.baselines.clinical_models import ClinicalEncoder
from finetune.baselines.radiomics import survival_target
from finetune.clinical import ClinicalSchema
from finetune.evaluate import one_row_per_subject
from models.tasks import Task, get_task

FORMAT = "mimfm.hybrid_stacker/1"
FIT_SPLIT = "val"  # the only rows a stacker is fitted on: pooled out-of-fold predictions
IMAGE = "image"    # the input name of the fine-tuning run's score
# task -> the first-level baselines (python -m finetune.baselines names) the stacker reads beside the image
FIRST_LEVEL = {"classification": ("radiomics_clinical",), "survival": ("clinical_only", "radiomics_clinical")}
C_GRID = np.logspace(-3, 2, 11)      # inverse L2 strength of the label stacker
ALPHA_GRID = np.logspace(-2, 3, 11)  # ridge strength of the Cox stacker (on the summed partial likelihood)
PROB_EPS = 1e-6                      # probabilities are clipped before the logit, so 0 or 1 stays finite


def score_of(task: Task | str) -> str:
    """The predictions column a task's first-level models give: prob (label) or risk (survival)."""
    return "prob" if (get_task(task) if isinstance(task, str) else task).label else "risk"


# ---------------------------------------------------------------- first-level rows

def stack_inputs(preds: dict[str, pd.DataFrame], score: str, split: str) -> pd.DataFrame:
    """subject_id and one column per input: its `score` on `split`, one row per subject.

    On val each subject must have exactly one row (its out-of-fold prediction) in every input, and every input
    the same subjects: a stacker fitted on val must never see an in-fold or held-out prediction. A held-out set
    is read from the fold ensemble (fold -1) where there is one."""
    table, seen = None, []
    for name, pred in preds.items():
        rows = pred[pred["split"] == split]
        if score not in rows.columns or rows.empty:
            raise InputError(f"{name}: no {split!r} rows with a {score!r} column")
        if split == FIT_SPLIT:
            twice = sorted(rows["subject_id"][rows["subject_id"].duplicated()].unique())
            if twice:
                raise InputError(f"{name}: {split} rows are not out-of-fold, subject(s) {twice[:5]} appear more "
                                 f"than once (a stacker is fitted on one out-of-fold row per subject)")
        else:
            rows = one_row_per_subject(rows)[0]
        col = rows[["subject_id", score]].rename(columns={score: name})
        if table is not None:
            _same_subjects(table, col, name, split, seen)
            col = table.merge(col, on="subject_id", validate="one_to_one")
        table, seen = col, seen + [name]
    return table.sort_values("subject_id", kind="stable").reset_index(drop=True)


def _same_subjects(table: pd.DataFrame, col: pd.DataFrame, name: str, split: str, seen: list[str]) -> None:
    """InputError naming the input that lacks a subject the others have (every input scores the same rows)."""
    have, new = set(table["subject_id"]), set(col["subject_id"])
    if have - new:
        raise InputError(f"{name}: {split} rows missing for subject(s) {sorted(have - new)[:5]} that "
                         f"{', '.join(seen)} has")
    if new - have:
        raise InputError(f"{', '.join(seen)}: {split} rows missing for subject(s) {sorted(new - have)[:5]} "
                         f"that {name} has")


def score_features(table: pd.DataFrame, inputs: list[str], score: str) -> np.ndarray:
    """The stacker's score inputs [N, len(inputs)]: a probability as its logit (the scale a logistic model is
    linear in), a risk as it is."""
    x = table[inputs].to_numpy(np.float64)
    return logit(np.clip(x, PROB_EPS, 1 - PROB_EPS)) if score == "prob" else x


# ---------------------------------------------------------------- the stacker

@dataclass
class Stacker:
    """A fitted stacker: everything its prediction needs, saved as JSON (no pickle)."""
    task: str
    inputs: list[str]                     # first-level score columns, in this order
    clinical_columns: list[str]           # raw clinical columns beside them ([] = none)
    clinical_schema: dict | None          # finetune.clinical.ClinicalSchema.to_dict() of those columns
    feature_names: list[str]              # the linear model's columns: inputs, then the encoded clinical ones
    mean: list[float]                     # standardisation of those columns, fitted on the stacker's rows
    scale: list[float]
    coef: list[float]
    intercept: float                      # 0 for Cox (a risk has no intercept)
    penalty: dict
    inner_cv: dict
    n_fit: int
    fit_split: str = FIT_SPLIT
    first_level: dict = field(default_factory=dict)  # input name -> the predictions file it is read from
    dropped: dict = field(default_factory=dict)      # input left out -> its weight in the fit over every input
    format: str = FORMAT
    pipeline: object = field(default=None, repr=False, compare=False)  # the sklearn fit; not saved

    @property
    def score(self) -> str:
        return score_of(self.task)

    def design(self, table: pd.DataFrame) -> np.ndarray:
        """The standardised design matrix [N, F] of `table` (first-level scores and raw clinical columns)."""
        absent = [c for c in self.inputs + self.clinical_columns if c not in table.columns]
        if absent:
            raise InputError(f"hybrid stacker: column(s) {absent[:5]} missing from the table it is applied to")
        x = score_features(table, self.inputs, self.score)
        if self.clinical_columns:
            schema = ClinicalSchema.from_dict(self.clinical_schema)
            x = np.hstack([x, schema.transform(table[self.clinical_columns]).astype(np.float64)])
        return (x - np.asarray(self.mean)) / np.asarray(self.scale)

    def predict(self, table: pd.DataFrame) -> np.ndarray:
        """P(y=1) for the label, the Cox linear predictor for survival. Computed from the saved numbers by hand:
        a JSON stacker has no sklearn object to call, and a linear model is one dot product."""
        eta = self.design(table) @ np.asarray(self.coef) + self.intercept
        return expit(eta) if self.score == "prob" else eta

    def summary(self) -> dict:
        """The fit's numbers for a results JSON: penalty, inner-CV score, coefficients by name, rows."""
        return {"penalty": self.penalty, "inner_cv": self.inner_cv, "coef": dict(zip(self.feature_names, self.coef)),
                "dropped": self.dropped, "n_fit": self.n_fit, "fit_split": self.fit_split}

    def to_dict(self) -> dict:
        d = asdict(self)
        d.pop("pipeline")
        return d

    def save(self, path) -> None:
        write_json(Path(path), self.to_dict())

    @classmethod
    def load(cls, path) -> "Stacker":
        from finetune.baselines.linear_export import read_model_json
        # "dropped" came later: a stacker.json without it dropped nothing
        return cls(**read_model_json(path, "stacker", FORMAT, set(cls.__dataclass_fields__) - {"pipeline"},
                                     _shape_problem, optional={"dropped"}))


def _shape_problem(d: dict) -> str:
    """Why a stacker JSON's numbers cannot be one linear model over its inputs and clinical columns, or ""."""
    lists = ("inputs", "clinical_columns", "feature_names", "mean", "scale", "coef")
    bad = [k for k in lists if not isinstance(d[k], list)]
    if bad:
        return f"{bad} must be lists"
    try:
        expected = list(d["inputs"])
        if d["clinical_columns"]:
            schema = ClinicalSchema.from_dict(d["clinical_schema"])
            if sorted(schema.columns) != sorted(d["clinical_columns"]):
                return f"clinical_schema encodes {schema.columns}, not clinical_columns {d['clinical_columns']}"
            expected += list(schema.feature_names)
        elif d["clinical_schema"] is not None:
            return "a clinical_schema without clinical_columns"
    except (InputError, KeyError, TypeError, ValueError) as e:
        return f"clinical_schema unreadable ({type(e).__name__}: {e})"
    if d["feature_names"] != expected:
        return (f"feature_names ({len(d['feature_names'])}) are not its inputs then its encoded clinical columns "
                f"({len(expected)}: {expected[:5]})")
    lengths = {k: len(d[k]) for k in ("mean", "scale", "coef")}
    if set(lengths.values()) != {len(expected)}:
        return f"lengths {lengths} differ from its {len(expected)} feature_names"
    numbers = d["mean"] + d["scale"] + d["coef"] + [d["intercept"]]
    if not all(type(x) in (int, float) and np.isfinite(x) for x in numbers):
        return "mean, scale, coef and intercept must be finite numbers"
    if min(d["scale"], default=1.0) <= 0:
        return "scale must be positive"
    return ""


def _pipeline(model, inputs: list[str], clinical: list[str]) -> Pipeline:
    parts = [("scores", StandardScaler(), inputs)]
    if clinical:
        # encoded as every mimfm model encodes them, then scaled with the scores under one penalty
        parts.append(("clinical", Pipeline([("encode", ClinicalEncoder(clinical)), ("scale", StandardScaler())]),
                      clinical))
    return Pipeline([("features", ColumnTransformer(parts)), ("model", model)])


def fit_stacker(train: pd.DataFrame, task: Task | str, inputs: list[str], clinical: list[str] = (), seed: int = 0,
                inner_folds: int = 5) -> Stacker:
    """Fit the task's stacker on `train` (one out-of-fold row per subject: the inputs' scores, patient_id, the
    outcome, the clinical columns); the penalty by patient-grouped, outcome-stratified inner CV (log loss for the
    label, Harrell's C for survival). No score gets a negative weight (module docstring): the fit over every
    input where its weights are all >= 0, else the subset of inputs whose fit has them all >= 0 with the best
    inner-CV score (the inputs left out go to `dropped`, with their weights in the fit over all). Choosing by
    inner CV, not by dropping the most negative weight, keeps a good score whose weight came out at noise level
    (-0.002 under the strongest penalty) from being dropped for a worse one. When no subset has non-negative
    weights, no score ranks these rows the right way: every weight is set to 0 and the stacker predicts the base
    rate (label) or one risk for all (survival), as non-negative least squares would."""
    def fit(subset) -> Stacker:
        return _fit_penalised(train, task, list(subset), clinical, seed, inner_folds)

    def non_negative(stacker: Stacker) -> bool:
        return min(stacker.coef[:len(stacker.inputs)]) >= 0

    full = fit(inputs)
    weights = dict(zip(inputs, full.coef[:len(inputs)]))
    if non_negative(full):
        full.dropped = {}
        return full
    subsets = [c for k in range(len(inputs) - 1, 0, -1) for c in itertools.combinations(inputs, k)]
    fits = [fit(c) for c in subsets] or [full]  # one input: only itself to fall back on
    valid = [f for f in fits if non_negative(f)]
    if valid:  # max keeps the first of equal scores: the larger subset
        stacker = max(valid, key=lambda f: f.inner_cv["score"])
        stacker.dropped = {n: float(weights[n]) for n in inputs if n not in stacker.inputs}
        return stacker
    stacker = max((f for f in fits if len(f.inputs) == 1), key=lambda f: f.inner_cv["score"])
    stacker.dropped = {n: float(weights[n]) for n in inputs if n not in stacker.inputs} | {
        stacker.inputs[0]: float(stacker.coef[0])}
    stacker.coef = [0.0] * len(stacker.coef)
    stacker.intercept = float(logit(np.clip(train["label"].mean(), PROB_EPS, 1 - PROB_EPS))) \
        if stacker.score == "prob" else 0.0
    stacker.pipeline = None  # the sklearn fit is not this stacker any more
    return stacker


def _fit_penalised(train: pd.DataFrame, task: Task | str, inputs: list[str], clinical: list[str], seed: int,
                   inner_folds: int) -> Stacker:
    task = get_task(task) if isinstance(task, str) else task  # one penalised fit over `inputs` (fit_stacker)
    clinical, score = list(clinical), score_of(task)
    strata = _strata(train, task)
    y = strata if task.label else survival_target(train["event"], train["time"])
    model = LogisticRegression(solver="lbfgs", max_iter=2000) if task.label else CoxPHSurvivalAnalysis()
    grid = {"model__C": list(C_GRID)} if task.label else {"model__alpha": list(ALPHA_GRID)}
    n_splits = _inner_splits(strata, task, inner_folds)
    cv = list(StratifiedGroupKFold(n_splits, shuffle=True, random_state=seed)
              .split(train, strata, train["patient_id"].astype(str)))
    _distinct(inputs, clinical)
    X = pd.concat([pd.DataFrame(score_features(train, inputs, score), index=train.index, columns=inputs),
                   train[clinical]], axis=1)
    search = GridSearchCV(_pipeline(model, inputs, clinical), grid, cv=cv,
                          scoring="neg_log_loss" if task.label else harrell_c_or_chance, error_score=np.nan,
                          refit=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a near-separable inner fold warns; it scores on and may lose
        search.fit(X, y)
    if not np.isfinite(search.best_score_):  # every penalty failed in some inner fold (the warning is silenced)
        raise InputError(f"hybrid {task.name} stacker: no penalty could be fitted on every inner fold of its "
                         f"{len(train)} {FIT_SPLIT} rows")
    return _as_stacker(search, task, inputs, clinical, n_splits, len(train))


def harrell_c_or_chance(estimator, X, y) -> float:
    """Harrell's C of `estimator`'s risk on an inner test fold (the Cox stacker's own score), and 0.5 where the
    fold has no comparable pair (its events all tied, or every censored row before them): such a fold carries
    no evidence for any penalty, and its NaN would otherwise void every penalty of the grid."""
    from sksurv.exceptions import NoComparablePairException
    from sksurv.metrics import concordance_index_censored
    event, time = (y[n] for n in y.dtype.names)
    try:  # sksurv raises, or returns NaN, by version
        c = float(concordance_index_censored(event.astype(bool), time, estimator.predict(X))[0])
    except NoComparablePairException:
        return 0.5
    return c if np.isfinite(c) else 0.5


def _strata(rows: pd.DataFrame, task: Task) -> np.ndarray:
    """What inner CV stratifies on: the label, or the event."""
    return rows["label" if task.label else "event"].to_numpy(int)


def _inner_splits(strata: np.ndarray, task: Task, inner_folds: int = 5, which: str = "") -> int:
    """Inner folds a stacker fitted on rows of these `strata` gets; InputError where it cannot have 2."""
    counts = np.bincount(strata, minlength=2)
    # logistic needs both classes in every inner fold; Cox needs events (all-event data is fine)
    n_splits = min(inner_folds, int(counts.min() if task.label else counts[1]))
    if n_splits < 2:
        raise InputError(f"hybrid {task.name} stacker{which}: needs at least 2 "
                         f"{'rows of each class' if task.label else 'events'} among its {len(strata)} {FIT_SPLIT} "
                         f"rows (counts {counts.tolist()})")
    return n_splits


def _distinct(inputs: list[str], clinical: list[str]) -> None:
    if set(inputs) & set(clinical):
        raise InputError(f"hybrid stacker: input(s) {sorted(set(inputs) & set(clinical))} are also clinical columns")


def check_stackable(outcomes: pd.DataFrame, val_folds: pd.Series, task: Task | str, clinical: list[str] = ()) -> None:
    """Before anything is fitted: InputError unless every stacker stack_predictions fits has rows enough (each
    fold's, on the other folds' val rows, and the final one, on all) and no clinical column is named as an input.
    outcomes: the development cohort's rows (subject_id and the outcome); val_folds: subject_id -> outer fold."""
    task = get_task(task) if isinstance(task, str) else task
    _distinct([IMAGE, *FIRST_LEVEL[task.name]], list(clinical))
    rows = outcomes.assign(subject_id=outcomes["subject_id"].astype(str))
    rows = rows[rows["subject_id"].isin(val_folds.index)]
    strata, fold = _strata(rows, task), rows["subject_id"].map(val_folds).to_numpy()
    for k in sorted(set(fold)):
        _inner_splits(strata[fold != k], task, which=f" of fold {k} (the other folds' {FIT_SPLIT} rows)")
    _inner_splits(strata, task)


def _as_stacker(search: GridSearchCV, task: Task, inputs: list[str], clinical: list[str], n_splits: int,
                n_fit: int) -> Stacker:
    """The fitted pipeline's numbers as a Stacker (the pipeline kept beside them, unsaved)."""
    pipe = search.best_estimator_
    parts = pipe.named_steps["features"].named_transformers_
    scalers, names, schema = [parts["scores"]], list(inputs), None
    if clinical:
        encoded = parts["clinical"]
        schema = encoded.named_steps["encode"].schema_
        scalers.append(encoded.named_steps["scale"])
        names += list(schema.feature_names)
    fitted = pipe.named_steps["model"]
    return Stacker(
        task=task.name, inputs=list(inputs), clinical_columns=clinical,
        clinical_schema=None if schema is None else schema.to_dict(), feature_names=names,
        mean=np.concatenate([s.mean_ for s in scalers]).tolist(), scale=np.concatenate([s.scale_ for s in scalers]).tolist(),
        coef=np.ravel(fitted.coef_).astype(float).tolist(),
        intercept=float(np.ravel(fitted.intercept_)[0]) if task.label else 0.0,
        penalty={k.split("__")[1]: float(v) for k, v in search.best_params_.items()},
        inner_cv={"score": float(search.best_score_), "scoring": "neg_log_loss" if task.label else "harrell_c",
                  "folds": n_splits, "grouped_by": "patient_id"},
        n_fit=int(n_fit), pipeline=pipe)


def prediction_rows(stacker: Stacker, table: pd.DataFrame, split: str, fold: int = -1) -> pd.DataFrame:
    """The stacker's predictions as a predictions table (subject_id, split, fold, prob | risk)."""
    return pd.DataFrame({"subject_id": table["subject_id"].to_numpy(), "split": split, "fold": fold,
                         stacker.score: stacker.predict(table)})


# ---------------------------------------------------------------- the hybrid's predictions

def stack_predictions(preds: dict[str, pd.DataFrame], outcomes: pd.DataFrame, task: Task | str, held_out: list[str],
                      clinical: list[str] = (), seed: int = 0, val_folds: pd.Series | None = None,
                      held_rows: dict[str, pd.DataFrame] | None = None) -> tuple[pd.DataFrame, Stacker, list[dict]]:
    """The hybrid's predictions in the baselines' format, its final stacker, and each fold stacker's summary.

    preds: input name -> predictions table (subject_id, split, fold, prob | risk); outcomes: subject_id,
    patient_id, the outcome and clinical columns. val_folds: subject_id -> outer fold; where given, each fold's
    val rows are predicted by a stacker fitted on the other folds' val rows (none sees its own fold). The
    held-out sets are predicted by the stacker fitted on every val row, each from the clinical values of its own
    cohort: held_rows[split] (subject_id and the clinical columns) where given, else `outcomes` (a subject id
    may repeat across cohorts)."""
    score, inputs = score_of(task), list(preds)
    val = _with_outcomes(stack_inputs(preds, score, FIT_SPLIT), outcomes)
    rows, per_fold = [], []
    if val_folds is not None:
        fold = val["subject_id"].map(val_folds)
        if fold.isna().any():
            raise InputError(f"{FIT_SPLIT} subject(s) {val['subject_id'][fold.isna()].tolist()[:5]} are in no fold")
        for k in sorted(fold.unique()):
            stacker = fit_stacker(val[fold != k], task, inputs, clinical, seed)
            rows.append(prediction_rows(stacker, val[fold == k], FIT_SPLIT, int(k)))
            per_fold.append({"fold": int(k), **stacker.summary()})
    final = fit_stacker(val, task, inputs, clinical, seed)
    per_fold.append({"fold": -1, **final.summary()})
    for split in held_out:
        cohort = (held_rows or {}).get(split, outcomes)
        held = stack_inputs(preds, score, split).merge(cohort, on="subject_id", how="left", validate="one_to_one")
        rows.append(prediction_rows(final, held, split))
    return pd.concat(rows, ignore_index=True), final, per_fold


def val_folds(splits: dict) -> pd.Series:
    """subject_id -> the outer fold whose val rows hold it: stack_predictions' `val_folds` from a splits file."""
    return pd.Series({str(s): k for k, fold in enumerate(splits["folds"]) for s in fold["val"]})


def _with_outcomes(val: pd.DataFrame, outcomes: pd.DataFrame) -> pd.DataFrame:
    """val rows with their outcomes; InputError naming subjects the outcomes lack."""
    val = val.merge(outcomes, on="subject_id", how="left", validate="one_to_one")
    unknown = val["subject_id"][val["patient_id"].isna()].tolist()
    if unknown:
        raise InputError(f"{FIT_SPLIT} subject(s) {unknown[:5]} not in the cohort's manifests")
    return val
