"""XRAI through `saliency` and LIME through `lime`: the adapters' contracts, LIME over PFC's own
coalitions, determinism, and the error without the optional packages."""

import functools
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pfc_jax import ExplainConfig, baselines, explain, metrics, models, weights
from pfc_jax.baselines.lime import COALITIONS_CONFIG, segments
from pfc_jax.baselines.xrai import INPUT_OUTPUT_GRADIENTS, _target_logit_gradients, call_model_function
from pfc_jax.benchmarks import shapes
from test_baselines import colour_classifier, colour_images

SIZE = 32
TINY_XRAI = baselines.XRAIConfig(steps=4, batch_size=4)
# lime's quickshift settings leave one or two segments on 32 px images; these give 4-6.
TINY_LIME = baselines.LIMEConfig(num_samples=40, batch_size=16,
                                 segmentation=baselines.QuickshiftConfig(kernel_size=2, max_dist=20))
TINY_COALITIONS = ExplainConfig.preset("tiny").coalitions


def _needs(module: str, extra: str):
  return pytest.importorskip(module, reason=f"optional extra [{extra}] not installed")


@functools.cache
def _classifier():
  return models.classifier("shapes_cnn", weights.load("shapes_cnn"))


def _images_and_targets():
  images = shapes.generate(2, SIZE, seed=1).images
  return images, np.asarray(_classifier().logits(images).argmax(-1), np.int32)


def test_call_model_function_returns_the_target_logit_gradient():
  classifier, (images, _) = _classifier(), _images_and_targets()
  batch = np.concatenate([images, images[:1] * 0.5, images[1:] ** 2]).astype(np.float64)  # N = 4.
  fn = call_model_function(classifier, target=2, batch_size=3)  # Two calls, one padded.
  output = fn(batch, call_model_args=None, expected_keys=[INPUT_OUTPUT_GRADIENTS])
  gradients = output[INPUT_OUTPUT_GRADIENTS]
  expected = jax.jit(jax.grad(lambda x: classifier.logits(x)[:, 2].sum()))(
      jnp.asarray(batch, jnp.float32))
  assert gradients.shape == batch.shape and gradients.dtype == np.float32
  np.testing.assert_allclose(gradients, expected, rtol=1e-5, atol=1e-6)
  compiled = _target_logit_gradients._cache_size()
  call_model_function(classifier, target=0, batch_size=3)(
      batch[:2], expected_keys=[INPUT_OUTPUT_GRADIENTS])
  assert _target_logit_gradients._cache_size() == compiled  # Padded: no recompilation.
  with pytest.raises(ValueError, match="expected_keys"):
    fn(batch, expected_keys=["OUTPUT_LAYER_VALUES"])


def test_call_model_function_key_is_the_package_s():
  core = _needs("saliency.core", "xrai")
  assert INPUT_OUTPUT_GRADIENTS == core.INPUT_OUTPUT_GRADIENTS


def test_xrai_maps_are_finite_float32_and_deterministic():
  _needs("saliency.core", "xrai")
  classifier, (images, target) = _classifier(), _images_and_targets()
  first = baselines.xrai(classifier, images, target, None, TINY_XRAI)
  again = baselines.xrai(classifier, images, target, None, TINY_XRAI)
  assert first.shape == (2, SIZE, SIZE) and first.dtype == jnp.float32
  assert np.isfinite(np.asarray(first)).all() and np.ptp(np.asarray(first[0])) > 0
  np.testing.assert_array_equal(first, again)


def test_xrai_passes_its_settings_to_the_package():
  core = _needs("saliency.core", "xrai")
  classifier, (images, target) = _classifier(), _images_and_targets()
  config = baselines.XRAIConfig(steps=3, algorithm="fast", batch_size=2)
  direct = core.XRAI().GetMask(
      np.asarray(images[0]), call_model_function(classifier, target[0], 2), batch_size=2,
      extra_parameters=core.XRAIParameters(steps=3, algorithm="fast"))
  np.testing.assert_allclose(baselines.xrai(classifier, images[:1], target[:1], None, config)[0],
                             direct, rtol=1e-6)


@pytest.mark.parametrize("name, module, extra, config", [
    ("xrai", "saliency.core", "xrai", TINY_XRAI),
    ("lime", "lime.lime_image", "lime", baselines.LIMEConfig(
        num_samples=60, hide_color=0.0, segmentation=baselines.QuickshiftConfig(max_dist=20))),
])
def test_the_segment_methods_find_the_evidence_region(name, module, extra, config):
  """tests/test_baselines.py's red-square classifier, its images upsampled 4x to 64 px."""
  _needs(module, extra)
  images, masks = (np.repeat(np.repeat(array, 4, axis=1), 4, axis=2) for array in colour_images())
  saliency = baselines.METHODS[name](colour_classifier(), images, np.zeros(2, np.int32),
                                     jax.random.key(0), config)
  np.testing.assert_array_equal(metrics.pointing_game(saliency, masks, tolerance=4.0), 1.0)
  assert np.all(metrics.relevance_mass(saliency, masks) > 2 * masks.mean(axis=(1, 2)))


