"""Cost of each coalition variant: FLOPs (XLA cost analysis) and seconds per image.

For each variant: FLOPs of the one-off preparation (init and, with a frozen backbone, the
features) and of one training step from XLA's cost analysis, the FLOPs of a whole image at
`max_steps`, and the measured seconds per step and per image (after a warm-up call that compiles)
with `--steps` training steps. Seconds per image are `prepare + max_steps * step` when `--steps` is
below `max_steps` (early stops make real runs cheaper).

Example:
  python scripts/benchmark_coalitions.py --size 224 --steps 20 --variants fast frozen
  python scripts/benchmark_coalitions.py --size 224 --steps 2 --variants full
"""

from __future__ import annotations

import argparse
import time

import jax

import pfc_jax.coalitions as coalitions
from _xla_cost import flops

Config = coalitions.CoalitionConfig
VARIANTS = {
    "full": Config(),
    "fast": Config.fast(),
    "frozen": Config(train_backbone=False),
    "frozen@112": Config.fast(resolution=112),
    "half-res": Config(resolution=112),
    "width0.25": Config(width=0.25),
    "width0.25@112": Config(width=0.25, resolution=112),
}


def _seconds(fn, *args) -> float:
  start = time.perf_counter()
  jax.block_until_ready(fn(*args))
  return time.perf_counter() - start


def benchmark(name: str, config: Config, size: int, steps: int) -> dict:
  """Cost of variant `config` on one random `size` x `size` image with `steps` steps."""
  image = jax.random.uniform(jax.random.key(0), (size, size, 3))
  key = jax.random.key(1)
  training = coalitions.image_training(config)
  state = training.init(image, key)
  prepare_flops = flops(training.init, image, key)
  step_flops = flops(training.step, state)
  prepare_seconds = _seconds(training.init, image, key)
  state = jax.block_until_ready(training.step(state))  # Warm-up.
  start = time.perf_counter()
  for _ in range(steps):
    state = training.step(state)
  jax.block_until_ready(state)
  step_seconds = (time.perf_counter() - start) / steps
  return {
      "variant": name, "prepare GFLOP": prepare_flops / 1e9, "step GFLOP": step_flops / 1e9,
      "image TFLOP": (prepare_flops + config.max_steps * step_flops) / 1e12,
      "prepare s": prepare_seconds, "step s": step_seconds,
      "image s": prepare_seconds + config.max_steps * step_seconds,
  }


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--size", type=int, default=224, help="image side in pixels")
  parser.add_argument("--steps", type=int, default=10, help="timed training steps per variant")
  parser.add_argument("--variants", nargs="*", default=["fast", "frozen"], choices=list(VARIANTS))
  args = parser.parse_args()
  print(f"backend {jax.default_backend()} ({jax.devices()[0].device_kind}), {args.size} px, "
        f"{args.steps} timed steps, image = prepare + max_steps steps of the variant")
  columns = ["variant", "prepare GFLOP", "step GFLOP", "image TFLOP", "prepare s", "step s",
             "image s"]
  print(" | ".join(columns))
  for name in args.variants:
    row = benchmark(name, VARIANTS[name], args.size, args.steps)
    print(" | ".join(f"{row[c]:.4g}" if isinstance(row[c], float) else row[c] for c in columns),
          flush=True)


if __name__ == "__main__":
  main()
