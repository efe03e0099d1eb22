"""Run by tests/test_deepspeed.py under `accelerate launch` (2 ranks); not a test module itself.

    python tests/zero_helper.py RUN OUT

Each rank writes OUT/rank<r>.json: what its Accelerator says and which of 10 items it trains on in
epoch 0. Then the run's newest checkpoint is restored into the DeepSpeed engine the way `--resume auto`
restores it, and rank 0 writes OUT/engine.safetensors: the encoder's output on a fixed input, in eval
mode, from its weights gathered out of the engine's shards.
"""
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from safetensors.torch import save_file  # noqa: E402


def ranks(acc, out: Path) -> None:
    from engine.batches import ResumableBatches
    batches = ResumableBatches(list(range(10)), 1, seed=0, num_replicas=acc.num_processes, rank=acc.process_index)
    stream = batches.iterate(0)
    items = [int(next(stream)[1][0]) for _ in range(batches.per_epoch)]
    stream.close()
    row = {"process_index": acc.process_index, "num_processes": acc.num_processes, "main": acc.is_main_process,
           "distributed_type": str(acc.distributed_type), "backend": acc.state.backend,
           "world_size": torch.distributed.get_world_size(), "items": items}
    (out / f"rank{acc.process_index}.json").write_text(json.dumps(row))


def engine_outputs(acc, run: Path, out: Path) -> None:
    import deepspeed

    from core.config import load_config
    from engine.checkpoints import Checkpointer
    from pretrain.config import PretrainConfig
    from pretrain.train import build
    cfg = load_config(PretrainConfig, run / "config.yaml")
    model, _, _, _, _ = build(cfg, acc)
    ckpt = Checkpointer(run, cfg.keep_ckpts)
    ckpt.load(acc, ckpt.latest())
    encoder = acc.unwrap_model(model).encoder.eval()
    e = cfg.model.encoder
    x = torch.randn(2, e.in_channels, e.img_size, e.img_size, e.img_size, generator=torch.Generator().manual_seed(3))
    with torch.no_grad(), deepspeed.zero.GatheredParameters(list(encoder.parameters())):  # a collective
        tokens = encoder(x)  # [2, N, D]
    if acc.is_main_process:
        save_file({"x": x, "tokens": tokens.float().contiguous()}, str(out / "engine.safetensors"))


if __name__ == "__main__":
    from engine.config import LoopConfig
    from engine.distributed import make_accelerator
    accelerator = make_accelerator(LoopConfig(mixed_precision="no", report_to="none"))
    ranks(accelerator, Path(sys.argv[2]))
    engine_outputs(accelerator, Path(sys.argv[1]), Path(sys.argv[2]))
    accelerator.wait_for_everyone()
