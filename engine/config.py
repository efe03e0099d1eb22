"""The knobs both training loops share; the stage configs (pretrain/config.py, finetune/config.py) extend them."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from core.errors import ConfigError
from engine.logs import trackers


@dataclass
class OptimConfig:
    lr: float = 1.5e-4            # peak learning rate (after warmup)
    min_lr: float = 1e-6          # learning rate at the end of the cosine decay
    weight_decay: float = 0.05    # AdamW decoupled weight decay (not on biases, norms, embeddings)
    betas: tuple[float, float] = (0.9, 0.95)  # AdamW betas
    warmup_steps: int = 20        # optimizer steps of linear warmup
    clip_grad: float = 1.0        # max grad norm; 0 disables clipping


@dataclass
class LoopConfig:
    """What both training loops share; PretrainConfig and FinetuneConfig extend it."""
    seed: int = 0                   # seeds everything: weights, order, masks, augmentation, splits
    grad_accum: int = 1             # micro-batches per optimizer step
    mixed_precision: Literal["auto", "no", "bf16"] = "auto"  # auto: bf16 on CUDA, fp32 on CPU (autocast)
    # consecutive skipped optimizer steps (each spoiled by a non-finite loss in any of its grad_accum micro-batches,
    # or skipped for non-finite gradients behind finite ones) before the run stops
    max_nonfinite: int = 5
    report_to: str = "tensorboard"  # trackers: tensorboard | wandb | mlflow | all | none (comma-separated)
    # Worker processes that prepare this rank's share of the volumes into the cache (rank r prepares rows
    # r::world, then the ranks wait once for each other); 0: the cores per local rank
    prep_workers: int = 0
    # Minutes a collective may wait before the run stops (the process group's timeout; NCCL's own default is
    # 10). A rank's share of preparing that is measured to outlast it is said up front, with an estimate.
    dist_timeout_min: float = 30.0

    def __post_init__(self):
        if self.mixed_precision not in ("auto", "no", "bf16"):
            raise ConfigError(f"--mixed_precision {self.mixed_precision!r}: expected auto, no or bf16")
        if self.grad_accum < 1:
            raise ConfigError(f"--grad_accum must be >= 1, got {self.grad_accum}")
        trackers(self.report_to)  # an unknown or missing tracker fails at parse time
