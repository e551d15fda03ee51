"""XLA's cost analysis, shared by the benchmark scripts."""

import jax


def flops(fn, *args) -> float:
  """XLA's FLOP count of `jax.jit(fn)(*args)` (NaN where the backend does not report it).

  Read from the lowered program, before optimisation, so nothing is compiled: on XLA:CPU the
  one-image coalition step of the "tiny" preset counts 101.1 MFLOP there and 102.1 MFLOP after
  compilation (fusion changes little), at a fiftieth of the cost.
  """
  analysis = jax.jit(fn).lower(*args).cost_analysis()
  analysis = analysis[0] if isinstance(analysis, (list, tuple)) else analysis
  return float((analysis or {}).get("flops", float("nan")))
