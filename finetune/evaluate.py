"""Evaluate predictions against outcomes: metrics.json, ROC / Kaplan-Meier / calibration figures, a table.

    python -m finetune.evaluate --predictions run/predictions.csv --manifest manifest.csv \\
        [--external external.csv] [--compare other/predictions.csv] [--baselines baselines/] [--out DIR] \\
        [--n_boot N] [--seed S] [--figures true|false]

predictions.csv: subject_id, split ("val", "test", "external", ...), fold (-1 = fold ensemble),
and prob and/or risk. Per split one row per subject is evaluated: the fold ensemble if present,
else all rows when each subject appears once (out-of-fold "val" pooled over folds), else the mean
over folds. Splits with several folds also get per-fold point estimates. Rows of split "train",
if present, are the reference for Uno's C, time-dependent AUC, the integrated Brier score's
Breslow baseline, and the Kaplan-Meier risk cut.

--baselines adds the baselines a user fits first (python -m finetune.baselines writes them on the run's
splits): each one's AUC and Harrell's C, and the model's paired difference to it with a patient-bootstrap
CI; the best baseline of each metric is picked on the out-of-fold val rows (finetune/baselines/compare.py).

--n_boot, --seed and --figures default to the fine-tuning run's own (its config.yaml next to the predictions),
else 1000, 0 and true, so re-evaluating a run reproduces the CIs of the metrics.json it wrote (and draws no
figures for a run made with --figures false unless --figures true says so).
"""
from __future__ import annotations

import argparse
import json
import math
import re
from pathlib import Path

import numpy as np
import pandas as pd

from core.atomic import write_json
from core.config import load_file
from core.errors import InputError, cli_entry, first_line
from finetune.figures import plot_calibration, plot_km, plot_roc
from finetune.metrics import classification_report, delong_paired_test, kernel_values, survival_report, try_metric
from models.tasks import LABEL_REPORT, SURVIVAL_REPORT, task_of_scores

KEY_COLUMNS = ("subject_id", "split", "fold")
SCORE_COLUMNS = ("prob", "risk")
REFERENCE_SPLIT = "train"
MAX_LISTED = 5
RUN_CONFIG = "config.yaml"  # what fine-tuning writes next to its predictions.csv
DEFAULT_N_BOOT, DEFAULT_SEED = 1000, 0


# ---------------------------------------------------------------- input

def _head(items) -> str:
    items = list(items)
    shown = ", ".join(str(x) for x in items[:MAX_LISTED])
    return shown + (f" and {len(items) - MAX_LISTED} more" if len(items) > MAX_LISTED else "")


