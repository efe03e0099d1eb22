"""Predict with a fine-tuned model folder (or the fold ensemble) on a new manifest.

    python -m finetune.predict --model runs/ft/model --manifest new.csv --out predictions.csv

A row with no mask (no mask column, an empty cell, or a mask file without a lesion) is segmented first by
a segmenter (--seg_model, default --model itself: a ViT run's with a segmentation head, or a CNN run's,
--seg_arch dynunet|segresnet, so a CNN may segment and the pretrained ViT predict the outcome; either
trained on windows anywhere in the head, not lesion crops only; --tta averages each window over its flips): finetune.lesion.search scores every lesion candidate inside the brain and
writes them all to <out stem>_masks/candidates.csv (rank, score, whether confident, world RAS centroid,
volume), and the index lesion, the best candidate, as <out stem>_masks/<subject_id>_pred_mask.nii.gz on the
image's own grid; its path goes into the `predicted_mask` column, and the outcome is then predicted from it.
A row whose best candidate is below the confidence threshold gets no outcome: its `lesion_status` says
no_confident_lesion (with --accept_low_confidence it takes that candidate, marked low_confidence_accepted);
a drawn mask's row says drawn, a confident one found. The row is prepared again with
that mask, exactly as a drawn one, so a PET channel's TBR reference leaves the found lesion out (the
segmentation itself reads a preparation without a mask, whose reference still holds it).

The manifest is checked as a whole first (the clinical columns the model was trained on): a missing
column is one line and exit code 2, before any preprocessing, and no output file is written. Then every
row is validated on its own (files, grids, mask, clinical values against the saved schema); bad rows are
named on the console and listed with their reasons in `<out>.rejected.csv`, and the good ones are still
predicted. The crops follow the model's input contract (input_spec.json).

With --hybrid OUT/hybrid/export (python -m finetune.baselines --baselines hybrid, on the run --model comes from),
or without the flag where --model has a hybrid/ folder (python -m finetune --hybrid), each scored row also
gets the hybrid's score, hybrid_prob or hybrid_risk (finetune.baselines.hybrid_predict).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from core.atomic import atomic_path
from core.errors import InputError, cli_entry
from finetune.clinical import unseen_categories_reported_once
from finetune.lesion.candidates import CONFIDENCE_THRESHOLD
from models.cnn_segmenter import CNNSegmenter, load_fold_model
from models.input_spec import load_input_spec
from models.multimodal import MultimodalModel
from models.tasks import output_scores

MAX_NAMED = 5  # rejected rows named on the console before "and N more"
RUN_HYBRID = "hybrid"  # <run>/model/hybrid/: the hybrid's export python -m finetune --hybrid writes beside the folds


def model_folders(path: str | Path) -> list[Path]:
    """A single model folder, or every fold folder listed by an ensemble folder's ensemble.json."""
    path = Path(path)
    if (path / "ensemble.json").is_file():
        folds = json.loads((path / "ensemble.json").read_text())["folds"]
        return [path / Path(f).name for f in folds]
    if (path / "config.json").is_file():
        return [path]
    raise InputError(f"{path}: not a fine-tuned model folder (no config.json or ensemble.json)")


def load_model(folder: str | Path) -> tuple[MultimodalModel | CNNSegmenter, dict]:
    """The model in eval mode (a fine-tuned ViT, or a CNN segmenter: by its config.json), and its saved config
    plus "schema" (ClinicalSchema or None) and "spec" (the input contract)."""
    model, config = load_fold_model(folder)
    model.eval()
    schema = None
    if config.get("clinical_schema"):
        from finetune.clinical import ClinicalSchema
        schema = ClinicalSchema.from_dict(config["clinical_schema"])
    return model, {**config, "schema": schema, "spec": load_input_spec(folder)}


