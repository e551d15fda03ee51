"""Tests for the synthetic shapes benchmark and its shipped classifier."""

import jax
import numpy as np
import pytest

from pfc_jax import data, weights
from pfc_jax.benchmarks import shapes
from pfc_jax.models import shapes_cnn


@pytest.fixture(scope="module")
def small_set():
  return shapes.generate(12, size=32, seed=3)


def test_generate_shapes_and_dtypes(small_set):
  assert small_set.images.shape == (12, 32, 32, 3) and small_set.images.dtype == np.float32
  assert small_set.labels.shape == (12,) and small_set.labels.dtype == np.int32
  assert small_set.masks.shape == (12, 32, 32) and small_set.masks.dtype == bool
  assert small_set.boxes.shape == (12, 4) and small_set.boxes.dtype == np.int32
  assert small_set.images.min() >= 0.0 and small_set.images.max() <= 1.0
  assert set(small_set.labels.tolist()) <= set(range(len(shapes.CLASS_NAMES)))


def test_generate_is_deterministic_per_seed(small_set):
  again = shapes.generate(12, size=32, seed=3)
  for field, other in zip(small_set, again):
    np.testing.assert_array_equal(field, other)
  different = shapes.generate(12, size=32, seed=4)
  assert not np.array_equal(small_set.images, different.images)


def test_image_depends_only_on_seed_and_index(small_set):
  prefix = shapes.generate(5, size=32, seed=3)
  for field, prefix_field in zip(small_set, prefix):
    np.testing.assert_array_equal(field[:5], prefix_field)


def test_masks_and_boxes_match_the_object(small_set):
  for image, mask, box in zip(small_set.images, small_set.masks, small_set.boxes):
    assert mask.any()
    rows, cols = np.nonzero(mask)
    np.testing.assert_array_equal(box, [rows.min(), cols.min(), rows.max() + 1, cols.max() + 1])
    # The object is one flat colour that stands out from its surroundings in the box.
    object_pixels = image[mask]
    np.testing.assert_allclose(object_pixels, object_pixels[:1].repeat(len(object_pixels), 0))
    y0, x0, y1, x1 = box
    surround = image[max(y0 - 2, 0):y1 + 2, max(x0 - 2, 0):x1 + 2]
    surround_mask = mask[max(y0 - 2, 0):y1 + 2, max(x0 - 2, 0):x1 + 2]
    background = surround[~surround_mask]
    assert np.abs(background - object_pixels[0]).max(axis=-1).mean() > 0.1


def test_all_classes_appear():
  labels = shapes.generate(40, size=16, seed=0).labels
  assert set(labels.tolist()) == set(range(len(shapes.CLASS_NAMES)))


@pytest.mark.parametrize("kwargs, name", [
    ({"num": -1}, "num"), ({"num": 2, "size": 8}, "size"), ({"num": 2, "seed": -1}, "seed")])
def test_generate_rejects_bad_arguments(kwargs, name):
  with pytest.raises(ValueError, match=f"`{name}`"):
    shapes.generate(**kwargs)


def test_features_and_head_compose_to_logits():
  model = shapes_cnn.ShapesCNN()
  params = weights.load("shapes_cnn")
  x = jax.random.normal(jax.random.key(0), (2, 32, 32, 3))

  @jax.jit
  def outputs(x):
    features = model.apply(params, x, method=shapes_cnn.ShapesCNN.features)
    head = model.apply(params, features, method=shapes_cnn.ShapesCNN.head)
    return features, head, model.apply(params, x)

  features, head, logits = outputs(x)
  assert features.shape == (2, 8, 8, model.widths[-1]) and float(features.min()) >= 0.0
  assert logits.shape == (2, len(shapes.CLASS_NAMES))
  np.testing.assert_allclose(head, logits, rtol=1e-5, atol=1e-5)


def test_shipped_weights_classify_fresh_benchmark_images():
  params = weights.load("shapes_cnn")  # The weights packaged in pfc_jax/assets.
  bench = shapes.generate(100, size=64, seed=12345)
  logits = jax.jit(shapes_cnn.ShapesCNN().apply)(
      params, data.normalize(bench.images, shapes_cnn.MEAN, shapes_cnn.STD))
  predictions = np.argmax(logits, axis=-1)
  assert np.mean(predictions == bench.labels) >= 0.9
