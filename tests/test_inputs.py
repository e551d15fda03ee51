"""Input validation and the per-image key contract."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pfc_jax import baselines, extract_coalitions, metrics, viz
from pfc_jax._inputs import check_image, check_images, per_image_keys
from pfc_jax.coalitions import CoalitionConfig
from entry_points import classifier_entry_points
from test_baselines import colour_classifier, colour_images


@pytest.mark.parametrize("images, message", [
    (np.zeros((8, 8, 3), np.float32), "shape"),
    (np.zeros((1, 8, 8, 4), np.float32), "shape"),
    (np.zeros((1, 7, 8, 3), np.float32), "at least 8x8"),
    (np.zeros((1, 8, 8, 3), np.uint8), "dtype"),
    (np.full((1, 8, 8, 3), np.nan, np.float32), "NaN"),
    (np.full((1, 8, 8, 3), 1.5, np.float32), r"\[0, 1\]"),
])
def test_check_images_rejects(images, message):
  with pytest.raises(ValueError, match=f"`pics`.*{message}"):
    check_images(images, name="pics")


def test_check_images_accepts_and_skips_value_checks_under_jit():
  ok = np.random.default_rng(0).uniform(size=(2, 8, 9, 3)).astype(np.float64)
  assert check_images(ok).dtype == jnp.float32
  # Under jit values are unknown: only static checks apply.
  jax.jit(check_images)(jnp.full((1, 8, 8, 3), 2.0))


def test_check_image_is_the_same_check_for_one_image():
  with pytest.raises(ValueError, match=r"`image01` must have shape \[H, W, 3\]"):
    check_image(np.zeros((1, 8, 8, 3), np.float32))
  with pytest.raises(ValueError, match=r"`image01` must lie in \[0, 1\].*divide 0-255"):
    check_image(np.full((2, 2, 3), 255.0))
  assert check_image(np.zeros((2, 2, 3))).dtype == np.float32


def _image_functions():
  """Every public function that takes images, called on `images` `[2, 16, 16, 3]`."""
  classifier = colour_classifier()
  target, saliency, key = np.zeros(2, np.int32), np.ones((2, 16, 16), np.float32), jax.random.key(0)
  calls = {
      "viz.overlay": lambda x: viz.overlay(x[0], saliency[0]),
      "viz.panel": lambda x: viz.panel(x[0], np.zeros((16, 16), np.int32), saliency[0]),
      "extract_coalitions": lambda x: extract_coalitions(x, key, CoalitionConfig.tiny()),
      "model_randomization": lambda x: metrics.model_randomization(
          baselines.gradcam, classifier, x, target, key),
  }
  calls.update({name: (lambda x, fn=fn: fn(classifier, x))
                for name, fn in classifier_entry_points().items()})
  return calls


@pytest.mark.parametrize("name", sorted(_image_functions()))
@pytest.mark.parametrize("scale, dtype", [(255, np.float32), (255, np.uint8)])
def test_every_function_taking_images_refuses_0_255_images(name, scale, dtype):
  """The reported case: `viz.overlay(image * 255, saliency)` drew a white picture."""
  images = (colour_images()[0] * scale).astype(dtype)
  with pytest.raises(ValueError, match=r"`image(s|01)` must (lie in \[0, 1\]|be floating point)"):
    _image_functions()[name](images)


@pytest.mark.parametrize("make_key", [jax.random.PRNGKey, jax.random.key])
def test_one_key_equals_split_keys(make_key):
  key = make_key(3)
  np.testing.assert_array_equal(
      jax.random.key_data(per_image_keys(key, 4)),
      jax.random.key_data(per_image_keys(jax.random.split(key, 4), 4)))


def test_wrong_number_of_keys():
  with pytest.raises(ValueError, match="`key`.*3 keys"):
    per_image_keys(jax.random.split(jax.random.PRNGKey(0), 2), 3)
