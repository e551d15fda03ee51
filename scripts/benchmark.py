"""Throughput of the PFC pipeline: images/s, seconds per image by stage, FLOPs and FLOP/s.

  python scripts/benchmark.py --model squeezenet1_1 \
      --weights ../shared/evaldata/squeezenet1_1.safetensors --size 224 --preset fast --batch 2

Each stage (coalitions, perturbation) is run once to compile, then timed over `--repeats` runs
on the same batch. FLOPs come from XLA's cost analysis (`jit(...).lower(...).compile().cost_analysis()`):
for the coalitions, the per-image set-up plus one step (`coalitions.image_training`) times the
steps each image took; for the perturbation, the stage compiled with one
step (its set-up is one clean forward pass) times its steps. Achieved FLOP/s is that over the
measured time. Images are random unless `--images` names a folder or glob.

`--max-steps N` runs at most N steps of each stage and scales times and FLOPs linearly to the
preset's step counts (set-up included in the scaling, so a slight overestimate): how the "paper"
preset, hours per 224 px image on a CPU, is costed there.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time

import jax
import numpy as np

from pfc_jax import coalitions, models, perturbation, sources, weights
from pfc_jax.explain import ExplainConfig
from _xla_cost import flops


def _timed(fn, repeats: int):
  """(result, mean seconds) over `repeats` calls after one warm-up call."""
  jax.block_until_ready(fn())
  start = time.perf_counter()
  for _ in range(repeats):
    result = jax.block_until_ready(fn())
  return result, (time.perf_counter() - start) / repeats


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
  parser.add_argument("--model", required=True, choices=models.MODEL_NAMES)
  parser.add_argument("--weights", help="Weights file; default: the model's default source.")
  parser.add_argument("--size", type=int, default=224, help="Image side, pixels.")
  parser.add_argument("--preset", default="fast", help="ExplainConfig preset.")
  parser.add_argument("--batch", type=int, default=1, help="Images per call.")
  parser.add_argument("--repeats", type=int, default=1, help="Timed runs per stage.")
  parser.add_argument("--images", help="Folder or glob of photos (default: random images).")
  parser.add_argument("--max-steps", type=int,
                      help="Run at most N steps per stage and scale to the preset's steps.")
  args = parser.parse_args()

  preset = ExplainConfig.preset(args.preset)
  config = preset
  if args.max_steps:
    config = dataclasses.replace(
        preset,
        coalitions=dataclasses.replace(
            preset.coalitions, max_steps=min(args.max_steps, preset.coalitions.max_steps)),
        perturb=dataclasses.replace(
            preset.perturb, steps=min(args.max_steps, preset.perturb.steps)))
  # Scale factors from the steps run to the preset's steps (1 without --max-steps).
  coalition_scale = preset.coalitions.max_steps / config.coalitions.max_steps
  perturb_scale = preset.perturb.steps / config.perturb.steps
  classifier = models.classifier(args.model, weights.load(args.model, source=args.weights))
  if args.images:
    source = sources.ImageFolderSource(args.images, args.size)
    images = np.stack([source.read(i)[1] for i in range(args.batch)])
  else:
    images = np.random.default_rng(0).random((args.batch, args.size, args.size, 3), np.float32)
  keys = jax.random.split(jax.random.key(0), args.batch)

  found, coalition_s = _timed(
      lambda: coalitions.extract_coalitions(images, keys, config.coalitions), args.repeats)
  if int(np.min(found.steps)) < config.coalitions.max_steps:
    coalition_scale = 1.0  # Stopped early: the preset's run stops at the same step.
  _, perturb_s = _timed(
      lambda: perturbation.perturb(classifier, images, found.labels, keys, config.perturb), args.repeats)

  training = coalitions.image_training(config.coalitions)
  state = training.init(images[0], keys[0])
  coalition_flops = args.batch * (
      flops(training.init, images[0], keys[0])
      + coalition_scale * float(np.mean(found.steps)) * flops(training.step, state))
  perturb_one = dataclasses.replace(config.perturb, steps=1, driver="compiled")
  perturb_flops = preset.perturb.steps * flops(
      lambda c, x, l, k: perturbation.perturb(c, x, l, k, perturb_one), classifier, images, found.labels, keys)

  coalition_s *= coalition_scale
  perturb_s *= perturb_scale
  total_s = coalition_s + perturb_s
  report = {
      "device": str(jax.devices()[0].device_kind), "backend": jax.default_backend(),
      "model": args.model, "size": args.size, "preset": args.preset, "batch": args.batch,
      "images_per_s": args.batch / total_s,
      "s_per_image": {"coalitions": coalition_s / args.batch, "perturbation": perturb_s / args.batch,
                      "total": total_s / args.batch},
      "steps_run": {"coalitions": float(np.mean(found.steps)), "perturbation": config.perturb.steps},
      "scaled_to_preset_steps": bool(args.max_steps),
      "gflop_per_image": {"coalitions": coalition_flops / args.batch / 1e9,
                          "perturbation": perturb_flops / args.batch / 1e9},
      "achieved_gflop_per_s": {"coalitions": coalition_flops / coalition_s / 1e9,
                               "perturbation": perturb_flops / perturb_s / 1e9},
  }
  print(json.dumps(report, indent=2))


if __name__ == "__main__":
  main()
