"""Speed and memory benchmarks a user runs (not tests): each prints a table and, with --write-docs, puts it
in docs/BENCHMARKS.md with the command, machine and date.

- pretrain.py: pretraining throughput, ours vs MONAI's MAE, and peak memory;
- throughput.py: the product's speed table (pretraining, fine-tuning, inference, data);
- loader.py: reading .nii.gz vs the .npy cache;
- zero_memory.py: memory per rank under DDP, ZeRO-2 and ZeRO-3.
"""
