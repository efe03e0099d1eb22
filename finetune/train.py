"""Stage two: fine-tune the pretrained encoder on [image, lesion mask] (+ clinical) per CV fold.

    accelerate launch -m finetune --config launch/finetune_tiny_cpu.yaml --manifest M.csv \
        --pretrained runs/pt/encoder --task classification --fusion concat --output_dir runs/ft

Patient-level splits: a held-out test set plus K folds on the rest. Each fold trains with early
stopping on its validation metric; test and external sets are predicted by the fold ensemble.
Writes predictions.csv, metrics.json, figures, metrics.jsonl/TensorBoard and one HF-format folder
per fold model (clinical schema and preprocessing inside) under model/.
"""
from __future__ import annotations

import copy
import json
import math
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from data.atomic import atomic_path, write_json
from data.config import parse_config, save_config, to_dict
from data.errors import ConfigError, InputError, cli_entry
from data.prepare import PrepConfig
from finetune.cohort import TASK_NEEDS, lesion_crop_voxels, make_dataset, min_side_vox
from models.multimodal import MultimodalConfig, MultimodalModel
from models.training import (NonFiniteGuard, backward_and_step, OptimConfig, ResumableBatches, RunLogger,
                             WarmupCosine, build_optimizer, make_accelerator, progress, seed_step,
                             set_deepspeed_micro_batch)
from models.vit3d import ViT3DConfig

TASKS = tuple(TASK_NEEDS)
FUSIONS = ("none", "concat", "film", "tokens", "clinical_only")


def _default_model() -> MultimodalConfig:
    return MultimodalConfig(encoder=ViT3DConfig(in_channels=2))


@dataclass
class FinetuneConfig:
    manifest: str = ""
    external: str = ""
    pretrained: str = ""            # HF-format encoder folder from pretraining; "" trains from scratch
    task: str = "classification"    # classification | survival | multitask
    fusion: str = "concat"          # none | concat | film | tokens | clinical_only
    output_dir: str = "runs/finetune"
    cache_dir: str = ""             # default: <output_dir>/../cache
    splits: str = ""                # splits JSON to reuse (default: <output_dir>/splits.json)
    folds: int = 5
    test_fraction: float = 0.2
    clinical_columns: list[str] = field(default_factory=list)   # empty: every non-standard column
    margin_mm: float = 10.0         # peritumoral margin kept around the lesion box
    # Smallest side of the lesion-centred cube, in mm. The cube (lesion box + margin, at least this)
    # is resized to the encoder input, so a value below input size x spacing magnifies the lesion.
    # 0: input size x spacing (native scale, no magnification).
    crop_mm: float = 0.0
    batch_size: int = 8
    epochs: int = 30
    patience: int = 8               # epochs without validation improvement before stopping
    layer_decay: float = 0.75
    freeze_encoder: bool = False    # linear probe / frozen-feature fine-tuning
    class_weighting: bool = True
    n_time_bins: int = 8            # for model.survival_head = discrete
    n_boot: int = 1000
    explain: int = 2                # test subjects to explain (attention rollout + occlusion)
    num_workers: int = 0
    seed: int = 0
    mixed_precision: str = "auto"
    grad_accum: int = 1
    max_nonfinite: int = 5
    resume: str = "auto"            # "auto": reuse finished folds in output_dir; "" recompute all
    prep: PrepConfig = field(default_factory=PrepConfig)
    model: MultimodalConfig = field(default_factory=_default_model)
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=3e-4, weight_decay=0.05, warmup_steps=10))

    def __post_init__(self):
        if self.task not in TASKS:
            raise ConfigError(f"--task {self.task!r}: expected one of {TASKS}")
        if self.fusion not in FUSIONS:
            raise ConfigError(f"--fusion {self.fusion!r}: expected one of {FUSIONS}")
        min_side_vox(self.crop_mm, 1.0)  # a negative crop_mm fails here, at parse time