def subject_inputs(row, meta: dict) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
    """x [C + 1, S, S, S] (the contract's image channels, then the mask), clinical [F], and the crop's
    voxel-to-world affine."""
    from data.cache import CacheEntry
    from data.crops import lesion_crop, lesion_crop_with_affine
    from data.datasets import pad_values_of
    entry = CacheEntry.from_path(row["cache_image"])
    spec, view = meta["spec"], meta["spec"].view_voxels()
    image, mask, pads = entry.image(), entry.mask(), pad_values_of(entry.image_path)
    x, affine = lesion_crop_with_affine(image, mask, spec.input_size, view["margin_vox"],
                                        np.asarray(entry.meta["affine"]), min_size=view["min_side_vox"], pad_value=pads)
    if view["wide_margin_vox"] is not None:  # the peritumoral crop after the lesion crop
        wide = lesion_crop(image, mask, spec.input_size, view["wide_margin_vox"], min_size=view["min_side_vox"],
                           pad_value=pads)
        x = np.concatenate([x, wide])  # [2 (C + 1), S, S, S]
    schema = meta["schema"]
    clin = schema.transform(pd.DataFrame([row]))[0] if schema is not None else np.zeros(0, np.float32)
    return torch.as_tensor(x), torch.as_tensor(clin), affine


def check_manifest(df: pd.DataFrame, meta: dict, manifest: str) -> None:
    """Whole-manifest checks that need no image: the clinical columns the model was trained on."""
    needed = list(meta["schema"].columns) if meta["schema"] is not None else []
    missing = [c for c in needed if c not in df.columns]
    if missing:
        raise InputError(f"{manifest}: clinical column(s) {missing} missing; the model was trained on "
                         f"{needed}")


def validate_rows(df: pd.DataFrame, meta: dict, cache_dir: str) -> tuple[pd.DataFrame, list[tuple[str, str]]]:
    """Prepare each row on its own; a bad file or clinical value rejects only that row."""
    from data.prepare import prepare_table
    good, rejected = prepare_table(df, meta["spec"].prep, cache_dir, require_lesion=True, on_error="collect")
    schema = meta["schema"]
    if schema is not None and len(good):
        keep = []
        for i, row in good.iterrows():
            try:
                schema.transform(pd.DataFrame([row]))
                keep.append(i)
            except InputError as e:
                rejected.append((row["subject_id"], str(e)))
        good = good.loc[keep]
    return good.reset_index(drop=True), rejected


@torch.no_grad()
def predict_table(folders: list[Path], df: pd.DataFrame, cache_dir: str,
                  first: tuple[MultimodalModel, dict] | None = None) -> tuple[pd.DataFrame, list]:
    """`first`: folders[0] already loaded (main loads it once for the manifest check)."""
    first_model, first_meta = first if first is not None else load_model(folders[0])
    good, rejected = validate_rows(df, first_meta, cache_dir)
    per_model: list[dict[str, list[float]]] = []
    for folder in folders:
        model, meta = (first_model, first_meta) if folder == folders[0] else load_model(folder)
        scores: dict[str, list[float]] = {}
        for _, row in good.iterrows():
            x, clin, _ = subject_inputs(row, meta)
            out = model(x[None] if model.config.fusion != "clinical_only" else None, clin[None])
            for k, v in output_scores(out, meta.get("time_bins")).items():
                scores.setdefault(k, []).append(v.item())
        per_model.append(scores)
    res = pd.DataFrame({"subject_id": good["subject_id"].to_numpy()})
    for k in per_model[0] if len(good) else []:
        res[k] = np.mean([m[k] for m in per_model], axis=0)  # the fold ensemble: mean prob / mean risk
    return res, rejected


def needs_mask(df: pd.DataFrame) -> np.ndarray:
    """[N] bool: rows with no mask to read (no column, an empty cell, or a mask file with no lesion voxel).
    A mask path that does not exist is not one of them: validation names it as a bad file."""
    import nibabel as nib
    if "mask" not in df.columns:
        return np.ones(len(df), bool)
    out = []
    for m in df["mask"]:
        if not isinstance(m, str) or not m.strip():
            out.append(True)
        elif Path(m).is_file():
            try:
                out.append(not np.asanyarray(nib.load(m).dataobj).any())
            except Exception:  # an unreadable file is validation's to report, with its reason
                out.append(False)
        else:
            out.append(False)
    return np.array(out, bool)


