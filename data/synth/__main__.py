"""CLI: python -m data.synth --out DIR --n_unlabeled N --n_labeled M --n_external K --seed S [--workers W]

`--sequences t1ce,flair,pet` adds FLAIR and FET-PET volumes and their manifest columns (default: t1ce only).
Every generator parameter is also a flag (e.g. --site_b.noise 0.08, --outcome.image_weight 0.7) or
a key in --config FILE.yaml; the resolved values are saved in DIR/cohort.json. Flags are spelt with
underscores, as every mimfm command's; the hyphenated spellings (--n-labeled) are kept as aliases.
"""
from __future__ import annotations

import argparse

from core.cli import parse_config
from core.errors import cli_entry
from data.synth.cohort import generate_cohort
from data.synth.params import CohortParams


def build_parser() -> argparse.ArgumentParser:
    usage = ("python -m data.synth --out DIR [--n_unlabeled N] [--n_labeled M] [--n_external K] [--seed S] "
             "[--workers W] [--sequences t1ce[,flair][,pet]] [--overwrite] [--no_progress] [--config FILE] "
             "[--SECTION.PARAM V ...]")
    p = argparse.ArgumentParser(allow_abbrev=False, prog="python -m data.synth", usage=usage, description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="output directory (created; replaced only with --overwrite)")
    p.add_argument("--n_unlabeled", "--n-unlabeled", dest="n_unlabeled", type=int, default=24,
                   help="unlabelled volumes (pretraining data)")
    p.add_argument("--n_labeled", "--n-labeled", dest="n_labeled", type=int, default=40,
                   help="labelled site-A patients (manifest.csv)")
    p.add_argument("--n_external", "--n-external", dest="n_external", type=int, default=12,
                   help="labelled site-B patients (external.csv)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=1, help="parallel processes; results do not depend on it")
    p.add_argument("--overwrite", action="store_true", help="replace an existing cohort in --out")
    p.add_argument("--no_progress", "--no-progress", dest="no_progress", action="store_true",
                   help="hide the progress bar")
    return p


@cli_entry
def main(argv=None) -> int:
    params, ns = parse_config(CohortParams, argv, parser=build_parser())
    out = generate_cohort(ns.out, ns.n_unlabeled, ns.n_labeled, ns.n_external, ns.seed, ns.workers,
                          overwrite=ns.overwrite, progress=not ns.no_progress, params=params)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
