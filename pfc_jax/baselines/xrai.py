"""XRAI (Kapishnikov, Bolukbasi, Viegas and Terry, "XRAI: Better Attributions Through Regions",
ICCV 2019) through PAIR's framework-agnostic `saliency` package (`saliency.core.XRAI`).

The package does the work: Integrated Gradients from two baselines, Felzenszwalb segmentations
at six scales, and the greedy region ranking. This module only supplies its model interface, a
`call_model_function` that returns gradients of the target logit, computed by one jitted
`jax.grad` over fixed-size batches. Install with `pip install 'pfc-jax[xrai]'`.

Guided IG (`saliency.core.GuidedIG`) is not offered: in `saliency` 0.2.1 it calls
`np.quantile(..., interpolation=...)`, a keyword that NumPy 2.4 removed, so it raises TypeError.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from pfc_jax._inputs import check_images
from pfc_jax.baselines import _common
from pfc_jax.classifier import Classifier

ALGORITHMS = ("full", "fast")
# `saliency.core.INPUT_OUTPUT_GRADIENTS`, the one output XRAI asks its model for.
INPUT_OUTPUT_GRADIENTS = "INPUT_OUTPUT_GRADIENTS"


@dataclasses.dataclass(frozen=True)
class XRAIConfig:
  """XRAI settings; the defaults are `saliency.core.XRAIParameters`'.

  The package's other defaults are kept and not configurable here: the Integrated Gradients
  baselines are constant images at the image's minimum and maximum value (black and white for
  an image spanning [0, 1]), their two attributions are averaged, and the regions are
  Felzenszwalb segmentations at scales 50-1200 of the image resized to 224 x 224 (minimum
  segment 150 px), dilated by 5 px.

  Attributes:
    steps: Integrated Gradients steps per baseline (`linspace(0, 1, steps)`, both ends
      included); default 100.
    algorithm: `"full"` (greedy ranking over all regions) or `"fast"` (the package's
      approximation); default "full".
    area_threshold: Fraction of the image the "full" ranking covers before the remaining area
      becomes one last region, in (0, 1]; default 1.0 (rank everything).
    batch_size: Gradients per jitted call; default 25 (memory only, no effect on the map).
  """
  steps: int = 100
  algorithm: str = "full"
  area_threshold: float = 1.0
  batch_size: int = 25

  def __post_init__(self):
    _common.check_positive_ints(self, "steps", "batch_size")
    if self.algorithm not in ALGORITHMS:
      raise ValueError(f"`algorithm` must be one of {ALGORITHMS}, got {self.algorithm!r}.")
    if not 0.0 < self.area_threshold <= 1.0:
      raise ValueError(f"`area_threshold` must lie in (0, 1], got {self.area_threshold}.")


@jax.jit
def _target_logit_gradients(classifier: Classifier, target: jax.Array,
                            images: jax.Array) -> jax.Array:
  """`[N, H, W, 3] float32` gradient of each image's `target` logit w.r.t. its [0, 1] RGB."""
  def summed_target_logit(images):
    return _common.target_logits(
        classifier, images, jnp.full(images.shape[:1], target, jnp.int32)).sum()
  return jax.grad(summed_target_logit)(images)


def call_model_function(classifier: Classifier, target: int, batch_size: int = 25) -> Callable:
  """The `saliency` package's model interface for one image's `target` class.

  The returned `fn(x_value_batch, call_model_args=None, expected_keys=None)` takes RGB images
  `[N, H, W, 3]` in [0, 1] (any float dtype, any N) and returns
  `{INPUT_OUTPUT_GRADIENTS: [N, H, W, 3] float32}`, the gradient of the target's logit, as
  `pfc_jax.baselines.integrated_gradients` integrates it: the logit does not saturate where the
  softmax probability nears 1, and XRAI then differs from the library's Integrated Gradients
  only by its baselines and its regions. Gradients come from one jitted `jax.grad` over
  batches of `batch_size` (the last one padded), compiled once per classifier and image size.

  Args:
    classifier: The classifier.
    target: Class whose logit is differentiated.
    batch_size: Images per jitted call.

  Returns:
    The function. It raises ValueError for an `expected_keys` other than
    `[INPUT_OUTPUT_GRADIENTS]` (XRAI and Integrated Gradients ask for nothing else).
  """
  target = np.int32(target)

  def fn(x_value_batch: np.ndarray, call_model_args: Any = None,
         expected_keys: list[str] | None = None) -> dict[str, np.ndarray]:
    del call_model_args
    if list(expected_keys or []) != [INPUT_OUTPUT_GRADIENTS]:
      raise ValueError(
          f"`expected_keys` must be [{INPUT_OUTPUT_GRADIENTS!r}], got {expected_keys!r}.")
    return {INPUT_OUTPUT_GRADIENTS: _common.call_padded(
        _target_logit_gradients, x_value_batch, batch_size, classifier, target)}

  return fn


def xrai(classifier: Classifier, images: jax.Array, target: jax.Array, key: jax.Array | None = None,
         config: XRAIConfig | None = None) -> jax.Array:
  """XRAI saliency: regions ranked by their density of Integrated Gradients attribution.

  Each pixel gets the attribution density (mean over its pixels of the channel-max of the
  averaged Integrated Gradients attribution) of the region through which XRAI's greedy ranking
  first added it (Kapishnikov et al. 2019, Algorithm 1). Images are explained one at a time on
  the host by `saliency.core.XRAI`; its gradients are batched and jitted.

  Cost at the defaults: 15-17 s of CPU time per 224 px photo on SqueezeNet 1.1 (2 ImageNet
  photos, a shared 2-core CPU), mostly the package's host-side segmentation and ranking.

  Args:
    classifier: The classifier.
    images: `[B, H, W, 3] float32` RGB in [0, 1].
    target: `[B] int32` classes to explain.
    key: Unused (deterministic); kept for the common call shape.
    config: `XRAIConfig`.

  Returns:
    `[B, H, W] float32` saliency.

  Raises:
    ValueError: on bad images, a `target` outside the classifier's classes [0, C), or a
      config that is not an `XRAIConfig`.
    ImportError: without the `saliency` package (`pip install 'pfc-jax[xrai]'`).
  """
  del key
  config = _common.check_config(config, XRAIConfig)
  images = check_images(images)
  target = np.asarray(_common.check_target(target, classifier, images))
  core = _common.import_optional("saliency.core", "xrai", "xrai")
  parameters = core.XRAIParameters(steps=config.steps, area_threshold=config.area_threshold,
                                   algorithm=config.algorithm)
  maps = [core.XRAI().GetMask(image, call_model_function(classifier, label, config.batch_size),
                              batch_size=config.batch_size, extra_parameters=parameters)
          for image, label in zip(np.asarray(images), target)]
  return jnp.asarray(np.stack(maps).reshape(images.shape[:3]), jnp.float32)