def segmenting_models(path: str | Path) -> list[MultimodalModel | CNNSegmenter]:
    """The fold models of `path`, either kind (a ViT with a segmentation head, or a CNN segmenter), each
    trained for whole-head search (on windows anywhere in the head, not lesion crops only); InputError
    naming the first that is not."""
    from finetune.fold import SEG_WINDOWS_KEY
    loaded = {folder: load_model(folder) for folder in model_folders(path)}
    if not all(m.config.segments for m, _ in loaded.values()):
        raise InputError(f"{path}: has no segmentation head, and some rows have no mask; pass --seg_model with "
                         "a model trained with --task segmentation or --seg_weight > 0")
    old = [folder for folder, (_, meta) in loaded.items() if not meta.get(SEG_WINDOWS_KEY)]
    if old:
        raise InputError(f"{old[0]}: its segmentation head trained on lesion crops only (config.json has no "
                         f"{SEG_WINDOWS_KEY}), so it was never shown the rest of a head; fine-tune it again with "
                         "this version before segmenting rows without a mask")
    return [m for m, _ in loaded.values()]


def fill_masks(df: pd.DataFrame, need: np.ndarray, models: list, spec, cache_dir: str, masks_dir: Path,
               surface_margin_mm: float, accept_low_confidence: bool = False,
               tta: bool = False, threshold: float = CONFIDENCE_THRESHOLD,
               overlap: float | None = None) -> tuple[pd.DataFrame, list[tuple[str, str]]]:
    """Segment the rows in `need` and point their mask at the written NIfTI; (table, rejected rows).
    The table gains mask_source ("given" / "predicted"), lesion_status (finetune/lesion/candidates.py),
    search_region, predicted_mask and predicted_volume_ml, and, where a row's drawn mask was set aside
    (--segment_all), dice_vs_given. A row with no confident lesion keeps no mask (`scored_rows` leaves it
    out). Every candidate of every segmented row goes to <masks_dir>/candidates.csv; `threshold`: the score the
    best one must reach to be taken (predict --confidence_threshold); `overlap`: the sliding window's (None:
    the search's default)."""
    from data.prepare import prepare_table
    from engine.logs import progress
    from finetune.lesion.search import search_lesion
    from finetune.lesion.candidates import DRAWN
    df = df.copy()
    df["mask_source"] = np.where(need, "predicted", "given")
    df["lesion_status"], df["search_region"] = np.where(need, "", DRAWN), ""
    df["predicted_mask"], df["predicted_volume_ml"] = "", np.nan
    if "mask" in df.columns:  # a mask column of blanks reads as float NaN; it receives paths below
        df["mask"] = df["mask"].astype(object)
    todo = df[need].drop(columns=["mask"], errors="ignore")
    good, rejected = prepare_table(todo, spec.prep, cache_dir, require_lesion=False, on_error="collect")
    masks_dir.mkdir(parents=True, exist_ok=True)
    if tta:
        from finetune.lesion.search import FlipAveraged
        models = [FlipAveraged(m) for m in models]
    found = []
    bar = progress(len(good), 0, True, "segmenting rows without a mask")
    for _, row in good.iterrows():
        try:
            found.append((row["subject_id"], search_lesion(models, row, spec, masks_dir, surface_margin_mm,
                                                           accept_low_confidence=accept_low_confidence, threshold=threshold,
                                                           **({} if overlap is None else {"overlap": overlap}))))
        except InputError as e:
            rejected.append((row["subject_id"], str(e)))
        bar.update(1)
    bar.close()
    write_candidates(masks_dir / "candidates.csv", found)
    lost = {sid for sid, _ in rejected}
    df = df[~df["subject_id"].isin(lost)].set_index("subject_id", drop=False)
    for sid, res in found:
        path = str(res.mask_path) if res.mask_path is not None else ""
        given = df.loc[sid, "mask"] if "mask" in df.columns else None
        if isinstance(given, str) and Path(given).is_file():  # --segment_all on a drawn mask: how close?
            df.loc[sid, "dice_vs_given"] = dice_on_grid(path, given) if path else 0.0  # no lesion: a miss
        df.loc[sid, ["mask", "predicted_mask", "predicted_volume_ml", "lesion_status", "search_region"]] = [
            path, path, res.volume_ml, res.status, res.region]
    return df.reset_index(drop=True), rejected


