"""Connected regions in JAX against scipy.ndimage.label, and the static region numbering."""

import jax
import numpy as np
import pytest
from scipy import ndimage

from pfc_jax import regions


def _random_labels(seed, size=24, num=3, smooth=3):
  rng = np.random.default_rng(seed)
  noisy = rng.integers(0, num, size=(size, size))
  return ndimage.median_filter(noisy, smooth).astype(np.int32)


def _scipy_components(labels):
  """Component index per pixel (4-connectivity), numbered per label by scipy."""
  out = np.zeros(labels.shape, np.int64)
  offset = 0
  for value in np.unique(labels):
    component, count = ndimage.label(labels == value)
    out[component > 0] = component[component > 0] + offset
    offset += count
  return out, offset


@pytest.mark.parametrize("seed", range(4))
def test_connected_regions_match_scipy(seed):
  labels = _random_labels(seed)
  ids = np.asarray(jax.jit(regions.connected_regions)(labels))
  expected, count = _scipy_components(labels)
  assert count > 3
  # The same partition: a bijection between scipy's components and ours.
  pairs = set(zip(expected.ravel(), ids.ravel()))
  assert len(pairs) == count == len(np.unique(ids))
  # Each component is named by its first pixel in raster order.
  for value in np.unique(ids):
    assert value == np.flatnonzero(ids.ravel() == value)[0]


def test_a_spiral_converges():
  """A long winding corridor: propagation must run to convergence, not a fixed count."""
  size = 21
  labels = np.ones((size, size), np.int32)
  labels[1:-1:2, 1:-1] = 0  # horizontal bars of label 0 ...
  labels[2:-1:4, -2] = 0  # ... joined alternately on the right ...
  labels[4:-1:4, 1] = 0  # ... and on the left: one snake.
  ids = np.asarray(regions.connected_regions(labels))
  expected, count = _scipy_components(labels)
  assert len(set(zip(expected.ravel(), ids.ravel()))) == count == len(np.unique(ids))


def test_region_ids_number_the_largest_regions_and_pool_the_rest():
  labels = np.zeros((8, 8), np.int32)
  labels[:, 4:] = 1  # two halves of 32 pixels
  labels[0, 0] = 2  # three single pixels of label 2 ...
  labels[7, 0] = 2
  labels[0, 7] = 2
  labels[3:5, 1:3] = 3  # ... and a 2x2 block of label 3.
  numbers = np.asarray(jax.jit(regions.region_ids, static_argnums=(1, 2))(labels, 3, 4))
  # The largest three by size: the right half (31 pixels), the left half (26), the block (4).
  assert numbers[0, 5] == 0 and numbers[0, 1] == 1 and numbers[3, 1] == 2
  # The single pixels of label 2 fall back to 3 + label.
  assert numbers[0, 0] == numbers[7, 0] == numbers[0, 7] == 3 + 2
  assert numbers.max() < 3 + 4
