"""XLA's cost analysis, shared by the benchmark scripts."""

import jax


def flops(fn, *args) -> float:
  """XLA's FLOP count of `jax.jit(fn)(*args)` (NaN where the backend does not report it)."""
  analysis = jax.jit(fn).lower(*args).compile().cost_analysis()
  analysis = analysis[0] if isinstance(analysis, (list, tuple)) else analysis
  return float(analysis.get("flops", float("nan")))
