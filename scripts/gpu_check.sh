#!/usr/bin/env bash
# Measures on one accelerator, in under 8 minutes (the steps' limits add up to 475 s), the
# figures of the GPU table in docs/performance.md, each row labelled with the preset's current
# name:
#   1. benchmark.py, s/image by stage, images/s, compile time, TFLOP/s, MFU, peak memory: `fast`
#      with SqueezeNet 1.1 and VGG16 (random weights; the photos when given), layout "dense"
#      (the accelerator default) at batch 1/16/64 and "map" (the layout before it) at 16,
#      bfloat16, and float32 at 16; `paper` with VGG16 (scaled from 10 steps per stage) at 16,
#      dense against map, bfloat16 and float32;
#   2. memory: XLA's memory analysis of each stage's step per image (scripts/memory.py: the
#      compiled programs' buffers, no autotuning scratch in them), the compute_batch chosen for
#      16 GB and 80 GB devices, and one measured peak with autotuning off
#      (XLA_FLAGS=--xla_gpu_autotune_level=0: the allocator's peak is then the programs' own);
#   3. rematerialisation: each stage's program compiled alone, with and without autotuning,
#      counting XLA's "Can't reduce memory use" warnings, to name the program that logs them;
#   4. determinism of the dense layout: each image alone against in a batch of 4;
#   5. end to end: `pfc_jax.batch.run_job` (what `pfc-jax batch` runs) over 1,024 copies of the
#      photos, decoding, transfers and writing included, with where the time goes.
# Each step has its own time limit and a failed step does not stop the others; benchmark rows
# are saved as they come. Figures go to docs/results/gpu_check/ (one file per step;
# gpu_check.md gathers them).
#
# Usage, from the repository root:
#   bash scripts/gpu_check.sh [PHOTOS_DIR] [SQUEEZENET_WEIGHTS]
# (default: ../shared/evaldata/imagenet-sample and ../shared/evaldata/squeezenet1_1.safetensors;
# without them the benchmark uses random images and the end-to-end job the packaged photo).
#   GPU_CHECK_SMOKE=1 bash scripts/gpu_check.sh
# runs every step in miniature (shapes_cnn, 32 px, 2 steps) on any backend, into
# ${GPU_CHECK_OUT:-/tmp/gpu_check_smoke}, to know the script runs (minutes on a CPU, where
# every time limit is 4 times longer).
set -u
cd "$(dirname "$0")/.."
PHOTOS=${1:-../shared/evaldata/imagenet-sample}
WEIGHTS=${2:-../shared/evaldata/squeezenet1_1.safetensors}
SMOKE=${GPU_CHECK_SMOKE:-0}
if [ "$SMOKE" = 1 ]; then
  OUT=${GPU_CHECK_OUT:-/tmp/gpu_check_smoke}
  SQUEEZENET=shapes_cnn VGG16=shapes_cnn MODELS=shapes_cnn SIZE=32 MAX_STEPS=2 BATCHES="1 2"
  BIG=2 COUNT=16 CAP=(--max-steps 2) PAPER=tiny
  LIMIT_SCALE=4  # A CPU compiles and runs slower than the GPU the limits are set for.
else
  OUT=${GPU_CHECK_OUT:-docs/results/gpu_check}
  SQUEEZENET=squeezenet1_1 VGG16=vgg16 MODELS="squeezenet1_1 vgg16" SIZE=224 MAX_STEPS=10
  BATCHES="1 16 64" BIG=16 COUNT=1024 CAP=() PAPER=paper
  LIMIT_SCALE=1
fi
mkdir -p "$OUT"
SUMMARY=$OUT/gpu_check.md
START=$(date +%s)
export PYTHONPATH=.:scripts${PYTHONPATH:+:$PYTHONPATH}
PYTHON=$(command -v python || command -v python3)
IMAGES=()
[ -d "$PHOTOS" ] && [ "$SMOKE" != 1 ] && IMAGES=(--images "$PHOTOS")
PHOTOS_ARG=()
[ -d "$PHOTOS" ] && PHOTOS_ARG=(--photos "$PHOTOS")

step() {  # step NAME SECONDS COMMAND...: runs COMMAND with a time limit, logs to $OUT/NAME.txt
  local name=$1 limit=$(( $2 * LIMIT_SCALE ))
  shift 2
  echo "== $name (limit ${limit}s, started at +$(( $(date +%s) - START ))s)" | tee -a "$SUMMARY"
  timeout "$limit" "$@" > "$OUT/$name.txt" 2>&1
  local rc=$?
  grep -v "^WARNING\|^I0000\|^W0000\|cuda_timer\|bfc_allocator\|hlo_rematerialization" \
    "$OUT/$name.txt" | tail -n 40 >> "$SUMMARY"
  echo "(exit $rc; $(grep -c "hlo_rematerialization" "$OUT/$name.txt") rematerialisation" \
       "warnings in $name.txt)" >> "$SUMMARY"
}

{
  echo "# GPU check, $(date -u +%Y-%m-%dT%H:%MZ)$( [ "$SMOKE" = 1 ] && echo ' (smoke)')"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null
  "$PYTHON" -c "import jax; print('jax', jax.__version__, jax.devices())"
  git rev-parse --short HEAD 2>/dev/null
} > "$SUMMARY" 2>&1

BENCH=("$PYTHON" scripts/benchmark.py --size "$SIZE" "${IMAGES[@]}" "${CAP[@]}")
step fast_dense 100 "${BENCH[@]}" --model $MODELS --preset fast \
  --batch $BATCHES --batching dense --precision bfloat16 --json "$OUT/fast_dense.json"
step fast_map 50 "${BENCH[@]}" --model $MODELS --preset fast --batch "$BIG" \
  --batching map --precision bfloat16 --json "$OUT/fast_map.json"
