"""Score new patients with the hybrid: `python -m finetune.predict --model RUN/model --hybrid OUT/hybrid/export`.

For each row the image model scored (its drawn mask, or the lesion finetune.predict found), as the hybrid was
fitted (finetune.baselines.__main__):

1. the radiomics features of its image and mask: the row prepared as the baselines prepare it (the export's
   prep) and finetune.baselines.radiomics_features.extract_features with the export's ring_mm and bins;
2. each first-level baseline's score from those features and the row's clinical values
   (linear_export.LinearBaseline, from JSON);
3. the image model's score: the fold ensemble's, as finetune.predict computes it;
4. the stacker over them (hybrid.Stacker, from JSON) -> hybrid_prob (label) or hybrid_risk (survival).

`load_hybrid` reads and checks the export folder, the manifest's columns and the model's task before any row is
prepared; `hybrid_scores` does the rest.
"""
from __future__ import annotations

import numpy as np
import pandas as pd

from core.errors import InputError
from finetune.baselines.hybrid import IMAGE
from finetune.baselines.hybrid_export import HybridExport, image_model_digest, read_export
from models.tasks import get_task


def hybrid_column(export: HybridExport) -> str:
    """The output column of the hybrid's score, beside the image model's prob / risk."""
    return f"hybrid_{export.score}"


def load_hybrid(folder, df: pd.DataFrame, manifest, model_task: str, model) -> HybridExport:
    """The export folder read, checked against the manifest (the clinical and image columns the hybrid reads)
    and the model (it predicts the hybrid's score, and is the model whose scores the stacker was fitted on); one
    InputError line each."""
    export = read_export(folder)
    have = get_task(model_task)
    if not (have.label if get_task(export.task).label else have.survival):
        raise InputError(f"--hybrid {folder}: a {export.task} hybrid (it reads and gives {export.score!r}); --model "
                         f"{model} is --task {model_task}, with no {export.score!r} output")
    needed = export.clinical_columns() + (export.prep.image_columns() if export.needs_radiomics() else [])
    missing = [c for c in needed if c not in df.columns]
    if missing:
        raise InputError(f"{manifest}: column(s) {missing} missing; the hybrid (--hybrid {folder}) reads {needed}")
    if export.image and (digest := image_model_digest(model)) != export.image_model:
        # the stacker's weights were fitted to one model's scores: another model's (another run, a retrained or
        # single fold) would be stacked without an error and give wrong hybrid scores
        raise InputError(f"--hybrid {folder}: stacked on the scores of another image model than --model {model} "
                         f"(weights digest {str(export.image_model)[:12]}, --model's {str(digest)[:12]}); use the "
                         f"export of --model's own run (its hybrid/ folder from python -m finetune --hybrid, or "
                         f"python -m finetune.baselines --baselines hybrid --image_run on that run)")
    return export


def hybrid_scores(export: HybridExport, rows: pd.DataFrame, image_scores: pd.DataFrame,
                  cache_dir: str) -> tuple[pd.DataFrame, list[tuple[str, str]]]:
    """(subject_id and the hybrid's score for every row of `image_scores` it could score, the rows it could not
    with the reason). rows: the manifest rows the image model scored (subject_id, mask: drawn or found, the
    clinical and image columns); image_scores: subject_id and the image model's prob / risk."""
    table = image_scores[["subject_id", export.score]].rename(columns={export.score: IMAGE})
    table = table.merge(rows[["subject_id", *export.clinical_columns()]], on="subject_id", validate="one_to_one")
    failed: list[tuple[str, str]] = []
    if export.needs_radiomics():
        features, failed = radiomics_features(export, rows[rows["subject_id"].isin(table["subject_id"])], cache_dir)
        table = table.merge(features, on="subject_id", validate="one_to_one")  # a failed row has no features
    for name, model in export.baselines.items():
        table[name] = model.predict(table)
    for name in export.stacker.inputs:
        if name != IMAGE and name not in export.baselines:  # dropped: its weight is 0, any finite value will do
            table[name] = 0.5 if export.score == "prob" else 0.0
    return pd.DataFrame({"subject_id": table["subject_id"].to_numpy(),
                         hybrid_column(export): export.stacker.predict(table)}), failed


def radiomics_features(export: HybridExport, rows: pd.DataFrame, cache_dir: str
                       ) -> tuple[pd.DataFrame, list[tuple[str, str]]]:
    """(subject_id and the radiomics features of each row, the rows that could not be prepared or measured
    with the reason): prepared with the export's prep, measured as finetune.baselines.radiomics does."""
    from data.cache import CacheEntry
    from data.prepare import prepare_table
    from finetune.baselines.radiomics_features import extract_features
    todo = rows.drop(columns=[c for c in rows.columns if c.startswith("cache_")])
    good, failed = prepare_table(todo, export.prep, cache_dir, require_lesion=True, on_error="collect")
    measured = []
    for _, row in good.iterrows():
        entry = CacheEntry.from_path(row["cache_image"])
        try:
            feats = extract_features(entry.image()[0], entry.mask()[0], entry.meta["spacing"], export.ring_mm,
                                     export.bins)
        except InputError as e:
            failed.append((row["subject_id"], str(e)))
            continue
        measured.append({"subject_id": row["subject_id"], **feats})
    columns = ["subject_id", *sorted({c for m in export.baselines.values() for c in m.radiomics_columns})]
    table = pd.DataFrame(measured, columns=None if measured else columns)
    return table.astype({c: np.float64 for c in table.columns if c != "subject_id"}), failed
