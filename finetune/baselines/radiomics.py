"""Radiomics baseline: hand-crafted lesion + peritumoral features and a regularised linear model.

Features (finetune.baselines.radiomics_features, re-exported here): first-order statistics of the lesion and of a
peritumoral ring, lesion shape, and 3D GLCM texture, computed with numpy/scipy/scikit-image and
cross-checked against PyRadiomics (tests/test_radiomics_reference.py).

Model: every step is fitted on the training rows only, inside one sklearn pipeline, so the inner CV that
tunes it sees no leak: median imputation -> standardisation -> a constant/correlation filter ->
[a univariate filter (k best features by ANOVA F for a label, by |Harrell's C - 0.5| for survival)] ->
a penalised linear model. Which of the two recipes (see `RadiomicsModel`) each task uses by default is
the better one on out-of-fold validation (benchmarks.research.radiomics_selection), never on a test set.

CLI: fits one model per CV fold and one on all non-test rows, and writes predictions.csv in the
same format as the ViT fine-tuning, so `finetune.evaluate` scores both alike.
"""
from __future__ import annotations

import argparse
import hashlib
import inspect
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.base import BaseEstimator, TransformerMixin
from sklearn.exceptions import FitFailedWarning
from sklearn.feature_selection import SelectKBest, f_classif
from sklearn.impute import SimpleImputer
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import GridSearchCV, StratifiedKFold
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler
from sksurv.linear_model import CoxnetSurvivalAnalysis
from sksurv.metrics import concordance_index_censored
from sksurv.util import Surv

from core.atomic import atomic_path, write_json
from core.cli import underscore_spellings
from core.errors import InputError, cli_entry
from data.cache import CacheEntry
from finetune.baselines.radiomics_features import (  # noqa: F401
    DIRECTIONS_3D,
    FEATURE_VERSION,
    extract_features,
    first_order_features,
    glcm_features,
    glcm_matrices,
    glcm_properties,
    peritumoral_ring,
    quantise,
    shape_features,
)
from finetune.config import FinetuneConfig
from models.tasks import CLASSIFICATION, SURVIVAL, Task, get_task

# ---------------------------------------------------------------- model

class FeatureFilter(BaseEstimator, TransformerMixin):
    """Drop (near-)constant features, then any feature correlated above `threshold` with a kept one.

    Radiomics features are heavily redundant (mean/p50, volume/mesh volume, ...); fitted on the
    training rows only, inside the pipeline, so inner CV sees no leak.
    """

    def __init__(self, threshold: float = 0.95, min_std: float = 1e-8):
        self.threshold = threshold
        self.min_std = min_std

    def fit(self, X, y=None):
        X = np.asarray(X, dtype=np.float64)
        candidates = np.flatnonzero(X.std(axis=0) > self.min_std)
        kept: list[int] = []
        if len(candidates):
            corr = np.abs(np.corrcoef(X[:, candidates], rowvar=False).reshape(len(candidates), -1))
            for a in range(len(candidates)):
                if all(corr[a, b] < self.threshold for b in kept):
                    kept.append(a)
        # With nothing informative left keep one column, so the model still fits (and predicts a constant).
        self.keep_ = candidates[kept] if kept else np.array([0])
        return self

    def transform(self, X):
        return np.asarray(X, dtype=np.float64)[:, self.keep_]


_SCORE_CACHE: dict[bytes, np.ndarray] = {}


def concordance_scores(X, y) -> np.ndarray:
    """Univariate survival score per column: |Harrell's C - 0.5| (a SelectKBest score_func).

    Direction-free, so a protective feature ranks as high as a harmful one; a constant column scores 0.
    The grid search refits the selector for every (k, alpha) on the same fold data, and Harrell's C is the
    costly part (~9 ms a column at 1,000 rows), so scores are memoised on the bytes of (X, y): one
    computation per fold, not one per grid point.
    """
    X = np.ascontiguousarray(X, dtype=np.float64)
    event, time = (np.ascontiguousarray(y[n]) for n in y.dtype.names)
    event = event.astype(bool)
    key = hashlib.blake2b(X.tobytes() + str(X.shape).encode() + event.tobytes()
                          + time.astype(np.float64).tobytes(), digest_size=16).digest()
    if key not in _SCORE_CACHE:
        if len(_SCORE_CACHE) >= 64:  # bounded: only the current search's folds are ever reused
            _SCORE_CACHE.clear()
        _SCORE_CACHE[key] = np.array([abs(concordance_index_censored(event, time, X[:, j])[0] - 0.5)
                                      for j in range(X.shape[1])])
    return _SCORE_CACHE[key].copy()


