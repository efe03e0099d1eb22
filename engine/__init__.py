"""The training engine both stages share (never copied into either):

- config.py: OptimConfig and LoopConfig, the knobs both loops share;
- distributed.py: the Accelerator, DeepSpeed's config filled from the run, whole weights under ZeRO;
- steps.py: per-step seeds, AdamW with warm-up + cosine, the non-finite guard, one optimizer step;
- batches.py: micro-batches indexed by a global counter, so resume continues mid-epoch exactly;
- checkpoints.py: atomic, rotated checkpoints that `--resume auto` finds;
- logs.py: metrics.jsonl, trackers and progress bars.
"""
