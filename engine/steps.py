"""One optimizer step of either loop, and what it rests on: per-step seeds, AdamW with its warm-up +
cosine schedule, and the guard that skips a non-finite loss or gradient identically on every rank.

- `step_seed` / `reseed_torch`: every step reseeds torch from (seed, step, rank), so a resumed run replays
  the same dropout / masks / augmentation as an uninterrupted one without restoring RNG state.
- `build_optimizer` / `WarmupCosine`: AdamW, then linear warm-up + cosine decay per optimizer step, which
  honours the per-group `lr_scale` that layer-wise lr decay sets.
- `optimizer_step`: the one micro-step block of both loops (accumulate, autocast, backward, clip, step).
"""
from __future__ import annotations

import math
from typing import Any, Callable, Iterable

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType

from core.errors import RunStopped
from engine.config import OptimConfig


class TrainingStopped(RunStopped):
    """The run cannot go on (e.g. too many consecutive skipped optimizer steps); the message says why."""


def step_seed(seed: int, step: int, rank: int = 0) -> int:
    """A distinct, reproducible 63-bit seed for each (seed, step, rank)."""
    # negative steps name set-up phases (e.g. -1 = weight init); wrap them into uint32 words
    words = [v % 2**32 for v in (seed, step, rank)]
    return int(np.random.SeedSequence(words).generate_state(1, np.uint64)[0] >> 1)


def reseed_torch(seed: int, step: int, rank: int = 0) -> torch.Generator:
    """Reseed torch's global RNG for this step and return a matching private generator."""
    s = step_seed(seed, step, rank)
    torch.manual_seed(s)
    g = torch.Generator()
    g.manual_seed(s)
    return g


def build_optimizer(params: Iterable | list[dict], cfg: OptimConfig) -> torch.optim.Optimizer:
    fused = torch.cuda.is_available()
    return torch.optim.AdamW(params, lr=cfg.lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay,
                             fused=fused or None)


class WarmupCosine:
    """Linear warmup then cosine decay, per optimiser step; honours each group's `lr_scale`.

    Stateless apart from the step, so resuming only needs the step number.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, cfg: OptimConfig, max_steps: int):
        self.optimizer, self.cfg, self.max_steps = optimizer, cfg, max(1, max_steps)

    def lr_at(self, step: int) -> float:
        c = self.cfg
        if step < c.warmup_steps:
            return c.lr * (step + 1) / c.warmup_steps
        t = min(1.0, (step - c.warmup_steps) / max(1, self.max_steps - c.warmup_steps))
        return c.min_lr + 0.5 * (c.lr - c.min_lr) * (1 + math.cos(math.pi * t))

    def set_step(self, step: int) -> float:
        lr = self.lr_at(step)
        for g in self.optimizer.param_groups:
            g["lr"] = lr * g.get("lr_scale", 1.0)
        return lr


class NonFiniteGuard:
    """Decides, identically on every rank, whether a micro-batch's loss is usable, and counts skipped steps.

    One unit: an optimizer step that is not applied, whether a non-finite loss spoiled it (however many of
    its micro-batches were non-finite) or its gradients were non-finite behind finite losses (DeepSpeed's
    overflow check, or the norm taken at the boundary elsewhere). `step_verdict` counts each once, in `total`
    (train/nonfinite_skipped) and `in_row`; only an applied step ends a run of them, since a finite loss says
    nothing about the gradients checked after it. `ok` only reports whether a micro-batch's loss is finite.
    """

    def __init__(self, max_in_row: int):
        self.max_in_row = max_in_row
        self.in_row = 0
        self.total = 0

    def ok(self, loss: torch.Tensor, accelerator: Accelerator) -> bool:
        """Whether this micro-batch's loss is finite on every rank (the same answer on each)."""
        bad = (~torch.isfinite(loss.detach())).float().reshape(1)  # [1]
        bad = accelerator.reduce(bad, reduction="sum") if accelerator.num_processes > 1 else bad
        return bad.item() == 0

    def step_verdict(self, skipped: bool, accelerator: Accelerator) -> bool:
        """At the accumulation boundary: whether the optimizer step is applied. `skipped`: this rank's verdict
        (any rank's skips it on all). A skipped step counts once; an applied one ends the run."""
        flag = torch.tensor([float(skipped)], device=accelerator.device)  # [1]
        # the gradients are all-reduced by now, so the ranks agree; the max makes sure of it
        skipped = bool((accelerator.reduce(flag, reduction="max") if accelerator.num_processes > 1 else flag).item())
        if not skipped:
            self.in_row = 0
            return True
        self.in_row += 1
        self.total += 1
        if self.in_row >= self.max_in_row:
            raise TrainingStopped(
                f"{self.in_row} consecutive skipped optimizer steps (a non-finite loss, or non-finite gradients "
                f"behind finite ones; {self.total} skipped in total); stopping. The last good checkpoint is "
                "kept: lower the learning rate or check the data, then --resume auto.")
        return False

    def state_dict(self) -> dict:
        return {"in_row": self.in_row, "total": self.total}

    def load_state_dict(self, d: dict) -> None:
        # older checkpoints also hold "holding" (a flag this one-unit count no longer needs); it is ignored
        self.in_row, self.total = int(d.get("in_row", 0)), int(d.get("total", 0))