def _l1_logistic() -> LogisticRegression:
    # scikit-learn >= 1.8 deprecates `penalty` (l1_ratio=1 means L1); older releases ignore l1_ratio unless
    # penalty="elasticnet", so the keyword differs by version. liblinear: fast and exact on ~100 rows.
    if inspect.signature(LogisticRegression).parameters["penalty"].default == "deprecated":
        return LogisticRegression(l1_ratio=1.0, solver="liblinear", max_iter=1000)
    return LogisticRegression(penalty="l1", solver="liblinear", max_iter=1000)


class RadiomicsModel:
    """Impute (median) -> standardise -> filter -> [univariate k-best] -> penalised linear model, tuned by inner CV.

    selection="none": L2 LogisticRegression over C / elastic-net (l1_ratio 0.5) Coxnet over alpha, on every
      feature the constant/correlation filter keeps.
    selection="univariate_l1", as radiomics papers do it:
      classification: SelectKBest(ANOVA F) -> L1 LogisticRegression; k and C by inner CV (log loss).
      survival: SelectKBest(|C - 0.5|) -> Coxnet, l1_ratio=0.95; k and alpha by inner CV (Harrell's C).
    selection=None takes the task's default (DEFAULT_SELECTION_LABEL / _SURVIVAL), the better of the two on
      out-of-fold validation (benchmarks.research.radiomics_selection; docs/RESULTS.md): for the label L2, since many
      weak, correlated features pool better than L1's few picks; for survival univariate + L1.
    predict -> P(y=1) for classification, risk (linear predictor, higher = earlier event) for survival.
    y for survival is a sksurv structured array (event: bool, time: float), e.g. from `survival_target`.
    """

    NAME = "radiomics"  # how errors and results name the model
    SELECTIONS = ("univariate_l1", "none")
    DEFAULT_SELECTION_LABEL, DEFAULT_SELECTION_SURVIVAL = "none", "univariate_l1"
    K_GRID = (5, 10, 20, "all")  # features after the univariate filter; "all" leaves selection to L1

    def __init__(self, task: Task | str = CLASSIFICATION, seed: int = 0, inner_folds: int = 5,
                 selection: str | None = None):
        task = get_task(task) if isinstance(task, str) else task
        if task.label == task.survival:
            raise InputError(f"{self.NAME}: --task {task.name} predicts {list(task.columns)}; a {self.NAME} model "
                             f"predicts one target: --task {CLASSIFICATION.name} or {SURVIVAL.name}")
        if selection is None:
            selection = self.DEFAULT_SELECTION_LABEL if task.label else self.DEFAULT_SELECTION_SURVIVAL
        if selection not in self.SELECTIONS:
            raise InputError(f"{self.NAME}: selection {selection!r} is not one of {self.SELECTIONS}")
        self.task, self.seed, self.inner_folds, self.selection = task, seed, inner_folds, selection

    # Where the univariate filter's k sits in the pipeline's parameters (a subclass nests it deeper).
    SELECT_PARAM = "select__k"

    def _radiomics_steps(self, k=None) -> list:
        """Impute -> standardise -> constant/correlation filter -> [k best], each fitted on training rows only."""
        steps = [("impute", SimpleImputer(strategy="median", keep_empty_features=True)),
                 ("scale", StandardScaler()), ("filter", FeatureFilter())]
        if k is not None:
            score = f_classif if self.task.label else concordance_scores
            steps.append(("select", SelectKBest(score, k=k)))
        return steps

    def _feature_steps(self, k=None) -> list:
        """The steps before the linear model (the clinical baselines replace them)."""
        return self._radiomics_steps(k)

    def _pipeline(self, model, k=None) -> Pipeline:
        return Pipeline(self._feature_steps(k) + [("model", model)])

    def _as_input(self, X):
        """What the pipeline reads: a float matrix (radiomics features are all numeric)."""
        return np.asarray(X, dtype=np.float64)

    def _search_space(self, X, y):
        """(pipeline, parameter grid, scoring) for this task and selection."""
        select = self.selection == "univariate_l1"
        k_grid = {self.SELECT_PARAM: list(self.K_GRID)} if select else {}
        if self.task.label:
            if select:
                pipe, C = self._pipeline(_l1_logistic(), k="all"), np.logspace(-2, 2, 9)
            else:
                l2 = LogisticRegression(solver="newton-cholesky", max_iter=1000)
                pipe, C = self._pipeline(l2), np.logspace(-3, 2, 6)
            # Log loss, not AUC: AUC ties on separable folds would pick the smallest C, whose
            # near-prior probabilities do not pool across the outer folds.
            return pipe, {"model__C": list(C), **k_grid}, "neg_log_loss"
        l1_ratio = 0.95 if select else 0.5
        # The alpha path depends on the data: take it from a fit on all training rows (every feature, so
        # its largest alpha zeroes any subset a smaller k keeps).
        path = self._pipeline(CoxnetSurvivalAnalysis(l1_ratio=l1_ratio, alpha_min_ratio=0.05, n_alphas=30))
        path.fit(X, y)
        alphas = path.named_steps["model"].alphas_[::3]
        pipe = self._pipeline(CoxnetSurvivalAnalysis(l1_ratio=l1_ratio), k="all" if select else None)
        return pipe, {"model__alphas": [[a] for a in alphas], **k_grid}, None  # None: Coxnet's Harrell's C

    def fit(self, X, y) -> "RadiomicsModel":
        self.feature_names_ = list(X.columns) if isinstance(X, pd.DataFrame) else None
        X = self._as_input(X)
        if self.task.label:
            y = np.asarray(y).astype(int)
            strata = y
        else:
            strata = np.asarray(y[y.dtype.names[0]]).astype(int)
        smallest = int(np.bincount(strata, minlength=2).min())
        if smallest < 2:
            what = "class" if self.task.label else "event/censored group"
            raise InputError(f"{self.NAME}: each {what} needs at least 2 training rows (counts "
                             f"{np.bincount(strata, minlength=2).tolist()})")
        with warnings.catch_warnings():
            # Inner folds with too little signal fail or converge poorly; they score NaN and lose. A k
            # above the filtered feature count keeps them all (SelectKBest warns).
            warnings.simplefilter("ignore", FitFailedWarning)
            warnings.simplefilter("ignore", UserWarning)
            warnings.simplefilter("ignore", RuntimeWarning)
            pipe, grid, scoring = self._search_space(X, y)
            # Fixed index folds: GridSearchCV would otherwise stratify on the (structured) survival y itself.
            cv = list(StratifiedKFold(min(self.inner_folds, smallest), shuffle=True,
                                      random_state=self.seed).split(X, strata))
            search = GridSearchCV(pipe, grid, cv=cv, scoring=scoring, error_score=np.nan, refit=True)
            search.fit(X, y)
        self.pipeline_ = search.best_estimator_
        self.best_params_ = self._chosen(search.best_params_)
        return self

    def _selection_steps(self) -> dict:
        """The fitted filter and selector steps (named_steps) of the radiomics part."""
        return self.pipeline_.named_steps

    def _chosen(self, chosen: dict) -> dict:
        """The tuned values and how many features each step kept (JSON-ready)."""
        steps = self._selection_steps()
        out = ({"C": float(chosen["model__C"])} if self.task.label
               else {"alpha": float(chosen["model__alphas"][0])})
        if "filter" in steps:
            out["n_features_kept"] = int(len(steps["filter"].keep_))  # after the constant/correlation filter
        out["selection"] = self.selection
        if "select" in steps:
            k = chosen[self.SELECT_PARAM]
            out["k"] = str(k) if k == "all" else int(k)
            out["n_features_selected"] = int(steps["select"].get_support().sum())
        coef = np.ravel(self.pipeline_.named_steps["model"].coef_)
        out["n_nonzero"] = int(np.count_nonzero(coef))  # features the final linear model uses
        return out

    def model_inputs(self) -> list:
        """The final linear model's input columns: names if fitted on a DataFrame, else indices."""
        steps = self._selection_steps()
        cols = steps["filter"].keep_
        if "select" in steps:
            cols = cols[steps["select"].get_support()]
        return [self.feature_names_[c] for c in cols] if self.feature_names_ else [int(c) for c in cols]

    def used_features(self) -> list:
        """The model inputs with a nonzero coefficient (the features the final model uses)."""
        coef = np.ravel(self.pipeline_.named_steps["model"].coef_)
        return [name for name, c in zip(self.model_inputs(), coef) if c != 0]

    def predict(self, X) -> np.ndarray:
        if isinstance(X, pd.DataFrame) and self.feature_names_ is not None:
            absent = [c for c in self.feature_names_ if c not in X.columns]
            if absent:
                raise InputError(f"{self.NAME}: feature column(s) {absent[:5]} missing at prediction")
            X = X[self.feature_names_]
        X = self._as_input(X)
        if self.task.label:
            return self.pipeline_.predict_proba(X)[:, 1]
        return self.pipeline_.predict(X)


