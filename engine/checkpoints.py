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
from safetensors import safe_open
from safetensors.torch import save_file

from core.atomic import write_json
from core.config import flat_dict
from core.errors import InputError, RunStopped
from engine.distributed import full_state_dict

_CKPT = re.compile(r"^ckpt-(\d+)$")


class CheckpointNotWritten(RunStopped):
    """A checkpoint could not be written (a full disk, a quota): the run stops; the last complete one stays."""


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
        """The checkpoint to resume from: None for a fresh run, the newest complete one for "auto" (None when
        there is none yet), else the path given. A fresh run in a folder that holds another run's checkpoints
        (complete or not) or log is refused before anything is written: its rotation and export would take
        the other run's steps for its own."""
        if not resume:
            self.refuse_used()
            return None
        if resume == "auto":
            return self.latest()
        p = Path(resume)
        if not (p / "trainer_state.json").is_file():
            raise InputError(f"{p}: not a complete checkpoint (no trainer_state.json)")
        return p

    def refuse_used(self) -> None:
        """InputError when checkpoints/ is not empty (a half-written checkpoint counts: a run died in it) or
        output_dir has a metrics.jsonl with rows (a run died before its first checkpoint)."""
        found = sorted(p.name for p in self.root.iterdir()) if self.root.is_dir() else []
        log = self.root.parent / "metrics.jsonl"
        if not found and not (log.is_file() and log.stat().st_size):
            return
        what = f"{self.root} holds another run's checkpoints ({', '.join(found[-2:])})" if found else \
            f"{log} holds another run's log"
        raise InputError(f"{what}: continue that run with --resume auto, or start a fresh one in a new --output_dir")

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
        """Write ckpt-<step> (a collective: every rank calls it). A write that fails (OSError: a full disk)
        stops the run on every rank with CheckpointNotWritten; the half-written folder is removed, so the
        last complete checkpoint stays the newest that `latest()` and `--resume auto` find."""
        final = self.root / f"ckpt-{step:07d}"
        tmp = self.root / f".tmp-ckpt-{step:07d}"
        error = None
        if accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
            error = _attempt(lambda: tmp.mkdir(parents=True))
        self._agree(accelerator, error, tmp, step)  # also the barrier: tmp exists before any rank writes
        error = _attempt(lambda: accelerator.save_state(str(tmp)))
        self._agree(accelerator, error, tmp, step)  # every rank's files are in tmp before it is renamed
        full = full_state_dict(accelerator, model)  # a collective: gathers ZeRO partitions
        if accelerator.is_main_process:
            error = _attempt(lambda: self._finish(accelerator, tmp, final, full, step, state, files))
        self._agree(accelerator, error, tmp, step)
        return final

    def _finish(self, accelerator: Accelerator, tmp: Path, final: Path, full: dict, step: int, state: dict,
                files: dict[str, Any]) -> None:
        """Main process: the full weights and the JSON files into tmp, trainer_state.json last (it marks the
        folder complete), then the rename and the rotation."""
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

    def _agree(self, accelerator: Accelerator, error: Exception | None, tmp: Path, step: int) -> None:
        """Every rank learns whether any rank failed to write, so all stop together rather than waiting for
        the failed one at the next collective; the half-written tmp folder is removed."""
        failed = torch.tensor([float(error is not None)], device=accelerator.device)  # [1]
        if accelerator.num_processes > 1:
            failed = accelerator.reduce(failed, reduction="sum")
        if failed.item() == 0:
            return
        if accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
        last = self.latest()
        why = (getattr(error, "strerror", None) or str(error)) if error is not None else "a write failed on another rank"
        kept = f"the last complete checkpoint {last} is kept" if last else "no complete checkpoint exists yet"
        raise CheckpointNotWritten(f"{self.root}: could not write the checkpoint of step {step} ({why}); {kept}: "
                                   "free some space, then continue with --resume auto")

    def load(self, accelerator: Accelerator, path: Path, model_config: dict | None = None) -> dict:
        """Load `path` into the prepared model and optimizer; its trainer_state. `model_config` (today's model
        section of the run config, as a dict) lets a refusal name the model flags that changed."""
        refuse_other_weights(accelerator, path, model_config)
        accelerator.load_state(str(path))
        return json.loads((path / "trainer_state.json").read_text())


