"""One cross-validation fold of fine-tuning: build (schema, datasets, model, optimizer), fit (the loop,
early stopping on the validation metric), export (predictions per set and the fold's HF folder).

The loop reads like the pretraining loop: one `engine.steps.optimizer_step` per optimizer step.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from core.errors import InputError
from engine.batches import ResumableBatches
from engine.distributed import configure_deepspeed, prepare
from engine.logs import RunLogger, progress
from engine.steps import NonFiniteGuard, build_optimizer, optimizer_step, reseed_torch
from finetune.clinical import ClinicalSchema
from finetune.cohort import make_dataset, time_bins
from finetune.config import FinetuneConfig
from finetune.recipe import EpochChoice, FinetuneSchedule, encoder_peak_lr, tag_param_groups
from finetune.lesion.seg_metrics import segmentation_metrics
from models.cnn_segmenter import CNNSegConfig, CNNSegmenter
from models.input_spec import InputSpec
from models.multimodal import MultimodalConfig, MultimodalModel
from models.segmentation import seg_target, segmentation_loss
from models.tasks import Task, output_scores

# The seeds of fold k, all derived from the run's --seed: its initial weights come from step_seed's set-up
# phase -1 - k, its augmentation and batch order from seed + k, and its per-step dropout / drop-path from
# seed + FOLD_STEP_STRIDE * (k + 1), a stream apart from every fold's order seed for --seed below the stride.
FOLD_STEP_STRIDE = 1000

# In a fold model's config.json: its segmentation head also trained on windows anywhere in the head, at the
# sliding window's scale (data.crops.segmentation_box), so whole-head search may use it.
SEG_WINDOWS_KEY = "seg_background_windows"


@dataclass(frozen=True)
class FoldSeeds:
    init_phase: int   # step_seed's (negative) set-up phase for the initial weights
    data: int         # augmentation and batch order
    steps: int        # per-step dropout / drop-path

    @classmethod
    def of(cls, seed: int, index: int) -> "FoldSeeds":
        return cls(init_phase=-1 - index, data=seed + index, steps=seed + FOLD_STEP_STRIDE * (index + 1))


@dataclass
class Fold:
    """Everything one fold trains with; made by `build_fold`."""
    index: int
    spec: InputSpec
    schema: ClinicalSchema | None
    bins: np.ndarray | None          # discrete-time bin edges fitted on the training rows, or None
    train_ds: object
    val_ds: object
    val_df: pd.DataFrame
    model: torch.nn.Module           # prepared by accelerate
    optimizer: torch.optim.Optimizer
    schedule: FinetuneSchedule
    batches: ResumableBatches
    steps_per_epoch: int
    pos_weight: torch.Tensor | None


def dataset_for(fold: Fold, df: pd.DataFrame, task: Task, use_images: bool):
    return make_dataset(df, task, fold.schema, use_images=use_images,
                        crop_size=fold.spec.input_size, time_bins=fold.bins, augment=False, seed=0,
                        **fold.spec.view_voxels())


def build_fold(cfg: FinetuneConfig, model_cfg: MultimodalConfig, spec: InputSpec, index: int,
               train_df: pd.DataFrame, val_df: pd.DataFrame, columns: list[str], accelerator) -> Fold:
    """Fit the clinical schema and time bins on this fold's training rows; make datasets, model, optimizer."""
    schema = ClinicalSchema.fit(train_df, columns) if model_cfg.uses_clinical else None
    bins = None
    if cfg.task.survival and model_cfg.survival_head == "discrete":
        bins = np.asarray(time_bins(train_df["time"].to_numpy(), train_df["event"].to_numpy(), cfg.n_time_bins))
    mcfg = replace(model_cfg, clinical_dim=schema.n_features if schema else 0, voxel_mm=spec.spacing_mm,
                   n_time_bins=cfg.n_time_bins if bins is not None else model_cfg.n_time_bins)
    seeds = FoldSeeds.of(cfg.seed, index)
    kw = dict(use_images=mcfg.uses_image, crop_size=spec.input_size, time_bins=bins, **spec.view_voxels())
    # The segmentation task trains on segmentation windows alone; an outcome task keeps its lesion crops,
    # and an auxiliary segmentation head (--seg_weight > 0) also gets a window per item ("seg_x").
    train_ds = make_dataset(train_df, cfg.task, schema, augment=True, seed=seeds.data,
                            placement="segmentation" if cfg.task.segment else "lesion",
                            seg_windows=mcfg.segments and not cfg.task.segment, **kw)
    val_ds = make_dataset(val_df, cfg.task, schema, augment=False, seed=0, **kw)

    reseed_torch(cfg.seed, seeds.init_phase)  # the fold's initial weights
    model = new_model(cfg, mcfg, spec)
    if cfg.task.survival and mcfg.linear_clinical_hazard and schema is not None:
        if train_df["event"].any():
            # the hazard's linear clinical part starts as this fold's clinical Cox fit (its training rows only),
            # so the untrained model already ranks as the Cox model a user would fit first
            from finetune.baselines.cox_init import clinical_cox_fit
            model.set_clinical_hazard(clinical_cox_fit(schema, train_df).coef_)
        elif accelerator.is_main_process:
            print(f"fold {index}: no events among its training rows, so no clinical Cox fit; the hazard's "
                  "clinical part starts at beta = 0")
    if cfg.freeze_encoder and mcfg.uses_image:
        model.freeze_encoder(linear_probe=True)
    batch_size = min(cfg.batch_size, len(train_ds) // accelerator.num_processes)
    if batch_size < 1:
        raise InputError(f"fold {index}: {len(train_ds)} training subject(s) for {accelerator.num_processes} processes")
    batches = ResumableBatches(train_ds, batch_size, seeds.data, accelerator.num_processes,
                               accelerator.process_index, cfg.num_workers, pin_memory=accelerator.device.type == "cuda")
    steps_per_epoch = math.ceil(batches.per_epoch / cfg.grad_accum)
    groups = tag_param_groups(model.param_groups(cfg.optim.lr, cfg.optim.weight_decay, cfg.layer_decay),
                              model.encoder_parameters())
    optimizer = build_optimizer(groups, cfg.optim)
    warmup = (round(cfg.warmup_epochs * steps_per_epoch) if cfg.warmup_epochs > 0 else cfg.optim.warmup_steps)
    encoder_lr = encoder_peak_lr(cfg.encoder_blr, batch_size * cfg.grad_accum * accelerator.num_processes)
    schedule = FinetuneSchedule(optimizer, cfg.optim, cfg.epochs * steps_per_epoch, warmup, encoder_lr,
                                lp_steps=cfg.lp_epochs * steps_per_epoch)
    configure_deepspeed(accelerator, micro_batch=batch_size, clip_grad=cfg.optim.clip_grad,
                        width=mcfg.encoder.dim, mixed_precision=cfg.mixed_precision)
    model, optimizer = prepare(accelerator, model, optimizer)
    pos_weight = None
    if cfg.class_weighting and cfg.task.label:
        n_pos = float(train_df["label"].sum())
        pos_weight = torch.tensor((len(train_df) - n_pos) / max(n_pos, 1.0), device=accelerator.device)
    return Fold(index, spec, schema, bins, train_ds, val_ds, val_df, model, optimizer, schedule, batches,
                steps_per_epoch, pos_weight)


def new_model(cfg: FinetuneConfig, mcfg: MultimodalConfig, spec: InputSpec) -> torch.nn.Module:
    """The fold's fresh model: the ViT (pretrained encoder when given), or with a CNN --seg_arch a MONAI CNN
    segmenter reading the same image channels at the same crop size and voxel as the ViT's head would."""
    if cfg.seg_arch == "vit":
        return MultimodalModel.from_pretrained_encoder(mcfg, cfg.pretrained or None)
    from finetune.lesion.search import model_voxel_mm
    return CNNSegmenter(CNNSegConfig(arch=cfg.seg_arch, in_channels=mcfg.encoder.in_channels - 1,
                                     img_size=spec.input_size, voxel_mm=model_voxel_mm(spec), width=mcfg.seg_width))


@torch.no_grad()
def predict(model: MultimodalModel | CNNSegmenter, dataset, batch_size: int, device, time_bins=None,
            spacing_mm: float = 1.0) -> dict[str, np.ndarray]:
    """Per subject: the outcome scores ("prob", "risk") and, with a segmentation head, "dice" of the
    predicted mask against the crop's own (`spacing_mm`: the prepared voxel edge, for the crop's scale)."""
    import monai.data
    model.eval()
    parts: dict[str, list] = {}
    for batch in monai.data.DataLoader(dataset, batch_size=batch_size, shuffle=False):
        x = batch["x"].to(device) if "x" in batch else None
        out = model(x, batch["clinical"].to(device), batch["scale"].to(device) if "scale" in batch else None)
        scores = output_scores(out, time_bins)
        if "seg_logits" in out:
            seg = segmentation_metrics(out["seg_logits"].float().cpu() > 0, seg_target(x).cpu(),
                                       batch["scale"].numpy() * spacing_mm)
            scores["dice"] = torch.from_numpy(seg["dice"])
        for k, v in scores.items():
            parts.setdefault(k, []).append(v.cpu())
    model.train()
    return {k: torch.cat(v).numpy() for k, v in parts.items()}


def _epoch(cfg: FinetuneConfig, fold: Fold, accelerator, guard: NonFiniteGuard, stream, step: int) -> tuple[dict, int]:
    """One epoch of optimizer steps; returns the mean scalar terms of the good steps and the step count."""
    def loss_fn(micro):
        m, batch = micro
        reseed_torch(FoldSeeds.of(cfg.seed, fold.index).steps, m, accelerator.process_index)  # dropout, drop-path
        batch = {k: v.to(accelerator.device) if torch.is_tensor(v) else v for k, v in batch.items()}
        terms = cfg.task.loss(fold.model(batch.get("x"), batch["clinical"], batch.get("scale")), batch,
                              fold.pos_weight, seg_weight=cfg.model.seg_weight, hazard_l2=cfg.model.hazard_l2)
        if "seg_x" in batch:
            terms = window_segmentation_loss(cfg, fold, accelerator, batch["seg_x"], terms)
        return terms

    totals: dict[str, float] = {}
    good = 0
    for _ in range(fold.steps_per_epoch):
        fold.schedule.set_step(step)
        micro = (next(stream) for _ in range(cfg.grad_accum))
        terms, step_ok, _ = optimizer_step(accelerator, fold.model, fold.optimizer, guard, cfg.optim.clip_grad,
                                           micro, loss_fn)
        step += 1
        if step_ok:  # a skipped (non-finite) step does not poison the epoch's mean
            good += 1
            for k, v in terms.items():
                totals[k] = totals.get(k, 0.0) + v
    return {k: v / max(good, 1) for k, v in totals.items()}, step


def window_segmentation_loss(cfg: FinetuneConfig, fold: Fold, accelerator, windows: torch.Tensor,
                             terms: dict) -> dict:
    """`terms` plus "seg_windows": the segmentation loss (Dice + CE, weighted by --seg_weight) of the head on
    the items' segmentation windows [B, C + 1, S, S, S], most of them lesion-free, added to "loss".
    The head is called on the unwrapped model: its parameters already take part in this step's forward
    through the wrapper (the lesion crop's segmentation), so DDP and ZeRO-1/2 gather their gradients, summed
    over both uses, once per backward."""
    logits = accelerator.unwrap_model(fold.model).segment(windows)  # [B, 1, S, S, S]
    extra = cfg.task.seg_weight(cfg.model.seg_weight) * segmentation_loss()(logits.float(), seg_target(windows))
    return {**terms, "seg_windows": extra, "loss": terms["loss"] + extra}


def _stop_key(score: float | None, totals: dict, accelerator) -> float:
    """The early-stopping key: the validation score, or (when undefined: a one-class fold, no events)
    minus the training loss averaged over ranks, so every rank takes the same decision."""
    if score is not None:
        return score
    loss = torch.tensor(totals.get("loss", math.inf), device=accelerator.device)
    return -float(accelerator.reduce(loss, reduction="mean")) if accelerator.num_processes > 1 else -float(loss)


def fit_fold(cfg: FinetuneConfig, fold: Fold, accelerator, logger: RunLogger) -> EpochChoice:
    """Train for up to cfg.epochs (LP-FT's probe phase first, when set); returns the choice of weights to keep."""
    guard = NonFiniteGuard(cfg.max_nonfinite)
    stream = fold.batches.iterate(0)
    unwrapped = accelerator.unwrap_model(fold.model)
    choice = EpochChoice(cfg.epoch_choice, max(cfg.min_epochs, cfg.lp_epochs), cfg.patience, unwrapped, cfg.epochs)
    metric = cfg.task.validation_metric
    bar = progress(cfg.epochs, 0, accelerator.is_main_process, f"fold {fold.index}")
    step, stopped = 0, ""
    for epoch in range(cfg.epochs):
        if unwrapped.encoder is not None and cfg.lp_epochs:
            unwrapped.hold_encoder(epoch < cfg.lp_epochs)
        totals, step = _epoch(cfg, fold, accelerator, guard, stream, step)
        score = cfg.task.validation_score(predict(unwrapped, fold.val_ds, cfg.batch_size, accelerator.device,
                                                  fold.bins, fold.spec.spacing_mm), fold.val_ds.targets)
        choice.update(epoch, _stop_key(score, totals, accelerator))
        logger.log(step, {f"fold{fold.index}/train_{k}": v for k, v in totals.items()}
                   | ({f"fold{fold.index}/val_score": score} if score is not None else {}), epoch=epoch)
        bar.update(1)
        bar.set_postfix({"loss": f"{totals.get('loss', 0):.3f}",
                         metric: f"{score:.3f}" if score is not None else "n/a", "kept": choice.kept_epoch})
        if choice.should_stop(epoch):
            stopped = f"stopped early at epoch {epoch}: no {metric} gain for {cfg.patience} epochs"
            break
    if unwrapped.encoder is not None and cfg.lp_epochs:
        unwrapped.hold_encoder(False)
    bar.set_description(f"fold {fold.index} ({stopped + '; ' if stopped else ''}kept: {choice.describe()})")
    bar.close()
    return choice


def export_fold(cfg: FinetuneConfig, fold: Fold, choice: EpochChoice, eval_sets: dict[str, pd.DataFrame], columns: list[str],
                accelerator) -> dict:
    """Predict every set with the kept weights and save the fold model (schema, contract inside)."""
    model = accelerator.unwrap_model(fold.model)
    model.load_state_dict(choice.chosen_state())
    preds = {"val": (fold.val_df, predict(model, fold.val_ds, cfg.batch_size, accelerator.device, fold.bins,
                                          fold.spec.spacing_mm))}
    val_score = cfg.task.validation_score(preds["val"][1], fold.val_ds.targets)  # of the kept weights
    # A segmentation-only model's held-out sets are scored once, by the fold ensemble (finetune.lesion.segmentation).
    for name, df in eval_sets.items() if model.config.predicts_outcome else ():
        dataset = dataset_for(fold, df, cfg.task, model.config.uses_image)
        preds[name] = (df, predict(model, dataset, cfg.batch_size, accelerator.device, fold.bins,
                                   fold.spec.spacing_mm))
    folder = Path(cfg.output_dir) / "model" / f"fold{fold.index}"
    if accelerator.is_main_process:
        extra = {"clinical_schema": fold.schema.to_dict() if fold.schema else None, "clinical_columns": columns,
                 "time_bins": fold.bins.tolist() if fold.bins is not None else None,
                 "pretrained": cfg.pretrained or None, "fold": fold.index}
        if model.config.segments:  # its head trained on windows anywhere in the head, not lesion crops only
            extra[SEG_WINDOWS_KEY] = True
        card = {"training": {"fold": fold.index, "train_subjects": len(fold.train_ds),
                             "kept_weights": choice.describe(), "pretrained": cfg.pretrained or "none (from scratch)"},
                "metrics": {"validation_score": val_score}}
        model.save_pretrained(folder, extra_config=extra, card=card, input_spec=fold.spec)
    accelerator.wait_for_everyone()
    return {"preds": preds, "best_epoch": choice.kept_epoch, "kept": choice.describe(), "val_score": val_score,
            "folder": str(folder)}


def train_fold(cfg: FinetuneConfig, model_cfg: MultimodalConfig, spec: InputSpec, index: int, train_df: pd.DataFrame,
               val_df: pd.DataFrame, eval_sets: dict[str, pd.DataFrame], columns: list[str], accelerator,
               logger: RunLogger) -> dict:
    """Train one fold; returns predictions per set, the best epoch, its validation score and the model folder."""
    fold = build_fold(cfg, model_cfg, spec, index, train_df, val_df, columns, accelerator)
    choice = fit_fold(cfg, fold, accelerator, logger)
    result = export_fold(cfg, fold, choice, eval_sets, columns, accelerator)
    # Each fold prepares its own model; accelerate ties one DeepSpeed engine to an Accelerator until freed.
    accelerator.free_memory()
    return result
