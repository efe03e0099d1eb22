"""The Accelerator both stages train under, and what DeepSpeed needs filled in before `prepare`.

- `make_accelerator`: the run's precision (`--mixed_precision auto`: bf16 on CUDA, fp32 on CPU), the
  trackers, and gloo when ranks were launched on a host with no GPU.
- `check_deepspeed_json`: a DeepSpeed JSON (`deepspeed_config_file` in the accelerate YAML) is read
  before any work; what it asks that a run cannot honour is one line naming the file and key.
- `configure_deepspeed`: fills the JSON's "auto" values from the run (micro-batch, clipping, bucket
  sizes from the model's width, precision) just before `accelerator.prepare`.
- `zero3_init`: under ZeRO-3, the context a model is built in so that each module's weights are split
  across the ranks as soon as its own `__init__` returns (`deepspeed.zero.Init`): no rank holds them whole.
- `prepare`: `accelerator.prepare(model, optimizer)`, with ZeRO-3 holding one fp32 copy of its partition.
- `full_state_dict`: the whole model's fp32 weights on the main process, under DDP or any ZeRO stage.

Precision under DeepSpeed is the run's, applied as DeepSpeed's `torch_autocast`: weights stay fp32
and the forward runs under torch.autocast, as accelerate does under DDP. So bf16 lives only inside
autocast on every path; DeepSpeed's own "bf16"/"fp16" modes (16-bit weights) are refused.
"""
from __future__ import annotations

import copy
import json
import os
from contextlib import nullcontext
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType, InitProcessGroupKwargs

from core.errors import ConfigError
from engine.logs import trackers

if not torch.cuda.is_available():
    # DeepSpeed (which accelerate imports) warns on every CPU run that it could not find a GPU and fell
    # back to the CPU; saying so up front keeps that noise out of every run.
    os.environ.setdefault("DS_ACCELERATOR", "cpu")

# The "auto" values a run fills: accelerate from the run and the prepared objects, the rest by
# configure_deepspeed. Any other "auto" would reach DeepSpeed unfilled and fail inside it.
FILLED_AUTO = {
    "train_micro_batch_size_per_gpu", "train_batch_size", "gradient_accumulation_steps", "gradient_clipping",
    "bf16.enabled", "fp16.enabled", "torch_autocast.enabled", "torch_autocast.dtype",
    "zero_optimization.reduce_bucket_size", "zero_optimization.stage3_prefetch_bucket_size",
    "zero_optimization.stage3_param_persistence_threshold",
}


def resolve_precision(mixed_precision: str) -> str:
    """--mixed_precision -> "bf16" or "no" (auto: bf16 on CUDA, fp32 on a CPU host)."""
    if mixed_precision == "auto":
        return "bf16" if torch.cuda.is_available() else "no"
    return mixed_precision


def launched_deepspeed() -> bool:
    """True in a process that `accelerate launch` started with a DeepSpeed config."""
    return os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"


