#!/usr/bin/env bash
# Measures on one accelerator, in about 10 minutes, every figure of the GPU table in docs/performance.md:
#   1. benchmark.py: s/image by stage, TFLOP/s, MFU, compile time, peak memory, images/s, for
#      "fast" and "paper" (paper scaled from 10 steps per stage), VGG16 and SqueezeNet 1.1
#      (random weights), batch 1-16, layouts "map" (the accelerator default) and "vmap" (paper),
#      float32 and bfloat16;
#   2. determinism: each image alone against in a batch of 4 (equal to float32 expected), and
#      the cost of XLA_FLAGS=--xla_gpu_deterministic_ops=true;
#   3. bfloat16 agreement with float32 next to the seed floor (needs the shared photos);
#   4. the persistent compilation cache: one CLI command cold, then warm.
# Each step has its own time limit (about 585 s in all) and a failed step does not stop the
# others; benchmark rows are saved as they come. Figures go to docs/results/gpu_check/ (one
# file per step; gpu_check.md gathers them).
#
# Usage, from the repository root:
#   bash scripts/gpu_check.sh [PHOTOS_DIR] [SQUEEZENET_WEIGHTS]
# (default: ../shared/evaldata/imagenet-sample and ../shared/evaldata/squeezenet1_1.safetensors)
set -u
cd "$(dirname "$0")/.."
OUT=docs/results/gpu_check
PHOTOS=${1:-../shared/evaldata/imagenet-sample}
WEIGHTS=${2:-../shared/evaldata/squeezenet1_1.safetensors}
mkdir -p "$OUT"
SUMMARY=$OUT/gpu_check.md
START=$(date +%s)
export PYTHONPATH=scripts${PYTHONPATH:+:$PYTHONPATH}
PYTHON=$(command -v python || command -v python3)

step() {  # step NAME SECONDS COMMAND...: runs COMMAND with a time limit, logs to $OUT/NAME.txt
  local name=$1 limit=$2
  shift 2
  echo "== $name (limit ${limit}s, started at +$(( $(date +%s) - START ))s)" | tee -a "$SUMMARY"
  timeout "$limit" "$@" > "$OUT/$name.txt" 2>&1
  local rc=$?
  grep -v "^WARNING\|^I0000\|^W0000" "$OUT/$name.txt" | tail -n 40 >> "$SUMMARY"
  echo "(exit $rc)" >> "$SUMMARY"
}

{
  echo "# GPU check, $(date -u +%Y-%m-%dT%H:%MZ)"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null
  "$PYTHON" -c "import jax; print('jax', jax.__version__, jax.devices())"
} > "$SUMMARY" 2>&1

BENCH="$PYTHON scripts/benchmark.py"
step fast 110 $BENCH --model squeezenet1_1 vgg16 --preset fast --batch 1 16 --batching map \
  --precision float32 --json "$OUT/fast.json"
step fast_bf16 60 $BENCH --model squeezenet1_1 vgg16 --preset fast --batch 16 --batching map \
  --precision bfloat16 --json "$OUT/fast_bf16.json"
step paper_vgg16 125 $BENCH --model vgg16 --preset paper --max-steps 10 --batch 1 4 \
  --batching map vmap --json "$OUT/paper_vgg16.json"
step paper_vgg16_bf16 50 $BENCH --model vgg16 --preset paper --max-steps 10 --batch 4 \
  --batching map --precision bfloat16 --json "$OUT/paper_vgg16_bf16.json"
step paper_squeezenet 45 $BENCH --model squeezenet1_1 --preset paper --max-steps 10 --batch 4 \
  --batching map --json "$OUT/paper_squeezenet.json"

step determinism 40 "$PYTHON" - <<'EOF'
import jax, numpy as np
from pfc_jax import models, parallel
from pfc_jax.explain import ExplainConfig, explain
module = models.module("squeezenet1_1")
classifier = models.classifier("squeezenet1_1", jax.jit(module.init)(
    jax.random.key(0), np.zeros((1, 64, 64, 3), np.float32)))
images = np.random.default_rng(0).random((4, 64, 64, 3), np.float32)
keys = parallel.image_keys(0, range(4))
config = ExplainConfig.preset("fast")
together = jax.device_get(explain(classifier, images, keys, config))
for i in range(4):
  alone = jax.device_get(explain(classifier, images[i:i + 1], keys[i:i + 1], config))
  print(f"image {i}: alone vs in a batch of 4, max |saliency difference| "
        f"{np.abs(alone.saliency[0] - together.saliency[i]).max():.3g}, labels equal: "
        f"{np.array_equal(alone.labels[0], together.labels[i])}")
EOF
step deterministic_ops 45 env XLA_FLAGS=--xla_gpu_deterministic_ops=true $BENCH \
  --model squeezenet1_1 --preset fast --batch 16 --batching map \
  --json "$OUT/deterministic_ops.json"

if [ -d "$PHOTOS" ] && [ -f "$WEIGHTS" ]; then
  step precision 50 "$PYTHON" scripts/precision_agreement.py --photos "$PHOTOS" \
    --weights "$WEIGHTS" --count 16 --size 224 --preset fast
else
  echo "== precision: skipped, no photos at $PHOTOS or weights at $WEIGHTS" | tee -a "$SUMMARY"
fi

CACHE=$(mktemp -d)
for run in cold warm; do
  step "cache_$run" 30 env PFC_JAX_CACHE="$CACHE/xla" "$PYTHON" - "$CACHE" "$run" <<'EOF'
import os, subprocess, sys, time
cache, run = sys.argv[1:]
start = time.perf_counter()
subprocess.run(["pfc-jax", "explain", "--model", "shapes_cnn", "--preset", "fast",
                "--image-size", "64", "--no-progress", "--out", os.path.join(cache, "out"),
                "pfc_jax/assets/grace_hopper.jpg"], check=True, capture_output=True)
print(f"{run}: {time.perf_counter() - start:.1f} s wall for `pfc-jax explain --model shapes_cnn "
      f"--preset fast --image-size 64`, {len(os.listdir(os.path.join(cache, 'xla')))} cache entries")
EOF
done
echo "total $(( $(date +%s) - START )) s" | tee -a "$SUMMARY"
