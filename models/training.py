"""Training-loop plumbing shared by pretraining and fine-tuning (never copied into either). The
Accelerator and DeepSpeed set-up are in models/distributed.py.

- `OptimConfig` / `LoopConfig`: the knobs both loops share.
- `build_optimizer` / `WarmupCosine`: AdamW, then linear warmup + cosine decay per optimizer step,
  which honours the per-group `lr_scale` that layer-wise lr decay sets.
- `optimizer_step`: the one micro-step block of both loops (accumulate, autocast, backward, clip, step).
- `RunLogger`: metrics.jsonl plus accelerate's trackers (`--report_to`), main process only.
- `Checkpointer`: atomic, rotated checkpoints that `--resume auto` can find.
- `NonFiniteGuard`: skip a step whose loss is NaN/inf on any rank; stop after too many in a row.
- `seed_step`: every step reseeds torch from (seed, step, rank), so a resumed run replays the same
  dropout / masks / augmentation as an uninterrupted one without restoring RNG state.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Literal

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType
from safetensors.torch import save_file

from data.atomic import write_json
from data.errors import ConfigError, InputError, RunStopped
from models.distributed import full_state_dict, trackers


class TrainingStopped(RunStopped):
    """The run cannot go on (e.g. too many non-finite losses in a row); the message says why."""


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
    max_nonfinite: int = 5          # consecutive non-finite losses before the run stops
    resume: str = ""                # "" (fresh), "auto" (newest complete checkpoint), or a checkpoint path
    report_to: str = "tensorboard"  # trackers: tensorboard | wandb | mlflow | all | none (comma-separated)

    def __post_init__(self):
        if self.mixed_precision not in ("auto", "no", "bf16"):
            raise ConfigError(f"--mixed_precision {self.mixed_precision!r}: expected auto, no or bf16")
        if self.grad_accum < 1:
            raise ConfigError(f"--grad_accum must be >= 1, got {self.grad_accum}")
        trackers(self.report_to)  # an unknown or missing tracker fails at parse time


def absolute_paths(cfg, names: Iterable[str]):
    """The config with its non-empty path fields resolved, so a saved config works from any folder."""
    return dataclasses.replace(cfg, **{n: str(Path(getattr(cfg, n)).resolve()) for n in names if getattr(cfg, n)})


def step_seed(seed: int, step: int, rank: int = 0) -> int:
    """A distinct, reproducible 63-bit seed for each (seed, step, rank)."""
    # negative steps name set-up phases (e.g. -1 = weight init); wrap them into uint32 words
    words = [v % 2**32 for v in (seed, step, rank)]
    return int(np.random.SeedSequence(words).generate_state(1, np.uint64)[0] >> 1)


def seed_step(seed: int, step: int, rank: int = 0) -> torch.Generator:
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


class RunLogger:
    """Scalars to `metrics.jsonl` and to accelerate's trackers (TensorBoard by default), main process only."""

    def __init__(self, accelerator: Accelerator, output_dir: str | os.PathLike):
        self.accelerator = accelerator
        self.enabled = accelerator.is_main_process
        self.path = Path(output_dir) / "metrics.jsonl"
        if self.enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        if accelerator.log_with:
            accelerator.init_trackers("tensorboard")  # TensorBoard writes under <output_dir>/tensorboard

    def log(self, step: int, scalars: dict[str, float], **extra: Any) -> None:
        scalars = {k: float(v) for k, v in scalars.items()}
        if self.enabled:
            row = {"step": step, "time": round(time.time(), 3), **scalars, **extra}
            with open(self.path, "a") as f:
                f.write(json.dumps(row) + "\n")
        self.accelerator.log(scalars, step=step)

    def truncate_after(self, step: int) -> None:
        """On resume, drop rows logged after the checkpoint so the log has no duplicate steps."""
        if not self.enabled or not self.path.exists():
            return
        rows = [r for r in self.path.read_text().splitlines() if r.strip() and json.loads(r)["step"] <= step]
        tmp = self.path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(r + "\n" for r in rows))
        os.replace(tmp, self.path)

    def close(self) -> None:
        # Not accelerator.end_training(): that also destroys the process group, which the run still needs.
        for tracker in self.accelerator.trackers:
            tracker.finish()