step fast_float32 40 "${BENCH[@]}" --model $MODELS --preset fast --batch "$BIG" \
  --batching dense --precision float32 --json "$OUT/fast_float32.json"
step paper_vgg16 50 "${BENCH[@]}" --model "$VGG16" --preset "$PAPER" --max-steps "$MAX_STEPS" \
  --batch "$BIG" --batching dense map --precision bfloat16 --json "$OUT/paper_vgg16.json"
step paper_float32 30 "${BENCH[@]}" --model "$VGG16" --preset "$PAPER" --max-steps "$MAX_STEPS" \
  --batch "$BIG" --batching dense --precision float32 --json "$OUT/paper_float32.json"

step memory 35 "$PYTHON" scripts/memory.py --model $MODELS --preset fast "$PAPER" \
  --size "$SIZE" --batch 1 "$BIG" --precision bfloat16 float32 --json "$OUT/memory.json"
step memory_measured 30 env XLA_FLAGS="${XLA_FLAGS:+$XLA_FLAGS }--xla_gpu_autotune_level=0" \
  "${BENCH[@]}" --model "$VGG16" --preset fast --batch "$BIG" --batching dense \
  --max-steps "$MAX_STEPS" --json "$OUT/memory_measured.json"

step remat 40 "$PYTHON" - "$SIZE" "$VGG16" "$PAPER" <<'EOF'
"""Which program logs XLA's rematerialisation warnings: each stage of `paper` compiled alone
(a one-image step, as the "map" layout runs it)."""
import os, subprocess, sys
size, model, preset = sys.argv[1:]
PROGRAM = """
import sys, jax, jax.numpy as jnp
sys.path.insert(0, "scripts")
import memory
from pfc_jax.explain import ExplainConfig
stage = sys.argv[1]
config = ExplainConfig.preset(sys.argv[4])
classifier = memory._abstract_classifier(sys.argv[3], int(sys.argv[2]))
inputs = dict(zip(("coalitions", "perturbation"), memory._inputs(config, int(sys.argv[2]))))
s, static, shared = memory._stages(config, classifier, "map")[stage]
analysis, _, _ = memory._step_memory(s, static, shared, inputs[stage], 1, "map")
print(f"temp {analysis.temp_size_in_bytes / 1e9:.2f} GB")
"""
for stage in ("coalitions", "perturbation"):
  for flags in ("", "--xla_gpu_autotune_level=0"):
    env = {**os.environ, "XLA_FLAGS": f"{os.environ.get('XLA_FLAGS', '')} {flags}".strip()}
    if not env["XLA_FLAGS"]:
      del env["XLA_FLAGS"]
    run = subprocess.run([sys.executable, "-c", PROGRAM, stage, size, model, preset], env=env,
                         capture_output=True, text=True, timeout=120)
    warnings = [line for line in run.stderr.splitlines() if "hlo_rematerialization" in line]
    print(f"{preset} {stage} step, one image at {size} px, XLA_FLAGS={flags or '(none)'}: "
          f"{run.stdout.strip() or run.stderr.strip()[-300:]}; {len(warnings)} "
          f"rematerialisation warnings{': ' + warnings[0][-160:] if warnings else ''}")
EOF

DETERMINISM_PRESET=fast
[ "$SMOKE" = 1 ] && DETERMINISM_PRESET=tiny
step determinism 25 "$PYTHON" - "$SQUEEZENET" "$DETERMINISM_PRESET" <<'EOF'
import dataclasses, sys, jax, numpy as np
from pfc_jax import models, parallel
from pfc_jax.explain import ExplainConfig, explain
model, preset = sys.argv[1:]
module = models.module(model)
classifier = models.classifier(model, jax.jit(module.init)(
    jax.random.key(0), np.zeros((1, 64, 64, 3), np.float32)))
images = np.random.default_rng(0).random((4, 64, 64, 3), np.float32)
keys = parallel.image_keys(0, range(4))
base = ExplainConfig.preset(preset)
config = ExplainConfig(dataclasses.replace(base.coalitions, batching="dense", compute_batch=4),
                       dataclasses.replace(base.perturb, batching="dense", compute_batch=4))
together = jax.device_get(explain(classifier, images, keys, config))
for i in range(4):
  alone = jax.device_get(explain(classifier, images[i:i + 1], keys[i:i + 1], config))
  print(f"{preset}, dense, compute_batch 4, image {i}: alone vs in a batch of 4, max |saliency "
        f"difference| {np.abs(alone.saliency[0] - together.saliency[i]).max():.3g}, labels "
        f"equal: {np.array_equal(alone.labels[0], together.labels[i])}")
EOF

E2E=("$PYTHON" scripts/batch_throughput.py --count "$COUNT" --size "$SIZE" "${PHOTOS_ARG[@]}")
SMOKE_STEPS=()
[ "$SMOKE" = 1 ] && SMOKE_STEPS=("${CAP[@]}" --chunk-size 4)
WEIGHTS_ARG=()
[ -f "$WEIGHTS" ] && [ "$SMOKE" != 1 ] && WEIGHTS_ARG=(--weights "$WEIGHTS")
step end_to_end_squeezenet 35 "${E2E[@]}" --model "$SQUEEZENET" "${WEIGHTS_ARG[@]}" \
  --preset fast "${SMOKE_STEPS[@]}" --json "$OUT/end_to_end_squeezenet.json"
step end_to_end_vgg16 40 "${E2E[@]}" --model "$VGG16" --preset fast "${SMOKE_STEPS[@]}" \
  --json "$OUT/end_to_end_vgg16.json"
echo "total $(( $(date +%s) - START )) s" | tee -a "$SUMMARY"
