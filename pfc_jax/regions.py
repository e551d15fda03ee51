"""Connected regions of a label map, computed in JAX (jittable, vmappable, static sizes).

A feature coalition (`pfc_jax.coalitions`) may be spread over the image: the sky left and right
of a tree is one coalition. PFC's region-tied noise (`PerturbConfig.parameterization="region"`)
gives one noise value to each *connected* part of a coalition, so that two patches of sky can
be judged separately. `connected_regions` finds those parts; `region_ids` numbers the largest
ones for a parameter table of static size.

Connected components are found by min-label propagation with pointer jumping (as in
Shiloach and Vishkin's parallel connectivity, 1982): every pixel starts with its own raster
index, repeatedly takes the smallest index among its 4-neighbours of the same label, then jumps
to its pointer's pointer; the fixed point gives each component its smallest pixel index. It is a
`lax.while_loop` over elementwise passes (no convolutions), run to convergence.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax


def _shift(x: jax.Array, dy: int, dx: int, fill) -> jax.Array:
  """`out[i, j] = x[i + dy, j + dx]`, `fill` outside the map."""
  height, width = x.shape
  padded = jnp.pad(x, 1, constant_values=fill)
  return padded[1 + dy:1 + dy + height, 1 + dx:1 + dx + width]


def connected_regions(labels: jax.Array) -> jax.Array:
  """Connected components (4-connectivity) of the equal-label areas of one label map.

  Args:
    labels: `[H, W] int` label map (e.g. coalition labels).

  Returns:
    `[H, W] int32`: each pixel's component, named by the raster index `y * W + x` of the
    component's first pixel in raster order. Two pixels share a value exactly when a 4-connected
    path of equal labels joins them.
  """
  height, width = labels.shape
  size = height * width
  own = jnp.arange(size, dtype=jnp.int32).reshape(height, width)
  outside = jnp.int32(size)
  same = [(_shift(labels, dy, dx, -1) == labels, dy, dx)
          for dy, dx in ((-1, 0), (1, 0), (0, -1), (0, 1))]

  def propagate(ids):
    for neighbour_same, dy, dx in same:
      ids = jnp.minimum(ids, jnp.where(neighbour_same, _shift(ids, dy, dx, outside), outside))
    flat = ids.ravel()
    return flat[flat[flat]].reshape(height, width)  # Two pointer jumps.

  def not_converged(state):
    return state[1]

  def body(state):
    ids, _ = state
    new = propagate(ids)
    return new, jnp.any(new != ids)

  ids, _ = lax.while_loop(not_converged, body, (own, jnp.bool_(True)))
  return ids


def region_ids(labels: jax.Array, max_regions: int, num_labels: int) -> jax.Array:
  """Numbers the `max_regions` largest connected regions of a label map; the rest fall back to
  their label.

  Args:
    labels: `[H, W] int` labels in [0, num_labels).
    max_regions: Static count R of regions that get their own number.
    num_labels: Static upper bound L on the labels.

  Returns:
    `[H, W] int32` in [0, R + L): the R largest connected regions (ties: first pixel in raster
    order first) are numbered 0..R-1 by size; a pixel of a smaller region gets `R + label`, so
    all small regions of one label share a number.
  """
  height, width = labels.shape
  components = connected_regions(labels).ravel()
  sizes = jnp.zeros(height * width, jnp.int32).at[components].add(1)
  count = min(max_regions, height * width)
  top_sizes, top_roots = lax.top_k(sizes, count)
  number = jnp.full(height * width, -1, jnp.int32).at[top_roots].set(
      jnp.where(top_sizes > 0, jnp.arange(count, dtype=jnp.int32), -1))
  region = number[components].reshape(height, width)
  return jnp.where(region >= 0, region, max_regions + labels.astype(jnp.int32))
