"""Models: shapes, parameter names, activations, pooling semantics and the Classifier registry."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import reference_numpy as ref
from pfc_jax import Classifier, IMAGENET_MEAN, IMAGENET_STD, models
from pfc_jax.models import squeezenet, vgg


def _shapes(tree):
  return {jax.tree_util.keystr(path): leaf.shape
          for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


def _abstract_variables(model, size: int):
  return jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, size, size, 3)))


def _random_variables(model, size: int, seed: int):
  """He-scaled random variables, drawn in numpy (`model.init` compiles slowly on CPU)."""
  rng = np.random.default_rng(seed)

  def draw(leaf):
    scale = np.sqrt(2.0 / np.prod(leaf.shape[:-1])) if len(leaf.shape) > 1 else 0.05
    return jnp.asarray(rng.standard_normal(leaf.shape, np.float32) * np.float32(scale))

  return jax.tree_util.tree_map(draw, _abstract_variables(model, size))


@functools.partial(jax.jit, static_argnames=("model", "capture"))
def _call(model, variables, x, capture=()):
  return model.apply(variables, x, capture=capture)


@functools.partial(jax.jit, static_argnames=("model", "method"))
def _method(model, variables, x, method):
  return model.apply(variables, x, method=method)


def test_vgg16_parameter_layout():
  shapes = _shapes(_abstract_variables(models.VGG16(), 224)["params"])
  expected = {"['conv1_1']['kernel']": (3, 3, 3, 64), "['conv3_3']['kernel']": (3, 3, 256, 256),
              "['conv5_3']['bias']": (512,), "['fc6']['kernel']": (25088, 4096),
              "['fc7']['kernel']": (4096, 4096), "['fc8']['kernel']": (4096, 1000)}
  assert {k: shapes[k] for k in expected} == expected
  assert len(shapes) == 2 * 16
  assert sum(np.prod(s) for s in shapes.values()) == 138_357_544  # torchvision's count.


def test_squeezenet_parameter_layout():
  shapes = _shapes(_abstract_variables(models.SqueezeNet1_1(), 224)["params"])
  assert shapes["['fire9']['expand3x3']['kernel']"] == (3, 3, 64, 256)
  assert shapes["['conv10']['kernel']"] == (1, 1, 512, 1000)
  assert sum(np.prod(s) for s in shapes.values()) == 1_235_496  # torchvision's count.


@pytest.mark.parametrize("model, features_shape", [
    (models.VGG16(), (2, 14, 14, 512)), (models.SqueezeNet1_1(), (2, 13, 13, 512))])
def test_feature_shapes_at_224(model, features_shape):
  variables = _abstract_variables(model, 224)
  x = jax.ShapeDtypeStruct((2, 224, 224, 3), jnp.float32)
  assert jax.eval_shape(lambda v, x: model.apply(v, x, method="features"), variables,
                        x).shape == features_shape
  assert jax.eval_shape(model.apply, variables, x).shape == (2, 1000)


@pytest.fixture(scope="module")
def small_vgg16(vgg16):
  """VGG16 and random variables (conftest's)."""
  return models.VGG16(), vgg16[2]


def test_vgg16_capture_features_and_head(small_vgg16):
  model, variables = small_vgg16
  x = jax.random.normal(jax.random.key(1), (2, 48, 40, 3))
  logits, acts = _call(model, variables, x, capture=("conv1_1", "conv5_3"))
  assert set(acts) == {"conv1_1", "conv5_3"}
  assert acts["conv1_1"].shape == (2, 48, 40, 64) and acts["conv1_1"].min() >= 0
  features = _method(model, variables, x, "features")
  np.testing.assert_allclose(acts["conv5_3"], features, rtol=1e-6)
  np.testing.assert_allclose(_method(model, variables, features, "head"), logits, rtol=1e-5,
                             atol=1e-5)


def test_capture_and_size_errors(small_vgg16):
  model, variables = small_vgg16
  with pytest.raises(ValueError, match="conv6_1"):
    _call(model, variables, jnp.zeros((1, 32, 32, 3)), capture=("conv6_1",))
  with pytest.raises(ValueError, match="32"):
    _call(model, variables, jnp.zeros((1, 31, 64, 3)))


def test_squeezenet_capture_features_and_head():
  model = models.SqueezeNet1_1()
  x = jax.random.normal(jax.random.key(2), (2, 66, 66, 3))
  variables = _random_variables(model, 66, seed=0)
  logits, acts = _call(model, variables, x, capture=("fire9", "conv10", "conv1"))
  assert set(acts) == {"fire9", "conv10", "conv1"}
  np.testing.assert_allclose(acts["conv10"].mean(axis=(1, 2)), logits, rtol=1e-5)
  features = _method(model, variables, x, "features")
  np.testing.assert_allclose(features, acts["fire9"], rtol=1e-6)
  np.testing.assert_allclose(_method(model, variables, features, "head"), logits, rtol=1e-5)
  with pytest.raises(ValueError, match="fire10"):
    _call(model, variables, x, capture=("fire10",))


@pytest.mark.parametrize("in_size", [1, 2, 3, 5, 7, 9, 14, 15])
def test_adaptive_avg_pool_matches_torch_semantics(in_size):
  x = np.random.default_rng(in_size).standard_normal((2, in_size, in_size + 2, 3), np.float32)
  expected = ref.adaptive_avg_pool2d(x.transpose(0, 3, 1, 2), 7).transpose(0, 2, 3, 1)
  np.testing.assert_allclose(vgg.adaptive_avg_pool(jnp.asarray(x), 7), expected, rtol=1e-5,
                             atol=1e-6)


@pytest.mark.parametrize("height, width", [(7, 8), (13, 14), (55, 56), (111, 112), (4, 3)])
def test_ceil_mode_max_pool_matches_torch_semantics(height, width):
  x = np.random.default_rng(height).standard_normal((2, height, width, 3), np.float32)
  expected = ref.max_pool2d(x.transpose(0, 3, 1, 2), 3, 2, ceil_mode=True).transpose(0, 2, 3, 1)
  np.testing.assert_array_equal(squeezenet.max_pool_ceil(jnp.asarray(x)), expected)


def _squeezenet_variables(seed: int):
  return _random_variables(models.SqueezeNet1_1(), 32, seed)


def test_classifier_registry_shares_compilation():
  traces = []

  @jax.jit
  def logits(classifier, images01):
    traces.append(1)
    return classifier.logits(images01)

  images = jax.random.uniform(jax.random.key(3), (2, 32, 32, 3))
  first = models.classifier("squeezenet1_1", _squeezenet_variables(0))
  second = models.classifier("squeezenet1_1", _squeezenet_variables(1))
  assert (first.mean, first.std, first.bgr) == (IMAGENET_MEAN, IMAGENET_STD, False)
  out_first, out_second = logits(first, images), logits(second, images)
  assert len(traces) == 1
  assert not np.allclose(out_first, out_second)
  np.testing.assert_allclose(
      out_first, _call(models.SqueezeNet1_1(), first.params, first.normalize(images)),
      rtol=1e-5)
  features = jax.jit(first.features_fn)(first.params, first.normalize(images))
  np.testing.assert_allclose(jax.jit(first.head_fn)(first.params, features), out_first,
                             rtol=1e-5, atol=1e-6)


def test_classifier_passes_through_vmap():
  classifier = models.classifier("squeezenet1_1", _squeezenet_variables(0))
  images = jax.random.uniform(jax.random.key(4), (2, 3, 20, 20, 3))
  batched = jax.jit(jax.vmap(lambda c, x: c.logits(x), in_axes=(None, 0)))(classifier, images)
  single = jax.jit(lambda c, x: c.logits(x))(classifier, images[1])
  np.testing.assert_allclose(batched[1], single, rtol=1e-5, atol=1e-5)


def test_classifier_reads_preprocessing_collection():
  variables = dict(_squeezenet_variables(0))
  variables[models.PREPROCESSING] = {"mean": np.array([0.4, 0.5, 0.6], np.float32),
                                     "std": np.full(3, 0.5, np.float32),
                                     "bgr": np.array(1.0, np.float32)}
  classifier = models.classifier("squeezenet1_1", variables)
  assert classifier.bgr and set(classifier.params) == {"params"}
  np.testing.assert_allclose(classifier.mean, (0.4, 0.5, 0.6), rtol=1e-6)
  rgb = np.zeros((1, 1, 1, 3), np.float32) + np.array([0.1, 0.2, 0.3], np.float32)
  np.testing.assert_allclose(classifier.normalize(rgb)[0, 0, 0], [-0.2, -0.6, -1.0], atol=1e-6)


def test_shapes_cnn_registry():
  size = models.input_size("shapes_cnn")
  variables = _random_variables(models.module("shapes_cnn"), size, seed=0)
  classifier = models.classifier("shapes_cnn", variables)
  assert isinstance(classifier, Classifier)
  logits = jax.jit(lambda c, x: c.logits(x))(classifier, jnp.full((2, size, size, 3), 0.5))
  assert logits.shape == (2, len(models.class_names("shapes_cnn")))


def test_class_names_and_unknown_model():
  names = models.class_names("vgg16")
  assert len(names) == 1000 and names[0] == "tench" and names[999] == "toilet_tissue"
  assert models.class_names("squeezenet1_1") == names
  with pytest.raises(ValueError, match="resnet"):
    models.classifier("resnet", {})
  with pytest.raises(ValueError, match="resnet"):
    models.class_names("resnet")