def _flat(config: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in config.items():
        out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def check_deepspeed_json(path: str | os.PathLike) -> dict:
    """The DeepSpeed JSON at `path`, refused (ConfigError naming the file and key) where a run cannot honour it."""
    path = Path(path)
    try:
        config = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ConfigError(f"{path}: not a readable DeepSpeed JSON ({e})") from None
    flat = _flat(config)
    for section in ("optimizer", "scheduler"):
        if section in config:
            raise ConfigError(f"{path}: remove the {section!r} section; the run builds its own AdamW and "
                              "warmup-cosine schedule (set them with --optim.*)")
    for dtype in ("fp16", "bf16"):
        if str(flat.get(f"{dtype}.enabled", "auto")).lower() == "true":
            where = " (and DeepSpeed refuses fp16 on a host with no GPU)" if dtype == "fp16" else ""
            raise ConfigError(f"{path}: {dtype}.enabled is true, which keeps 16-bit weights{where}; set it to "
                              "\"auto\" and choose the precision with --mixed_precision (bf16 runs under autocast)")
    # A non-finite loss skips its optimizer step through ZeRO's overflow check (engine/steps.py); without
    # ZeRO, or with its gradient norm off, DeepSpeed would apply the spoiled step.
    stage = flat.get("zero_optimization.stage", 0)
    if stage not in (1, 2, 3):
        raise ConfigError(f"{path}: zero_optimization.stage is {stage!r}; use 1, 2 or 3 (a non-finite loss is "
                          "skipped through ZeRO's overflow check), or DDP: launch/accelerate/multi_gpu_ddp.yaml")
    if flat.get("zero_optimization.compute_grad_norm", True) is False:
        raise ConfigError(f"{path}: zero_optimization.compute_grad_norm is false, which turns off the overflow "
                          "check that skips a step spoiled by a non-finite loss; remove it")
    unfilled = sorted(k for k, v in flat.items() if v == "auto" and k not in FILLED_AUTO)
    if unfilled:
        raise ConfigError(f"{path}: {unfilled[0]} is \"auto\", which nothing fills; give it a number")
    return config


def make_accelerator(loop, output_dir: str | os.PathLike | None = None, timeout_min: float | None = None
                     ) -> Accelerator:
    """The Accelerator for a run with LoopConfig `loop` (trackers only when there is an output_dir).
    `timeout_min`: how long any collective may wait (the process group's timeout, --dist_timeout_min);
    None: the backend's default (NCCL 10 min, gloo 30)."""
    precision = resolve_precision(loop.mixed_precision)
    if launched_deepspeed():
        check_deepspeed_json(os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE", ""))
        precision = "no"  # accelerate's bf16 under DeepSpeed is 16-bit weights; configure_deepspeed autocasts
    group = {}
    if int(os.environ.get("LOCAL_RANK", -1)) != -1 and not torch.cuda.is_available():
        # Launched ranks on a host with no GPU: accelerate leaves its backend unset under DeepSpeed, and
        # every rank would call itself rank 0 of 1 while DeepSpeed's gloo group has them all.
        group["backend"] = "gloo"
    if timeout_min is not None:
        if not timeout_min > 0:
            raise ConfigError(f"--dist_timeout_min: expected > 0 minutes, got {timeout_min}")
        group["timeout"] = timedelta(minutes=timeout_min)
    handlers = [InitProcessGroupKwargs(**group)] if group else []
    log_with = trackers(loop.report_to) if output_dir is not None else []
    return Accelerator(mixed_precision=precision, gradient_accumulation_steps=loop.grad_accum,
                       log_with=log_with or None, project_dir=str(output_dir) if output_dir else None,
                       kwargs_handlers=handlers)


def zero_stage(accelerator: Accelerator) -> int:
    """The run's ZeRO stage; 0 without DeepSpeed."""
    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    return int(getattr(plugin, "zero_stage", 0) or 0) if plugin is not None else 0


def configure_deepspeed(accelerator: Accelerator, *, micro_batch: int, clip_grad: float, width: int,
                        mixed_precision: str) -> None:
    """Fill the DeepSpeed config's run-dependent values before `accelerator.prepare`; no-op without DeepSpeed.

    - micro-batch per process: ours is not a prepared DataLoader (ResumableBatches owns the order);
    - gradient clipping: `--optim.clip_grad` (DeepSpeed clips inside its step; accelerate's own
      clip_grad_norm_ does nothing under it);
    - bucket sizes from the model's widest token dimension, by HF's rule (dim², 0.9·dim², 10·dim),
      where the JSON says "auto";
    - precision: torch autocast in bf16 when the run is bf16, fp32 weights either way.
    """
    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    if plugin is None:
        return
    ds = plugin.deepspeed_config
    ds["train_micro_batch_size_per_gpu"] = micro_batch
    ds["gradient_clipping"] = float(clip_grad)
    zero = ds.setdefault("zero_optimization", {})
    for key, value in (("reduce_bucket_size", width * width), ("stage3_prefetch_bucket_size", int(0.9 * width * width)),
                       ("stage3_param_persistence_threshold", 10 * width)):
        if zero.get(key) == "auto":
            zero[key] = value
    bf16 = resolve_precision(mixed_precision) == "bf16"
    autocast = ds.setdefault("torch_autocast", {})
    autocast["enabled"], autocast["dtype"] = bf16, "bfloat16"
    # Gradients are reduced in fp32, as under DDP (DeepSpeed's default reduces Linear/Conv grads in bf16).
    autocast.setdefault("lower_precision_safe_modules", [])


def zero3_init(accelerator: Accelerator):
    """The context to build a model in: `deepspeed.zero.Init` under ZeRO-3, nothing otherwise.

    Under it each module's own parameters are partitioned across the ranks as soon as its `__init__`
    returns, so the model is never whole on any rank (accelerate and transformers do the same for their
    models with `zero3_init_flag`). Initialisation that a parent runs afterwards on its children's weights
    must go through `Module.apply`, which DeepSpeed wraps to gather one module at a time, apply, broadcast
    rank 0's values and re-partition; a parent that writes a child's weights directly sees empty
    placeholders. Weights stay fp32 (the run's precision is autocast), tensors keep the dtype they are
    made in, and `F.linear` is left alone. Call it after `configure_deepspeed`, so that which parameters
    stay whole (stage3_param_persistence_threshold) is the engine's choice too. Build the optimizer's
    groups with `weight_decay_groups`: a placeholder's own shape is empty.
    """
    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    if zero_stage(accelerator) != 3:
        return nullcontext()
    import deepspeed
    config = copy.deepcopy(plugin.deepspeed_config)
    # What zero.Init reads is the ZeRO section and the weights' dtype; the batch sizes accelerate fills at
    # prepare are placeholders here (as accelerate's own zero3_init_context_manager does), consistent with
    # whatever configure_deepspeed already filled, as DeepSpeed checks train = micro x accumulation x ranks.
    micro, accum = (config.get(k, "auto") for k in ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps"))
    config["train_micro_batch_size_per_gpu"] = micro = 1 if micro == "auto" else micro
    config["gradient_accumulation_steps"] = accum = 1 if accum == "auto" else accum
    config["train_batch_size"] = micro * accum * accelerator.num_processes
    for dtype in ("fp16", "bf16"):
        config.setdefault(dtype, {})["enabled"] = False  # fp32 weights: bf16 is autocast (check_deepspeed_json)
    config.pop("torch_autocast", None)  # a forward-time setting, filled by configure_deepspeed
    zero = config.get("zero_optimization", {})
    for key in ("reduce_bucket_size", "stage3_prefetch_bucket_size", "stage3_param_persistence_threshold"):
        if zero.get(key) == "auto":
            zero.pop(key)
    # Tensors are created on the rank's device, but in the dtype asked for: DeepSpeed's default also casts
    # every float tensor made inside to the weights' dtype, float64 sin-cos tables included (changing them).
    from deepspeed.runtime.zero.partition_parameters import DeepSpeedTensorOverride
    return deepspeed.zero.Init(config_dict_or_path=config, mem_efficient_linear=False,
                               tensor_overrides=[DeepSpeedTensorOverride.device])


def weight_decay_groups(model: torch.nn.Module, weight_decay: float, no_weight_decay: set[str] = frozenset()
                        ) -> list[dict]:
    """timm's `param_groups_weight_decay` by each parameter's whole shape: no decay for biases, 1-D weights
    and the names in `no_weight_decay`. Under `zero3_init` a parameter is an empty 1-D placeholder (its
    shape is `ds_shape`), which timm's rule would take for a norm weight and not decay."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        ndim = len(p.ds_shape) if hasattr(p, "ds_shape") else p.ndim
        (no_decay if ndim <= 1 or name.endswith(".bias") or name in no_weight_decay else decay).append(p)
    return [g for g in ({"params": no_decay, "weight_decay": 0.0}, {"params": decay, "weight_decay": weight_decay})
            if g["params"]]


def prepare(accelerator: Accelerator, model: torch.nn.Module, optimizer: torch.optim.Optimizer):
    """`accelerator.prepare(model, optimizer)`; under ZeRO-3 the optimizer's fp32 partition then shares
    the weights' own fp32 partition instead of holding a copy.

    DeepSpeed's ZeRO-3 means to skip that copy when the weights are already fp32 on the device (as with
    torch_autocast; stage3.py `_create_fp32_partitions`), but it compares a torch.device with a device
    name string, which is never equal, so every partition is stored twice: a sixth of ZeRO-3's memory
    per rank on 2 ranks. After each step it copies the fp32 partition into the weights' partition, a
    no-op once they share storage; checkpoints save and load the same values either way.
    """
    model, optimizer = accelerator.prepare(model, optimizer)
    wrapped = getattr(accelerator, "deepspeed_engine_wrapped", None)
    zero = getattr(wrapped.engine, "optimizer", None) if wrapped is not None else None
    for weights, master in zip(getattr(zero, "fp16_partitioned_groups_flat", []),
                               getattr(zero, "fp32_partitioned_groups_flat", [])):
        if (weights is not None and master is not None and weights.dtype == master.dtype
                and weights.device == master.device and weights.numel() == master.numel()):
            master.data = weights.data
    return model, optimizer


def full_state_dict(accelerator: Accelerator, model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The unwrapped model's whole state dict in fp32 on the main process (other ranks: may be partial).

    A collective under DeepSpeed: every rank calls it. There the weights are the optimizer's fp32
    master copies, gathered from their ZeRO partitions (under ZeRO-3 the module holds only placeholders).
    """
    if accelerator.distributed_type != DistributedType.DEEPSPEED:
        return accelerator.get_state_dict(model)
    import deepspeed
    from deepspeed.utils import safe_get_full_fp32_param
    module = accelerator.unwrap_model(model)
    params = dict(module.named_parameters())
    out = {}
    for name in module.state_dict().keys():
        if name not in params:  # a buffer: never partitioned
            out[name] = module.get_buffer(name).detach().float().cpu()
            continue
        p = params[name]
        full = safe_get_full_fp32_param(p) if p.requires_grad else None
        if full is None:  # not trained (no master copy): the module's own value, gathered under ZeRO-3
            with deepspeed.zero.GatheredParameters([p], modifier_rank=None):
                full = p.detach().clone()
        out[name] = full.detach().float().cpu()
    return out