# --------------------------------------------------------------------------------------------
# set-up


def encoder_from_pretrained(cfg: FinetuneConfig) -> tuple[MultimodalConfig, PrepConfig]:
    """Take the encoder sizes and preprocessing from the pretrained folder, so they always agree."""
    if not cfg.pretrained:
        return replace(cfg.model, task=cfg.task, fusion=cfg.fusion), cfg.prep
    folder = Path(cfg.pretrained)
    cfg_path = folder / "config.json"
    if not cfg_path.is_file():
        raise InputError(f"{folder}: not a pretrained model folder (no config.json)")
    saved = json.loads(cfg_path.read_text())
    enc_fields = {f for f in ViT3DConfig.__dataclass_fields__}
    enc = ViT3DConfig(**{k: v for k, v in saved.items() if k in enc_fields})
    enc = replace(enc, in_channels=2, drop_path=cfg.model.encoder.drop_path,
                  grad_checkpointing=cfg.model.encoder.grad_checkpointing)
    prep = cfg.prep
    pre = saved.get("preprocessing") or {}
    prep_fields = set(PrepConfig.__dataclass_fields__)
    if pre:
        prep = PrepConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in pre.items() if k in prep_fields})
    return replace(cfg.model, encoder=enc, task=cfg.task, fusion=cfg.fusion), prep


def load_cohort(cfg: FinetuneConfig, prep: PrepConfig, show_progress: bool):
    from data.manifest import clinical_columns, read_manifest
    from data.prepare import prepare_table
    if not cfg.manifest:
        raise InputError("--manifest is required")
    cache = cfg.cache_dir or str(Path(cfg.output_dir).parent / "cache")
    df, _ = prepare_table(read_manifest(cfg.manifest, task=cfg.task), prep, cache, progress=show_progress)
    ext = None
    if cfg.external:
        ext, _ = prepare_table(read_manifest(cfg.external, task=cfg.task), prep, cache, progress=show_progress)
        clash = sorted(set(ext["subject_id"]) & set(df["subject_id"]))
        if clash:
            raise InputError(f"{cfg.external}: subject_id(s) {clash[:5]} also appear in {cfg.manifest}; "
                             "ids must be unique across both cohorts")
    cols = list(cfg.clinical_columns) or clinical_columns(df)
    missing = [c for c in cols if c not in df.columns]
    if missing:
        raise InputError(f"{cfg.manifest}: clinical column(s) {missing} not found")
    if cfg.fusion != "none" and not cols:
        raise InputError(f"{cfg.manifest}: --fusion {cfg.fusion} needs clinical columns, found none")
    return df.reset_index(drop=True), ext, cols


def load_splits(cfg: FinetuneConfig, df: pd.DataFrame) -> dict:
    from data.splits import load_or_make_splits
    path = cfg.splits or str(Path(cfg.output_dir) / "splits.json")
    stratify = "event" if cfg.task == "survival" else "label"
    return load_or_make_splits(path, df, test_fraction=cfg.test_fraction, folds=cfg.folds,
                               stratify=stratify, seed=cfg.seed)


# --------------------------------------------------------------------------------------------
# one fold


def task_loss(out: dict, batch: dict, cfg: FinetuneConfig, pos_weight: torch.Tensor | None) -> dict:
    from finetune.survival_losses import cox_efron_loss, discrete_time_nll
    terms = {}
    if cfg.task in ("classification", "multitask"):
        terms["bce"] = F.binary_cross_entropy_with_logits(out["logit"].float(), batch["label"].float(),
                                                          pos_weight=pos_weight)
    if cfg.task in ("survival", "multitask"):
        if "risk" in out:
            terms["cox"] = cox_efron_loss(out["risk"].float(), batch["time"], batch["event"])
        else:
            terms["nll"] = discrete_time_nll(out["hazard_logits"].float(), batch["bin"], batch["event"])
    terms["loss"] = sum(terms.values())
    return terms


