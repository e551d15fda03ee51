"""Input validation and the per-image key contract."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pfc_jax._inputs import check_images, per_image_keys


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


@pytest.mark.parametrize("make_key", [jax.random.PRNGKey, jax.random.key])
def test_one_key_equals_split_keys(make_key):
  key = make_key(3)
  np.testing.assert_array_equal(
      jax.random.key_data(per_image_keys(key, 4)),
      jax.random.key_data(per_image_keys(jax.random.split(key, 4), 4)))


def test_wrong_number_of_keys():
  with pytest.raises(ValueError, match="`key`.*3 keys"):
    per_image_keys(jax.random.split(jax.random.PRNGKey(0), 2), 3)
