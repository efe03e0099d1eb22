#!/usr/bin/env bash
# Fill the preprocessing cache with a SLURM array of CPU jobs before the GPUs start, then train.
#
#   SHARDS=32 TRAIN="launch/slurm_pretrain.sh --config launch/pretrain_base_gpu.yaml --data /data/ct.json \
#       --cache_dir /scratch/cache --output_dir runs/pt" \
#   launch/slurm_prepare_array.sh --config launch/pretrain_base_gpu.yaml --datalist /data/ct.json --cache /scratch/cache
#
# Run on the login node, it submits itself as an array of SHARDS tasks (--array=0-(SHARDS-1)), each
# `python -m data.prepare --shard I/SHARDS` over rows I::SHARDS with its CPUs as workers, and then, when
# TRAIN is given, `sbatch $TRAIN` with --dependency=afterok on the whole array: the training job starts
# only once every shard succeeded, finds every entry in the cache and prepares nothing. The last shard
# to finish writes the cache's index-<name>.csv. Its arguments are data.prepare's; give the training
# stage's YAML as --config so both use one preprocessing key. SBATCH_PREP adds sbatch options to the array
# (e.g. "--partition=cpu --time=2:00:00").
#SBATCH --job-name=mimfm-prepare
#SBATCH --ntasks=1
#SBATCH --cpus-per-task=16
#SBATCH --time=4:00:00
#SBATCH --output=%x-%A_%a.out
set -euo pipefail
if [[ -n "${SLURM_ARRAY_TASK_ID:-}" ]]; then  # one array task: this shard's rows
  exec python -m data.prepare --shard "$SLURM_ARRAY_TASK_ID/$SLURM_ARRAY_TASK_COUNT" \
    --workers "${SLURM_CPUS_PER_TASK:-1}" "$@"
fi
SHARDS=${SHARDS:?set SHARDS, the number of array tasks}
# --parsable prints "jobid" or "jobid;cluster"; afterok on the array's id waits for every task.
# shellcheck disable=SC2086  # SBATCH_PREP and TRAIN are word lists
prep=$(sbatch --parsable --array="0-$((SHARDS - 1))" ${SBATCH_PREP:-} "${BASH_SOURCE[0]}" "$@")
prep=${prep%%;*}
echo "preparing: array job $prep ($SHARDS shards)"
if [[ -n "${TRAIN:-}" ]]; then
  # shellcheck disable=SC2086
  sbatch --dependency="afterok:$prep" $TRAIN
fi