def backward_and_step(accelerator: Accelerator, model, optimizer, loss: torch.Tensor, guard: NonFiniteGuard,
                      clip_grad: float, step_ok: bool = True) -> tuple[bool, bool]:
    """One micro-batch, called inside `accelerator.accumulate(model)`; both stages' loops use it.

    Backpropagates a finite loss; a non-finite one (decided alike on every rank) is skipped and
    spoils the whole optimizer step it belongs to, which is then not taken. On the accumulation
    boundary: clip, step (if the step is still good and the gradient norm finite) and zero the gradients;
    a step not applied, for either reason, counts once in the guard. DeepSpeed steps inside
    its backward, so there the skip goes through DeepSpeed's own (`_deepspeed_backward`).
    Returns (this micro-batch's loss was finite, the optimizer step is still good).
    """
    finite = guard.ok(loss, accelerator)
    step_ok = step_ok and finite
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        return finite, _deepspeed_backward(accelerator, optimizer, loss, finite, step_ok, guard)
    if finite:
        accelerator.backward(loss)
    if accelerator.sync_gradients:
        # finite losses can still give non-finite gradients (an op at a singular point): they skip the step,
        # as DeepSpeed's overflow check does, rather than write NaN into every weight
        skipped = not step_ok or not _clipped_norm_finite(accelerator, model, clip_grad)
        step_ok = guard.step_verdict(skipped, accelerator)
        if step_ok:
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return finite, step_ok


def _clipped_norm_finite(accelerator: Accelerator, model, clip_grad: float) -> bool:
    """Clip the gradients to `clip_grad` (when > 0); whether their total norm, taken before clipping, is finite."""
    if clip_grad > 0:
        norm = accelerator.clip_grad_norm_(model.parameters(), clip_grad)
    else:
        norm = torch.nn.utils.get_total_norm([p.grad for p in model.parameters() if p.grad is not None])
    return norm is None or bool(torch.isfinite(norm))


def _deepspeed_backward(accelerator: Accelerator, optimizer, loss: torch.Tensor, finite: bool, step_ok: bool,
                        guard: NonFiniteGuard) -> bool:
    """One micro-batch's backward under DeepSpeed; returns whether the optimizer step is still good.

    Here `accelerator.backward` also runs the engine's step at the accumulation boundary, and the engine
    accumulates the micro-batches' gradients in its own partitions, which `optimizer.zero_grad` (a no-op
    under DeepSpeed) never reaches. Skipping a bad micro-batch's backward would therefore still apply the
    other micro-batches (a bad non-boundary one), or leave their gradients to leak into the next step (a
    bad boundary one). So a bad micro-batch backpropagates NaN instead (`loss * nan` is NaN whatever its
    gradient was, and keeps the graph, so every rank's reduction hooks fire alike): at the boundary
    DeepSpeed's own overflow check (ZeRO 1-3) finds a non-finite gradient norm, skips the update and
    clears the accumulated gradients, and AdamW's step counter stays where it was.
    """
    accelerator.backward(loss if finite else loss * float("nan"))
    if not accelerator.sync_gradients:
        return step_ok
    skipped = optimizer.step_was_skipped  # DeepSpeed's verdict on the update it just ran
    if not step_ok and not skipped:
        raise TrainingStopped(
            "DeepSpeed applied an optimizer step that a non-finite loss spoiled: its overflow check is off "
            "(zero_optimization.stage 0, or compute_grad_norm false). The last good checkpoint is kept.")
    return guard.step_verdict(skipped, accelerator)


def optimizer_step(accelerator: Accelerator, model, optimizer, guard: NonFiniteGuard, clip_grad: float,
                   micro_batches: Iterable, loss_fn: Callable[[Any], dict]) -> tuple[dict[str, float], bool, dict]:
    """One optimizer step over `grad_accum` micro-batches: the micro-step block of both loops.

    `loss_fn(batch)` runs the forward (under autocast) and returns a dict with "loss". Returns the
    scalar terms averaged over the micro-batches, whether the step was taken (no micro-batch was
    non-finite), and the last micro-batch's outputs (for previews).
    """
    sums: dict[str, float] = {}
    step_ok, outputs, n = True, {}, 0
    for batch in micro_batches:
        with accelerator.accumulate(model):
            with accelerator.autocast():
                outputs = loss_fn(batch)
            _, step_ok = backward_and_step(accelerator, model, optimizer, outputs["loss"], guard, clip_grad, step_ok)
        for k, v in outputs.items():
            if torch.is_tensor(v) and v.ndim == 0:
                sums[k] = sums.get(k, 0.0) + float(v.detach())
        n += 1
    return {k: v / max(n, 1) for k, v in sums.items()}, step_ok, outputs
