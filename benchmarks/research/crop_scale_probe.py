"""Can the tiny ViT learn the lesion from ~90 patients, and at which crop scale? A fast in-memory probe.

    python -m benchmarks.research.crop_scale_probe --cohort DIR --cache DIR [--crop native|zoom] [--labels real|latent]
        [--model vit|features] [--pretrained ENCODER_DIR] [--epochs 40] [--folds 5]

Stratified K-fold CV over the labelled patients of a synthetic cohort (data.synth), lesion crops held
in memory, flips as the only augmentation, AdamW + one-cycle, the fold's last epoch scored (no
model selection on validation). Prints per-fold train/validation AUC and the pooled out-of-fold AUC.

- `--crop native`: the 48^3-voxel cube at the prepared spacing (the lesion is a few tokens);
  `--crop zoom`: the lesion box + 10 mm margin resized to 48^3 (what `finetune --crop_mm` does).
- `--labels latent`: replace the label by the sign of the image part of the true logit (from
  oracle.csv), so only what the image shows decides it: a learnability ceiling for the image model.
- `--model features`: mean / SD / enhancing share / 90th percentile inside the mask and log volume,
  with logistic regression: what a few hand-made numbers reach on the same folds.
- `--model linear`: a linear probe of the frozen encoder (`--pretrained`, or a random one): the mean
  token and the mask-weighted mean token, with L2 logistic regression. No fine-tuning noise, so it
  compares what different pretraining runs put into the features.

This is a probe of the recipe, not the benchmark: `benchmarks.research.ssl_gain` runs the real CLI.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import StratifiedKFold
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from core.errors import cli_entry

BETA = dict(rim=0.85, nodularity=0.6, core=-0.7, oedema=-0.55, peritumoral=0.6, irregularity=0.3, septation=-0.5)


def load_crops(cohort: Path, cache: Path, crop: str, spacing: float = 2.0, margin_mm: float = 10.0):
    from data.crops import lesion_crop
    from data.prep_config import PrepConfig
    from data.prepare import prepare_table
    from models.tasks import CLASSIFICATION
    df, _ = prepare_table(CLASSIFICATION.read_manifest(cohort / "manifest.csv"),
                          PrepConfig(spacing=(spacing,) * 3, modality="mri"), str(cache), progress=False)
    margin = int(round(margin_mm / spacing))
    crops = [lesion_crop(np.load(i, mmap_mode="r"), np.load(m, mmap_mode="r"), 48, margin,
                         min_size=48 if crop == "native" else 1)
             for i, m in zip(df["cache_image"], df["cache_mask"])]
    return df, torch.from_numpy(np.stack(crops))  # [N, 2, 48, 48, 48]


def latent_labels(cohort: Path, subjects) -> np.ndarray:
    oracle = pd.read_csv(cohort / "oracle.csv", dtype={"subject_id": str}).set_index("subject_id")
    image_part = sum(b * oracle.loc[list(subjects), "z_" + k].to_numpy() for k, b in BETA.items())
    return (image_part > np.median(image_part)).astype(int)


def features(x: torch.Tensor) -> np.ndarray:
    rows = []
    for crop in x:
        inside = crop[0][crop[1] > 0.5].numpy()
        rows.append([inside.mean(), inside.std(), (inside > 1.0).mean(), np.quantile(inside, 0.9),
                     np.log(inside.size)])
    return np.asarray(rows, dtype=float)


@torch.no_grad()
def frozen_features(x: torch.Tensor, pretrained: str | None, patch: int = 12) -> np.ndarray:
    """[N, 2D]: mean token ++ mask-weighted mean token of the frozen encoder (mask channel: the mean kernel)."""
    torch.manual_seed(0)
    model = tiny_vit(pretrained, mask_channel_init="mean").eval()
    rows = []
    for i in range(0, len(x), 16):
        xb = x[i:i + 16]
        tokens = model.encoder(xb)  # [B, N, D]
        weight = F.avg_pool3d(xb[:, 1:], patch).flatten(1)  # [B, N]: the mask share of each patch
        weight = weight / weight.sum(1, keepdim=True).clamp_min(1e-6)
        rows.append(torch.cat([tokens.mean(1), (weight[..., None] * tokens).sum(1)], dim=1))  # [B, 2D]
    return torch.cat(rows).numpy()


def tiny_vit(pretrained: str | None, mask_channel_init: str = "zero"):
    from models.multimodal import MultimodalConfig, MultimodalModel
    from models.vit3d import ViT3DConfig
    enc = ViT3DConfig(in_channels=2, img_size=48, patch_size=12, dim=96, depth=4, heads=3, drop_path=0.1)
    return MultimodalModel.from_pretrained_encoder(MultimodalConfig(encoder=enc, fusion="none",
                                                                    mask_channel_init=mask_channel_init), pretrained)


def fit_vit(x, y, tr, va, epochs, lr, pretrained, seed):
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    model = tiny_vit(pretrained)
    logit = lambda xb: model(xb, None)["logit"].squeeze(-1)  # noqa: E731
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05)
    steps = epochs * int(np.ceil(len(tr) / 8))
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, lr, total_steps=steps, pct_start=0.1)
    for _ in range(epochs):
        model.train()
        perm = tr[torch.randperm(len(tr), generator=gen).numpy()]
        for b in range(0, len(perm), 8):
            xb = x[perm[b:b + 8]]
            for axis in (2, 3, 4):
                if torch.rand(1, generator=gen) < 0.5:
                    xb = xb.flip(axis)
            loss = F.binary_cross_entropy_with_logits(logit(xb), torch.from_numpy(y[perm[b:b + 8]]).float())
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
    model.eval()
    with torch.no_grad():
        score = lambda idx: torch.cat([logit(x[idx[i:i + 16]]) for i in range(0, len(idx), 16)]).numpy()  # noqa: E731
        return score(tr), score(va)


@cli_entry
def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(allow_abbrev=False, prog="python -m benchmarks.research.crop_scale_probe",
                                 description=__doc__.splitlines()[0])
    ap.add_argument("--cohort", required=True, type=Path)
    ap.add_argument("--cache", required=True, type=Path)
    ap.add_argument("--crop", choices=("native", "zoom"), default="zoom")
    ap.add_argument("--labels", choices=("real", "latent"), default="real")
    ap.add_argument("--model", choices=("vit", "features", "linear"), default="vit")
    ap.add_argument("--pretrained", default=None, help="HF-format encoder folder (default: from scratch)")
    ap.add_argument("--epochs", type=int, default=40)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--folds", type=int, default=5)
    args = ap.parse_args(argv)
    t0 = time.time()
    df, x = load_crops(args.cohort, args.cache, args.crop)
    y = df["label"].to_numpy().astype(int) if args.labels == "real" else latent_labels(args.cohort, df["subject_id"])
    print(f"{len(y)} patients, crops {tuple(x.shape)}, mask share of the crop {float(x[:, 1].mean()):.3f}")
    oof, fold_aucs = np.zeros(len(y)), []
    feats = {"features": features, "linear": lambda v: frozen_features(v, args.pretrained)}.get(args.model)
    feats = feats(x) if feats else None
    folds = StratifiedKFold(args.folds, shuffle=True, random_state=0).split(np.zeros(len(y)), y)
    for k, (tr, va) in enumerate(folds):
        if feats is not None:
            c = 1.0 if args.model == "features" else 0.05  # 2D = 192 probe features for ~87 patients
            clf = make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=2000)).fit(feats[tr], y[tr])
            s_tr, s_va = clf.decision_function(feats[tr]), clf.decision_function(feats[va])
        else:
            s_tr, s_va = fit_vit(x, y, tr, va, args.epochs, args.lr, args.pretrained, seed=k)
        oof[va] = s_va
        fold_aucs.append(float(roc_auc_score(y[va], s_va)))
        print(f"fold {k}: train AUC {roc_auc_score(y[tr], s_tr):.3f}  validation AUC {roc_auc_score(y[va], s_va):.3f}"
              f"  ({time.time() - t0:.0f} s)", flush=True)
    print(f"pooled out-of-fold AUC {roc_auc_score(y, oof):.3f}  [{args.model}, crop {args.crop}, labels {args.labels}"
          f"{', pretrained ' + args.pretrained if args.pretrained else ''}]  {time.time() - t0:.0f} s")
    return {"oof_auc": float(roc_auc_score(y, oof)), "fold_aucs": fold_aucs, "labels": y}


if __name__ == "__main__":
    main()