class NonFiniteGuard:
    """Decides, identically on every rank, whether this step's loss is usable."""

    def __init__(self, max_in_row: int):
        self.max_in_row = max_in_row
        self.in_row = 0
        self.total = 0

    def ok(self, loss: torch.Tensor, accelerator: Accelerator) -> bool:
        bad = (~torch.isfinite(loss.detach())).float().reshape(1)
        bad = accelerator.reduce(bad, reduction="sum") if accelerator.num_processes > 1 else bad
        if bad.item() == 0:
            self.in_row = 0
            return True
        self.in_row += 1
        self.total += 1
        if self.in_row >= self.max_in_row:
            raise TrainingStopped(
                f"{self.in_row} non-finite losses in a row ({self.total} in total); stopping. "
                "The last good checkpoint is kept: lower the learning rate or check the data, then --resume auto.")
        return False

    def state_dict(self) -> dict:
        return {"in_row": self.in_row, "total": self.total}

    def load_state_dict(self, d: dict) -> None:
        self.in_row, self.total = int(d.get("in_row", 0)), int(d.get("total", 0))


def backward_and_step(accelerator: Accelerator, model, optimizer, loss: torch.Tensor, guard: NonFiniteGuard,
                      clip_grad: float, step_ok: bool = True) -> tuple[bool, bool]:
    """One micro-batch, called inside `accelerator.accumulate(model)`; both stages' loops use it.

    Backpropagates a finite loss; a non-finite one (decided alike on every rank) is skipped and
    spoils the whole optimizer step it belongs to, which is then not taken. On the accumulation
    boundary: clip, step (if the step is still good) and zero the gradients.
    Returns (this micro-batch's loss was finite, the optimizer step is still good).
    """
    finite = guard.ok(loss, accelerator)
    if finite:
        accelerator.backward(loss)
    step_ok = step_ok and finite
    if accelerator.sync_gradients:
        if step_ok and clip_grad > 0:
            accelerator.clip_grad_norm_(model.parameters(), clip_grad)
        if step_ok:
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return finite, step_ok


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


_CKPT = re.compile(r"^ckpt-(\d+)$")


class Checkpointer:
    """Atomic, rotated checkpoints under `output_dir/checkpoints/ckpt-<step>`.

    A checkpoint is written to a temporary folder (accelerate's state for model, optimizer and
    any DeepSpeed shards, plus `weights.safetensors` with the full unwrapped weights and
    `trainer_state.json`), then renamed; `trainer_state.json` marks it complete.
    """

    def __init__(self, output_dir: str | Path, keep: int):
        self.root = Path(output_dir) / "checkpoints"
        self.keep = max(1, keep)

    def complete(self) -> list[Path]:
        if not self.root.is_dir():
            return []
        found = [(int(m.group(1)), p) for p in self.root.iterdir()
                 if (m := _CKPT.match(p.name)) and (p / "trainer_state.json").is_file()]
        return [p for _, p in sorted(found)]

    def latest(self) -> Path | None:
        done = self.complete()
        return done[-1] if done else None

    def resolve(self, resume: str) -> Path | None:
        if not resume:
            return None
        if resume == "auto":
            return self.latest()
        p = Path(resume)
        if not (p / "trainer_state.json").is_file():
            raise InputError(f"{p}: not a complete checkpoint (no trainer_state.json)")
        return p

    @staticmethod
    def check_resumable(accelerator: Accelerator, path: Path | None) -> None:
        """A ZeRO checkpoint resumes only on as many ranks as wrote it (its optimizer state is sharded per
        rank); say so before the run starts, rather than from inside DeepSpeed's loader."""
        if path is None or accelerator.distributed_type != DistributedType.DEEPSPEED:
            return
        wrote = json.loads((path / "trainer_state.json").read_text()).get("world_size")
        if wrote is not None and wrote != accelerator.num_processes:
            raise InputError(f"{path}: written by {wrote} DeepSpeed ranks, this run has {accelerator.num_processes}; "
                             f"resume it with --num_processes {wrote} (ZeRO shards the optimizer state per rank)")

    def save(self, accelerator: Accelerator, model: torch.nn.Module, step: int, state: dict,
             files: dict[str, Any]) -> Path:
        final = self.root / f"ckpt-{step:07d}"
        tmp = self.root / f".tmp-ckpt-{step:07d}"
        if accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        accelerator.wait_for_everyone()
        accelerator.save_state(str(tmp))
        accelerator.wait_for_everyone()  # every rank's files are in tmp before it is renamed
        full = full_state_dict(accelerator, model)  # a collective: gathers ZeRO partitions
        if accelerator.is_main_process:
            # Every step reseeds from (seed, step, rank), so accelerate's pickled RNG states are not
            # needed; dropping them means resuming never unpickles anything.
            for rng in tmp.glob("random_states_*.pkl"):
                rng.unlink()
            # Not model.safetensors: accelerate wrote that one (wrapped keys) and load_state needs it.
            save_file({k: v.detach().float().cpu().contiguous() for k, v in full.items()}, str(tmp / "weights.safetensors"))
            for name, obj in files.items():
                write_json(tmp / name, obj)
            write_json(tmp / "trainer_state.json", {"step": step, "world_size": accelerator.num_processes, **state})
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
            for old in self.complete()[:-self.keep]:
                shutil.rmtree(old, ignore_errors=True)
        accelerator.wait_for_everyone()
        return final

    def load(self, accelerator: Accelerator, path: Path) -> dict:
        accelerator.load_state(str(path))
        return json.loads((path / "trainer_state.json").read_text())


