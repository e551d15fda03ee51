"""XLA's cost analysis, shared by the benchmark scripts."""

import math

import jax


def flops(fn, *args) -> float:
  """XLA's FLOP count of `jax.jit(fn)(*args)`, counted by XLA:CPU on any backend (NaN if none).

  Read from the program lowered for the CPU from the arguments' shapes, before optimisation, so
  nothing is compiled and the count is the same whichever device runs the program: on XLA:CPU
  the one-image coalition step of the "tiny" preset counts 101.1 MFLOP there and 102.1 MFLOP
  after compilation (fusion changes little). XLA:GPU (jax 0.11) counts nothing before
  compilation and, after it, nothing for the convolutions it hands to cuDNN: 0.44 of the about
  20 TFLOP of a VGG16 `fast` perturbation per image.
  """
  shapes = jax.tree.map(lambda leaf: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype), args)
  with jax.default_device(jax.devices("cpu")[0]):
    analysis = jax.jit(fn).lower(*shapes).cost_analysis()
  analysis = analysis[0] if isinstance(analysis, (list, tuple)) and analysis else analysis
  return float((analysis or {}).get("flops", math.nan))
