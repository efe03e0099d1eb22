"""Fit the baselines a user fits first on the fine-tuning run's splits: clinical-only, radiomics, radiomics + clinical,
and the hybrid (the run's image score stacked with them).

    python -m finetune.baselines --manifest manifest.csv --cache cache/ --splits run/splits.json \\
        --task classification --out baselines/ [--external external.csv] [--eval_sets big=big.csv] \\
        [--baselines clinical_only,radiomics]
    python -m finetune.baselines --out baselines/ --baselines hybrid --image_run run/
    python -m finetune.evaluate --predictions run/predictions.csv --manifest manifest.csv --baselines baselines/

Each baseline gets OUT/<name>/predictions.csv (one model per CV fold for its val rows, one on all non-test
rows for test, external and each --eval_sets cohort, as fine-tuning writes them) and OUT/<name>/baseline.json (each model's tuned
penalty and kept features) and OUT/<name>/model.json (the all-non-test-rows model as numbers,
finetune.baselines.linear_export); the radiomics features are cached in OUT/features.csv.

The hybrid (finetune.baselines.hybrid) reads the fine-tuning run's out-of-fold val and fold-ensemble held-out
predictions (RUN/predictions.csv), fits the first-level baselines it stacks on the same splits (or reuses them
from OUT when they were fitted there on those splits with the same settings), and writes OUT/hybrid/ as the
others, with the fitted stacker in OUT/hybrid/stacker.json, and OUT/hybrid/export/ (finetune.baselines.hybrid_export:
the stacker, each first-level model it reads, the radiomics settings) for
`python -m finetune.predict --model RUN/model --hybrid OUT/hybrid/export`. With --image_run, --manifest, --cache,
--splits, --task, --folds, --test_fraction and --seed default to the run's own (its config.yaml).
"""
from __future__ import annotations

import argparse
from pathlib import Path

import pandas as pd

from core.atomic import atomic_path, write_json
from core.cli import underscore_spellings
from core.errors import InputError, cli_entry
from finetune.baselines.clinical_models import BASELINES, make_baseline
from finetune.baselines.compare import HYBRID
from finetune.baselines.radiomics import (
    FEATURE_VERSION,
    REQUIRED,
    add_arguments,
    load_inputs,
    predict_splits,
    read_cohorts,
    split_defaults,
)

CHOICES = (*BASELINES, HYBRID)
MODEL_FILE = "model.json"  # OUT/<name>/: the all-non-test-rows model (linear_export.LinearBaseline)
# baseline.json keys that must match for a fitted baseline in --out to be reused by the hybrid
REUSE_KEYS = ("task", "seed", "manifest", "external", "eval_sets", "ring_mm", "bins", "clinical_columns",
              "feature_version", "splits_digest")


def _table(name: str, features: pd.DataFrame, df: pd.DataFrame, clinical: list[str]) -> pd.DataFrame:
    """What baseline `name` reads, indexed by subject_id: radiomics features, clinical columns, or both."""
    values = df.set_index(pd.Index(df["subject_id"].astype(str), name="subject_id"))[clinical]
    if name == "radiomics":
        return features
    return values if name == "clinical_only" else features.join(values, how="left")


def _clinical(cohorts: dict, flag: str, manifest: str) -> list[str]:
    """The clinical columns (--clinical-columns, else the development manifest's), checked in every cohort: each
    held-out one is predicted from its own values of them."""
    from data.manifest import check_not_image_paths, clinical_columns
    from data.prep_config import PrepConfig
    df = cohorts["df"]
    columns = [c.strip() for c in flag.split(",") if c.strip()] or clinical_columns(df, PrepConfig())
    if not columns:
        raise InputError(f"{manifest}: no clinical columns; pass --baselines radiomics, or --clinical-columns")
    absent = [c for c in columns if c not in df.columns]
    if absent:
        raise InputError(f"--clinical-columns: {absent} not in the manifest")
    check_not_image_paths(df, columns, f"--clinical-columns ({manifest})")
    for name, table in cohorts["held"].items():
        absent = [c for c in columns if c not in table.columns]
        if absent:
            raise InputError(f"{cohorts['held_paths'][name]}: clinical column(s) {absent} not found (the "
                             f"baselines predict the {name!r} cohort from its own values of {columns})")
    return columns


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(allow_abbrev=False, prog="python -m finetune.baselines",
                                description=__doc__.split("\n\n")[0])
    add_arguments(p, run_flag="--image_run")
    p.add_argument("--baselines", default=",".join(BASELINES),
                   help=f"comma-separated, of {list(CHOICES)}; {HYBRID} needs --image_run")
    p.add_argument("--clinical-columns", default="", help="comma-separated; default: the manifest's clinical columns")
    p.add_argument("--eval_sets", nargs="*", default=[], metavar="NAME=CSV",
                   help="more held-out cohorts, as python -m finetune --eval_sets: each baseline's all-rows model "
                        "(and the hybrid's stacker) predicts them under split NAME; never fitted on")
    p.add_argument("--image_run", default="",
                   help=f"for --baselines {HYBRID}: a python -m finetune output folder (config.yaml, predictions.csv, "
                        f"on the same --splits) whose out-of-fold image score the hybrid stacks with the baselines; "
                        f"--manifest, --cache, --splits, --task, --folds, --test_fraction and --seed default to the "
                        f"run's own (its config.yaml; a multitask run's --task must be given), and a flag given that "
                        f"contradicts the run (another task or other splits) is refused")
    p.add_argument("--hybrid_clinical", action="store_true",
                   help=f"for --baselines {HYBRID}: also give the stacker the clinical columns themselves, beside "
                        f"the first-level scores (default: the scores only)")
    return underscore_spellings(p)  # --clinical_columns as every command spells it