def progress(total: int, initial: int, enabled: bool, desc: str):
    from tqdm.auto import tqdm
    return tqdm(total=total, initial=initial, disable=not enabled, desc=desc, dynamic_ncols=True)


def collate_items(m: int, items: list):
    """The default `collate` of ResumableBatches: MONAI's list_data_collate; `m` is not needed."""
    from monai.data import list_data_collate
    return list_data_collate(items)


class _StepItems(torch.utils.data.Dataset):
    """Item j of the remaining (epoch, index) order, tagged with the micro-batch counter it belongs to.

    The item's epoch is set on the dataset right before it is read (in whichever worker reads it), so
    one loader can run across epochs: its workers start once per span of epochs, not once per epoch.
    """

    def __init__(self, dataset, order: list[tuple[int, int]], batch_size: int, first: int):
        self.dataset, self.order, self.batch_size, self.first = dataset, order, batch_size, first

    def __len__(self) -> int:
        return len(self.order)

    def __getitem__(self, j: int):
        epoch, index = self.order[j]
        if hasattr(self.dataset, "set_epoch"):
            self.dataset.set_epoch(epoch)
        return self.first + j // self.batch_size, self.dataset[index]


class _StepCollate:
    """Collates a tagged micro-batch into (m, collate(m, items)); runs in the loader's workers."""

    def __init__(self, collate: Callable[[int, list], Any]):
        self.collate = collate

    def __call__(self, tagged: list) -> tuple[int, Any]:
        m = tagged[0][0]
        return m, self.collate(m, [item for _, item in tagged])


class ResumableBatches:
    """Micro-batches indexed by a global counter, so a resumed run continues mid-epoch exactly.

    Batch `m` is batch `m % per_epoch` of epoch `m // per_epoch`, with the sampler's order and the
    dataset's augmentation both seeded by the epoch. Nothing before the resume point is loaded.
    `collate(m, items)` makes a micro-batch from its items in the loader's workers (default: MONAI's
    list_data_collate); it is told `m`, so what it draws can be seeded per micro-batch, never from
    worker state, and is the same for any number of workers.
    """

    LOADER_SPAN = 512  # micro-batches per loader (rounded up to whole epochs)

    def __init__(self, dataset, batch_size: int, seed: int, num_replicas: int, rank: int,
                 num_workers: int = 0, drop_last: bool = True, shuffle: bool = True,
                 collate: Callable[[int, list], Any] = collate_items):
        from torch.utils.data.distributed import DistributedSampler
        self.dataset, self.batch_size, self.num_workers = dataset, batch_size, num_workers
        self.collate = _StepCollate(collate)
        self.sampler = DistributedSampler(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle,
                                          seed=seed, drop_last=False)
        n = len(self.sampler)
        self.per_epoch = n // batch_size if drop_last else math.ceil(n / batch_size)
        if self.per_epoch == 0:
            raise InputError(f"{len(dataset)} items cannot fill one batch of {batch_size} per process "
                             f"on {num_replicas} process(es): lower the batch size or add data")

    def iterate(self, start: int):
        """Yield (m, batch) for m = start, start + 1, ... forever."""
        import monai.data
        m = start
        # One loader spans about LOADER_SPAN micro-batches (whole epochs): starting workers once per epoch
        # left the step waiting for data 12-22% of the time on a small pretraining cohort.
        span = max(1, math.ceil(self.LOADER_SPAN / self.per_epoch))
        while True:
            epoch, pos = divmod(m, self.per_epoch)
            order = []
            for e in range(epoch, epoch + span):
                self.sampler.set_epoch(e)
                first = pos * self.batch_size if e == epoch else 0
                order += [(e, i) for i in list(self.sampler)[first: self.per_epoch * self.batch_size]]
            loader = monai.data.DataLoader(_StepItems(self.dataset, order, self.batch_size, m),
                                           batch_size=self.batch_size, shuffle=False, num_workers=self.num_workers,
                                           collate_fn=self.collate, persistent_workers=False)
            for tagged_m, batch in loader:
                assert tagged_m == m, (tagged_m, m)  # the loader keeps the order it was given
                yield m, batch
                m += 1