def read_predictions(path) -> pd.DataFrame:
    """Read and check a predictions CSV (see the module docstring)."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"predictions {path}: file not found")
    try:
        df = pd.read_csv(path, dtype={"subject_id": str, "split": str})
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as e:
        raise InputError(f"predictions {path}: cannot parse CSV ({first_line(e)})") from None
    return check_predictions(df, f"predictions {path}")


def check_predictions(df: pd.DataFrame, where: str = "predictions") -> pd.DataFrame:
    """Typed copy of a predictions table; InputError naming the column and rows on anything wrong."""
    df = df.copy()
    missing = [c for c in KEY_COLUMNS if c not in df.columns]
    if missing:
        raise InputError(f"{where}: missing column(s) {missing}; found {list(df.columns)}")
    scores = [c for c in SCORE_COLUMNS if c in df.columns]
    if not scores:
        raise InputError(f"{where}: needs a 'prob' and/or a 'risk' column; found {list(df.columns)}")
    if df.empty:
        raise InputError(f"{where}: no rows")

    def rows(mask) -> str:  # 1-based data rows, header excluded
        return _head(f"row {i + 1} (subject {df['subject_id'].iloc[i]})" for i in np.flatnonzero(mask))

    for col in ("subject_id", "split"):
        df[col] = df[col].astype("string").str.strip()
        empty = df[col].isna() | (df[col] == "")
        if empty.any():
            raise InputError(f"{where}: empty '{col}' in {rows(empty)}")
    df["subject_id"], df["split"] = df["subject_id"].astype(str), df["split"].astype(str)
    fold = pd.to_numeric(df["fold"], errors="coerce")
    bad = fold.isna() | (fold != fold.round()) | (fold < -1)
    if bad.any():
        raise InputError(f"{where}: 'fold' must be an integer >= 0, or -1 for the fold ensemble; bad {rows(bad)}")
    df["fold"] = fold.astype(int)
    for col in scores:
        raw = df[col]
        values = pd.to_numeric(raw, errors="coerce")
        blank = raw.isna()
        if blank.any():
            raise InputError(f"{where}: '{col}' is empty (NaN) in {rows(blank)}")
        not_number = values.isna() | ~np.isfinite(values)
        if not_number.any():
            raise InputError(f"{where}: '{col}' must be a finite number; bad {rows(not_number)}")
        if values.dtype.kind == "f" and values.dtype.itemsize < 8:
            # A float32 score counts at the decimal it prints as, which is what predictions.csv
            # holds: in-memory predictions (fine-tuning's own evaluation) and the file then agree.
            values = values.astype(str)
        df[col] = values.astype(float)
    if "prob" in scores:
        outside = (df["prob"] < 0) | (df["prob"] > 1)
        if outside.any():
            raise InputError(f"{where}: 'prob' must be a probability in [0, 1]; bad {rows(outside)}")
    dupes = df.duplicated(list(KEY_COLUMNS), keep=False)
    if dupes.any():
        raise InputError(f"{where}: the same (subject_id, split, fold) appears more than once: {rows(dupes)}")
    return df


def read_outcomes(manifest, external=None, scores=("prob", "risk")) -> pd.DataFrame:
    """Outcomes (label and/or time, event, patient_id) from the manifest and an optional external one."""
    task = task_of_scores(scores)
    from data.manifest import read_manifest  # the targets only: evaluation reads no image, of any channel
    frames = [read_manifest(p, columns=task.columns, purpose=f"evaluating {'/'.join(scores)}", check_files=False)
              for p in [manifest, external] if p is not None]
    outcomes = pd.concat(frames, ignore_index=True)
    both = outcomes["subject_id"][outcomes["subject_id"].duplicated()]
    if len(both):
        raise InputError(f"subject_id(s) in both --manifest and --external: {_head(sorted(set(both)))}")
    return outcomes


def join_outcomes(pred: pd.DataFrame, outcomes: pd.DataFrame) -> pd.DataFrame:
    """Predictions with their subjects' outcomes; InputError listing subjects the outcomes lack."""
    if "subject_id" not in outcomes.columns:
        raise InputError(f"outcomes: missing column 'subject_id'; found {list(outcomes.columns)}")
    needed = (["label"] if "prob" in pred.columns else []) + (["time", "event"] if "risk" in pred.columns else [])
    missing = [c for c in needed if c not in outcomes.columns]
    if missing:
        raise InputError(f"outcomes: missing column(s) {missing} needed for the predictions' "
                         f"{[c for c in SCORE_COLUMNS if c in pred.columns]}")
    outcomes = outcomes.assign(subject_id=outcomes["subject_id"].astype(str))
    unknown = sorted(set(pred["subject_id"]) - set(outcomes["subject_id"]))
    if unknown:
        raise InputError(f"predictions: {len(unknown)} subject_id(s) not found in the outcomes: {_head(unknown)}")
    keep = ["subject_id"] + needed + (["patient_id"] if "patient_id" in outcomes.columns else [])
    joined = pred.merge(outcomes[keep], on="subject_id", how="left", validate="many_to_one")
    for col in needed:
        bad = joined[col].isna()
        if bad.any():
            raise InputError(f"outcomes: '{col}' is missing for subject(s) {_head(joined['subject_id'][bad].unique())}")
    return joined


