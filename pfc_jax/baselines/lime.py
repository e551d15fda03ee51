"""LIME over superpixels (Ribeiro, Singh and Guestrin, "'Why Should I Trust You?': Explaining the
Predictions of Any Classifier", KDD 2016) through the `lime` package (`lime_image`).

The package does the work: it segments the image, draws random on/off vectors over the
segments, fills the segments switched off with their mean colour, weights each sample by an
exponential kernel of its cosine distance to the full image, and fits a ridge regression of the
target probability on the on/off vectors; a segment's coefficient is its attribution. This
module supplies the classifier (softmax probabilities, one jitted call per fixed-size batch) and
the segments: lime's own quickshift, or PFC's feature coalitions (`lime_coalitions`), which asks
whether PFC's perturbation beats a LIME attribution over the very same coalitions. Install with
`pip install 'pfc-jax[lime]'`.

LIME rather than KernelSHAP: `lime_image` is a complete superpixel explainer, segmentation and
masking included, so the adapter stays thin; `shap`'s KernelExplainer works on flat feature
vectors, and the superpixel masking would have to be written here.
"""

from __future__ import annotations

import dataclasses
from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np

from pfc_jax._inputs import check_images, per_image_keys
from pfc_jax.baselines import _common
from pfc_jax.classifier import Classifier
from pfc_jax.coalitions import CoalitionConfig, extract_coalitions
from pfc_jax.explain import stage_keys


@dataclasses.dataclass(frozen=True)
class QuickshiftConfig:
  """lime's default segmentation: `skimage.segmentation.quickshift` on the [0, 1] RGB image
  (converted to CIELAB by skimage) through lime's `SegmentationAlgorithm`, with `lime_image`'s
  parameters as defaults. Its tie-breaking noise is seeded from the image's key (`rng`; lime's
  own `random_seed` is silently dropped by the scikit-image versions that renamed it `rng`).

  Attributes:
    kernel_size: Width of the Gaussian kernel of the density estimate, in pixels; default 4.
    max_dist: Cut-off distance of the hierarchical segmentation; default 200.
    ratio: Balance of colour against image-space proximity, in [0, 1]; default 0.2.
  """
  kernel_size: float = 4.0
  max_dist: float = 200.0
  ratio: float = 0.2

  def __post_init__(self):
    if not self.kernel_size > 0 or not self.max_dist > 0:
      raise ValueError(
          f"`kernel_size` and `max_dist` must be positive, got {self.kernel_size} and "
          f"{self.max_dist}.")
    if not 0.0 <= self.ratio <= 1.0:
      raise ValueError(f"`ratio` must lie in [0, 1], got {self.ratio}.")


@dataclasses.dataclass(frozen=True)
class LIMEConfig:
  """LIME settings; the defaults are `lime_image.LimeImageExplainer`'s.

  The package's other defaults are kept: distances are cosine, the regression is ridge with
  alpha 1.

  Attributes:
    num_samples: Random on/off vectors over the segments (the first is all on); default 1000.
    kernel_width: Width of the exponential kernel on the cosine distance; default 0.25.
    hide_color: What a segment switched off shows: None, its own mean colour (lime's default;
      a segment of uniform colour then never changes, and gets no attribution), or this grey
      level in raw [0, 1] RGB (0.0 is black).
    segmentation: `QuickshiftConfig` (lime's segmentation; default) or a `CoalitionConfig`:
      segments are then PFC's feature coalitions computed with it (`extract_coalitions`), as
      `pfc_jax.explain` computes them for the same key.
    batch_size: Perturbed images per jitted classifier call; default 50 (speed only, no effect
      on the map).
  """
  num_samples: int = 1000
  kernel_width: float = 0.25
  hide_color: float | None = None
  segmentation: QuickshiftConfig | CoalitionConfig = QuickshiftConfig()
  batch_size: int = 50

  def __post_init__(self):
    _common.check_positive_ints(self, "num_samples", "batch_size")
    if not self.kernel_width > 0:
      raise ValueError(f"`kernel_width` must be positive, got {self.kernel_width}.")
    if self.hide_color is not None and not 0.0 <= self.hide_color <= 1.0:
      raise ValueError(f"`hide_color` must be None or lie in [0, 1], got {self.hide_color}.")
    if not isinstance(self.segmentation, (QuickshiftConfig, CoalitionConfig)):
      raise ValueError(
          "`segmentation` must be a QuickshiftConfig or a CoalitionConfig, got "
          f"{type(self.segmentation).__name__}.")


# `lime_coalitions`' default: the coalitions of the "fast" preset (`CoalitionConfig.fast()`,
# which `ExplainConfig.preset("fast").coalitions` is).
COALITIONS_CONFIG = LIMEConfig(segmentation=CoalitionConfig.fast())


@jax.jit
def _probabilities(classifier: Classifier, images: jax.Array) -> jax.Array:
  """`[N, C] float32` softmax probabilities of RGB images `[N, H, W, 3]` in [0, 1]."""
  return jax.nn.softmax(classifier.logits(images).astype(jnp.float32), axis=-1)


def _seeds(keys: jax.Array) -> np.ndarray:
  """`[B] int` numpy seeds, one per key, for the packages' host-side random generators."""
  return np.asarray(jax.vmap(lambda key: jax.random.randint(key, (), 0, 2**31 - 1))(keys))