def write_candidates(path: Path, found: list) -> None:
    """Every candidate of every segmented row (subject_id, then finetune/lesion/candidates.py's columns)."""
    from finetune.lesion.candidates import COLUMNS
    tables = [res.candidates.assign(subject_id=sid) for sid, res in found]
    table = pd.concat(tables, ignore_index=True) if tables else pd.DataFrame(columns=["subject_id", *COLUMNS])
    with atomic_path(path) as tmp:
        table[["subject_id", *COLUMNS]].to_csv(tmp, index=False)


def scored_rows(df: pd.DataFrame) -> pd.DataFrame:
    """The rows that get an outcome: all but those flagged with no confident lesion."""
    from finetune.lesion.candidates import NO_CONFIDENT
    return df[df["lesion_status"] != NO_CONFIDENT] if "lesion_status" in df.columns else df


def dice_on_grid(pred_path: str, given_path: str) -> float:
    """Dice of two masks on the same voxel grid (the predicted mask is written on the image's, as the
    given one must be); NaN when the grids differ."""
    import nibabel as nib
    from finetune.lesion.seg_metrics import dice_scores
    a, b = (torch.as_tensor(np.asanyarray(nib.load(p).dataobj) > 0.5)[None, None] for p in (pred_path, given_path))
    if a.shape != b.shape:
        return float("nan")
    return float(dice_scores(a, b)[0])


