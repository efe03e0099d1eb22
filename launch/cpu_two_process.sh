#!/usr/bin/env bash
# Two real processes on a CPU-only host (gloo). Note: plain `--cpu --num_processes 2` silently
# starts ONE process; ACCELERATE_USE_CPU=1 with --multi_gpu gives two ranks.
#   bash launch/cpu_two_process.sh -m pretrain --config launch/pretrain_tiny_cpu.yaml --data DIR
set -euo pipefail
ACCELERATE_USE_CPU=1 exec accelerate launch --multi_gpu --num_processes 2 --num_machines 1 \
  --mixed_precision no --main_process_port "${MASTER_PORT:-29511}" "$@"
