"""Score-CAM (Wang et al., "Score-CAM: Score-Weighted Visual Explanations for Convolutional
Neural Networks", CVPR Workshops 2020)."""

from __future__ import annotations

import dataclasses

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
    _common.check_positive_ints(self, "chunk_size")


def _score_chunk(static: tuple[ScoreCAMConfig, int], chunk: jax.Array, classifier: Classifier,
                 images: jax.Array, features: jax.Array, target: jax.Array) -> jax.Array:
  """`sum_k s_k A_k [B, h, w]` over this chunk's channels k, at the feature resolution."""
  config, num_channels = static
  batch, height, width, _ = images.shape
  channels, valid = _common.chunk_indices(chunk, config.chunk_size, num_channels)
  activations = jnp.take(features, channels, axis=3).astype(jnp.float32)  # [B, h, w, c]
  maps = jnp.moveaxis(activations, 3, 1).reshape(-1, *activations.shape[1:3])
  masks = _common.min_max_normalize(_common.resize_maps(maps, (height, width)))
  masks = masks.reshape(batch, config.chunk_size, height, width)
  # A constant channel carries no spatial information; the authors' code skips it.
  informative = activations.max(axis=(1, 2)) > activations.min(axis=(1, 2))  # [B, c]
  masked = classifier.normalize(images)[:, None] * masks[..., None]
  logits = classifier(masked.reshape(-1, height, width, 3)).astype(jnp.float32)
  probs = jax.nn.softmax(logits, axis=-1).reshape(batch, config.chunk_size, -1)
  scores = jnp.take_along_axis(probs, target[:, None, None], axis=2)[..., 0]
  scores = jnp.where(valid[None] & informative, scores, 0.0)
  return jnp.einsum("bc,bhwc->bhw", scores, activations)


@jax.jit
def _features(classifier: Classifier, images: jax.Array) -> jax.Array:
  return classifier.features_fn(classifier.params, classifier.normalize(images))


def scorecam(classifier: Classifier, images: jax.Array, target: jax.Array, key: jax.Array | None = None,
             config: ScoreCAMConfig | None = None) -> jax.Array:
  """Score-CAM saliency: activation maps weighted by the target probability they alone let through.

  Wang et al., eq. 2: saliency = ReLU(sum_k s_k Up(A_k)), with A_k channel k of
  `features_fn`'s output (raw activations, so a channel's scale counts) and Up bilinear
  upsampling to the image. The weight s_k is the softmax probability of the target on
  `normalize(image) * M_k`, where the mask M_k is Up(A_k) min-max normalised to [0, 1]; as in
  the authors' released code, the normalised input is masked (masked pixels take the data set
  mean), the baseline score f(X_b) of the paper's Definition 2 is not subtracted, and constant
  channels are skipped. (pytorch-grad-cam instead applies a softmax over k to the target
  logits.)

  Args:
    classifier: Needs `features_fn` and `head_fn`.
    images: `[B, H, W, 3] float32` RGB in [0, 1].
    target: `[B] int32` classes to explain.
    key: Unused (Score-CAM is deterministic); kept for the common call shape.
    config: `ScoreCAMConfig`.

  Returns:
    `[B, H, W] float32` saliency, >= 0.

  Raises:
    ValueError: if the classifier lacks `features_fn`/`head_fn`, on bad images, or on a
      `target` outside the classifier's classes [0, C).
  """
  del key
  config = _common.check_config(config, ScoreCAMConfig)
  check_feature_split(classifier, "Score-CAM")
  images = check_images(images)
  target = _common.check_target(target, classifier, images)
  features = _features(classifier, images)
  num_channels = features.shape[-1]
  weighted = _common.sum_over_chunks(
      _score_chunk, (config, num_channels), _common.num_chunks(num_channels, config.chunk_size),
      classifier, images, features, target)
  # Bilinear resizing is linear: upsampling the weighted sum equals summing upsampled maps.
  return jax.nn.relu(_common.resize_maps(weighted, images.shape[1:3]))
