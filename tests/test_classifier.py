"""The Classifier pytree: normalisation conventions, jit/vmap, and one compilation per model."""

import jax
import jax.numpy as jnp
import numpy as np

from pfc_jax import Classifier


def _linear(params, x):
  return x.mean(axis=(1, 2)) @ params


def test_rgb_and_bgr_normalisation():
  img = jnp.asarray(np.random.default_rng(0).uniform(size=(1, 4, 4, 3)), jnp.float32)
  rgb = Classifier(_linear, jnp.eye(3), mean=(0.1, 0.2, 0.3), std=(0.5, 0.5, 0.5))
  np.testing.assert_allclose(rgb.normalize(img), (img - jnp.array([0.1, 0.2, 0.3])) / 0.5, rtol=1e-6)
  caffe = Classifier(_linear, jnp.eye(3), mean=(103.939 / 255, 116.779 / 255, 123.68 / 255),
                     std=(1 / 255,) * 3, bgr=True)
  expected = img[..., ::-1] * 255 - jnp.array([103.939, 116.779, 123.68])
  np.testing.assert_allclose(caffe.normalize(img), expected, rtol=1e-5, atol=1e-3)


def test_passes_through_jit_without_recompiling():
  traces = []

  @jax.jit
  def predict(classifier, images):
    traces.append(1)
    return classifier.logits(images)

  images = jnp.ones((2, 4, 4, 3))
  a = Classifier(_linear, jnp.eye(3))
  b = Classifier(_linear, 2 * jnp.eye(3))
  np.testing.assert_allclose(predict(b, images), 2 * predict(a, images), rtol=1e-6)
  assert len(traces) == 1
  per_image = jax.vmap(lambda x: a.logits(x[None])[0])(images)
  np.testing.assert_allclose(per_image, a.logits(images), rtol=1e-6)