def _write(folder, pred: pd.DataFrame, meta: dict) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    with atomic_path(folder / "predictions.csv") as tmp:
        pred.to_csv(tmp, index=False)
    write_json(folder / "baseline.json", meta)
    print(f"wrote {folder / 'predictions.csv'} ({len(pred)} rows)")


def _reusable(folder, meta: dict, held_out: list[str]) -> pd.DataFrame | None:
    """The predictions of a baseline already fitted in `folder` with the same settings and splits (and its
    model.json beside them), else None."""
    import json

    from finetune.baselines.linear_export import LinearBaseline
    from finetune.evaluate import read_predictions
    try:
        saved = json.loads((folder / "baseline.json").read_text())
        pred = read_predictions(folder / "predictions.csv")
        LinearBaseline.load(folder / MODEL_FILE)  # a folder from before model.json existed is fitted again
    except (OSError, ValueError):
        return None
    same = isinstance(saved, dict) and all(saved.get(k) == meta[k] for k in REUSE_KEYS)
    return pred if same and set(held_out) <= set(pred["split"]) else None


@cli_entry
def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    names = [n.strip() for n in args.baselines.split(",") if n.strip()]
    unknown = [n for n in names if n not in CHOICES]
    if unknown or not names:
        raise InputError(f"--baselines {args.baselines!r}: expected a comma-separated subset of {list(CHOICES)}")
    if HYBRID not in names and (args.image_run or args.hybrid_clinical):
        raise InputError(f"--image_run / --hybrid_clinical: read by --baselines {HYBRID} only; add it to --baselines")
    args = _with_run_defaults(args)
    eval_sets = _eval_sets(args.eval_sets)
    run = _image_run(args, names, eval_sets)
    # every check of the whole input comes here, before the first volume is prepared or file written
    cohorts = read_cohorts(args, eval_sets)
    clinical = _clinical(cohorts, args.clinical_columns, args.manifest) if set(names) - {"radiomics"} else []
    if run is not None:
        from finetune.baselines.hybrid import check_stackable, val_folds
        check_stackable(cohorts["df"], val_folds(cohorts["splits"]), cohorts["task"],
                        clinical if args.hybrid_clinical else [])
    d = load_inputs(args, cohorts)
    held_out = (["test"] if len(d["splits"]["test"]) else []) + (["external"] if d["ext_df"] is not None else [])
    held_out += list(eval_sets)
    fitted = _fit_baselines(args, d, names, clinical, held_out)
    if run is not None:
        _export_hybrid(args, d["out"], _fit_hybrid(args, d, run, fitted, clinical, held_out))
    return 0


def _with_run_defaults(args):
    """Flags not given take --image_run's own (image_run.run_inputs), then the built-in defaults; InputError naming
    a required flag still missing."""
    from finetune.baselines.image_run import run_inputs
    given = run_inputs(args.image_run) if args.image_run else {}
    for name, value in ({**split_defaults(), **given}).items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    missing = [f"--{name}" for name in REQUIRED if getattr(args, name) is None]
    if missing:
        where = (f"; the --image_run {args.image_run} config names no {' or '.join(missing)}"
                 + (" (a multitask run: pass --task classification or survival)" if "--task" in missing else "")
                 if args.image_run else ", or --image_run RUN to take them from a fine-tuning run")
        raise InputError(f"{', '.join(missing)}: required{where}")
    return args


def _image_run(args, names: list[str], eval_sets: dict[str, str]) -> dict | None:
    """The fine-tuning run the hybrid stacks, read and checked (image_run.read_image_run); None without the hybrid."""
    if HYBRID not in names:
        return None
    from finetune.baselines.image_run import read_image_run
    if not args.image_run:
        raise InputError(f"--baselines {HYBRID}: needs --image_run RUN (a python -m finetune output folder)")
    held = ({"external": ("--external", args.external)} if args.external else {}) | {
        name: (f"--eval_sets {name}", csv) for name, csv in eval_sets.items()}
    return read_image_run(args.image_run, args.task, args.splits, held)