def survival_target(event, time) -> np.ndarray:
    return Surv.from_arrays(event=np.asarray(event).astype(bool), time=np.asarray(time, dtype=float))


# ---------------------------------------------------------------- cross-validated predictions

def predict_splits(features: pd.DataFrame, targets: pd.DataFrame, splits: dict, task: Task | str, seed: int = 0,
                   external: pd.DataFrame | None = None, eval_sets: dict[str, pd.DataFrame] | None = None,
                   make_model: Callable[[Task, int], RadiomicsModel] | None = None,
                   keep_final: Callable[[RadiomicsModel], None] | None = None) -> tuple[pd.DataFrame, list[dict]]:
    """One model per fold (predicts its val rows) and one on all non-test rows (test, external and each
    further held-out set in `eval_sets`, predicted under its own split name).

    features/targets are indexed by subject_id; targets has `label` or `time`/`event`. make_model(task, seed)
    builds an unfitted model (default: RadiomicsModel; finetune.baselines.clinical_models has the others).
    keep_final, where given, receives the fitted all-non-test-rows model (the one a new patient is scored by).
    Returns predictions (subject_id, split, fold, prob|risk) and each model's chosen parameters.
    """
    task = get_task(task) if isinstance(task, str) else task
    make_model = make_model or RadiomicsModel
    score = "prob" if task.label else "risk"
    listed = {s for fold in splits["folds"] for part in ("train", "val") for s in fold[part]} | set(splits["test"])
    absent = sorted(listed - set(features.index))
    if absent:
        raise InputError(f"{make_model(task, seed).NAME}: {len(absent)} subject(s) in the splits have no "
                         f"features: {absent[:5]}")

    def target(ids):
        t = targets.loc[ids]
        return t["label"].to_numpy() if task.label else survival_target(t["event"], t["time"])

    def fit(ids):
        return make_model(task, seed).fit(features.loc[ids], target(ids))

    rows, params = [], []

    def emit(model, X, split, fold):
        rows.append(pd.DataFrame({"subject_id": list(X.index), "split": split, "fold": fold,
                                  score: model.predict(X)}))

    for k, fold in enumerate(splits["folds"]):
        model = fit(list(fold["train"]))
        emit(model, features.loc[list(fold["val"])], "val", k)
        params.append({"fold": k, **model.best_params_})
    non_test = sorted({s for fold in splits["folds"] for part in ("train", "val") for s in fold[part]})
    model = fit(non_test)
    params.append({"fold": -1, **model.best_params_})
    if keep_final is not None:
        keep_final(model)
    if len(splits["test"]):
        emit(model, features.loc[list(splits["test"])], "test", -1)
    held_out = ({"external": external} if external is not None else {}) | dict(eval_sets or {})
    for name, table in held_out.items():
        if len(table):
            emit(model, table[features.columns], name, -1)
    return pd.concat(rows, ignore_index=True), params


