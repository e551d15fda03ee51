"""Memory of one perturbation step for VGG16 at 224 px, from XLA's analysis of the compiled step.

Nothing runs and no weights are needed: the step is compiled for abstract VGG16 parameters on
the default backend, and XLA's `memory_analysis()` reports its buffers. Temporary memory
(activations kept for the backward pass, gradients) grows with images x noise samples; the
difference between batch 2 and batch 1 is the cost of one more image. Parameters (528 MB) are
shared by all images. Evaluating the noise samples in chunks (`PerturbConfig.noise_chunk`)
divides the per-image memory.

Usage:
  python scripts/memory_vgg16.py [--samples 16] [--chunks 0,4,1]
"""

from __future__ import annotations

import argparse
import jax
import jax.numpy as jnp

from pfc_jax import _loop, models, perturbation

_MB = 2**20


def step_memory(config: perturbation.PerturbConfig, batch: int, size: int = 224):
  """XLA's memory analysis of one perturbation step of VGG16 for `batch` images in one dense
  batch (the "vmap" layout; with one image, the step every image runs under "sequential" and
  "map")."""
  variables = jax.eval_shape(models.module("vgg16").init, jax.random.key(0),
                             jnp.zeros((1, size, size, 3)))
  classifier = models.classifier("vgg16", variables)
  inputs = (jax.ShapeDtypeStruct((batch, size, size, 3), jnp.float32),
            jax.ShapeDtypeStruct((batch, size, size), jnp.int32),
            jax.eval_shape(lambda: jax.random.split(jax.random.key(0), batch)),
            jax.eval_shape(lambda: jax.tree.map(
                lambda v: jnp.full(batch, v), perturbation.Hyperparameters.from_config(config))))
  stage = perturbation._STAGE  # pylint: disable=protected-access
  states = jax.eval_shape(lambda c, i: jax.vmap(lambda x: stage.prepare(config, c, x))(i),
                          classifier, inputs)
  step = _loop.jit_step(_loop._paired_step(stage.step, batched=True))  # pylint: disable=protected-access
  return step.lower(config, (classifier, states)).compile().memory_analysis()


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--samples", type=int, default=16, help="Noise samples S per step.")
  parser.add_argument("--chunks", default="0,4,1",
                      help="Comma-separated noise_chunk values; 0 = none.")
  args = parser.parse_args()
  print(f"backend {jax.default_backend()}, VGG16 224 px, S = {args.samples}")
  print("| noise_chunk | temp, 1 image (MB) | temp, 2 images (MB) | per image (MB) |"
        " arguments (MB) |")
  print("|---|---|---|---|---|")
  for chunk in (int(c) for c in args.chunks.split(",")):
    config = perturbation.PerturbConfig(noise_samples=args.samples, noise_chunk=chunk or None)
    one, two = (step_memory(config, batch) for batch in (1, 2))
    print(f"| {chunk or 'none'} | {one.temp_size_in_bytes / _MB:.0f} | "
          f"{two.temp_size_in_bytes / _MB:.0f} | "
          f"{(two.temp_size_in_bytes - one.temp_size_in_bytes) / _MB:.0f} | "
          f"{one.argument_size_in_bytes / _MB:.0f} |", flush=True)


if __name__ == "__main__":
  main()