def _eval_sets(entries: list[str]) -> dict[str, str]:
    """--eval_sets NAME=CSV ... as fine-tuning reads them; "internal" also names the development cohort's features."""
    from finetune.config import parse_eval_sets
    sets = parse_eval_sets(entries)
    if "internal" in sets:
        raise InputError("--eval_sets internal=...: the name 'internal' is the development cohort's; choose another")
    return sets


def _fit_baselines(args, d: dict, names: list[str], clinical: list[str], held_out: list[str]) -> dict[str, pd.DataFrame]:
    """Fit each baseline asked for, and each one the hybrid stacks (reused from --out when fitted there alike)."""
    from data.splits import splits_digest
    from finetune.baselines.hybrid import FIRST_LEVEL
    from finetune.baselines.linear_export import export_model
    needed = list(FIRST_LEVEL[d["task"].name]) if HYBRID in names else []
    fitted = {}
    for name in [n for n in BASELINES if n in names or n in needed]:
        meta = {**vars(args), "baseline": name, "clinical_columns": clinical, "feature_version": FEATURE_VERSION,
                "splits_digest": splits_digest(d["splits"])}
        folder = d["out"] / name
        if name not in names and (reused := _reusable(folder, meta, held_out)) is not None:
            print(f"reused {folder / 'predictions.csv'} (fitted there on the same splits and settings)")
            fitted[name] = reused
            continue
        external = None if d["ext_df"] is None else _table(name, d["external"], d["ext_df"], clinical)
        more = {s: _table(name, d["eval_features"][s], df, clinical) for s, df in d["eval_dfs"].items()}
        final = []
        pred, params = predict_splits(_table(name, d["features"], d["df"], clinical), d["targets"], d["splits"],
                                      d["task"], args.seed, external, eval_sets=more,
                                      make_model=make_baseline(name, clinical), keep_final=final.append)
        _write(folder, pred, meta | {"models": params})
        export_model(final[0]).save(folder / MODEL_FILE)  # last: a folder without it is never reused
        fitted[name] = pred
    return fitted


def _fit_hybrid(args, d: dict, run: dict, fitted: dict, clinical: list[str], held_out: list[str]):
    """The stacker over the run's image score and the first-level baselines; OUT/hybrid/ as every baseline.
    Returns the final stacker (hybrid.Stacker)."""
    from data.splits import splits_digest
    from finetune.baselines.hybrid import FIRST_LEVEL, IMAGE, stack_predictions, val_folds
    task = d["task"]
    preds = {IMAGE: run["predictions"]} | {n: fitted[n] for n in FIRST_LEVEL[task.name]}

    def rows(table: pd.DataFrame, columns: list[str]) -> pd.DataFrame:
        return table[columns].assign(subject_id=table["subject_id"].astype(str))
    outcomes = rows(d["df"], ["subject_id", "patient_id", *task.columns, *clinical])
    # each held-out cohort is stacked from its own clinical values: a subject id may repeat across cohorts
    cohorts = {"test": d["df"]} | ({"external": d["ext_df"]} if d["ext_df"] is not None else {}) | d["eval_dfs"]
    held_rows = {split: rows(table, ["subject_id", *clinical]) for split, table in cohorts.items()}
    stack_clinical = clinical if args.hybrid_clinical else []
    pred, stacker, per_fold = stack_predictions(preds, outcomes, task, held_out, stack_clinical, args.seed,
                                                val_folds(d["splits"]), held_rows)
    folder = d["out"] / HYBRID
    files = {IMAGE: str(run["path"] / "predictions.csv")} | {
        n: str(d["out"] / n / "predictions.csv") for n in FIRST_LEVEL[task.name]}
    stacker.first_level = {n: f for n, f in files.items() if n in stacker.inputs}  # a dropped input is not read
    _write(folder, pred, {**vars(args), "baseline": HYBRID, "clinical_columns": clinical,
                          "stacker_clinical_columns": stack_clinical, "first_level": stacker.first_level,
                          "splits_digest": splits_digest(d["splits"]), "models": per_fold})
    stacker.save(folder / "stacker.json")
    return stacker


def _export_hybrid(args, out, stacker) -> None:
    """OUT/hybrid/export/: the stacker and the first-level models it reads, for python -m finetune.predict --hybrid."""
    from finetune.baselines.hybrid_export import exported_inputs, image_model_digest, write_export
    from finetune.baselines.linear_export import LinearBaseline
    from finetune.baselines.radiomics import baseline_prep
    models = {n: LinearBaseline.load(out / n / MODEL_FILE) for n in exported_inputs(stacker) if n in BASELINES}
    write_export(out / HYBRID / "export", stacker, models, args.ring_mm, args.bins, baseline_prep(),
                 image_model_digest(Path(args.image_run) / "model"))
    print(f"wrote {out / HYBRID / 'export'} (python -m finetune.predict --hybrid reads it)")


if __name__ == "__main__":
    raise SystemExit(main())
