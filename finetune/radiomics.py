"""Radiomics baseline: hand-crafted lesion + peritumoral features and a regularised linear model.

PyRadiomics is not a dependency (it pins old numpy/SimpleITK and does not build everywhere we run),
so the standard IBSI-style features are computed here with numpy/scipy/scikit-image:
- first-order statistics of the lesion and of a peritumoral ring,
- lesion shape from a marching-cubes mesh and the principal axes of the voxel cloud,
- 3D GLCM texture (13 directions, distance 1, symmetric, normalised, features averaged over the
  directions that have any voxel pair) on intensities quantised to a fixed number of bins.

Undefined values: a region without voxels (an empty ring when the lesion fills the volume) or
without any neighbouring voxel pair (a one-voxel region) gives NaN for that region's features;
`RadiomicsModel` imputes them with the training median. A constant region follows PyRadiomics:
skewness = kurtosis = 0 and GLCM correlation = 1.

CLI: fits one model per CV fold and one on all non-test rows, and writes predictions.csv in the
same format as the ViT fine-tuning, so `finetune.evaluate` scores both alike.
"""
from __future__ import annotations

import argparse
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import ndimage
from scipy.spatial import ConvexHull, QhullError
from scipy.spatial.distance import pdist
from skimage.measure import marching_cubes, mesh_surface_area
from sklearn.base import BaseEstimator, TransformerMixin
from sklearn.exceptions import FitFailedWarning
from sklearn.impute import SimpleImputer
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import GridSearchCV, StratifiedKFold
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler
from sksurv.linear_model import CoxnetSurvivalAnalysis
from sksurv.util import Surv

from data.atomic import atomic_path, write_json
from data.cache import CacheEntry
from data.errors import InputError, cli_entry

FEATURE_VERSION = 1  # bump when a feature's definition changes: features.csv rows are keyed on it

# The 13 unique neighbour offsets of a 26-neighbourhood (the other 13 are their negatives).
DIRECTIONS_3D = [(0, 0, 1), (0, 1, 0), (1, 0, 0), (0, 1, 1), (0, 1, -1), (1, 0, 1), (1, 0, -1),
                 (1, 1, 0), (1, -1, 0), (1, 1, 1), (1, 1, -1), (1, -1, 1), (1, -1, -1)]


# ---------------------------------------------------------------- features

def extract_features(image: np.ndarray, mask: np.ndarray, spacing, ring_mm: float = 5.0,
                     bins: int = 32) -> dict[str, float]:
    """Features of the lesion (mask) and of a peritumoral ring ring_mm wide around it."""
    image = np.asarray(image, dtype=np.float64)  # [X, Y, Z]
    lesion = np.asarray(mask) > 0.5  # [X, Y, Z]
    spacing = tuple(float(s) for s in spacing)
    if image.ndim != 3 or image.shape != lesion.shape:
        raise InputError(f"radiomics: image {image.shape} and mask {lesion.shape} must be the same 3D grid")
    if len(spacing) != 3 or min(spacing) <= 0:
        raise InputError(f"radiomics: spacing {spacing} must be three positive numbers (mm)")
    if int(bins) < 2 or not ring_mm > 0:
        raise InputError(f"radiomics: bins ({bins}) must be >= 2 and ring_mm ({ring_mm}) > 0")
    if not lesion.any():
        raise InputError("radiomics: the lesion mask is empty")
    if not np.isfinite(image[lesion]).all():
        raise InputError("radiomics: the image has non-finite values inside the lesion")
    ring = peritumoral_ring(lesion, spacing, ring_mm)

    feats = _prefixed("lesion_shape", shape_features(lesion, spacing))
    for name, region in (("lesion", lesion), ("ring", ring)):
        feats |= _prefixed(f"{name}_firstorder", first_order_features(image[region], bins))
        feats |= _prefixed(f"{name}_glcm", glcm_features(image, region, bins))
    return feats


