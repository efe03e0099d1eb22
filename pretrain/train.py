"""Stage one: MiM hierarchical masked pretraining of a 3D ViT.

    accelerate launch -m pretrain --config launch/pretrain_tiny_cpu.yaml --data DIR --output_dir runs/pt

Data -> cache (data.prepare) -> level-1 views (data.views.PretrainCrops: a share centred on lesions,
from masks or from candidates found without labels, the rest uniform), cut in the DataLoader workers, which
send only the crops -> hierarchical masks (models.mim_masks; a lesion view's first child holds the lesion),
built with their loss targets in the loop on the training device (pretrain.batches: on a GPU the CPU-heavy
resizes leave the loader's cores) -> MiMModel (its forward returns a MiMOutput: per-level reconstructions
and alignment pairs, and the losses). Checkpoints are atomic and rotated; `--resume auto` continues exactly;
a fresh run refuses an output folder that holds another run's checkpoints or log; at the end the checkpoint
of this run's last step is exported, with its input contract, as a Hugging Face-format folder in
`output_dir/encoder`. The configuration is pretrain/config.py.
"""
from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

import torch

from core.cli import parse_config
from core.config import absolute_paths, save_config, to_dict
from core.errors import ConfigError, InputError, cli_entry
from engine.batches import ResumableBatches
from engine.checkpoints import Checkpointer
from engine.distributed import (configure_deepspeed, make_accelerator, prepare, weight_decay_groups, zero3_init,
                                zero_stage)
from engine.logs import RunLogger, progress
from engine.steps import NonFiniteGuard, WarmupCosine, build_optimizer, optimizer_step, reseed_torch
from models.mim import MiMModel
from pretrain.batches import CropCollate, LevelBuilder
from pretrain.config import PATH_FIELDS, PretrainConfig


def load_training_volumes(cfg: PretrainConfig, show_progress: bool, max_volumes: int = 0, accelerator=None):
    """(views dataset, subject names) from the --data folder / manifest / datalist, prepared into the cache;
    with max_volumes, only its first max_volumes volumes (nothing is prepared for the rest). Under an
    `accelerator`, each rank prepares its share of the volumes and then reads the whole cache (data/shard.py)."""
    import pandas as pd

    from data.manifest import one_sample_per_image, read_any
    from data.shard import Shard, of_run, prepare_shared
    from data.views import PretrainCrops, anchor_fractions

    if not cfg.data:
        raise InputError("--data is required: a folder of NIfTI files, a manifest CSV or a datalist JSON")
    # Each sequence is its own sample, so a subject without one simply has fewer samples.
    table = read_any(cfg.data, replace(cfg.prep, missing_image="zero"))
    if max_volumes:
        table = table.head(max_volumes)
    if len(table) == 0:
        raise InputError(f"{cfg.data}: no volumes found")
    cache = cfg.cache_dir or str(Path(cfg.output_dir).parent / "cache")
    use_masks = bool(cfg.lesion_view_fraction) and "mask" in table.columns and table["mask"].notna().all()
    if not use_masks:  # labels are not needed: pretraining sees the images only
        table = table.drop(columns=[c for c in ("mask",) if c in table.columns])
    parts = one_sample_per_image(table, cfg.prep)
    if len(parts) > 1 and show_progress:
        print("pretraining samples per sequence: "
              + ", ".join(f"{column} {len(t)}" for (column, _), (t, _) in zip(cfg.prep.channels(), parts)))
    shard, gather = of_run(accelerator) if accelerator is not None else (Shard(show=show_progress), None)
    prepared = pd.concat([prepare_shared(t, prep, cache, shard=shard, gather=gather, workers=cfg.prep_workers,
                                         require_lesion=False, timeout_s=cfg.dist_timeout_min * 60)[0]
                          for t, prep in parts], ignore_index=True)
    centres = lesion_centres(prepared, cfg, use_masks, show_progress) if cfg.lesion_view_fraction else None
    fractions, jitter = anchor_fractions(cfg.model.encoder.grid, cfg.model.masks.child_patches, cfg.model.masks.levels)
    dataset = PretrainCrops(list(prepared["cache_image"]), crop_size=cfg.crop_size,
                            crops_per_volume=cfg.crops_per_volume, seed=cfg.seed,
                            bright_fraction=cfg.bright_crop_fraction, bright_quantile=cfg.bright_quantile,
                            lesion_fraction=cfg.lesion_view_fraction, lesion_centres=centres,
                            anchor_fractions=fractions, anchor_jitter=jitter)
    return dataset, [str(s) for s in prepared["subject_id"]]