def _constant_on_segments(saliency: np.ndarray, labels: np.ndarray) -> bool:
  return all(np.ptp(saliency[labels == label]) == 0 for label in np.unique(labels))


def test_lime_is_constant_on_its_quickshift_segments_and_follows_the_key():
  _needs("lime.lime_image", "lime")
  classifier, (images, target) = _classifier(), _images_and_targets()
  key = jax.random.key(3)
  first = np.asarray(baselines.lime(classifier, images, target, key, TINY_LIME))
  split = np.asarray(baselines.lime(classifier, images, target, jax.random.split(key, 2),
                                    TINY_LIME))
  other = np.asarray(baselines.lime(classifier, images, target, jax.random.key(4), TINY_LIME))
  assert first.shape == (2, SIZE, SIZE) and first.dtype == np.float32
  np.testing.assert_array_equal(first, split)
  assert not np.array_equal(first, other)
  segment_keys = jax.vmap(jax.random.fold_in, (0, None))(jax.random.split(key, 2), 0)
  labels = segments(images, segment_keys, TINY_LIME.segmentation)
  for saliency, image_labels in zip(first, labels):
    assert image_labels.max() >= 2 and len(np.unique(saliency)) > 1
    assert _constant_on_segments(saliency, image_labels)


def test_lime_coalitions_segments_are_pfc_s_coalitions():
  _needs("lime.lime_image", "lime")
  classifier, (images, _) = colour_classifier(), colour_images()
  target = np.zeros(2, np.int32)
  key = jax.random.key(5)
  config = baselines.LIMEConfig(num_samples=40, batch_size=16, segmentation=TINY_COALITIONS)
  saliency = np.asarray(baselines.lime_coalitions(classifier, images, target, key, config))
  coalitions = np.asarray(explain(classifier, images, key, ExplainConfig.preset("tiny")).labels)
  for image_map, labels in zip(saliency, coalitions):
    assert len(np.unique(labels)) >= 2
    assert _constant_on_segments(image_map, labels)
    # One value per coalition: no two coalitions merged into one segment.
    assert len(np.unique(image_map)) == len(np.unique(labels))


def test_lime_coalitions_defaults_to_the_fast_preset_s_coalitions():
  assert COALITIONS_CONFIG.segmentation == ExplainConfig.preset("fast").coalitions
  with pytest.raises(ValueError, match="CoalitionConfig"):
    baselines.lime_coalitions(_classifier(), *_images_and_targets(), jax.random.key(0), TINY_LIME)


@pytest.mark.parametrize("name, modules, extra", [
    ("xrai", ("saliency", "saliency.core"), "xrai"),
    ("lime", ("lime", "lime.lime_image", "lime.wrappers.scikit_image"), "lime"),
    ("lime_coalitions", ("lime", "lime.lime_image", "lime.wrappers.scikit_image"), "lime"),
])
def test_a_missing_package_names_the_extra(monkeypatch, name, modules, extra):
  for module in modules:
    monkeypatch.setitem(sys.modules, module, None)  # `import module` then raises ImportError.
  config = {"xrai": TINY_XRAI, "lime": TINY_LIME}.get(name)
  with pytest.raises(ImportError, match=rf"pip install 'pfc-jax\[{extra}\]'"):
    baselines.METHODS[name](_classifier(), *_images_and_targets(), jax.random.key(0), config)


@pytest.mark.parametrize("make_config, match", [
    (lambda: baselines.XRAIConfig(steps=0), "steps"),
    (lambda: baselines.XRAIConfig(algorithm="slow"), "algorithm"),
    (lambda: baselines.XRAIConfig(area_threshold=0.0), "area_threshold"),
    (lambda: baselines.LIMEConfig(num_samples=0), "num_samples"),
    (lambda: baselines.LIMEConfig(kernel_width=0.0), "kernel_width"),
    (lambda: baselines.LIMEConfig(hide_color=-0.5), "hide_color"),
    (lambda: baselines.LIMEConfig(segmentation="slic"), "segmentation"),
    (lambda: baselines.QuickshiftConfig(ratio=2.0), "ratio"),
    (lambda: baselines.QuickshiftConfig(max_dist=0.0), "max_dist"),
])
def test_bad_configs_raise(make_config, match):
  with pytest.raises(ValueError, match=match):
    make_config()


@pytest.mark.parametrize("name, module, extra, make_config", [
    ("xrai", "saliency.core", "xrai", lambda n: baselines.XRAIConfig(steps=4, batch_size=n)),
    ("lime", "lime", "lime", lambda n: baselines.LIMEConfig(
        num_samples=40, batch_size=n, segmentation=TINY_LIME.segmentation)),
])
def test_batch_size_does_not_change_the_maps(name, module, extra, make_config):
  """`batch_size` is documented as memory or speed only. Equal to float32 rounding: another
  batch size of the jitted call may round the classifier's outputs differently."""
  _needs(module, extra)
  images, target = _images_and_targets()
  maps = [np.asarray(baselines.METHODS[name](_classifier(), images, target, jax.random.key(0),
                                             make_config(n))) for n in (1, 3, 64)]
  for other in maps[1:]:
    np.testing.assert_allclose(other, maps[0], rtol=1e-4, atol=1e-5 * np.abs(maps[0]).max())
