"""XLA's cost analysis, shared by the benchmark scripts."""

import math

import jax


def _flops_of(analysis) -> float:
  analysis = analysis[0] if isinstance(analysis, (list, tuple)) and analysis else analysis
  return float((analysis or {}).get("flops", math.nan))


def flops(fn, *args) -> float:
  """XLA's FLOP count of `jax.jit(fn)(*args)` (NaN where the backend reports none).

  Read from the lowered program, before optimisation, where the backend counts it there: on
  XLA:CPU the one-image coalition step of the "tiny" preset counts 101.1 MFLOP there and 102.1
  MFLOP after compilation (fusion changes little), at a fiftieth of the cost. XLA:GPU (jax 0.11)
  counts nothing before compilation; the compiled program's count is read instead.
  """
  lowered = jax.jit(fn).lower(*args)
  count = _flops_of(lowered.cost_analysis())
  if math.isnan(count):
    count = _flops_of(lowered.compile().cost_analysis())
  return count