def lesion_centres(prepared, cfg: PretrainConfig, use_masks: bool, show_progress: bool) -> list:
    """Per volume, the lesion centres [K, 3] in cache voxels: the masks' components, or candidates."""
    import numpy as np

    from data.cache import load_array
    from data.candidates import cached_candidates, mask_centres
    from data.datasets import pad_value_of
    from engine.logs import progress
    bar = progress(len(prepared), 0, show_progress, "lesion masks" if use_masks else "lesion candidates")
    spacing = float(np.mean(cfg.prep.spacing))
    centres = []
    for _, row in prepared.iterrows():
        if use_masks:
            centres.append(mask_centres(load_array(row["cache_mask"])[0]))
        else:
            image = Path(row["cache_image"])
            centres.append(cached_candidates(image, spacing, cfg.candidates, pad_value_of(image)))
        bar.update(1)
    bar.close()
    return centres


class StepClock:
    """How long the loop waits for data, as a share of the whole step (goal: under 5%).

    window() returns, since its last call: "train/data_wait" (waiting for the loader / whole step time),
    "train/step_s" (mean seconds per step) and "train/hierarchy_s" (mean seconds per step the loop spent
    building the MiM levels and their targets on the device, inside the step's time).
    """

    def __init__(self):
        self.wait = self.total = self.build = 0.0
        self.steps = 0
        self._t0 = self._t1 = 0.0
        self._events: list = []  # (start, end) CUDA events of level building not yet read

    def start(self) -> None:
        self._t0 = time.perf_counter()

    def loaded(self) -> None:
        self._t1 = time.perf_counter()

    @contextmanager
    def building(self, device: torch.device):
        """Times the block as level building. On a GPU its kernels run asynchronously, so CUDA events around it
        are read at window() (log steps only): timing never stalls the host between the build and the step."""
        if device.type != "cuda":
            t = time.perf_counter()
            yield
            self.build += time.perf_counter() - t
            return
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        yield
        end.record()
        self._events.append((start, end))

    def done(self) -> None:
        t2 = time.perf_counter()
        self.wait += self._t1 - self._t0
        self.total += t2 - self._t0
        self.steps += 1

    def share(self) -> float:
        return self.wait / self.total if self.total else 0.0

    def window(self) -> dict[str, float]:
        for start, end in self._events:
            end.synchronize()
            self.build += start.elapsed_time(end) / 1000.0  # ms -> s
        self._events.clear()
        n = max(self.steps, 1)
        out = {"train/data_wait": self.share(), "train/step_s": self.total / n, "train/hierarchy_s": self.build / n}
        self.wait = self.total = self.build = 0.0
        self.steps = 0
        return out


def checkpoint_files(cfg: PretrainConfig, summary: dict) -> dict:
    return {
        "encoder_config.json": to_dict(cfg.model.encoder),
        "input_spec.json": cfg.input_spec().to_dict(),
        "summary.json": summary,
        "run_config.json": to_dict(cfg),
    }


def build(cfg: PretrainConfig, accelerator):
    """Model, optimizer (prepared), schedule and the resumable batch stream's source."""
    # Every rank prepares its share of the volumes (rows rank::world), the ranks meet once, and each reads
    # the whole cache: no rank waits for a whole corpus's preparing.
    dataset, subjects = load_training_volumes(cfg, accelerator.is_main_process, accelerator=accelerator)
    batches = ResumableBatches(dataset, cfg.batch_size, cfg.seed, accelerator.num_processes,
                               accelerator.process_index, cfg.num_workers, collate=CropCollate(),
                               pin_memory=accelerator.device.type == "cuda")  # not on a --cpu run of a GPU host
    model = build_model(cfg, accelerator)
    # By each parameter's whole shape: under ZeRO-3 the module holds empty placeholders (timm's rule reads ndim).
    groups = weight_decay_groups(model, cfg.optim.weight_decay, model.no_weight_decay())
    optimizer = build_optimizer(groups, cfg.optim)
    model, optimizer = prepare(accelerator, model, optimizer)
    return model, optimizer, WarmupCosine(optimizer, cfg.optim, cfg.max_steps), batches, subjects