def refuse_other_weights(accelerator: Accelerator, path: Path, model_config: dict | None = None) -> None:
    """InputError in one line naming `path`, the keys and the shapes when the checkpoint's weights are not
    today's model's: said before accelerate's or DeepSpeed's strict load raises its multi-line error, and
    nothing is filled in. The checkpoint's names and shapes are read from weights.safetensors (the full,
    unwrapped state dict every checkpoint holds; its header only). The cause named is the model flags that
    differ between the checkpoint's run_config.json and `model_config`; an older mimfm only when they agree."""
    weights = path / "weights.safetensors"
    models = accelerator._models  # what load_state loads into; accelerate has no public name for it
    if not weights.is_file() or len(models) != 1:
        return
    with safe_open(str(weights), framework="pt") as f:
        saved = {k: list(f.get_slice(k).get_shape()) for k in f.keys()}
    expected = _full_shapes(accelerator.unwrap_model(models[0]))
    missing, unexpected = sorted(expected.keys() - saved.keys()), sorted(saved.keys() - expected.keys())
    resized = [f"{k} {saved[k]} -> {expected[k]}" for k in sorted(saved.keys() & expected.keys())
               if saved[k] != expected[k]]
    if not missing and not unexpected and not resized:
        return
    what = "; ".join(f"{name} {_listed(keys)}" for name, keys in
                     (("missing", missing), ("unexpected", unexpected), ("other shapes", resized)) if keys)
    changed = _changed_flags(path / "run_config.json", model_config)
    if changed:
        raise InputError(f"{path}: its weights do not match this model ({what}): the run was made with other model "
                         f"flags ({_listed(changed)}); resume it with the flags it was made with, or start a new "
                         "run (a new --output_dir)")
    # its encoder still exports (models.export reads the encoder's keys only), so only resuming is refused
    raise InputError(f"{path}: its weights do not match this model ({what}): the checkpoint was written by an older "
                     "mimfm; start a new run (a new --output_dir), or resume it with the mimfm that wrote it "
                     "(python -m models.export still exports its encoder)")


def _full_shapes(module: torch.nn.Module) -> dict[str, list[int]]:
    """Each state-dict entry's whole shape; under ZeRO-3 a parameter is an empty placeholder whose whole shape
    DeepSpeed keeps in `ds_shape` (buffers are never partitioned)."""
    shapes = {k: list(v.shape) for k, v in module.state_dict().items()}
    for name, p in module.named_parameters(remove_duplicate=False):
        if name in shapes and hasattr(p, "ds_shape"):
            shapes[name] = list(p.ds_shape)
    return shapes


def _changed_flags(run_config: Path, model_config: dict | None) -> list[str]:
    """`--model.<flag> <then> -> <now>` for each model flag whose value differs between the checkpoint's saved
    run config and today's; empty when either is unknown (a checkpoint without run_config.json). A flag only
    one side has is not counted: it was added or removed since, which is the older-mimfm case."""
    if model_config is None or not run_config.is_file():
        return []
    then = json.loads(run_config.read_text()).get("model")
    if not isinstance(then, dict):
        return []
    now = json.loads(json.dumps(model_config))  # tuples -> lists, as the saved JSON holds them
    old, new = flat_dict(then), flat_dict(now)
    return [f"--model.{k} {_shown(old[k])} -> {_shown(new[k])}" for k in sorted(old.keys() & new.keys())
            if old[k] != new[k]]


def _shown(v) -> str:
    return " ".join(map(str, v)) if isinstance(v, list) else str(v)  # a list as the CLI takes it: 0.75 0.75


def _listed(keys: list[str], most: int = 5) -> str:
    return ", ".join(keys[:most]) + (f" and {len(keys) - most} more" if len(keys) > most else "")


def _attempt(write) -> Exception | None:
    """Run `write`; the error it raises is returned rather than raised, so the ranks can agree on it before
    anyone stops. Not only OSError (ENOSPC, EDQUOT, EFBIG, ...): on a full disk safetensors raises its own
    SafetensorError and torch.save a RuntimeError ("enforce fail at inline_container.cc")."""
    try:
        write()
    except Exception as e:
        return e
    return None
