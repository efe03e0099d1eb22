"""Segmentation results of a fine-tuning run: per-subject Dice / HD95 / volume error, their summary with
bootstrap CIs, and overlays of predicted and true masks.

Validation subjects are segmented by their own fold's model; held-out sets by the fold ensemble, whose
mask is the mean of the fold models' lesion probabilities, thresholded at 0.5. All metrics are measured
on the lesion-centred crop the model sees (its voxel edge: the crop scale x the prepared spacing); a lesion
with nothing predicted counts with Dice 0 and HD95 at the crop's diagonal (finetune/lesion/seg_metrics.py).
"""
from __future__ import annotations

from pathlib import Path

import pandas as pd
import torch

from core.atomic import atomic_path
from core.errors import ConfigError
from finetune.cohort import make_dataset
from finetune.figures import save_overlay
from finetune.lesion.seg_metrics import SEG_METRICS, segmentation_metrics, segmentation_report
from models.input_spec import InputSpec
from models.cnn_segmenter import CNNSegmenter, load_fold_model
from models.multimodal import MultimodalModel
from models.segmentation import seg_target
from models.tasks import SEGMENTATION

OVERLAYS = 3  # subjects per held-out set drawn as overlay PNGs


@torch.no_grad()
def lesion_probabilities(models: list[MultimodalModel | CNNSegmenter], df: pd.DataFrame, spec: InputSpec,
                         batch_size: int = 8):
    """The mean lesion probability of `models` over each row's crop -> (prob [N, 1, S, S, S], crops
    [N, C + 1, S, S, S], voxel_mm [N])."""
    import monai.data
    dataset = make_dataset(df, SEGMENTATION, None, use_images=True, crop_size=spec.input_size, augment=False,
                           seed=0, **spec.view_voxels())
    probs, crops, scales = [], [], []
    for batch in monai.data.DataLoader(dataset, batch_size=batch_size, shuffle=False):
        x = batch["x"]  # [B, C + 1, S, S, S]
        p = torch.stack([torch.sigmoid(m.segment(x).float()) for m in models]).mean(0)  # [B, 1, S, S, S]
        probs.append(p)
        crops.append(x)
        scales.append(batch["scale"])
    return torch.cat(probs), torch.cat(crops), torch.cat(scales).numpy() * spec.spacing_mm


def metric_rows(split: str, fold: int, df: pd.DataFrame, prob, crops, voxel_mm) -> pd.DataFrame:
    m = segmentation_metrics(prob > 0.5, seg_target(crops), voxel_mm)
    rows = pd.DataFrame({"subject_id": df["subject_id"].to_numpy(), "split": split, "fold": fold})
    for k in SEG_METRICS:
        rows[k] = m[k]
    return rows


def segmentation_results(out: Path, fold_info: list, frames: list, df: pd.DataFrame, eval_sets: dict,
                         spec: InputSpec, n_boot: int, seed: int, overlays: bool = True) -> dict:
    """segmentation.csv (one row per subject and split), overlays under segmentation/ (unless `overlays` is
    false: --figures false), and the report
    {split: {dice: {mean, ci95}, hd95_mm, hd95_found_mm, hd95_misses, volume errors, missed, n}} that goes into
    metrics.json (seg_metrics says how a miss is counted)."""
    models = [load_fold_model(info["folder"])[0].eval() for info in fold_info]  # the ViT's or a CNN
    by_id = df.set_index("subject_id", drop=False)
    tables = []
    for k, (model, frame) in enumerate(zip(models, frames)):  # each validation subject by its own fold
        val = by_id.loc[frame.loc[frame["split"] == "val", "subject_id"].astype(str)].reset_index(drop=True)
        tables.append(metric_rows("val", k, val, *lesion_probabilities([model], val, spec)))
    for name, held in eval_sets.items():
        prob, crops, voxel_mm = lesion_probabilities(models, held, spec)
        tables.append(metric_rows(name, -1, held, prob, crops, voxel_mm))
        if overlays:
            save_overlays(out / "segmentation", name, held, prob, crops, spec)
    table = pd.concat(tables, ignore_index=True)
    with atomic_path(out / "segmentation.csv") as tmp:
        table.to_csv(tmp, index=False)
    return {split: segmentation_report(rows, n_boot=n_boot, seed=seed) for split, rows in table.groupby("split", sort=False)}


def save_overlays(folder: Path, name: str, held: pd.DataFrame, prob, crops, spec: InputSpec) -> None:
    """The first OVERLAYS subjects of a held-out set as PNGs: the first image, the given mask and the predicted
    one. prob [N, 1, S, S, S]; crops [N, C + 1, S, S, S] in the input contract's channel order, whose mask is
    the last channel (seg_target reads it, as the metrics do), so the mask is found with any number of images."""
    if crops.shape[1] != len(spec.channels):
        raise ConfigError(f"input_spec.json: channels {list(spec.channels)} name {len(spec.channels)} channels, "
                          f"but the crops of '{name}' have {crops.shape[1]}")
    masks = seg_target(crops)  # [N, 1, S, S, S]
    for i in range(min(OVERLAYS, len(held))):
        sid = held["subject_id"].iloc[i]
        save_overlay(folder / f"overlay_{name}_{sid}.png", crops[i, 0].numpy(), masks[i, 0].numpy(),
                     prob[i, 0].numpy() > 0.5, title=f"{sid} ({name})")


def format_segmentation(report: dict) -> str:
    """The report as a table: HD95 is the mean over every subject with each miss at the crop's diagonal, beside
    how many are at the diagonal and the mean over found lesions only; "missed": a lesion with nothing predicted."""
    header = (f"{'split':<14} {'n':>5}  {'Dice [95% CI]':<24} {'HD95 mm':>8} {'at diag':>7} {'HD95 found':>10} "
              f"{'|vol err| ml':>12} {'missed':>6}")
    lines = [header, "-" * len(header)]
    for split, r in report.items():
        d, h, f, v = r["dice"], r["hd95_mm"], r["hd95_found_mm"], r["abs_volume_error_ml"]
        ci = f" [{d['ci95'][0]:.3f}, {d['ci95'][1]:.3f}]" if d["ci95"] else ""
        found = f["mean"] if f["mean"] is not None else float("nan")  # every lesion missed
        lines.append(f"{split:<14} {r['n']:>5}  {d['mean']:.3f}{ci:<17} {h['mean']:>8.2f} {r['hd95_misses']:>7} "
                     f"{found:>10.2f} {v['mean']:>12.3f} {r['missed']:>6}")
    return "\n".join(lines)
