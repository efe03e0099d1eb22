"""Run by tests/test_deepspeed_faults.py under `accelerate launch` (2 ranks, grad_accum 2); not a test module.

    python tests/ds_nonfinite_script.py OUT

A small MLP trains through `engine.steps.optimizer_step` under the shipped DeepSpeed config for the steps
in PLAN; a step's micro-batch marked "nan" gets a NaN input on rank 1 only, so only one rank sees a
non-finite loss and the ranks must agree to skip. After every step rank 0 writes, to OUT/steps.safetensors,
the full fp32 weights and AdamW moments gathered from the ZeRO partitions, and to OUT/steps.json what
each rank saw (the step's verdict, AdamW's step counter, DeepSpeed's skip flag); the test replays PLAN
without the bad steps on plain torch and compares.
"""
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

GRAD_ACCUM, MICRO, LR, CLIP, WD, BETAS = 2, 4, 0.05, 0.5, 0.05, (0.9, 0.95)
# Each step: its micro-batches' data ids, and which micro-batch (if any) gets a NaN on rank 1.
# Steps 1 and 3 are spoiled (at the boundary micro-batch, then at the first one); steps 2 and 4 retake
# their data, so a run that never saw the bad steps is PLAN's good steps alone: data (0, 1), (2, 3), (4, 5).
PLAN = [((0, 1), None), ((2, 3), 1), ((2, 3), None), ((4, 5), 0), ((4, 5), None)]


def make_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.GELU(), torch.nn.Linear(16, 3))


def micro_batch(data_id: int, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(100 * data_id + rank)
    return torch.randn(MICRO, 6, generator=g), torch.randn(MICRO, 3, generator=g)  # [MICRO, 6], [MICRO, 3]


def loss_of(model, x, y) -> torch.Tensor:
    return torch.nn.functional.mse_loss(model(x), y)


def gathered(acc, model, optimizer) -> dict[str, torch.Tensor]:
    """Full fp32 weights and AdamW moments, gathered from the partitions (collectives: every rank calls it)."""
    from deepspeed.utils import safe_get_full_optimizer_state

    from engine.distributed import full_state_dict
    out = {f"w/{k}": v for k, v in full_state_dict(acc, model).items()}
    for name, p in acc.unwrap_model(model).named_parameters():
        for key in ("exp_avg", "exp_avg_sq"):
            state = safe_get_full_optimizer_state(p, key)
            out[f"{key}/{name}"] = (torch.zeros(p.ds_shape if hasattr(p, "ds_shape") else p.shape)
                                    if state is None else state.detach().float().cpu())
    return out


def main(out: Path) -> None:
    from safetensors.torch import save_file

    from engine.config import LoopConfig, OptimConfig
    from engine.distributed import configure_deepspeed, make_accelerator, prepare
    from engine.steps import NonFiniteGuard, build_optimizer, optimizer_step

    acc = make_accelerator(LoopConfig(mixed_precision="no", report_to="none", grad_accum=GRAD_ACCUM,
                                      max_nonfinite=3))
    rank = acc.process_index
    model = make_model()
    optimizer = build_optimizer(model.parameters(), OptimConfig(lr=LR, weight_decay=WD, betas=BETAS, clip_grad=CLIP))
    configure_deepspeed(acc, micro_batch=MICRO, clip_grad=CLIP, width=16, mixed_precision="no")
    model, optimizer = prepare(acc, model, optimizer)
    engine = acc.deepspeed_engine_wrapped.engine
    guard = NonFiniteGuard(max_in_row=3)

    def loss_fn(micro):
        data_id, nan = micro
        x, y = micro_batch(data_id, rank)
        if nan and rank == 1:
            x[0, 0] = float("nan")  # one bad voxel on one rank
        return {"loss": loss_of(model, x, y)}

    tensors, rows = {}, []
    for i, (ids, bad) in enumerate(PLAN):
        micro = [(d, k == bad) for k, d in enumerate(ids)]
        _, step_ok, _ = optimizer_step(acc, model, optimizer, guard, CLIP, micro, loss_fn)
        tensors.update({f"{i}/{k}": v for k, v in gathered(acc, model, optimizer).items()})
        adam = [int(s["step"]) for s in engine.optimizer.optimizer.state.values() if "step" in s]
        rows.append({"step_ok": step_ok, "adam_steps": sorted(set(adam)),
                     "ds_skipped": bool(optimizer.step_was_skipped)})
    every = [None] * acc.num_processes
    torch.distributed.all_gather_object(every, rows)
    if acc.is_main_process:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(out / "steps.safetensors"))
        (out / "steps.json").write_text(json.dumps({
            "world_size": torch.distributed.get_world_size(), "num_processes": acc.num_processes,
            "distributed_type": str(acc.distributed_type), "zero_stage": engine.zero_optimization_stage(),
            "grad_accum": acc.gradient_accumulation_steps, "ranks": every}))
    acc.wait_for_everyone()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