# ---------------------------------------------------------------- CLI

def extract_table(df: pd.DataFrame, cohort: str, ring_mm: float, bins: int, cache_csv: Path,
                  progress: bool = True) -> pd.DataFrame:
    """Features for every prepared row, indexed by subject_id; rows already in cache_csv are reused."""
    from tqdm.auto import tqdm

    tag = f"v{FEATURE_VERSION}_ring{ring_mm:g}_bins{bins}"
    key_cols = ["cohort", "subject_id", "cache_image", "extraction"]
    cached = pd.read_csv(cache_csv, dtype={"subject_id": str}) if cache_csv.is_file() else pd.DataFrame(columns=key_cols)
    by_key = {tuple(r[c] for c in key_cols): r for _, r in cached.iterrows()}
    rows = []
    for _, r in tqdm(df.iterrows(), total=len(df), desc=f"radiomics ({cohort})", disable=not progress):
        key = (cohort, str(r["subject_id"]), str(r["cache_image"]), tag)
        if key in by_key:
            rows.append(by_key[key].to_dict())
            continue
        entry = CacheEntry.open(Path(r["cache_image"]).parent)
        if entry.mask_path is None:
            raise InputError(f"subject {r['subject_id']}: no lesion mask; radiomics needs one")
        try:
            feats = extract_features(entry.image()[0], entry.mask()[0], entry.meta["spacing"], ring_mm, bins)
        except InputError as e:
            raise InputError(f"subject {r['subject_id']}: {e}") from None
        rows.append(dict(zip(key_cols, key)) | feats)
    table = pd.DataFrame(rows)
    keep = cached[~cached["cohort"].eq(cohort)] if len(cached) else cached
    merged = pd.concat([keep, table], ignore_index=True) if len(keep) else table
    with atomic_path(cache_csv) as tmp:
        merged.to_csv(tmp, index=False)
    return table.drop(columns=key_cols).set_index(pd.Index(table["subject_id"].astype(str), name="subject_id"))


