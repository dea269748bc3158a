#!/usr/bin/env bash
# The GPU checks, as one script for a CUDA machine: the CUDA tests, then the step ratios of the
# issue's targets (ResNet-50 b256 fp16 with GradScaler, ViT-B/16 b256 fp16 with 16x16 blocks,
# ResNet-50 bf16), each with the compiled kernels (TORCHSPARTAN_COMPILE=1, the default) and
# without (=0), alternating on the same machine so that both sides of a pair share its state.
#
#   bash benchmarks/gpu_check.sh [OUTDIR]     # default: benchmarks/results/gpu_check
#
# Every run writes OUTDIR/<name>.md and .json (step_overhead.py); OUTDIR/all.tgz packs them.
# ROUNDS (default 2) sets how many compiled/eager pairs ResNet-50 fp16 gets.
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-benchmarks/results/gpu_check}"
mkdir -p "$out"
py="${PYTHON:-python}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
"$py" -c 'import torch; assert torch.cuda.is_available(), "no CUDA device"; print(torch.__version__)'

"$py" -m pytest -q tests/test_cuda.py tests/test_fused.py 2>&1 | tail -n 15

step() {  # step NAME COMPILE ARGS...: one step_overhead.py run of the step ratios
  local name=$1 compiled=$2
  shift 2
  echo "== $name (TORCHSPARTAN_COMPILE=$compiled)"
  TORCHSPARTAN_COMPILE=$compiled "$py" benchmarks/step_overhead.py --device cuda --batch 256 \
    --fused --only steps --repeats 5 --pipelined-rounds 9 "$@" --out "$out/$name" 2>&1 |
    grep -E "pipelined round" | tail -n 9
}

for r in $(seq 1 "${ROUNDS:-2}"); do
  step "r50_fp16_compiled_$r" 1 --models resnet50 --amp fp16
  step "r50_fp16_eager_$r" 0 --models resnet50 --amp fp16
done
step vit_fp16_compiled 1 --models vit_b_16 --amp fp16
step vit_fp16_eager 0 --models vit_b_16 --amp fp16
step r50_bf16_compiled 1 --models resnet50 --amp bf16
(cd "$out" && tar czf all.tgz ./*.md ./*.json)
echo "results in $out"