def peritumoral_ring(lesion: np.ndarray, spacing, ring_mm: float) -> np.ndarray:
    """Voxels outside the lesion whose centre lies within ring_mm (Euclidean, in mm) of a lesion voxel.

    Exact Euclidean distance rather than a voxel structuring element, so anisotropic spacing is right.
    """
    distance = ndimage.distance_transform_edt(~lesion, sampling=spacing)  # [X, Y, Z] mm
    return (distance <= ring_mm) & ~lesion


def quantise(values: np.ndarray, bins: int) -> np.ndarray:
    """Levels 1..bins, equal-width over the values' own range (a constant region is all level 1)."""
    lo, hi = float(values.min()), float(values.max())
    if hi <= lo:
        return np.ones(values.shape, dtype=np.int64)
    level = np.floor(bins * (values - lo) / (hi - lo)).astype(np.int64)
    return np.clip(level, 0, bins - 1) + 1


def first_order_features(values: np.ndarray, bins: int) -> dict[str, float]:
    names = ["mean", "std", "skewness", "kurtosis", "p10", "p50", "p90", "energy", "entropy", "iqr"]
    if values.size == 0:
        return dict.fromkeys(names, np.nan)
    values = values.astype(np.float64)
    mean = values.mean()
    centred = values - mean
    m2, m3, m4 = (np.mean(centred ** k) for k in (2, 3, 4))
    flat = m2 <= 1e-12 * max(1.0, mean * mean)
    p10, p25, p50, p75, p90 = np.percentile(values, [10, 25, 50, 75, 90])
    p = np.bincount(quantise(values, bins))[1:] / values.size
    p = p[p > 0]
    return {
        "mean": mean, "std": np.sqrt(m2),
        "skewness": 0.0 if flat else m3 / m2 ** 1.5,
        "kurtosis": 0.0 if flat else m4 / m2 ** 2,  # Pearson (a normal gives 3), as PyRadiomics
        "p10": p10, "p50": p50, "p90": p90,
        "energy": float(np.sum(values ** 2)),
        "entropy": float(-np.sum(p * np.log2(p))),
        "iqr": p75 - p25,
    }


def shape_features(lesion: np.ndarray, spacing) -> dict[str, float]:
    spacing = np.asarray(spacing, dtype=np.float64)
    volume = float(lesion.sum() * np.prod(spacing))  # voxel count: exact for the voxelised lesion
    crop = np.pad(lesion[_bounding_box(lesion)], 1).astype(np.float32)  # padded so the mesh closes
    verts, faces, _, _ = marching_cubes(crop, level=0.5, spacing=tuple(spacing))
    area = float(mesh_surface_area(verts, faces))
    tri = verts[faces]  # [T, 3 vertices, 3 coords]
    mesh_volume = abs(float(np.einsum("ij,ij->i", tri[:, 0], np.cross(tri[:, 1], tri[:, 2])).sum())) / 6
    # Sphericity from the mesh volume and mesh area, as PyRadiomics: both see the same surface.
    sphericity = np.pi ** (1 / 3) * (6 * mesh_volume) ** (2 / 3) / area

    coords = np.argwhere(lesion) * spacing  # [N, 3] mm
    eig = np.sort(np.linalg.eigvalsh(np.cov(coords.T, bias=True)))[::-1] if len(coords) > 1 else np.zeros(3)
    eig = np.clip(eig, 0, None)
    major, minor, least = 4 * np.sqrt(eig)  # full axis lengths of the equivalent ellipsoid
    return {
        "volume_mm3": volume,
        "mesh_volume_mm3": mesh_volume,
        "surface_area_mm2": area,
        "surface_volume_ratio": area / mesh_volume,
        "sphericity": sphericity,
        "compactness": 36 * np.pi * mesh_volume ** 2 / area ** 3,  # = sphericity^3
        "major_axis_mm": major, "minor_axis_mm": minor, "least_axis_mm": least,
        "elongation": np.sqrt(eig[1] / eig[0]) if eig[0] > 0 else 1.0,
        "flatness": np.sqrt(eig[2] / eig[0]) if eig[0] > 0 else 1.0,
        "max_diameter_mm": _max_diameter(verts),
    }