def _targets(df: pd.DataFrame, task: Task) -> pd.DataFrame:
    return df.set_index(df["subject_id"].astype(str))[list(task.columns)]


def baseline_prep():
    """The preparation (data.prep_config.PrepConfig) the radiomics features are computed on."""
    from data.prep_config import PrepConfig
    return PrepConfig()


def prepared(df: pd.DataFrame, cache: str, workers: int) -> pd.DataFrame:
    """A manifest's rows prepared into `cache`: the rows with their cached arrays' paths."""
    from data.prepare import prepare_table

    table, _ = prepare_table(df, baseline_prep(), cache, workers=workers)
    return table


REQUIRED = ("manifest", "cache", "splits", "task")  # the flags a baseline CLI cannot run without


def split_defaults() -> dict:
    """--seed, --folds and --test_fraction as a default fine-tuning run has them, so its splits.json is reused."""
    ft = FinetuneConfig.__dataclass_fields__
    return {"seed": 0, "folds": ft["folds"].default, "test_fraction": ft["test_fraction"].default}


def add_arguments(p: argparse.ArgumentParser, run_flag: str = "") -> None:
    """The flags of every baseline CLI (this one and python -m finetune.baselines). With `run_flag` (the flag
    naming a fine-tuning run), REQUIRED and split_defaults() default to None, for the caller to fill from the run."""
    ours = split_defaults()
    later = bool(run_flag)
    need = f" (required without {run_flag}; with it, the run's own)" if later else ""
    note = f"; with {run_flag}: the run's own" if later else ""
    p.add_argument("--manifest", required=not later, help="CSV manifest of the development cohort" + need)
    p.add_argument("--cache", required=not later, help="preprocessing cache directory" + need)
    p.add_argument("--splits", required=not later,
                   help="splits JSON (made here if absent; shared with the ViT runs)" + need)
    p.add_argument("--task", required=not later, choices=[CLASSIFICATION.name, SURVIVAL.name],
                   help="the label (logistic models) or survival (Cox models)" + need)
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--external", help="CSV manifest of an external test cohort")
    p.add_argument("--seed", type=int, default=None if later else ours["seed"],
                   help=f"seed of the splits (when made here) and of the models' inner CV (default {ours['seed']}{note})")
    # the fine-tuning run's defaults, so a run's splits.json is reused as it is
    p.add_argument("--folds", type=int, default=None if later else ours["folds"],
                   help=f"CV folds (as the fine-tuning run, for shared splits; default {ours['folds']}{note})")
    p.add_argument("--test-fraction", type=float, default=None if later else ours["test_fraction"],
                   help=f"held-out test fraction (as the fine-tuning run; default {ours['test_fraction']}{note})")
    p.add_argument("--ring-mm", type=float, default=5.0, help="peritumoral ring width (mm)")
    p.add_argument("--bins", type=int, default=32, help="grey levels for texture and entropy")
    p.add_argument("--workers", type=int, default=0, help="preprocessing worker processes")


