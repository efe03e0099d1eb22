"""Predict with a fine-tuned model folder (or the fold ensemble) on a new manifest.

    python -m finetune.predict --model runs/ft/model --manifest new.csv --out predictions.csv

Every row is validated on its own (files, grids, mask, clinical values against the saved schema);
bad rows are listed with their reasons in `<out>.rejected.csv` and the good ones are still predicted.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from data.atomic import atomic_path
from data.errors import InputError, cli_entry
from data.prepare import PrepConfig
from models.multimodal import MultimodalModel


def model_folders(path: str | Path) -> list[Path]:
    """A single model folder, or every fold folder listed by an ensemble folder's ensemble.json."""
    path = Path(path)
    if (path / "ensemble.json").is_file():
        folds = json.loads((path / "ensemble.json").read_text())["folds"]
        return [path / Path(f).name for f in folds]
    if (path / "config.json").is_file():
        return [path]
    raise InputError(f"{path}: not a fine-tuned model folder (no config.json or ensemble.json)")


def load_model(folder: str | Path) -> tuple[MultimodalModel, dict]:
    model, config = MultimodalModel.from_pretrained(folder)
    model.eval()
    schema = None
    if config.get("clinical_schema"):
        from finetune.clinical import ClinicalSchema
        schema = ClinicalSchema.from_dict(config["clinical_schema"])
    pre = config["preprocessing"]
    prep = PrepConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in pre.items()
                         if k in PrepConfig.__dataclass_fields__})
    return model, {**config, "schema": schema, "prep": prep}


def subject_inputs(row, meta: dict) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
    """x [2, S, S, S] (image, mask), clinical [F], and the crop's voxel-to-world affine."""
    from data.crops import lesion_crop_with_affine
    from data.cache import CacheEntry
    from finetune.cohort import lesion_crop_voxels
    entry = CacheEntry.from_path(row["cache_image"])
    prep = meta["prep"]
    size = meta["preprocessing"]["input_size"]
    pre = meta["preprocessing"]
    crop = lesion_crop_voxels(pre["margin_mm"], float(pre.get("crop_mm", 0.0)), float(np.mean(prep.spacing)))
    x, affine = lesion_crop_with_affine(entry.image(), entry.mask(), size, crop["margin_vox"],
                                        np.asarray(entry.meta["affine"]), min_size=crop["min_side_vox"],
                                        pad_value=entry.meta.get("pad_value"))
    schema = meta["schema"]
    clin = schema.transform(pd.DataFrame([row]))[0] if schema is not None else np.zeros(0, np.float32)
    return torch.as_tensor(x), torch.as_tensor(clin), affine


def validate_rows(df: pd.DataFrame, meta: dict, cache_dir: str) -> tuple[pd.DataFrame, list[tuple[str, str]]]:
    """Prepare each row on its own; a bad file or clinical value rejects only that row."""
    from data.prepare import prepare_table
    good, rejected = prepare_table(df, meta["prep"], cache_dir, require_lesion=True, on_error="collect")
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
def predict_table(folders: list[Path], df: pd.DataFrame, cache_dir: str) -> tuple[pd.DataFrame, list]:
    from finetune.survival_losses import survival_risk_from_hazards
    first_model, first_meta = load_model(folders[0])
    good, rejected = validate_rows(df, first_meta, cache_dir)
    per_model = []
    for folder in folders:
        model, meta = (first_model, first_meta) if folder == folders[0] else load_model(folder)
        probs, risks = [], []
        for _, row in good.iterrows():
            x, clin, _ = subject_inputs(row, meta)
            out = model(x[None] if model.config.fusion != "clinical_only" else None, clin[None])
            if "logit" in out:
                probs.append(torch.sigmoid(out["logit"]).item())
            if "risk" in out:
                risks.append(out["risk"].item())
            elif "hazard_logits" in out:
                edges = torch.tensor(meta["time_bins"]) if meta.get("time_bins") else None
                risks.append(survival_risk_from_hazards(out["hazard_logits"], edges).item())
        per_model.append((probs, risks))
    res = pd.DataFrame({"subject_id": good["subject_id"].to_numpy()})
    if per_model and per_model[0][0]:
        res["prob"] = np.mean([p for p, _ in per_model], axis=0)
    if per_model and per_model[0][1]:
        res["risk"] = np.mean([r for _, r in per_model], axis=0)
    return res, rejected


@cli_entry
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True, help="fine-tuned model folder, or the model/ folder of a run (fold ensemble)")
    ap.add_argument("--manifest", required=True, help="CSV with subject_id, image, mask (+ clinical columns)")
    ap.add_argument("--out", required=True, help="output CSV: subject_id, prob and/or risk")
    ap.add_argument("--cache_dir", default="", help="preprocessing cache (default: next to --out)")
    args = ap.parse_args(argv)
    from data.manifest import read_manifest
    df = read_manifest(args.manifest, task="predict", check_files=False)
    folders = model_folders(args.model)
    cache = args.cache_dir or str(Path(args.out).resolve().parent / "cache")
    res, rejected = predict_table(folders, df, cache)
    with atomic_path(args.out) as tmp:
        res.to_csv(tmp, index=False)
    rej_path = Path(args.out).with_suffix(".rejected.csv")
    if rejected:
        with atomic_path(rej_path) as tmp:
            pd.DataFrame(rejected, columns=["subject_id", "reason"]).to_csv(tmp, index=False)
    elif rej_path.exists():
        rej_path.unlink()
    msg = f"predicted {len(res)} subject(s) with {len(folders)} model(s) -> {args.out}"
    if rejected:
        msg += f"; rejected {len(rejected)} row(s), reasons in {rej_path}"
    print(msg)
    return 0 if len(res) else 2


if __name__ == "__main__":
    raise SystemExit(main())