@torch.no_grad()
def predict(model: MultimodalModel, dataset, batch_size: int, device, time_bins=None) -> dict[str, np.ndarray]:
    from finetune.survival_losses import survival_risk_from_hazards
    import monai.data
    model.eval()
    probs, risks = [], []
    for batch in monai.data.DataLoader(dataset, batch_size=batch_size, shuffle=False):
        x = batch["x"].to(device) if "x" in batch else None
        out = model(x, batch["clinical"].to(device))
        if "logit" in out:
            probs.append(torch.sigmoid(out["logit"].float()).cpu())
        if "risk" in out:
            risks.append(out["risk"].float().cpu())
        elif "hazard_logits" in out:
            risks.append(survival_risk_from_hazards(out["hazard_logits"].float(), time_bins).cpu())
    model.train()
    res = {}
    if probs:
        res["prob"] = torch.cat(probs).numpy()
    if risks:
        res["risk"] = torch.cat(risks).numpy()
    return res


def validation_score(pred: dict, dataset, task: str) -> float | None:
    """Higher is better: AUC, Harrell's C, or their mean for multitask; None when undefined."""
    from sklearn.metrics import roc_auc_score
    from sksurv.metrics import concordance_index_censored
    t = dataset.targets
    scores = []
    if task in ("classification", "multitask"):
        if len(np.unique(t.label)) < 2:
            return None
        scores.append(roc_auc_score(t.label, pred["prob"]))
    if task in ("survival", "multitask"):
        if t.event.sum() == 0:
            return None
        scores.append(concordance_index_censored(t.event.astype(bool), t.time, pred["risk"])[0])
    return float(np.mean(scores))


