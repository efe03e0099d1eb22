"""Atomic, rotated checkpoints that `--resume auto` finds, under DDP and every ZeRO stage."""
from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType
from safetensors.torch import save_file

from core.atomic import write_json
from core.errors import InputError
from engine.distributed import full_state_dict

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
