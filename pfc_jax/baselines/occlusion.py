"""Occlusion (Zeiler and Fergus, "Visualizing and Understanding Convolutional Networks", ECCV 2014)."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from pfc_jax._inputs import check_images
from pfc_jax.baselines import _common
from pfc_jax.classifier import Classifier


@dataclasses.dataclass(frozen=True)
class OcclusionConfig:
  """Occlusion settings.

  Attributes:
    patch_size: Side of the square patch in pixels; default 32 (clipped to the image size).
    stride: Step between patch positions in pixels, at most `patch_size` so that every pixel
      is covered; default 16. A last row/column of positions is added where needed so that
      patches reach the image's far edges.
    fill: Grey level of the patch in raw [0, 1] RGB; default 0.5 (mid grey; 0.0 is black).
    chunk_size: Patch positions per image per forward pass; default 32 (memory only).
  """
  patch_size: int = 32
  stride: int = 16
  fill: float = 0.5
  chunk_size: int = 32

  def __post_init__(self):
    _common.check_positive_ints(self, "patch_size", "stride", "chunk_size")
    if self.stride > self.patch_size:
      raise ValueError(
          f"`stride` ({self.stride}) must not exceed `patch_size` ({self.patch_size}): pixels "
          "between patches would have no occlusion score.")
    if not 0.0 <= self.fill <= 1.0:
      raise ValueError(f"`fill` must lie in [0, 1], got {self.fill}.")


def _starts(length: int, patch: int, stride: int) -> np.ndarray:
  """Patch start offsets along one axis, covering `[0, length)`."""
  starts = list(range(0, length - patch + 1, stride))
  if starts[-1] != length - patch:
    starts.append(length - patch)
  return np.asarray(starts, np.int32)


def patch_grid(config: OcclusionConfig, height: int, width: int) -> tuple[np.ndarray, np.ndarray, int, int]:
  """Top-left corners `(ys [P], xs [P])` of every patch, and the patch height and width."""
  patch_h, patch_w = min(config.patch_size, height), min(config.patch_size, width)
  ys, xs = np.meshgrid(_starts(height, patch_h, config.stride), _starts(width, patch_w, config.stride),
                       indexing="ij")
  return ys.ravel(), xs.ravel(), patch_h, patch_w


def _occlusion_chunk(config: OcclusionConfig, chunk: jax.Array, classifier: Classifier,
                     images: jax.Array, target: jax.Array,
                     clean_probs: jax.Array) -> tuple[jax.Array, jax.Array]:
  batch, height, width, _ = images.shape
  ys, xs, patch_h, patch_w = patch_grid(config, height, width)
  positions, valid = _common.chunk_indices(chunk, config.chunk_size, len(ys))
  y0 = jnp.asarray(ys)[positions][:, None, None]
  x0 = jnp.asarray(xs)[positions][:, None, None]
  rows = jnp.arange(height)[None, :, None]
  cols = jnp.arange(width)[None, None, :]
  patches = (rows >= y0) & (rows < y0 + patch_h) & (cols >= x0) & (cols < x0 + patch_w)
  patches = patches & valid[:, None, None]  # [c, H, W]
  occluded = jnp.where(patches[None, ..., None], config.fill, images[:, None])
  probs = _common.target_probabilities(
      classifier, occluded.reshape(-1, height, width, 3), jnp.repeat(target, config.chunk_size))
  drops = clean_probs[:, None] - probs.reshape(batch, config.chunk_size)
  weights = patches.astype(jnp.float32)
  return jnp.einsum("bc,chw->bhw", drops, weights), weights.sum(axis=0)


_clean_probabilities = jax.jit(_common.target_probabilities)


def occlusion(classifier: Classifier, images: jax.Array, target: jax.Array, key: jax.Array | None = None,
              config: OcclusionConfig | None = None) -> jax.Array:
  """Occlusion saliency: the drop in target probability when a patch covering the pixel is greyed.

  saliency(pixel) = mean over the patches covering it of (p_t(image) - p_t(occluded image)),
  p_t the softmax probability of the target.

  Args:
    classifier: The classifier.
    images: `[B, H, W, 3] float32` RGB in [0, 1].
    target: `[B] int32` classes to explain.
    key: Unused (deterministic); kept for the common call shape.
    config: `OcclusionConfig`.

  Returns:
    `[B, H, W] float32` saliency (may be negative where occlusion raises the score).

  Raises:
    ValueError: on bad images, a `target` outside the classifier's classes [0, C), or a
      config that is not an `OcclusionConfig`.
  """
  del key
  config = _common.check_config(config, OcclusionConfig)
  images = check_images(images)
  target = _common.check_target(target, classifier, images)
  num_positions = len(patch_grid(config, *images.shape[1:3])[0])
  drop_sum, coverage = _common.sum_over_chunks(
      _occlusion_chunk, config, _common.num_chunks(num_positions, config.chunk_size),
      classifier, images, target, _clean_probabilities(classifier, images, target))
  return drop_sum / coverage
