"""The Classifier pytree: normalisation conventions, jit/vmap, one compilation per model, and the
contract `apply_fn(params, x) -> logits [B, C]` checked at every entry point."""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pfc_jax import Classifier
from pfc_jax.classifier import check_classifier
from entry_points import classifier_entry_points
from test_baselines import colour_apply, colour_classifier, colour_features, colour_images


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


def _wrapped(kind: str) -> Classifier:
  """The colour classifier (`test_baselines`) with `apply_fn` returning logits wrapped as
  `kind`: a fresh function each call, so that every call gets its own contract check."""
  wrap = {"softmax": lambda logits: jax.nn.softmax(logits, axis=-1),
          "tuple": lambda logits: (logits, {"batch_stats": jnp.zeros(3)}),  # Flax `mutable=`.
          "dict": lambda logits: {"logits": logits},
          "rank3": lambda logits: logits[..., None],
          "logits": lambda logits: logits}[kind]
  base = colour_classifier()
  return Classifier(lambda params, x: wrap(colour_apply(params, x)), base.params,
                    base.mean, base.std, features_fn=colour_features, head_fn=base.head_fn)


def _entry_points():
  """`{name: fn(classifier)}` for every public entry point that runs a classifier."""
  images = colour_images()[0]
  return {name: (lambda c, fn=fn: fn(c, images))
          for name, fn in classifier_entry_points().items()}


@pytest.mark.parametrize("name", sorted(_entry_points()))
@pytest.mark.parametrize("kind, returned", [
    ("tuple", r"a tuple of 2 \(float32\[2, 2\], dict\)\. A Flax `apply` with `mutable=`"),
    ("dict", r"a dict with keys \['logits'\]"),
    ("rank3", r"\[B, C\] = \[2, C\] for 2 images .* shape \[2, 2, 1\]"),
])
def test_apply_fn_returning_other_than_logits_is_a_value_error(name, kind, returned):
  with pytest.raises(ValueError, match=f"`apply_fn` must return .*{returned}"):
    _entry_points()[name](_wrapped(kind))


@pytest.mark.parametrize("name", sorted(_entry_points()))
def test_apply_fn_returning_probabilities_warns(name):
  """The reported case: a final softmax made probs and every metric silently wrong. The warning,
  raised as an error here, comes at the boundary, before any of the method's work."""
  with warnings.catch_warnings():
    warnings.simplefilter("error", UserWarning)
    with pytest.raises(UserWarning, match="`apply_fn` returned rows .* look like probabilities"):
      _entry_points()[name](_wrapped("softmax"))


def test_logits_pass_and_are_checked_once_per_classifier():
  classifier, images = _wrapped("logits"), jnp.full((2, 16, 16, 3), 0.5)
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    assert check_classifier(classifier, images) == 2
  probabilities = _wrapped("softmax")
  with pytest.warns(UserWarning):
    check_classifier(probabilities, images)
  with warnings.catch_warnings():
    warnings.simplefilter("error")  # Checked once: no second warning, no second forward pass.
    check_classifier(probabilities, images)
    # Under jit only the shapes are checked.
    jax.jit(lambda x: check_classifier(_wrapped("softmax"), x))(images)
  with pytest.raises(ValueError, match="`apply_fn` must return logits"):
    jax.jit(lambda x: check_classifier(_wrapped("dict"), x))(images)
  with pytest.raises(ValueError, match="`classifier` must be a pfc_jax.Classifier"):
    check_classifier(colour_apply, images)
