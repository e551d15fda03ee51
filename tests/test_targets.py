"""Every public function that takes target classes rejects one outside [0, C), naming the range.

`shapes_cnn` has 4 classes: target 7 used to give all-zero Grad-CAM and Integrated Gradients maps
and NaN from Occlusion and Average Drop, and target -1 silently explained class 3.
"""

import functools

import jax
import numpy as np
import pytest

from pfc_jax import baselines, metrics, models, weights
from pfc_jax.benchmarks import shapes
from pfc_jax.classifier import check_classifier


@functools.cache
def _shapes_classifier():
  return models.classifier("shapes_cnn", weights.load("shapes_cnn"))


def _call(name: str, classifier, images, target):
  saliency = np.ones(images.shape[:3], np.float32)
  key = jax.random.key(0)
  if name in baselines.METHODS:
    return baselines.METHODS[name](classifier, images, target, key)
  if name == "road":
    return metrics.road(classifier, images, saliency, target, key)
  return getattr(metrics, name)(classifier, images, saliency, target)


@pytest.mark.parametrize("name", [
    *sorted(baselines.METHODS), "confidences", "average_drop", "increase_in_confidence",
    "deletion_auc", "insertion_auc", "road"])
@pytest.mark.parametrize("target", [[7, 7], [-1, -1], [0, 4]])
def test_target_outside_the_classes_raises(name, target):
  images = shapes.generate(2, 64, seed=1).images
  with pytest.raises(ValueError, match=r"`target` must lie in the classifier's class range \[0, 4\)"):
    _call(name, _shapes_classifier(), images, np.array(target))


def test_the_class_count_comes_from_the_logits():
  classifier, images = _shapes_classifier(), shapes.generate(2, 64, seed=1).images
  assert check_classifier(classifier, images) == classifier.logits(images).shape[-1] == 4
  maps = baselines.gradcam(classifier, images, np.array([3, 0]))  # The last class is valid.
  assert maps.shape == (2, 64, 64) and np.isfinite(np.asarray(maps)).all()