def segments(images: jax.Array, key: jax.Array, segmentation: QuickshiftConfig | CoalitionConfig
             ) -> np.ndarray:
  """The segments LIME attributes to: `[B, H, W] int` labels 0..n_i - 1 per image.

  Args:
    images: `[B, H, W, 3] float32` RGB in [0, 1].
    key: `[B]` per-image segmentation keys: quickshift's random seed, or the coalition stage's
      keys (`stage_keys(per_image_keys(key, B))[0]`, as `pfc_jax.explain` derives them).
    segmentation: `QuickshiftConfig` or `CoalitionConfig`.

  Returns:
    Labels numbered consecutively from 0 (lime indexes its on/off vectors by label).
  """
  if isinstance(segmentation, CoalitionConfig):
    labels = np.asarray(extract_coalitions(images, key, segmentation).labels)
  else:
    wrappers = _common.import_optional("lime.wrappers.scikit_image", "lime", "lime")
    labels = np.stack([
        wrappers.SegmentationAlgorithm(
            "quickshift", kernel_size=segmentation.kernel_size, max_dist=segmentation.max_dist,
            ratio=segmentation.ratio, rng=seed)(image.astype(np.float64))
        for image, seed in zip(np.asarray(images), _seeds(key))])
  return np.stack([np.unique(image_labels, return_inverse=True)[1].reshape(image_labels.shape)
                   for image_labels in labels])


def lime(classifier: Classifier, images: jax.Array, target: jax.Array, key: jax.Array,
         config: LIMEConfig | None = None) -> jax.Array:
  """LIME saliency: each pixel gets the ridge coefficient of its segment for the target class.

  Image i's key is folded with 0 for its segmentation and with 1 for LIME's sampling
  (`pfc_jax.explain.stage_keys`), so that with coalition segments they are exactly PFC's
  coalitions under the same key. Images are explained one at a time on the host by
  `lime_image.LimeImageExplainer`; the classifier runs jitted on batches of `batch_size`.

  Cost at the defaults: 20-21 s of CPU time per 224 px photo on SqueezeNet 1.1 (2 ImageNet
  photos, a shared 2-core CPU; 33 and 48 quickshift segments); `lime_coalitions` 24-27 s.

  Args:
    classifier: The classifier.
    images: `[B, H, W, 3] float32` RGB in [0, 1].
    target: `[B] int32` classes to explain.
    key: One PRNG key (split per image) or `[B]` keys.
    config: `LIMEConfig`; default lime's quickshift segments.

  Returns:
    `[B, H, W] float32` saliency, constant on each segment (positive: the segment raises the
    target probability).

  Raises:
    ValueError: on bad images or keys, a `target` outside the classifier's classes [0, C), or
      a config that is not a `LIMEConfig`.
    ImportError: without the `lime` package (`pip install 'pfc-jax[lime]'`).
  """
  config = _common.check_config(config, LIMEConfig)
  images = check_images(images)
  target = np.asarray(_common.check_target(target, classifier, images))
  segment_keys, sample_keys = stage_keys(per_image_keys(key, images.shape[0]))
  lime_image = _common.import_optional("lime.lime_image", "lime", "lime")
  labels = segments(images, segment_keys, config.segmentation)
  maps = []
  for image, image_labels, label, seed in zip(np.asarray(images), labels, target,
                                              _seeds(sample_keys)):
    explainer = lime_image.LimeImageExplainer(kernel_width=config.kernel_width, random_state=seed)
    # lime draws a progress bar of its samples for every image; a batch has its own.
    with mock.patch.object(lime_image, "tqdm", lambda iterable, **_: iterable):
      explanation = explainer.explain_instance(
          image.astype(np.float64), lambda batch: _common.call_padded(
              _probabilities, batch, config.batch_size, classifier),
          labels=(int(label),), hide_color=config.hide_color, top_labels=None,
          num_samples=config.num_samples,
          batch_size=config.batch_size, segmentation_fn=lambda _, labels=image_labels: labels)
    weights = np.zeros(image_labels.max() + 1, np.float32)
    for segment, weight in explanation.local_exp[int(label)]:
      weights[segment] = weight
    maps.append(weights[image_labels])
  return jnp.asarray(np.stack(maps), jnp.float32)


def lime_coalitions(classifier: Classifier, images: jax.Array, target: jax.Array, key: jax.Array,
                    config: LIMEConfig | None = None) -> jax.Array:
  """LIME over PFC's feature coalitions: `lime` whose segments are the coalitions of the "fast"
  preset (`COALITIONS_CONFIG`), for the same key exactly those of
  `pfc_jax.explain(classifier, images, key, ExplainConfig.preset("fast"))`.

  Args and Returns: as `lime`; `config` defaults to `COALITIONS_CONFIG` and must segment with a
  `CoalitionConfig`.

  Raises:
    ValueError: as `lime`, and for a config whose segmentation is not a `CoalitionConfig`.
    ImportError: without the `lime` package (`pip install 'pfc-jax[lime]'`).
  """
  config = COALITIONS_CONFIG if config is None else config
  if isinstance(config, LIMEConfig) and not isinstance(config.segmentation, CoalitionConfig):
    raise ValueError(
        "`config.segmentation` of `lime_coalitions` must be a CoalitionConfig, got "
        f"{type(config.segmentation).__name__}; use `lime` for quickshift segments.")
  return lime(classifier, images, target, key, config)