def rejected_summary(rejected: list[tuple[str, str]]) -> str:
    named = "; ".join(f"{sid}: {reason}" for sid, reason in rejected[:MAX_NAMED])
    more = f"; and {len(rejected) - MAX_NAMED} more" if len(rejected) > MAX_NAMED else ""
    return f"rejected {len(rejected)} row(s): {named}{more}"


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m finetune.predict", description=__doc__.splitlines()[0],
                                 allow_abbrev=False)
    ap.add_argument("--model", required=True, help="fine-tuned model folder, or the model/ folder of a run (fold ensemble)")
    ap.add_argument("--manifest", required=True, help="CSV with subject_id, the model's image columns (its "
                    "input_spec.json, e.g. image, or t1ce, flair, pet), optionally mask (rows without one "
                    "are segmented), the model's clinical columns, and optionally lesion_x_mm, lesion_y_mm, "
                    "lesion_z_mm: a lesion centre in world RAS mm that picks the index lesion")
    ap.add_argument("--out", required=True, help="output CSV: subject_id, prob and/or risk (+ mask_source, "
                    "predicted_mask, predicted_volume_ml); predicted masks go to <out stem>_masks/")
    ap.add_argument("--seg_model", default="", help="model (folder or run model/ folder) that segments rows without "
                    "a mask: a ViT run's with a segmentation head, or a CNN run's (--seg_arch dynunet|segresnet), "
                    "so the outcome model (--model) and the segmenter may differ (default: --model, when it has a "
                    "segmentation head)")
    ap.add_argument("--segment_all", action="store_true", help="segment every row, ignoring the manifest's masks: "
                    "what the outcome would be without a drawn mask; the CSV gains dice_vs_given (the masks stay "
                    "untouched on disk)")
    ap.add_argument("--surface_margin_mm", type=float, default=10.0, help="the fallback search region when no "
                    "brain is found (no brain_mask column, and data.brain's estimate is empty): a candidate "
                    "mostly shallower than this below the head's surface is taken for scalp or skull and passed "
                    "over (default 10; 0 keeps every candidate). Otherwise lesions are searched for in the brain")
    ap.add_argument("--accept_low_confidence", action="store_true", help="a row whose best lesion candidate scores "
                    "below the confidence threshold (finetune/lesion/candidates.py) takes it anyway: its mask and "
                    "outcome are written, lesion_status low_confidence_accepted. Without this flag such a row is "
                    "flagged no_confident_lesion and gets no outcome")
    ap.add_argument("--tta", action="store_true", help="test-time flips: each sliding window's lesion probability "
                    "is the mean over its 8 axis flips (8x the search's compute). Off by default until measured on "
                    "whole heads")
    ap.add_argument("--cache_dir", default="", help="preprocessing cache (default: a cache/ folder next to --out)")
    ap.add_argument("--hybrid", default="", help="a hybrid's export folder (python -m finetune.baselines --baselines "
                    "hybrid writes OUT/hybrid/export, stacked on the run --model comes from; an export stacked on "
                    "another model's scores is refused, by a digest of the fold models): adds hybrid_prob "
                    "(label) or hybrid_risk (survival), the stacker over this model's score and the baselines' "
                    "(radiomics of each row's drawn or found lesion, its clinical columns); the manifest then "
                    "needs the clinical columns the hybrid reads. Default: --model's hybrid/ folder where it has "
                    "one (python -m finetune --hybrid writes RUN/model/hybrid)")
    ap.add_argument("--overlap", type=float, default=None, help="the whole-head search's sliding-window overlap, "
                    "in [0, 1) (default 0.25, MONAI's; finetune/lesion/search.py). 0 runs the fewest windows: about "
                    "a quarter less time a head at 2 mm (docs/BENCHMARKS.md); what it costs in detection is not "
                    "measured")
    ap.add_argument("--confidence_threshold", type=float, default=CONFIDENCE_THRESHOLD, help="the score a row's best "
                    "lesion candidate must reach to be taken as its lesion (finetune/lesion/candidates.py's score, in "
                    f"[0, 1]; default {CONFIDENCE_THRESHOLD}, a documented default). Choose it for your segmenter on "
                    "validation heads: python -m benchmarks.research.lesion_finder reports the threshold its rule "
                    "chose and this flag with it")
    return ap


@cli_entry
def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    if args.overlap is not None and not 0 <= args.overlap < 1:
        raise InputError(f"--overlap {args.overlap}: must lie in [0, 1)")
    if not 0 <= args.confidence_threshold <= 1:
        raise InputError(f"--confidence_threshold {args.confidence_threshold}: must lie in [0, 1]")
    if args.surface_margin_mm < 0:
        raise InputError(f"--surface_margin_mm {args.surface_margin_mm}: must be >= 0")
    from data.manifest import read_manifest
    folders = model_folders(args.model)
    first = load_model(folders[0])
    # The image channels are the contract's, read by column name: a missing one is one line, before any work.
    df = read_manifest(args.manifest, columns=("image",), purpose=f"predict with {args.model}", check_files=False,
                       prep=first[1]["spec"].prep)
    outcome = first[0].config.predicts_outcome
    if outcome:
        check_manifest(df, first[1], args.manifest)
    hybrid = read_hybrid(args, df, first[0].config.task)  # checked before any preprocessing; None without --hybrid
    need = np.ones(len(df), bool) if args.segment_all else needs_mask(df)
    if not outcome and not need.any():
        raise InputError(f"{args.model} is a segmentation model and every row of {args.manifest} has a mask: "
                         "nothing to predict (drop the mask column to segment, or pass an outcome model)")
    seg_models = segmenting_models(args.seg_model or args.model) if need.any() else []
    cache = args.cache_dir or str(Path(args.out).resolve().parent / "cache")
    rejected: list[tuple[str, str]] = []
    if need.any():
        seg_spec = load_input_spec(model_folders(args.seg_model or args.model)[0])
        masks_dir = Path(args.out).parent / f"{Path(args.out).stem}_masks"
        df, rejected = fill_masks(df, need, seg_models, seg_spec, cache, masks_dir, args.surface_margin_mm,
                                  args.accept_low_confidence, args.tta, args.confidence_threshold,
                                  args.overlap)
    res = df[["subject_id"]].copy()
    scored = scored_rows(df)
    if outcome and len(scored):
        with unseen_categories_reported_once():
            outcomes, more = predict_table(folders, scored, cache, first)
        rejected += more
        kept = set(outcomes["subject_id"]) | set(df["subject_id"][~df["subject_id"].isin(scored["subject_id"])])
        res = res[res["subject_id"].isin(kept)].merge(outcomes, on="subject_id", how="left")  # flagged: no outcome
        if hybrid is not None:
            res = add_hybrid(res, hybrid, scored, outcomes, cache)
    if need.any():
        extra = [c for c in ("mask_source", "lesion_status", "search_region", "predicted_mask", "predicted_volume_ml",
                             "dice_vs_given") if c in df.columns]
        res = res.merge(df[["subject_id", *extra]], on="subject_id")
    write_outputs(res, rejected, args, len(folders))
    return 0