def _splits(args, df: pd.DataFrame) -> dict:
    from data.splits import load_or_make_splits, stratify_of
    return load_or_make_splits(args.splits, df, test_fraction=args.test_fraction, folds=args.folds,
                               stratify=stratify_of(df), seed=args.seed)


def read_cohorts(args, eval_sets: dict[str, str] | None = None) -> dict:
    """The manifests the flags name, read and checked before any volume is prepared: the task, the development
    table, its splits where the --splits file exists (one made for another cohort or other settings is refused
    here), and each held-out manifest by split name (--external as "external", then `eval_sets`: name -> CSV)."""
    task = get_task(args.task)
    df = task.read_manifest(args.manifest)
    paths = ({"external": args.external} if args.external else {}) | dict(eval_sets or {})
    held = {name: task.read_manifest(csv) for name, csv in paths.items()}
    splits = _splits(args, df) if Path(args.splits).exists() else None
    return {"task": task, "df": df, "held": held, "held_paths": paths, "splits": splits}


def load_inputs(args, cohorts: dict | None = None) -> dict:
    """Prepared tables, splits and radiomics features (out/features.csv) of the cohorts `read_cohorts` read
    (read here when not given); --out is written only once every table is prepared."""
    c = cohorts or read_cohorts(args)
    task, out = c["task"], Path(args.out)
    df = prepared(c["df"], args.cache, args.workers)
    splits = c["splits"] or _splits(args, df)  # made once the cohort is prepared: a failed run leaves no splits file
    held = {name: prepared(t, args.cache, args.workers) for name, t in c["held"].items()}
    out.mkdir(parents=True, exist_ok=True)
    features = extract_table(df, "internal", args.ring_mm, args.bins, out / "features.csv")
    held_features = {name: extract_table(t, name, args.ring_mm, args.bins, out / "features.csv")
                     for name, t in held.items()}
    more = [name for name in held if name != "external"]
    return {"task": task, "out": out, "df": df, "splits": splits, "features": features,
            "ext_df": held.get("external"), "external": held_features.get("external"), "targets": _targets(df, task),
            "eval_dfs": {n: held[n] for n in more}, "eval_features": {n: held_features[n] for n in more}}


@cli_entry
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(allow_abbrev=False, prog="python -m finetune.baselines.radiomics",
                                description=__doc__.split("\n\n")[0])
    add_arguments(p)
    args = underscore_spellings(p).parse_args(argv)
    d = load_inputs(args)
    out = d["out"]
    predictions, params = predict_splits(d["features"], d["targets"], d["splits"], d["task"], args.seed, d["external"])
    with atomic_path(out / "predictions.csv") as tmp:
        predictions.to_csv(tmp, index=False)
    write_json(out / "radiomics.json", {**vars(args), "feature_version": FEATURE_VERSION,
                                        "n_features": d["features"].shape[1], "models": params})
    print(f"wrote {out / 'predictions.csv'} ({len(predictions)} rows)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
