"""Integrated Gradients (Sundararajan, Taly and Yan, "Axiomatic Attribution for Deep Networks",
ICML 2017)."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from pfc_jax._inputs import check_images
from pfc_jax.baselines import _common
from pfc_jax.classifier import Classifier


@dataclasses.dataclass(frozen=True)
class IntegratedGradientsConfig:
  """Integrated Gradients settings.

  Attributes:
    num_steps: Points of the midpoint Riemann sum along the path; default 32.
    baseline: Grey level of the baseline image in raw [0, 1] RGB; default 0.0 (black).
    chunk_size: Path points per image per forward/backward pass; default 8 (memory only).
  """
  num_steps: int = 32
  baseline: float = 0.0
  chunk_size: int = 8

  def __post_init__(self):
    _common.check_positive_ints(self, "num_steps", "chunk_size")
    if not 0.0 <= self.baseline <= 1.0:
      raise ValueError(f"`baseline` must lie in [0, 1], got {self.baseline}.")


def _gradient_chunk(config: IntegratedGradientsConfig, chunk: jax.Array, classifier: Classifier,
                    images: jax.Array, target: jax.Array) -> jax.Array:
  batch, height, width, _ = images.shape
  steps, valid = _common.chunk_indices(chunk, config.chunk_size, config.num_steps)
  alphas = (steps.astype(jnp.float32) + 0.5) / config.num_steps
  path = config.baseline + alphas[None, :, None, None, None] * (images[:, None] - config.baseline)
  path = path.reshape(-1, height, width, 3)

  def summed_target_logit(path):
    return _common.target_logits(classifier, path, jnp.repeat(target, config.chunk_size)).sum()

  grads = jax.grad(summed_target_logit)(path).reshape(batch, config.chunk_size, height, width, 3)
  return jnp.einsum("c,bchwk->bhwk", valid.astype(jnp.float32), grads)


def integrated_gradients(classifier: Classifier, images: jax.Array, target: jax.Array,
                         key: jax.Array | None = None,
                         config: IntegratedGradientsConfig | None = None) -> jax.Array:
  """Integrated Gradients saliency of the target logit, from a constant baseline image.

  attribution = (x - x0) * mean_k grad f_t(x0 + alpha_k (x - x0)), alpha_k = (k + 1/2) / n, in
  raw [0, 1] RGB; saliency = sum over channels of `|attribution|`.

  Args:
    classifier: The classifier.
    images: `[B, H, W, 3] float32` RGB in [0, 1].
    target: `[B] int32` classes to explain.
    key: Unused (deterministic); kept for the common call shape.
    config: `IntegratedGradientsConfig`.

  Returns:
    `[B, H, W] float32` saliency, >= 0.

  Raises:
    ValueError: on bad images, a `target` outside the classifier's classes [0, C), or a
      config that is not an `IntegratedGradientsConfig`.
  """
  del key
  config = _common.check_config(config, IntegratedGradientsConfig)
  images = check_images(images)
  target = _common.check_target(target, classifier, images)
  grad_sum = _common.sum_over_chunks(
      _gradient_chunk, config, _common.num_chunks(config.num_steps, config.chunk_size),
      classifier, images, target)
  attribution = (images - config.baseline) * grad_sum / config.num_steps
  return jnp.abs(attribution).sum(axis=-1)
