"""Fit the baselines a user fits first on the fine-tuning run's splits: clinical-only, radiomics, radiomics + clinical.

    python -m finetune.baselines --manifest manifest.csv --cache cache/ --splits run/splits.json \\
        --task classification --out baselines/ [--external external.csv] [--baselines clinical_only,radiomics]
    python -m finetune.evaluate --predictions run/predictions.csv --manifest manifest.csv --baselines baselines/

Each baseline gets OUT/<name>/predictions.csv (one model per CV fold for its val rows, one on all non-test
rows for test and external, as fine-tuning writes them) and OUT/<name>/baseline.json (each model's tuned
penalty and kept features); the radiomics features are cached in OUT/features.csv.
"""
from __future__ import annotations

import argparse

import pandas as pd

from core.atomic import atomic_path, write_json
from core.cli import underscore_spellings
from core.errors import InputError, cli_entry
from finetune.baselines.clinical_models import BASELINES, make_baseline
from finetune.baselines.radiomics import FEATURE_VERSION, add_arguments, load_inputs, predict_splits


def _table(name: str, features: pd.DataFrame, df: pd.DataFrame, clinical: list[str]) -> pd.DataFrame:
    """What baseline `name` reads, indexed by subject_id: radiomics features, clinical columns, or both."""
    values = df.set_index(pd.Index(df["subject_id"].astype(str), name="subject_id"))[clinical]
    if name == "radiomics":
        return features
    return values if name == "clinical_only" else features.join(values, how="left")


def _clinical(df: pd.DataFrame, flag: str) -> list[str]:
    from data.manifest import clinical_columns
    from data.prep_config import PrepConfig
    columns = [c.strip() for c in flag.split(",") if c.strip()] or clinical_columns(df, PrepConfig())
    absent = [c for c in columns if c not in df.columns]
    if absent:
        raise InputError(f"--clinical-columns: {absent} not in the manifest")
    return columns


@cli_entry
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(allow_abbrev=False, prog="python -m finetune.baselines",
                                description=__doc__.split("\n\n")[0])
    add_arguments(p)
    p.add_argument("--baselines", default=",".join(BASELINES), help=f"comma-separated, of {list(BASELINES)}")
    p.add_argument("--clinical-columns", default="", help="comma-separated; default: the manifest's clinical columns")
    args = underscore_spellings(p).parse_args(argv)  # --clinical_columns as every command spells it
    names = [n.strip() for n in args.baselines.split(",") if n.strip()]
    unknown = [n for n in names if n not in BASELINES]
    if unknown or not names:
        raise InputError(f"--baselines {args.baselines!r}: expected a comma-separated subset of {list(BASELINES)}")
    d = load_inputs(args)
    clinical = _clinical(d["df"], args.clinical_columns) if set(names) - {"radiomics"} else []
    if not clinical and set(names) - {"radiomics"}:
        raise InputError(f"{args.manifest}: no clinical columns; pass --baselines radiomics, or --clinical-columns")
    for name in names:
        external = None if d["ext_df"] is None else _table(name, d["external"], d["ext_df"], clinical)
        pred, params = predict_splits(_table(name, d["features"], d["df"], clinical), d["targets"], d["splits"],
                                      d["task"], args.seed, external, make_model=make_baseline(name, clinical))
        folder = d["out"] / name
        folder.mkdir(parents=True, exist_ok=True)
        with atomic_path(folder / "predictions.csv") as tmp:
            pred.to_csv(tmp, index=False)
        write_json(folder / "baseline.json", {**vars(args), "baseline": name, "clinical_columns": clinical,
                                              "feature_version": FEATURE_VERSION, "models": params})
        print(f"wrote {folder / 'predictions.csv'} ({len(pred)} rows)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