# ---------------------------------------------------------------- selection

def one_row_per_subject(rows: pd.DataFrame) -> tuple[pd.DataFrame, str]:
    """The rows that stand for a split (or fold), and a phrase saying which."""
    folds = sorted(int(f) for f in rows["fold"].unique())
    if -1 in folds:
        return rows[rows["fold"] == -1], "fold ensemble (fold -1)"
    if rows["subject_id"].is_unique:
        return rows, f"fold {folds[0]}" if len(folds) == 1 else f"pooled over folds {folds}"
    scores = [c for c in SCORE_COLUMNS if c in rows.columns]
    # Several fold models scored the same subjects: average them, as the fold ensemble would.
    first = rows.drop(columns=scores).drop_duplicates("subject_id").set_index("subject_id")
    mean = rows.groupby("subject_id", sort=False)[scores].mean()
    return first.join(mean).reset_index(), f"mean over folds {folds}"


def _arrays(rows: pd.DataFrame, *cols) -> list[np.ndarray]:
    return [rows[c].to_numpy() for c in cols]


def km_threshold(split: str, reference: pd.DataFrame | None, pooled_val: pd.DataFrame | None) -> tuple:
    """(cut, what it is) for the Kaplan-Meier risk groups of `split`, fixed on training data: the median
    risk of the "train" rows, else (for a held-out split) of the out-of-fold "val" rows, i.e. the
    training subjects; never the evaluated set's own median unless nothing else exists."""
    if reference is not None and "risk" in reference.columns:
        return float(np.median(reference["risk"])), "median training risk"
    if split != "val" and pooled_val is not None and "risk" in pooled_val.columns and len(pooled_val):
        return float(np.median(pooled_val["risk"])), "median out-of-fold risk of the training subjects"
    return "median", "median risk of the evaluated rows"


def _report(rows: pd.DataFrame, reference: pd.DataFrame | None, n_boot: int, seed: int,
            km: tuple = ("median", "median risk of the evaluated rows")) -> dict:
    out = {"n": int(len(rows))}
    # Bootstrap units are patients, else subjects (as read_manifest fills patient_id): units are
    # ordered by id, never by row, so the CIs do not depend on the order of the predictions.
    groups = rows["patient_id" if "patient_id" in rows.columns else "subject_id"].astype(str).to_numpy()
    if "prob" in rows.columns:
        out[LABEL_REPORT] = classification_report(*_arrays(rows, "label", "prob"), n_boot=n_boot, seed=seed,
                                                      groups=groups)
    if "risk" in rows.columns:
        train = None if reference is None else tuple(_arrays(reference, "time", "event", "risk"))
        rep = survival_report(*_arrays(rows, "time", "event", "risk"), train=train, n_boot=n_boot, seed=seed,
                              groups=groups, km_cut=km[0])
        rep["km"]["cut"] = km[1]
        out[SURVIVAL_REPORT] = rep
    return out