def _max_diameter(points: np.ndarray) -> float:
    # The farthest pair of mesh vertices are both hull vertices, which are few.
    try:
        points = points[ConvexHull(points).vertices]
    except QhullError:  # degenerate (flat) point set: all points, subsampled to bound the cost
        points = points[:: max(1, len(points) // 2000)]
    return float(pdist(points).max()) if len(points) > 1 else 0.0


def glcm_matrices(levels: np.ndarray, bins: int) -> np.ndarray:
    """[13, bins, bins] symmetric co-occurrence counts of levels 1..bins (0 = outside the region)."""
    out = np.zeros((len(DIRECTIONS_3D), bins, bins))
    shape = levels.shape
    for k, offset in enumerate(DIRECTIONS_3D):
        src = tuple(slice(max(0, -o), n - max(0, o)) for o, n in zip(offset, shape))
        dst = tuple(slice(max(0, o), n - max(0, -o)) for o, n in zip(offset, shape))
        a, b = levels[src], levels[dst]
        pair = (a > 0) & (b > 0)
        counts = np.bincount((a[pair] - 1) * bins + (b[pair] - 1), minlength=bins * bins)
        counts = counts.reshape(bins, bins)
        out[k] = counts + counts.T
    return out


def glcm_properties(P: np.ndarray) -> dict[str, float]:
    """Texture of one normalised GLCM [bins, bins] (skimage definitions; entropy in bits)."""
    i, j = np.indices(P.shape) + 1
    diff = np.abs(i - j)
    mu = np.sum(i * P)  # symmetric: the row and column means and variances are equal
    var = np.sum((i - mu) ** 2 * P)
    nz = P[P > 0]
    return {
        "contrast": np.sum(diff ** 2 * P),
        "dissimilarity": np.sum(diff * P),
        "homogeneity": np.sum(P / (1.0 + diff ** 2)),
        "energy": np.sqrt(np.sum(P ** 2)),
        "entropy": -np.sum(nz * np.log2(nz)),
        "correlation": np.sum((i - mu) * (j - mu) * P) / var if var > 1e-15 else 1.0,
    }


def glcm_features(image: np.ndarray, region: np.ndarray, bins: int) -> dict[str, float]:
    names = ["contrast", "dissimilarity", "homogeneity", "energy", "entropy", "correlation"]
    if not region.any():
        return dict.fromkeys(names, np.nan)
    box = _bounding_box(region)
    inside = region[box]
    levels = np.zeros(inside.shape, dtype=np.int64)  # [x, y, z] of the box
    levels[inside] = quantise(image[box][inside], bins)
    per_direction = [glcm_properties(P / P.sum()) for P in glcm_matrices(levels, bins) if P.sum() > 0]
    if not per_direction:  # a single voxel has no neighbour pair: texture is undefined
        return dict.fromkeys(names, np.nan)
    return {n: float(np.mean([d[n] for d in per_direction])) for n in names}


def _bounding_box(region: np.ndarray) -> tuple[slice, ...]:
    idx = np.argwhere(region)
    return tuple(slice(lo, hi + 1) for lo, hi in zip(idx.min(0), idx.max(0)))


def _prefixed(prefix: str, d: dict) -> dict[str, float]:
    return {f"{prefix}_{k}": float(v) for k, v in d.items()}


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


class RadiomicsModel:
    """Impute (median) -> standardise -> filter -> penalised linear model, tuned by inner CV.

    classification: L2 LogisticRegression, C chosen by inner stratified CV (log loss); predict -> P(y=1).
    survival: elastic-net Cox (CoxnetSurvivalAnalysis), alpha chosen by inner CV (Harrell's C);
              predict -> risk (linear predictor, higher = earlier event). y is a sksurv structured
              array (event: bool, time: float), e.g. from `survival_target`.
    """

    def __init__(self, task: str = "classification", seed: int = 0, inner_folds: int = 5):
        if task not in ("classification", "survival"):
            raise InputError(f"radiomics: task {task!r} is not 'classification' or 'survival'")
        self.task, self.seed, self.inner_folds = task, seed, inner_folds

    def _pipeline(self, model) -> Pipeline:
        return Pipeline([("impute", SimpleImputer(strategy="median", keep_empty_features=True)),
                         ("scale", StandardScaler()), ("filter", FeatureFilter()), ("model", model)])

    def fit(self, X, y) -> "RadiomicsModel":
        self.feature_names_ = list(X.columns) if isinstance(X, pd.DataFrame) else None
        X = np.asarray(X, dtype=np.float64)
        if self.task == "classification":
            y = np.asarray(y).astype(int)
            strata = y
            pipe = self._pipeline(LogisticRegression(solver="newton-cholesky", max_iter=1000))
            grid = {"model__C": list(np.logspace(-3, 2, 6))}
            # Log loss, not AUC: AUC ties on separable folds would pick the smallest C, whose
            # near-prior probabilities do not pool across the outer folds.
            scoring = "neg_log_loss"
        else:
            strata = np.asarray(y[y.dtype.names[0]]).astype(int)
            # The alpha path depends on the data: take it from a fit on all training rows.
            path = self._pipeline(CoxnetSurvivalAnalysis(l1_ratio=0.5, alpha_min_ratio=0.05, n_alphas=30))
            path.fit(X, y)
            alphas = path.named_steps["model"].alphas_[::3]
            pipe = self._pipeline(CoxnetSurvivalAnalysis(l1_ratio=0.5))
            grid = {"model__alphas": [[a] for a in alphas]}
            scoring = None  # Coxnet's own score: Harrell's C
        smallest = int(np.bincount(strata, minlength=2).min())
        if smallest < 2:
            what = "class" if self.task == "classification" else "event/censored group"
            raise InputError(f"radiomics: each {what} needs at least 2 training rows (counts "
                             f"{np.bincount(strata, minlength=2).tolist()})")
        # Fixed index folds: GridSearchCV would otherwise stratify on the (structured) survival y itself.
        cv = list(StratifiedKFold(min(self.inner_folds, smallest), shuffle=True,
                                  random_state=self.seed).split(X, strata))
        search = GridSearchCV(pipe, grid, cv=cv, scoring=scoring, error_score=np.nan, refit=True)
        with warnings.catch_warnings():
            # Inner folds with too little signal fail or converge poorly; they score NaN and lose.
            warnings.simplefilter("ignore", FitFailedWarning)
            warnings.simplefilter("ignore", UserWarning)
            warnings.simplefilter("ignore", RuntimeWarning)
            search.fit(X, y)
        self.pipeline_ = search.best_estimator_
        chosen = search.best_params_
        self.best_params_ = ({"C": float(chosen["model__C"])} if self.task == "classification"
                             else {"alpha": float(chosen["model__alphas"][0])})
        self.best_params_["n_features_kept"] = int(len(self.pipeline_.named_steps["filter"].keep_))
        return self

    def predict(self, X) -> np.ndarray:
        if isinstance(X, pd.DataFrame) and self.feature_names_ is not None:
            absent = [c for c in self.feature_names_ if c not in X.columns]
            if absent:
                raise InputError(f"radiomics: feature column(s) {absent[:5]} missing at prediction")
            X = X[self.feature_names_]
        X = np.asarray(X, dtype=np.float64)
        if self.task == "classification":
            return self.pipeline_.predict_proba(X)[:, 1]
        return self.pipeline_.predict(X)


def survival_target(event, time) -> np.ndarray:
    return Surv.from_arrays(event=np.asarray(event).astype(bool), time=np.asarray(time, dtype=float))


# ---------------------------------------------------------------- cross-validated predictions

def predict_splits(features: pd.DataFrame, targets: pd.DataFrame, splits: dict, task: str, seed: int = 0,
                   external: pd.DataFrame | None = None,
                   eval_sets: dict[str, pd.DataFrame] | None = None) -> tuple[pd.DataFrame, list[dict]]:
    """One model per fold (predicts its val rows) and one on all non-test rows (test, external and each
    further held-out set in `eval_sets`, predicted under its own split name).

    features/targets are indexed by subject_id; targets has `label` or `time`/`event`.
    Returns predictions (subject_id, split, fold, prob|risk) and each model's chosen parameters.
    """
    score = "prob" if task == "classification" else "risk"
    listed = {s for fold in splits["folds"] for part in ("train", "val") for s in fold[part]} | set(splits["test"])
    absent = sorted(listed - set(features.index))
    if absent:
        raise InputError(f"radiomics: {len(absent)} subject(s) in the splits have no features: {absent[:5]}")

    def target(ids):
        t = targets.loc[ids]
        return t["label"].to_numpy() if task == "classification" else survival_target(t["event"], t["time"])

    def fit(ids):
        return RadiomicsModel(task, seed).fit(features.loc[ids], target(ids))

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


def _targets(df: pd.DataFrame, task: str) -> pd.DataFrame:
    cols = ["label"] if task == "classification" else ["time", "event"]
    return df.set_index(df["subject_id"].astype(str))[cols]


def _prepared(manifest: str, task: str, cache: str, workers: int) -> pd.DataFrame:
    from data.manifest import read_manifest
    from data.prepare import PrepConfig, prepare_table

    df = read_manifest(manifest, task=task)
    prepared, _ = prepare_table(df, PrepConfig(), cache, workers=workers)
    return prepared


@cli_entry
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(allow_abbrev=False, prog="python -m finetune.radiomics", description=__doc__.split("\n\n")[0])
    p.add_argument("--manifest", required=True, help="CSV manifest of the development cohort")
    p.add_argument("--cache", required=True, help="preprocessing cache directory")
    p.add_argument("--splits", required=True, help="splits JSON (made here if absent; shared with the ViT runs)")
    p.add_argument("--task", required=True, choices=["classification", "survival"])
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--external", help="CSV manifest of an external test cohort")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--folds", type=int, default=5, help="CV folds (as the fine-tuning run, for shared splits)")
    p.add_argument("--test-fraction", type=float, default=0.2, help="held-out test fraction (as the fine-tuning run)")
    p.add_argument("--ring-mm", type=float, default=5.0, help="peritumoral ring width (mm)")
    p.add_argument("--bins", type=int, default=32, help="grey levels for texture and entropy")
    p.add_argument("--workers", type=int, default=0, help="preprocessing worker processes")
    args = p.parse_args(argv)
    from data.splits import load_or_make_splits

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    df = _prepared(args.manifest, args.task, args.cache, args.workers)
    splits = load_or_make_splits(args.splits, df, test_fraction=args.test_fraction, folds=args.folds,
                                 stratify="label" if args.task == "classification" else "event", seed=args.seed)
    features = extract_table(df, "internal", args.ring_mm, args.bins, out / "features.csv")
    external = None
    if args.external:
        external = extract_table(_prepared(args.external, args.task, args.cache, args.workers), "external",
                                 args.ring_mm, args.bins, out / "features.csv")
    predictions, params = predict_splits(features, _targets(df, args.task), splits, args.task, args.seed, external)
    with atomic_path(out / "predictions.csv") as tmp:
        predictions.to_csv(tmp, index=False)
    write_json(out / "radiomics.json", {**vars(args), "feature_version": FEATURE_VERSION,
                                        "n_features": features.shape[1], "models": params})
    print(f"wrote {out / 'predictions.csv'} ({len(predictions)} rows)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