def build_model(cfg: PretrainConfig, accelerator) -> MiMModel:
    """The MiMModel of a run, with DeepSpeed's config filled from the run. Under ZeRO-3 it is built inside
    `zero3_init`: each module's weights are partitioned across the ranks as its own __init__ returns, so no
    rank ever holds the whole model (its peak memory at start-up). Elsewhere an ordinary build, the same
    weights for the same seed."""
    if cfg.model.distill.weight > 0 and zero_stage(accelerator) == 3:
        raise ConfigError("--model.distill.weight > 0 under DeepSpeed ZeRO-3: the EMA teacher follows whole student "
                          "weights, which ZeRO-3 shards; use launch/accelerate/deepspeed_zero2.yaml or DDP")
    enc = cfg.model.encoder
    # Before the build: zero.Init reads which parameters stay whole from the filled persistence threshold.
    configure_deepspeed(accelerator, micro_batch=cfg.batch_size * cfg.crops_per_volume, clip_grad=cfg.optim.clip_grad,
                        width=max(enc.dim, cfg.model.decoder_dim), mixed_precision=cfg.mixed_precision)
    reseed_torch(cfg.seed, -1)  # identical initial weights on every rank and every (re)start
    with zero3_init(accelerator):
        model = MiMModel(cfg.model)
    if enc.grad_checkpointing:
        model.encoder.set_grad_checkpointing(True)
    if cfg.torch_compile:  # in place (nn.Module.compile), so state-dict keys and checkpoints are unchanged
        model.encoder.compile()
        for blk in model.decoder_blocks:
            blk.compile()
    return model


def restore(state: dict | None, path: Path | None, accelerator, guard: NonFiniteGuard, logger: RunLogger) -> int:
    """The step to continue from: 0 for a fresh run, else the loaded checkpoint's (`state`, its trainer state),
    with the guard's state. The log keeps only the rows up to that step: none when the run starts at 0 (a
    --resume auto that found no checkpoint follows a run that died before its first), so two runs never share
    a metrics.jsonl."""
    if state is None:
        logger.truncate_after(0)
        return 0
    guard.load_state_dict(state.get("nonfinite", {}))
    logger.truncate_after(state["step"])
    if accelerator.is_main_process:
        print(f"resumed from {path} at step {state['step']}")
    return state["step"]


def export_encoders(cfg: PretrainConfig, final: Path, out: Path, step: int, last: dict) -> None:
    """The finished run's encoder (and, when distilling, its teacher) as HF folders, and one line on the
    teacher's state from the last step's terms."""
    from models.export import export_checkpoint
    export_checkpoint(final, out / "encoder")
    if cfg.model.distill.weight > 0:  # the probe decides which of the two a study uses
        export_checkpoint(final, out / "encoder_teacher", encoder="teacher")
    print(f"pretraining done: {step} steps; encoder exported to {out / 'encoder'}")
    if cfg.model.distill.weight > 0 and "teacher_entropy" in last:
        from models.distill import teacher_verdict
        print(teacher_verdict(last["teacher_entropy"], last["prototype_usage"], cfg.model.distill.prototypes))


def micro_batch_loss(cfg: PretrainConfig, accelerator, model, subjects: list[str], clock: StepClock):
    """The loss of one micro-batch (m, CropCollate batch): its MiM levels built on the device (timed by
    `clock`), the model's losses, and what previews need."""
    build_levels = LevelBuilder(cfg.model, cfg.seed, accelerator.process_index)

    def loss_fn(micro):
        m, batch = micro
        # dropout / drop-path; the masks have their own generator, of (seed, m, rank)
        reseed_torch(cfg.seed, m, accelerator.process_index)
        with clock.building(accelerator.device):
            levels = build_levels(batch, accelerator.device)  # [Level, ...] on the device, with their targets
        names = [subjects[int(i)] for i in batch["index"] for _ in range(cfg.crops_per_volume)]
        out = model(levels)  # MiMOutput
        return {**out.losses, "preds": out.preds, "levels": levels, "subjects": names}

    return loss_fn


