#!/usr/bin/env bash
# The prepared GPU check: everything that needs a real GPU, in one call, under 8 minutes on one
# H100/H200. Every figure it prints goes to docs/BENCHMARKS.md / docs/RESULTS.md by hand afterwards.
#
#   bash benchmarks/gpu_check.sh OUTDIR
#
# 1. the CUDA-marked tests (bf16 autocast path, SDPA flash attention);
# 2. pretraining throughput, ViT-B, ours vs MONAI's MAE, gradient checkpointing off and on, a torch.compile row, the largest
#    batch that fits and the MFU (benchmarks.speed.pretrain --device cuda --preset base);
# 3. the product speed table (benchmarks.speed.throughput --device cuda);
# 4. DeepSpeed for real: ZeRO-2 and ZeRO-3 pretraining of a few dozen steps each through accelerate,
#    stopped half-way, resumed with --resume auto, exported, and the exported encoder compared with
#    the checkpoint's weights.
# Each step has its own time limit; a failed step is recorded in OUTDIR/summary.txt and the rest go on.
set -uo pipefail
OUT=${1:?usage: bash benchmarks/gpu_check.sh OUTDIR}
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
ACCELERATE=${ACCELERATE:-.venv/bin/accelerate}
mkdir -p "$OUT"
: > "$OUT/summary.txt"
export HF_HUB_OFFLINE=1 MPLBACKEND=Agg

step() {  # step NAME SECONDS COMMAND...: run it with a time limit, log to OUT/NAME.log, record rc and time
    local name=$1 limit=$2; shift 2
    local t0=$SECONDS
    echo "== $name (limit ${limit}s): $*" | tee -a "$OUT/summary.txt"
    timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
    local rc=$?
    echo "   $name: rc=$rc, $((SECONDS - t0)) s" | tee -a "$OUT/summary.txt"
}

nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1
"$PY" -c "import torch; print(torch.__version__, torch.version.cuda, torch.cuda.get_device_name(0))" \
    > "$OUT/torch.txt" 2>&1

step cuda_tests 120 "$PY" -m pytest -q -m cuda tests/test_cuda.py
step pretrain_speed 240 "$PY" -m benchmarks.speed.pretrain --device cuda --preset base --repeats 10 --compile \
    --write-docs --doc "$OUT/BENCHMARKS_gpu.md"
step throughput 90 "$PY" -m benchmarks.speed.throughput --device cuda --preset base --repeats 10 \
    --write-docs --doc "$OUT/BENCHMARKS_gpu.md"

# DeepSpeed: a small cohort, ViT-B, 24 steps stopped at 12 and resumed.
step cohort 60 "$PY" -m data.synth --out "$OUT/cohort" --n_unlabeled 16 --n_labeled 0 --n_external 0 \
    --seed 5 --workers 4 --no-progress --overwrite
for zero in 2 3; do
    run=(--config launch/pretrain_base_gpu.yaml --data "$OUT/cohort/unlabeled" --cache_dir "$OUT/cache"
         --output_dir "$OUT/zero$zero" --max_steps 24 --ckpt_every 6 --preview_every 0 --log_every 2
         --batch_size 2 --crops_per_volume 2 --num_workers 2 --report_to none)
    launch=("$ACCELERATE" launch --config_file "launch/accelerate/deepspeed_zero$zero.yaml" --num_processes 1
            -m pretrain)
    step "zero${zero}_first_half" 120 "${launch[@]}" "${run[@]}" --stop_at 12
    step "zero${zero}_resumed" 120 "${launch[@]}" "${run[@]}" --resume auto
    step "zero${zero}_export_check" 60 "$PY" - "$OUT/zero$zero" <<'EOF'
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

from models.vit3d import ViT3D

run = Path(sys.argv[1])
ckpt = sorted((run / "checkpoints").glob("ckpt-*"))[-1]
full = load_file(str(ckpt / "weights.safetensors"))
encoder = ViT3D.from_pretrained(run / "encoder")
bad = [k for k, v in encoder.state_dict().items() if not torch.equal(v, full["encoder." + k])]
import json
steps = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
wait = [r["train/data_wait"] for r in steps if "train/data_wait" in r]  # share of the step spent waiting for data
print(f"{ckpt.name}: {len(encoder.state_dict())} encoder tensors, {len(bad)} differ; {len(steps)} log rows; "
      f"data_wait mean {sum(wait) / max(len(wait), 1):.1%}, max {max(wait, default=0):.1%}")
sys.exit(1 if bad or not ckpt.name.endswith("24") else 0)
EOF
done
echo "done: $OUT/summary.txt"