def _safe_name(split: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", split)


# ---------------------------------------------------------------- evaluate

def evaluate(pred_df: pd.DataFrame, outcomes_df: pd.DataFrame, compare_df: pd.DataFrame | None = None,
             out_dir=None, n_boot: int = 1000, seed: int = 0, names=("model", "compare"),
             baselines: dict[str, pd.DataFrame] | None = None, figures: bool | None = None) -> dict:
    """Metrics per split (pooled, and per fold where there are several), optional paired DeLong
    against `compare_df`, and against each of `baselines` (name -> predictions: the baselines a user fits
    first) paired CIs of the differences (finetune.baselines.compare); with `out_dir`, writes metrics.json
    and, unless `figures` is false, roc/km/calibration PNGs there. `figures` None: the fine-tuning run's
    --figures from its config.yaml in `out_dir` (figures_setting), so fine-tuning's own evaluation follows it."""
    pred = join_outcomes(check_predictions(pred_df), outcomes_df)
    compare = None if compare_df is None else join_outcomes(check_predictions(compare_df, "compare predictions"),
                                                            outcomes_df)
    result = {"n_boot": n_boot, "seed": seed, "splits": {}}
    reference_rows = pred[pred["split"] == REFERENCE_SPLIT]
    reference = one_row_per_subject(reference_rows)[0] if len(reference_rows) else None
    val_rows = pred[pred["split"] == "val"]
    pooled_val = one_row_per_subject(val_rows)[0] if len(val_rows) else None

    selected = {}
    for split in pred["split"].unique():
        rows = pred[pred["split"] == split]
        chosen, source = one_row_per_subject(rows)
        selected[split] = chosen
        entry = {"rows": source, **_report(chosen, reference, n_boot, seed, km_threshold(split, reference, pooled_val))}
        folds = sorted(int(f) for f in rows["fold"].unique() if f >= 0)
        if len(folds) > 1:
            # Per-fold point estimates (DeLong CI only): the spread over folds shows the variability.
            entry["folds"] = {}
            for fold in folds:
                fold_ref = reference_rows[reference_rows["fold"] == fold]
                ref = fold_ref if len(fold_ref) else reference
                entry["folds"][str(fold)] = _report(rows[rows["fold"] == fold], ref, 0, seed)
        result["splits"][split] = entry

    if compare is not None:
        result["comparison"] = compare_models(selected, compare, names)
    if baselines:
        from finetune.baselines.compare import compare_baselines  # it builds on this module's paired statistics
        result["baselines"] = compare_baselines(selected, baselines, outcomes_df, n_boot, seed)
    if out_dir is not None:
        result["figures"] = []  # --figures false: none drawn, the numbers the same
        if figures_setting(out_dir, figures)[0]:
            cuts = {split: km_threshold(split, reference, pooled_val) for split in selected}
            result["figures"] = _figures(selected, compare, cuts, Path(out_dir), n_boot, seed, names)
        result |= run_record(Path(out_dir) / "metrics.json")
        write_json(Path(out_dir) / "metrics.json", result)
    return result


RUN_RECORD_KEYS = ("folds",)  # written by fine-tuning (each fold's kept epoch and folder), never by evaluation


def run_record(path: Path) -> dict:
    """The fine-tuning run's own entries of an existing metrics.json, so that re-evaluating a run in its
    folder replaces the metrics but keeps the record of how its folds were trained."""
    try:
        old = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return {k: old[k] for k in RUN_RECORD_KEYS if k in old} if isinstance(old, dict) else {}


def compare_models(selected: dict, compare: pd.DataFrame, names) -> dict:
    """Paired DeLong per split on the subjects both prediction sets scored.

    selected: split -> one row per subject (with 'label'); compare: joined predictions of the
    second model, any folds (the same row choice is made for it)."""
    out = {}
    for split, rows in selected.items():
        other = compare[compare["split"] == split]
        if "prob" not in rows.columns or "prob" not in other.columns or other.empty:
            out[split] = {"p": None, "note": f"no 'prob' for split {split!r} in both prediction sets"}
            continue
        out[split] = {"models": list(names), **paired_delong(rows, one_row_per_subject(other)[0])}
    return out


def paired_delong(rows: pd.DataFrame, other: pd.DataFrame, score: str = "prob") -> dict:
    """Paired DeLong test of two models' `score` on the subjects both scored; labels come from `rows`.

    {"n_common", "auc_a" (rows), "auc_b" (other), "diff", "p", ...}, or "p": None and a "note"."""
    both = rows[["subject_id", "label", score]].merge(other[["subject_id", score]], on="subject_id",
                                                      suffixes=("", "_other"))
    if both.empty:
        return {"n_common": 0, "p": None, "note": "no common subjects"}
    test, reason = try_metric(delong_paired_test, *_arrays(both, "label", score, f"{score}_other"))
    return {"n_common": int(len(both)), **(test if test is not None else {"p": None, "note": reason})}


# ---------------------------------------------------------------- paired bootstrap of a model difference
# (the pair statistics themselves, finetune.metrics.auc_kernel / harrell_kernel, are scored per resample
# by kernel_values; these functions draw the resamples and combine two models over seeds)

def bootstrap_counts(groups: list, n_boot: int, seed: int = 0) -> list[np.ndarray]:
    """Per sample s, [n_boot, n_s] draw counts of its rows when whole groups (patients) are resampled.

    Samples holding the same set of groups (one external set scored under several seeds) share every
    draw, so a replicate holds the same patients in each; samples with other groups (each seed's own
    test split) are drawn independently. Groups are ordered by id, so the row order does not matter.
    """
    rng, draws, out = np.random.default_rng(seed), {}, []
    for g in groups:
        g = np.asarray(g).astype(str)
        key = tuple(np.unique(g))
        if key not in draws:
            u = len(key)
            idx = rng.integers(0, u, size=(n_boot, u)) + u * np.arange(n_boot)[:, None]  # [B, u] flat unit ids
            draws[key] = np.bincount(idx.ravel(), minlength=n_boot * u).reshape(n_boot, u)
        out.append(draws[key][:, np.searchsorted(np.asarray(key), g)])  # [B, n_s]: a row counts as its group
    return out


def paired_diff_summary(full_a, full_b, boot_a: list, boot_b: list, n_boot: int, alpha: float = 0.05) -> dict:
    """a, b: mean over samples of each model's statistic; ci: percentile CI of the sample-averaged a - b
    over the replicates (boot_* [B] per sample). A replicate where either model is undefined in any
    sample is skipped; if more than half are, the CI is undefined (as in bootstrap_ci)."""
    a, b = float(np.mean(full_a)), float(np.mean(full_b))
    if not (np.isfinite(a) and np.isfinite(b)):
        return {"a": None, "b": None, "diff": None, "ci": None, "n_used": 0, "n_boot": n_boot,
                "reason": "the statistic is undefined on the full set"}
    res = {"a": a, "b": b, "diff": a - b, "ci": None, "n_used": 0, "n_boot": n_boot}
    if n_boot:
        diffs = np.mean(np.stack(boot_a) - np.stack(boot_b), axis=0)  # [B]
        ok = diffs[np.isfinite(diffs)]
        res["n_used"] = int(len(ok))
        if len(ok) >= max(2, math.ceil(n_boot / 2)):
            res["ci"] = [float(q) for q in np.quantile(ok, [alpha / 2, 1 - alpha / 2])]
    if res["ci"] is None:
        res["reason"] = "bootstrap disabled" if not n_boot else "too few resamples with a defined statistic"
    return res


def paired_bootstrap_diff(kernels_a: list, kernels_b: list, groups: list, n_boot: int = 1000, seed: int = 0,
                          alpha: float = 0.05) -> dict:
    """Paired bootstrap of model a's statistic minus model b's, averaged over samples (seeds).

    Sample s: kernels_a[s], kernels_b[s] on the same rows, groups[s] its patient per row. Each replicate
    resamples patients (bootstrap_counts) and scores both models on that same resample.
    """
    counts = bootstrap_counts(groups, n_boot, seed)
    full = [np.ones((1, len(g))) for g in groups]
    return paired_diff_summary([kernel_values(k, f)[0] for k, f in zip(kernels_a, full)],
                               [kernel_values(k, f)[0] for k, f in zip(kernels_b, full)],
                               [kernel_values(k, c) for k, c in zip(kernels_a, counts)],
                               [kernel_values(k, c) for k, c in zip(kernels_b, counts)], n_boot, alpha)

def _figures(selected: dict, compare, km_cuts: dict, out_dir: Path, n_boot: int, seed: int, names) -> list[str]:
    written = []
    for split, rows in selected.items():
        name = _safe_name(split)
        if "prob" in rows.columns:
            curves = {names[0]: tuple(_arrays(rows, "label", "prob"))}
            if compare is not None and "prob" in compare.columns and (compare["split"] == split).any():
                other = one_row_per_subject(compare[compare["split"] == split])[0]
                curves[names[1]] = tuple(_arrays(other, "label", "prob"))
            plot_roc(curves, out_dir / f"roc_{name}.png", n_boot=min(n_boot, 500), seed=seed, title=f"ROC: {split}")
            plot_calibration(*_arrays(rows, "label", "prob"), out_dir / f"calibration_{name}.png",
                             title=f"Calibration: {split}")
            written += [f"roc_{name}.png", f"calibration_{name}.png"]
        if "risk" in rows.columns:
            cut = km_cuts[split][0]
            plot_km(*_arrays(rows, "time", "event", "risk"), out_dir / f"km_{name}.png",
                    threshold=None if cut == "median" else cut, title=f"Kaplan-Meier by predicted risk: {split}")
            written.append(f"km_{name}.png")
    return written


# ---------------------------------------------------------------- table

def _fmt(value, ci=None) -> str:
    if value is None:
        return "n/a"
    return f"{value:.3f}" + (f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else "")


def format_table(result: dict) -> str:
    """A short plain-text table: one line per split, n/a where a metric is undefined."""
    header = f"{'split':<10} {'n':>5}  {'AUC [95% CI]':<24} {'Brier':>6}  {'Harrell C [95% CI]':<24} " \
             f"{'Uno C':>6} {'IBS':>6} {'log-rank p':>10}"
    lines = [header, "-" * len(header)]
    for split, entry in result["splits"].items():
        c, s = entry.get(LABEL_REPORT, {}), entry.get(SURVIVAL_REPORT, {})
        p = s.get("km", {}).get("logrank_p")
        lines.append(f"{split:<10} {entry['n']:>5}  {_fmt(c.get('auc'), c.get('auc_ci')):<24} "
                     f"{_fmt(c.get('brier')):>6}  {_fmt(s.get('harrell_c'), s.get('harrell_c_ci')):<24} "
                     f"{_fmt(s.get('uno_c')):>6} {_fmt(s.get('ibs')):>6} {'n/a' if p is None else f'{p:.3g}':>10}")
    for split, cmp in result.get("comparison", {}).items():
        if cmp.get("p") is None:
            lines.append(f"paired DeLong {split}: n/a ({cmp.get('note')})")
        else:
            lines.append(f"paired DeLong {split}: {cmp['models'][0]} {cmp['auc_a']:.3f} vs {cmp['models'][1]} "
                         f"{cmp['auc_b']:.3f}, diff {cmp['diff']:+.3f}, p = {cmp['p']:.3g} (n = {cmp['n_common']})")
    if result.get("baselines"):
        from finetune.baselines.compare import format_lines
        lines += format_lines(result["baselines"])
    return "\n".join(lines)


# ---------------------------------------------------------------- CLI

def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(allow_abbrev=False, prog="python -m finetune.evaluate", description=__doc__.split("\n")[0])
    ap.add_argument("--predictions", required=True, help="predictions CSV: subject_id, split, fold, prob/risk")
    ap.add_argument("--manifest", required=True, help="manifest CSV with the outcomes (label and/or time, event)")
    ap.add_argument("--external", help="manifest CSV of an external cohort")
    ap.add_argument("--compare", help="second predictions CSV: paired DeLong per split on common subjects")
    ap.add_argument("--baselines", nargs="+", default=[], metavar="DIR|NAME=CSV",
                    help="the baselines' predictions (a folder of <name>/predictions.csv, as python -m "
                         "finetune.baselines writes, or name=predictions.csv): paired CIs of the differences")
    ap.add_argument("--out", help="output folder (default: the predictions file's folder)")
    ap.add_argument("--n_boot", type=int, help=f"bootstrap resamples for CIs (0: none); default: the run's "
                    f"{RUN_CONFIG} next to the predictions, else {DEFAULT_N_BOOT}")
    ap.add_argument("--seed", type=int, help=f"bootstrap seed; default: the run's {RUN_CONFIG}, else {DEFAULT_SEED}")
    ap.add_argument("--figures", choices=("true", "false"), help=f"write the ROC / calibration / KM PNGs; default: "
                    f"the run's --figures in its {RUN_CONFIG} next to the predictions, else true")
    return ap.parse_args(argv)


def run_config(folder) -> tuple[dict, Path]:
    """(the fine-tuning run's saved config in `folder`, its path); {} where there is none or it is some
    other config.yaml (not a mapping)."""
    path = Path(folder) / RUN_CONFIG
    run = load_file(path) if path.is_file() else {}
    return (run if isinstance(run, dict) else {}), path


def figures_setting(folder, figures: bool | None) -> tuple[bool, str]:
    """(whether to draw the figures, where that came from): the flag, else the fine-tuning run's --figures
    in `folder`'s config.yaml, else true. Fine-tuning evaluates in its own folder after writing its config
    there, so a run with --figures false draws none, and neither does a re-evaluation of it."""
    if figures is not None:
        return bool(figures), "flag"
    run, path = run_config(folder)
    if type(run.get("figures")) is bool:
        return run["figures"], f"figures from {path}"
    return True, "default"


def bootstrap_settings(predictions, n_boot: int | None, seed: int | None) -> tuple[int, int, str]:
    """(n_boot, seed, where they came from): flags first, then the fine-tuning run's config.yaml.

    Fine-tuning evaluates with its own --n_boot and --seed; taking them from its saved config is
    what makes the CLI give the CIs of that run's metrics.json for the same predictions file."""
    run, path = run_config(Path(predictions).parent) if n_boot is None or seed is None else ({}, None)
    picked, source = {}, []
    for name, flag, default in (("n_boot", n_boot, DEFAULT_N_BOOT), ("seed", seed, DEFAULT_SEED)):
        if flag is not None:
            picked[name] = flag
        elif type(run.get(name)) is int:
            picked[name] = run[name]
            source.append(f"{name} from {path}")
        else:
            picked[name] = default
    return picked["n_boot"], picked["seed"], "; ".join(source) or "flags / defaults"


@cli_entry
def main(argv=None) -> int:
    args = parse_args(argv)
    n_boot, seed, source = bootstrap_settings(args.predictions, args.n_boot, args.seed)
    figures, figures_source = figures_setting(Path(args.predictions).parent,
                                              None if args.figures is None else args.figures == "true")
    if n_boot < 0:
        raise InputError(f"--n_boot must be >= 0, got {n_boot} ({source})")
    pred = read_predictions(args.predictions)
    compare = read_predictions(args.compare) if args.compare else None
    scores = [c for c in SCORE_COLUMNS if c in pred.columns]
    outcomes = read_outcomes(args.manifest, args.external, scores)
    out_dir = Path(args.out) if args.out else Path(args.predictions).parent
    names = ("model", "compare")
    if args.compare:  # name the two models after their run folders (or files, if those match)
        pair = [Path(args.predictions), Path(args.compare)]
        names = tuple(p.parent.name for p in pair)
        if names[0] == names[1] or not all(names):
            names = tuple(str(p) for p in pair)
    baselines = None
    if args.baselines:
        from finetune.baselines.compare import read_baselines
        baselines = read_baselines(args.baselines)
    result = evaluate(pred, outcomes, compare, out_dir=out_dir, n_boot=n_boot, seed=seed, names=names,
                      baselines=baselines, figures=figures)
    print(f"bootstrap: n_boot {n_boot}, seed {seed} ({source})")
    print(format_table(result))
    drawn = f"{len(result['figures'])} figure(s)" if figures else f"no figures ({figures_source}: false)"
    print(f"wrote {out_dir / 'metrics.json'} and {drawn} in {out_dir}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
