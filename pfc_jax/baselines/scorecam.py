"""Score-CAM (Wang et al., "Score-CAM: Score-Weighted Visual Explanations for Convolutional
Neural Networks", CVPR Workshops 2020)."""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from pfc_jax._inputs import check_images
from pfc_jax.baselines import _common
from pfc_jax.baselines.gradcam import check_feature_split
from pfc_jax.classifier import Classifier


@dataclasses.dataclass(frozen=True)
class ScoreCAMConfig:
  """Score-CAM settings.

  Attributes:
    chunk_size: Feature channels (masked copies of each image) per forward pass; default 32.
      Only memory and speed depend on it, not the result.
  """
  chunk_size: int = 32

  def __post_init__(self):
    if self.chunk_size < 1:
      raise ValueError(f"`chunk_size` must be >= 1, got {self.chunk_size}.")


def _score_chunk(static: tuple[ScoreCAMConfig, int], chunk: jax.Array, classifier: Classifier,
                 images: jax.Array, features: jax.Array, target: jax.Array) -> jax.Array:
  config, num_channels = static
  batch, height, width, _ = images.shape
  channels, valid = _common.chunk_indices(chunk, config.chunk_size, num_channels)
  maps = jnp.moveaxis(jnp.take(features, channels, axis=3), 3, 1)  # [B, c, h, w]
  maps = _common.resize_maps(maps.reshape(-1, *maps.shape[2:]), (height, width))
  masks = _common.min_max_normalize(maps).reshape(batch, config.chunk_size, height, width)
  # A constant channel carries no spatial information; the reference code skips it.
  informative = maps.reshape(batch, config.chunk_size, -1).std(axis=-1) > 0
  masked = classifier.normalize(images)[:, None] * masks[..., None]
  logits = classifier(masked.reshape(-1, height, width, 3)).astype(jnp.float32)
  probs = jax.nn.softmax(logits, axis=-1).reshape(batch, config.chunk_size, -1)
  scores = jnp.take_along_axis(probs, target[:, None, None], axis=2)[..., 0]
  scores = jnp.where(valid[None] & informative, scores, 0.0)
  return jnp.einsum("bc,bchw->bhw", scores, masks)


@jax.jit
def _features(classifier: Classifier, images: jax.Array) -> jax.Array:
  return classifier.features_fn(classifier.params, classifier.normalize(images))


def scorecam(classifier: Classifier, images: jax.Array, target: jax.Array, key: jax.Array | None = None,
             config: ScoreCAMConfig | None = None) -> jax.Array:
  """Score-CAM saliency: feature maps weighted by the target probability they alone let through.

  Each channel of `features_fn`'s output is upsampled to the image, min-max normalised to a mask
  `M_k`, and scored by the softmax probability of the target on `normalize(image) * M_k` (the
  reference implementation masks the normalised input, so masked pixels take the data set mean).
  Saliency = ReLU(sum_k score_k M_k).

  Args:
    classifier: Needs `features_fn` and `head_fn`.
    images: `[B, H, W, 3] float32` RGB in [0, 1].
    target: `[B] int32` classes to explain.
    key: Unused (Score-CAM is deterministic); kept for the common call shape.
    config: `ScoreCAMConfig`.

  Returns:
    `[B, H, W] float32` saliency, >= 0.

  Raises:
    ValueError: if the classifier lacks `features_fn`/`head_fn`, or on bad images or targets.
  """
  del key
  config = _common.check_config(config, ScoreCAMConfig)
  check_feature_split(classifier, "Score-CAM")
  images = check_images(images)
  target = _common.check_target(target, images.shape[0])
  features = _features(classifier, images)
  num_channels = features.shape[-1]
  total = _common.sum_over_chunks(
      _score_chunk, (config, num_channels), _common.num_chunks(num_channels, config.chunk_size),
      classifier, images, features, target)
  return jax.nn.relu(total)