def train(cfg: PretrainConfig) -> Path:
    cfg = absolute_paths(cfg, PATH_FIELDS)
    out = Path(cfg.output_dir)
    accelerator = make_accelerator(cfg, out, timeout_min=cfg.dist_timeout_min)
    main = accelerator.is_main_process
    ckpt = Checkpointer(out, cfg.keep_ckpts)
    resume_from = ckpt.resolve(cfg.resume)
    ckpt.check_resumable(accelerator, resume_from)
    model, optimizer, schedule, batches, subjects = build(cfg, accelerator)
    # Loaded (its weights' names and shapes checked against this model's, a refusal naming the model flags that
    # changed) before anything is written: a refused resume leaves the run's config.yaml and log as they were.
    state = ckpt.load(accelerator, resume_from, to_dict(cfg.model)) if resume_from is not None else None
    if main:  # only now that the run can start: nothing is written for a refused one
        out.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out / "config.yaml")
    guard = NonFiniteGuard(cfg.max_nonfinite)
    logger = RunLogger(accelerator, out)

    step = restore(state, resume_from, accelerator, guard, logger)
    enc = cfg.model.encoder
    unwrapped = accelerator.unwrap_model(model)  # MiMModel: the teacher's schedule and EMA, when distilling

    clock = StepClock()
    loss_fn = micro_batch_loss(cfg, accelerator, model, subjects, clock)
    last_stop = min(cfg.max_steps, cfg.stop_at) if cfg.stop_at else cfg.max_steps
    summary = {"volumes": len(subjects), "world_size": accelerator.num_processes}
    bar = progress(cfg.max_steps, step, main, "pretrain")
    stream = batches.iterate(step * cfg.grad_accum)
    last: dict = {}
    final = resume_from  # the checkpoint of this run's current step: what it exports once max_steps is reached
    t0 = time.time()
    try:
        while step < last_stop:
            lr = schedule.set_step(step)
            unwrapped.training_step_started(step)
            clock.start()
            micro = [next(stream) for _ in range(cfg.grad_accum)]  # the time spent here is waiting for data
            clock.loaded()
            terms, step_ok, outputs = optimizer_step(accelerator, model, optimizer, guard, cfg.optim.clip_grad,
                                                     micro, loss_fn)
            clock.done()
            if step_ok:
                unwrapped.training_step_done(step, cfg.max_steps)
            step += 1
            bar.update(1)
            if step_ok:
                last = terms
                bar.set_postfix(loss=f"{terms['loss']:.4f}", lr=f"{lr:.2e}", data_wait=f"{clock.share():.0%}")
            if step % cfg.log_every == 0 or step == last_stop:
                logger.log(step, {**{f"train/{k}": v for k, v in terms.items()}, "train/lr": lr,
                                  "train/nonfinite_skipped": guard.total, **clock.window()})
            if main and cfg.preview_every and (step % cfg.preview_every == 0 or step == last_stop):
                from pretrain.preview import save_previews
                save_previews(outputs["levels"], outputs["preds"], enc.patch_size, cfg.model.norm_pix_loss,
                              out / "previews" / f"step{step:07d}.png", step=step, subjects=outputs["subjects"])
            if step % cfg.ckpt_every == 0 or step == last_stop:
                summary.update(step=step, losses=last, nonfinite_skipped=guard.total,
                               seconds=round(time.time() - t0, 1))
                final = ckpt.save(accelerator, model, step, {"nonfinite": guard.state_dict()},
                                  checkpoint_files(cfg, summary))
    finally:
        stream.close()  # stops the loader's workers now, not at garbage collection
        bar.close()
        logger.close()

    # Not ckpt.latest(): a checkpoint of a higher step can be another timeline's (a run resumed from an
    # earlier checkpoint); the export is the weights of this run's own last step.
    if main and step >= cfg.max_steps and final is not None:
        export_encoders(cfg, final, out, step, last)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return out


@cli_entry
def main(argv=None) -> int:
    cfg, _ = parse_config(PretrainConfig, argv, description=__doc__.splitlines()[0])
    train(cfg)
    return 0
