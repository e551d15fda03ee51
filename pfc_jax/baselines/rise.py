"""RISE (Petsiuk, Das and Saenko, "RISE: Randomized Input Sampling for Explanation of Black-box
Models", BMVC 2018)."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from pfc_jax._inputs import check_images, per_image_keys
from pfc_jax.baselines import _common
from pfc_jax.classifier import Classifier


@dataclasses.dataclass(frozen=True)
class RISEConfig:
  """RISE settings (the paper's values, fewer masks).

  Attributes:
    num_masks: Random masks per image; default 2000 (the paper uses 4000-8000).
    cells: Side of the coarse binary grid; default 7.
    keep_probability: Probability that a grid cell is kept; default 0.5.
    chunk_size: Masks per image per forward pass; default 50. Memory only: each mask is
      drawn from its own index, so the maps do not depend on it (to float rounding).
  """
  num_masks: int = 2000
  cells: int = 7
  keep_probability: float = 0.5
  chunk_size: int = 50

  def __post_init__(self):
    _common.check_positive_ints(self, "num_masks", "cells", "chunk_size")
    if not 0.0 < self.keep_probability <= 1.0:
      raise ValueError(f"`keep_probability` must lie in (0, 1], got {self.keep_probability}.")


def _one_mask(config: RISEConfig, key: jax.Array, height: int, width: int) -> jax.Array:
  """One RISE mask `[H, W] float32` in [0, 1] drawn from `key` (see `random_masks`)."""
  cell_h, cell_w = -(-height // config.cells), -(-width // config.cells)
  # One uniform draw for the grid cells and the two shifts: one PRNG call to compile; float32,
  # so that `jax_enable_x64` draws the same masks.
  draws = jax.random.uniform(key, (config.cells * config.cells + 2,), jnp.float32)
  grid = (draws[:-2] < config.keep_probability).reshape(config.cells, config.cells)
  upsampled = jax.image.resize(
      grid.astype(jnp.float32), ((config.cells + 1) * cell_h, (config.cells + 1) * cell_w),
      method="bilinear")
  shift = jnp.floor(draws[-2:] * jnp.array([cell_h, cell_w])).astype(jnp.int32)
  return jax.lax.dynamic_slice(upsampled, shift, (height, width))


def random_masks(config: RISEConfig, key: jax.Array, count: int, height: int, width: int,
                 first: int | jax.Array = 0) -> jax.Array:
  """`[count, H, W] float32` RISE masks in [0, 1]: masks `first .. first + count - 1` of `key`.

  Mask n is drawn from `fold_in(key, n)` alone: a `cells x cells` Bernoulli grid upsampled
  bilinearly to `(cells + 1)` cell sizes and cropped to `H x W` at a random offset below one
  cell, so mask edges fall anywhere. Since mask n does not depend on which others are drawn
  with it, the saliency does not depend on `RISEConfig.chunk_size`.
  """
  indices = first + jnp.arange(count, dtype=jnp.int32)
  return jax.vmap(lambda n: _one_mask(config, jax.random.fold_in(key, n), height, width))(indices)


def _rise_chunk(config: RISEConfig, chunk: jax.Array, classifier: Classifier, images: jax.Array,
                target: jax.Array, keys: jax.Array) -> jax.Array:
  batch, height, width, _ = images.shape
  _, valid = _common.chunk_indices(chunk, config.chunk_size, config.num_masks)
  masks = jax.vmap(lambda key: random_masks(
      config, key, config.chunk_size, height, width, chunk * config.chunk_size))(keys)  # [B, c, H, W]
  masked = images[:, None] * masks[..., None]
  probs = _common.target_probabilities(
      classifier, masked.reshape(-1, height, width, 3), jnp.repeat(target, config.chunk_size))
  probs = jnp.where(valid[None], probs.reshape(batch, config.chunk_size), 0.0)
  return jnp.einsum("bc,bchw->bhw", probs, masks)


def rise(classifier: Classifier, images: jax.Array, target: jax.Array, key: jax.Array,
         config: RISEConfig | None = None) -> jax.Array:
  """RISE saliency: the target probability averaged over random masks that keep each pixel.

  saliency = sum_i p_t(image * M_i) M_i / (N * keep_probability), masks applied to raw [0, 1]
  RGB (masked pixels turn black), as in the paper.

  Args:
    classifier: The classifier.
    images: `[B, H, W, 3] float32` RGB in [0, 1].
    target: `[B] int32` classes to explain.
    key: One PRNG key (split per image) or `[B]` keys; image i's mask n is drawn from
      `fold_in(key_i, n)`, whatever the chunk size.
    config: `RISEConfig`.

  Returns:
    `[B, H, W] float32` saliency, >= 0.

  Raises:
    ValueError: on bad images or keys, a `target` outside the classifier's classes [0, C), or
      a config that is not a `RISEConfig`.
  """
  config = _common.check_config(config, RISEConfig)
  images = check_images(images)
  target = _common.check_target(target, classifier, images)
  keys = per_image_keys(key, images.shape[0])
  total = _common.sum_over_chunks(
      _rise_chunk, config, _common.num_chunks(config.num_masks, config.chunk_size),
      classifier, images, target, keys)
  return total / (config.num_masks * config.keep_probability)
