"""Grad-CAM (Selvaraju et al., "Grad-CAM: Visual Explanations from Deep Networks via
Gradient-based Localization", ICCV 2017)."""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from pfc_jax._inputs import check_images
from pfc_jax.baselines import _common
from pfc_jax.classifier import Classifier


@dataclasses.dataclass(frozen=True)
class GradCAMConfig:
  """Grad-CAM has no settings; the config keeps the baselines' call shape uniform.

  It reads the layer that `Classifier.features_fn` returns (usually the last convolution).
  """


def check_feature_split(classifier: Classifier, method: str) -> None:
  """Raises ValueError unless `classifier` has `features_fn` and `head_fn`, which `method` needs."""
  if classifier.features_fn is None or classifier.head_fn is None:
    raise ValueError(
        f"`classifier` has no features_fn/head_fn; {method} needs both (build the classifier "
        "with pfc_jax.models.classifier, or pass them to pfc_jax.Classifier).")


@functools.partial(jax.jit, static_argnums=0)
def _gradcam(config: GradCAMConfig, classifier: Classifier, images: jax.Array,
             target: jax.Array) -> jax.Array:
  del config
  features = classifier.features_fn(classifier.params, classifier.normalize(images))

  def summed_target_logit(features):
    logits = classifier.head_fn(classifier.params, features)
    return jnp.take_along_axis(logits, target[:, None], axis=1).sum()

  grads = jax.grad(summed_target_logit)(features)
  channel_weights = grads.mean(axis=(1, 2))  # [B, K]: global-average-pooled gradients.
  cam = jax.nn.relu(jnp.einsum("bhwk,bk->bhw", features, channel_weights))
  return _common.resize_maps(cam, images.shape[1:3])


def gradcam(classifier: Classifier, images: jax.Array, target: jax.Array, key: jax.Array | None = None,
            config: GradCAMConfig | None = None) -> jax.Array:
  """Grad-CAM saliency: ReLU of the feature maps weighted by their mean target-logit gradient.

  Selvaraju et al., eqs. 1-2: saliency = ReLU(sum_k alpha_k A_k), alpha_k = mean over (i, j) of
  d logit_t / d A_k(i, j), with A the output of `features_fn`, upsampled bilinearly.

  Args:
    classifier: Needs `features_fn` and `head_fn`.
    images: `[B, H, W, 3] float32` RGB in [0, 1].
    target: `[B] int32` classes to explain.
    key: Unused (Grad-CAM is deterministic); kept for the common call shape.
    config: `GradCAMConfig`.

  Returns:
    `[B, H, W] float32` saliency, >= 0, bilinearly upsampled from the feature resolution.

  Raises:
    ValueError: if the classifier lacks `features_fn`/`head_fn`, on bad images, or on a
      `target` outside the classifier's classes [0, C).
  """
  del key
  config = _common.check_config(config, GradCAMConfig)
  check_feature_split(classifier, "Grad-CAM")
  images = check_images(images)
  return _gradcam(config, classifier, images, _common.check_target(target, classifier, images))
