#!/usr/bin/env bash
# Multi-node pretraining on SLURM: one `accelerate launch` per node, each with its own machine rank.
#   sbatch --nodes=2 launch/slurm_pretrain.sh --config launch/pretrain_base_gpu.yaml --data /data/ct --output_dir runs/pt
# ACCEL_CONFIG picks the accelerate config (default ZeRO-2), GPUS_PER_NODE the ranks per node (default 8).
#SBATCH --job-name=mimfm-pretrain
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=64
#SBATCH --time=48:00:00
#SBATCH --output=%x-%j.out
# Re-queue on preemption: `--resume auto` picks up the newest complete checkpoint.
#SBATCH --requeue
set -euo pipefail
ACCEL_CONFIG=${ACCEL_CONFIG:-launch/accelerate/deepspeed_zero2.yaml}
GPUS_PER_NODE=${GPUS_PER_NODE:-8}
# sed reads the whole list: `head -n 1` would close the pipe early, and under pipefail scontrol's SIGPIPE
# (exit 141) stops the script.
MAIN_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | sed -n 1p)
MAIN_PORT=${MAIN_PORT:-29500}
# Single quotes: $SLURM_PROCID must expand on each node (inside srun), not here.
srun --kill-on-bad-exit=1 bash -c 'accelerate launch \
  --config_file '"$ACCEL_CONFIG"' \
  --num_machines '"$SLURM_NNODES"' \
  --num_processes '"$((SLURM_NNODES * GPUS_PER_NODE))"' \
  --machine_rank $SLURM_PROCID \
  --main_process_ip '"$MAIN_ADDR"' \
  --main_process_port '"$MAIN_PORT"' \
  --rdzv_backend static \
  -m pretrain --resume auto '"$*"
