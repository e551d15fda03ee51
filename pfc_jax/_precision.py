"""Mixed precision for both PFC stages: bfloat16 compute, float32 parameters and losses.

With `precision="bfloat16"` the networks (the coalition network, the classifier under the
noise) run their convolutions and matrix products on bfloat16 copies of their float32
parameters and inputs, and hand their outputs back as float32. Everything the optimiser sees
stays float32: the trained parameters, the noise scale, the SGD / Adam state, the losses and the
gradients (the cast's gradient casts back). Norm statistics are float32 (Flax computes them in
at least float32).

This is the usual recipe of mixed-precision training (Micikevicius et al., "Mixed Precision
Training", ICLR 2018), with bfloat16's float32 exponent range in place of loss scaling.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Literal

import jax
import jax.numpy as jnp

Precision = Literal["float32", "bfloat16"]
PRECISIONS = ("float32", "bfloat16")


def check_precision(precision: str) -> None:
  """Raises ValueError unless `precision` is one of `PRECISIONS`."""
  if precision not in PRECISIONS:
    raise ValueError(f"`precision` must be one of {PRECISIONS}, got {precision!r}.")


def cast_floating(tree: Any, dtype) -> Any:
  """Every floating-point leaf of `tree` as `dtype`; other leaves (ints, keys) unchanged."""
  return jax.tree.map(
      lambda x: x.astype(dtype) if jnp.issubdtype(jnp.result_type(x), jnp.floating) else x, tree)


@functools.cache
def computed_in(fn: Callable, precision: Precision) -> Callable:
  """`fn(params, x, ...)` computed in `precision`, its floating outputs as float32.

  One wrapper per `(fn, precision)`, so that a wrapped static function hashes the same on every
  call (no recompilation).
  """
  check_precision(precision)
  if precision == "float32":
    return fn

  def wrapped(params, x, *args, **kwargs):
    out = fn(cast_floating(params, jnp.bfloat16), cast_floating(x, jnp.bfloat16), *args,
             **kwargs)
    return cast_floating(out, jnp.float32)

  return wrapped


def classifier_in(classifier, precision: Precision):
  """`classifier` (a `pfc_jax.Classifier`) whose forward pass computes in `precision`; its
  parameters stay float32 leaves."""
  if precision == "float32":
    return classifier
  return dataclasses.replace(classifier, apply_fn=computed_in(classifier.apply_fn, precision))