def train_fold(cfg: FinetuneConfig, model_cfg: MultimodalConfig, prep: PrepConfig, fold: int,
               train_df: pd.DataFrame, val_df: pd.DataFrame, eval_sets: dict[str, pd.DataFrame],
               columns: list[str], accelerator, logger: RunLogger) -> dict:
    """Train one fold; returns predictions per set and the fold's model folder."""
    from finetune.clinical import ClinicalSchema
    from finetune.survival_losses import time_bins
    main = accelerator.is_main_process
    uses_clinical = cfg.fusion != "none"
    schema = ClinicalSchema.fit(train_df, columns) if uses_clinical else None
    bins = None
    if cfg.task != "classification" and model_cfg.survival_head == "discrete":
        bins = np.asarray(time_bins(train_df["time"].to_numpy(), train_df["event"].to_numpy(), cfg.n_time_bins))
    mcfg = replace(model_cfg, clinical_dim=schema.n_features if schema else 0,
                   n_time_bins=cfg.n_time_bins if bins is not None else model_cfg.n_time_bins)
    spacing = float(np.mean(prep.spacing))
    kw = dict(use_images=cfg.fusion != "clinical_only", crop_size=mcfg.encoder.img_size,
              time_bins=bins, **lesion_crop_voxels(cfg.margin_mm, cfg.crop_mm, spacing))
    train_ds = make_dataset(train_df, cfg.task, schema, augment=True, seed=cfg.seed + fold, **kw)
    val_ds = make_dataset(val_df, cfg.task, schema, augment=False, seed=0, **kw)

    seed_step(cfg.seed, -1 - fold)
    model = MultimodalModel.from_pretrained_encoder(mcfg, cfg.pretrained or None)
    if cfg.freeze_encoder and cfg.fusion != "clinical_only":
        model.freeze_encoder(linear_probe=True)
    optimizer = build_optimizer(model.param_groups(cfg.optim.lr, cfg.optim.weight_decay, cfg.layer_decay), cfg.optim)
    batch_size = min(cfg.batch_size, len(train_ds) // accelerator.num_processes)
    if batch_size < 1:
        raise InputError(f"fold {fold}: {len(train_ds)} training subject(s) for {accelerator.num_processes} processes")
    batches = ResumableBatches(train_ds, batch_size, cfg.seed + fold, accelerator.num_processes,
                               accelerator.process_index, cfg.num_workers)
    steps_per_epoch = math.ceil(batches.per_epoch / cfg.grad_accum)
    schedule = WarmupCosine(optimizer, cfg.optim, cfg.epochs * steps_per_epoch)
    set_deepspeed_micro_batch(accelerator, batch_size)
    model, optimizer = accelerator.prepare(model, optimizer)
    pos_weight = None
    if cfg.class_weighting and cfg.task in ("classification", "multitask"):
        n_pos = float(train_df["label"].sum())
        pos_weight = torch.tensor((len(train_df) - n_pos) / max(n_pos, 1.0), device=accelerator.device)

    guard = NonFiniteGuard(cfg.max_nonfinite)
    stream = batches.iterate(0)
    step_ok = True
    best = {"score": None, "key": -math.inf, "epoch": 0,
            "state": copy.deepcopy(accelerator.unwrap_model(model).state_dict())}
    step = 0
    bar = progress(cfg.epochs, 0, main, f"fold {fold}")
    for epoch in range(cfg.epochs):
        totals: dict[str, float] = {}
        for _ in range(steps_per_epoch * cfg.grad_accum):
            m, batch = next(stream)
            seed_step(cfg.seed + 1000 * (fold + 1), m, accelerator.process_index)
            batch = {k: v.to(accelerator.device) if torch.is_tensor(v) else v for k, v in batch.items()}
            with accelerator.accumulate(model):
                schedule.set_step(step)
                with accelerator.autocast():
                    out = model(batch.get("x"), batch["clinical"])
                terms = task_loss(out, batch, cfg, pos_weight)
                ok, step_ok = backward_and_step(accelerator, model, optimizer, terms["loss"], guard,
                                                cfg.optim.clip_grad, step_ok)
                if accelerator.sync_gradients:
                    step += 1
                    step_ok = True  # the next optimizer step starts clean
            if ok:  # a skipped (non-finite) step does not poison the epoch's mean
                for k, v in terms.items():
                    totals[k] = totals.get(k, 0.0) + float(v.detach()) / (steps_per_epoch * cfg.grad_accum)
        unwrapped = accelerator.unwrap_model(model)
        val_pred = predict(unwrapped, val_ds, cfg.batch_size, accelerator.device, bins)
        score = validation_score(val_pred, val_ds, cfg.task)
        # An undefined score (one-class fold, no events) falls back to the training loss trend,
        # averaged over ranks so every rank takes the same early-stopping decision.
        if score is None:
            loss = torch.tensor(totals.get("loss", math.inf), device=accelerator.device)
            key = -float(accelerator.reduce(loss, reduction="mean")) if accelerator.num_processes > 1 else -float(loss)
        else:
            key = score
        logger.log(step, {f"fold{fold}/train_{k}": v for k, v in totals.items()}
                   | ({f"fold{fold}/val_score": score} if score is not None else {}), epoch=epoch)
        if key > best["key"]:
            best = {"score": score, "key": key, "epoch": epoch, "state": copy.deepcopy(unwrapped.state_dict())}
        bar.update(1)
        bar.set_postfix(loss=f"{totals.get('loss', 0):.3f}", val=f"{score:.3f}" if score is not None else "n/a")
        if epoch - best["epoch"] >= cfg.patience:
            break
    bar.close()

    unwrapped = accelerator.unwrap_model(model)
    unwrapped.load_state_dict(best["state"])
    preds = {"val": (val_df, predict(unwrapped, val_ds, cfg.batch_size, accelerator.device, bins))}
    for name, df in eval_sets.items():
        ds = make_dataset(df, cfg.task, schema, augment=False, seed=0, **kw)
        preds[name] = (df, predict(unwrapped, ds, cfg.batch_size, accelerator.device, bins))
    folder = Path(cfg.output_dir) / "model" / f"fold{fold}"
    if main:
        extra = {"clinical_schema": schema.to_dict() if schema else None, "clinical_columns": columns,
                 "preprocessing": {**to_dict(prep), "orientation": "RAS", "channels": ["image", "lesion_mask"],
                                   "input_size": mcfg.encoder.img_size, "margin_mm": cfg.margin_mm,
                                   "crop_mm": cfg.crop_mm},
                 "time_bins": bins.tolist() if bins is not None else None,
                 "pretrained": cfg.pretrained or None, "fold": fold}
        card = {"training": {"fold": fold, "train_subjects": len(train_df), "best_epoch": best["epoch"],
                             "pretrained": cfg.pretrained or "none (from scratch)"},
                "metrics": {"validation_score": best["score"]}}
        unwrapped.save_pretrained(folder, extra_config=extra, card=card)
    accelerator.wait_for_everyone()
    return {"preds": preds, "best_epoch": best["epoch"], "val_score": best["score"], "folder": str(folder)}


# --------------------------------------------------------------------------------------------
# whole run


def prediction_rows(name: str, fold: int, df: pd.DataFrame, pred: dict) -> pd.DataFrame:
    rows = pd.DataFrame({"subject_id": df["subject_id"].to_numpy(), "split": name, "fold": fold})
    for k, v in pred.items():
        rows[k] = v
    return rows


def fold_ensemble(frames: list[pd.DataFrame], name: str) -> pd.DataFrame:
    """Mean probability / mean log-risk of the fold models on a held-out set (fold = -1)."""
    sub = pd.concat([f for f in frames if (f["split"] == name).any()])
    sub = sub[sub["split"] == name]
    cols = [c for c in ("prob", "risk") if c in sub.columns]
    ens = sub.groupby("subject_id", sort=False)[cols].mean().reset_index()
    ens.insert(1, "split", name)
    ens.insert(2, "fold", -1)
    return ens


def fold_fingerprint(cfg: FinetuneConfig, splits: dict) -> str:
    """What a finished fold depends on; a fold saved under another fingerprint is retrained, not reused."""
    import hashlib
    d = to_dict(cfg)
    for k in ("output_dir", "cache_dir", "n_boot", "explain", "num_workers", "resume", "external", "splits"):
        d.pop(k, None)
    d["folds_content"] = splits["folds"]
    d["pretrained_weights"] = _folder_stamp(cfg.pretrained)
    return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _folder_stamp(folder: str) -> str:
    if not folder:
        return ""
    files = sorted(Path(folder).glob("*.safetensors"))
    return ",".join(f"{p.name}:{p.stat().st_size}:{p.stat().st_mtime_ns}" for p in files)


def refuse_zero3(accelerator) -> None:
    """Fine-tuning keeps the best epoch's weights and saves each fold model from full state dicts
    held by one process; ZeRO-3 shards the parameters themselves, so those would be empty."""
    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    if plugin is not None and getattr(plugin, "zero_stage", None) == 3:
        raise ConfigError("fine-tuning does not support DeepSpeed ZeRO-3 (it shards the weights the best-epoch "
                          "snapshot and the fold export read); use launch/accelerate/deepspeed_zero2.yaml or DDP")


def run(cfg: FinetuneConfig) -> dict:
    accelerator = make_accelerator(cfg)
    refuse_zero3(accelerator)
    main = accelerator.is_main_process
    out = Path(cfg.output_dir)
    model_cfg, prep = encoder_from_pretrained(cfg)
    if main:
        out.mkdir(parents=True, exist_ok=True)
        save_config(replace(cfg, model=model_cfg, prep=prep), out / "config.yaml")
    with accelerator.main_process_first():  # one rank fills the cache; the others then hit it
        df, ext, columns = load_cohort(cfg, prep, show_progress=main)
    splits = load_splits(cfg, df)
    by_id = df.set_index("subject_id", drop=False)
    test_df = by_id.loc[splits["test"]].reset_index(drop=True)
    eval_sets = ({"test": test_df} if len(test_df) else {}) | ({"external": ext} if ext is not None else {})
    logger = RunLogger(out, enabled=main)

    frames, fold_info = [], []
    fingerprint = fold_fingerprint(cfg, splits)
    for k, fold in enumerate(splits["folds"]):
        done = out / "folds" / f"fold{k}.csv"
        saved = json.loads(done.with_suffix(".json").read_text()) if done.with_suffix(".json").is_file() else {}
        if cfg.resume == "auto" and done.is_file() and saved.get("fingerprint") == fingerprint:
            frames.append(pd.read_csv(done, dtype={"subject_id": str}))
            fold_info.append(saved)
            continue
        res = train_fold(cfg, model_cfg, prep, k, by_id.loc[fold["train"]].reset_index(drop=True),
                         by_id.loc[fold["val"]].reset_index(drop=True), eval_sets, columns, accelerator, logger)
        fr = pd.concat([prediction_rows(name, k, d, p) for name, (d, p) in res["preds"].items()])
        info = {"fold": k, "best_epoch": res["best_epoch"], "val_score": res["val_score"], "folder": res["folder"],
                "fingerprint": fingerprint}
        if main:
            with atomic_path(done) as tmp:
                fr.to_csv(tmp, index=False)
            write_json(done.with_suffix(".json"), info)
        frames.append(fr)
        fold_info.append(info)
    logger.close()

    metrics = {}
    if main:
        preds = pd.concat(frames + [fold_ensemble(frames, n) for n in eval_sets], ignore_index=True)
        with atomic_path(out / "predictions.csv") as tmp:
            preds.to_csv(tmp, index=False)
        write_json(out / "model" / "ensemble.json", {"folds": [i["folder"] for i in fold_info],
                                                     "combine": "mean of prob / mean of risk"})
        from finetune.evaluate import evaluate
        outcomes = pd.concat([df] + ([ext] if ext is not None else []), ignore_index=True)
        metrics = evaluate(preds, outcomes, out_dir=out, n_boot=cfg.n_boot, seed=cfg.seed)
        metrics["folds"] = fold_info
        write_json(out / "metrics.json", metrics)
        if cfg.explain and cfg.fusion != "clinical_only":
            explain_subjects(cfg, fold_info[0]["folder"], test_df.head(cfg.explain), out / "explain")
        print(f"fine-tuning done: predictions {out / 'predictions.csv'}, metrics {out / 'metrics.json'}, "
              f"figures {out}/*.png, models {out / 'model'}")
    accelerator.wait_for_everyone()
    return metrics


def explain_subjects(cfg: FinetuneConfig, folder: str, rows: pd.DataFrame, out_dir: Path) -> None:
    """Attention rollout and occlusion maps (NIfTI + PNG) for a few test subjects."""
    from finetune.interpret import attention_rollout, occlusion_sensitivity, save_explanations
    from finetune.predict import load_model, subject_inputs
    model, meta = load_model(folder)
    key = "logit" if cfg.task != "survival" else ("risk" if model.config.survival_head == "cox" else "hazard_logits")
    for _, row in rows.iterrows():
        x, clin, affine = subject_inputs(row, meta)
        maps = {"attention_rollout": attention_rollout(model, x[None], clin[None]),
                "occlusion": occlusion_sensitivity(model, x[None], clin[None], output_key=key)}
        save_explanations(out_dir, row["subject_id"], x, maps, affine)


@cli_entry
def main(argv=None) -> int:
    cfg, _ = parse_config(FinetuneConfig, argv, description=__doc__.splitlines()[0])
    run(cfg)
    return 0