def read_hybrid(args, df: pd.DataFrame, model_task: str):
    """--hybrid's export, else --model's own hybrid/ folder where it has one (finetune.baselines.hybrid_predict.
    load_hybrid: its files, the manifest's columns and the model's task checked), or None."""
    folder = args.hybrid or (Path(args.model) / RUN_HYBRID if (Path(args.model) / RUN_HYBRID).is_dir() else "")
    if not folder:
        return None
    from finetune.baselines.hybrid_predict import load_hybrid
    return load_hybrid(folder, df, args.manifest, model_task, args.model)


def add_hybrid(res: pd.DataFrame, hybrid, scored: pd.DataFrame, outcomes: pd.DataFrame, cache: str) -> pd.DataFrame:
    """res with the hybrid's score column (finetune.baselines.hybrid_predict); a row it cannot score keeps its
    image score, and is named on the console."""
    from finetune.baselines.hybrid_predict import hybrid_scores
    scores, failed = hybrid_scores(hybrid, scored, outcomes, cache)
    if failed:
        print(f"hybrid: no score for {rejected_summary(failed).removeprefix('rejected ')}")
    return res.merge(scores, on="subject_id", how="left")


def write_outputs(res: pd.DataFrame, rejected: list, args, n_models: int) -> None:
    """The output CSV and <out>.rejected.csv (removed when nothing was rejected); nothing when no row survived."""
    rej_path = Path(args.out).with_suffix(".rejected.csv")
    if rejected:
        with atomic_path(rej_path) as tmp:
            pd.DataFrame(rejected, columns=["subject_id", "reason"]).to_csv(tmp, index=False)
    elif rej_path.exists():
        rej_path.unlink()
    if not len(res):
        raise InputError(f"{args.manifest}: no row could be predicted; {rejected_summary(rejected)} "
                         f"(reasons in {rej_path}); no output written")
    with atomic_path(args.out) as tmp:
        res.to_csv(tmp, index=False)
    print(f"predicted {len(res)} subject(s) with {n_models} model(s) -> {args.out}")
    from finetune.lesion.candidates import NO_CONFIDENT
    flagged = int((res["lesion_status"] == NO_CONFIDENT).sum()) if "lesion_status" in res.columns else 0
    if flagged:
        print(f"{flagged} row(s) have no outcome: lesion_status {NO_CONFIDENT} (their candidates are in the "
              "masks folder's candidates.csv; --accept_low_confidence takes the best)")
    if rejected:
        print(f"{rejected_summary(rejected)} (all reasons in {rej_path})")


if __name__ == "__main__":
    raise SystemExit(main())
