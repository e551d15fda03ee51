"""Mixed precision: bfloat16 compute, float32 parameters, optimiser state, losses and results."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pfc_jax import Classifier, _precision
from pfc_jax.coalitions import CoalitionConfig, extract_coalitions, image_training
from pfc_jax.perturbation import PerturbConfig, perturb

COALITIONS = CoalitionConfig.tiny(max_steps=3)


def _float_dtypes(tree) -> set[str]:
  return {str(x.dtype) for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.floating)}


def test_cast_floating_leaves_ints_and_keys_alone():
  tree = {"w": jnp.ones(2), "n": jnp.arange(2), "key": jax.random.key(0)}
  cast = _precision.cast_floating(tree, jnp.bfloat16)
  assert cast["w"].dtype == jnp.bfloat16 and cast["n"].dtype == tree["n"].dtype
  assert cast["key"].dtype == tree["key"].dtype


def test_coalition_network_computes_in_bfloat16_and_trains_float32():
  config = dataclasses.replace(COALITIONS, precision="bfloat16")
  image = np.random.default_rng(0).random((16, 16, 3), np.float32)
  training = image_training(config)
  state = training.init(image, jax.random.key(0))
  jaxpr = str(jax.make_jaxpr(training.step)(state))
  convolutions = [line for line in jaxpr.splitlines() if "conv_general_dilated" in line]
  assert convolutions and all("bf16" in line for line in convolutions)
  stepped = training.step(state)
  assert _float_dtypes((stepped.params, stepped.opt_state)) == {"float32"}
  full = image_training(COALITIONS)
  reference = full.step(full.init(image, jax.random.key(0)))
  assert "bf16" not in str(jax.make_jaxpr(full.step)(reference))
  # One SGD step from the same start moves the parameters alike.
  for low, high in zip(jax.tree.leaves(stepped.params), jax.tree.leaves(reference.params)):
    np.testing.assert_allclose(low, high, rtol=0.05, atol=2e-3)


def _recording_classifier(dtypes):
  def apply(params, x):
    dtypes.append(str(x.dtype))
    return x.reshape(x.shape[0], -1) @ params.astype(x.dtype)
  return Classifier(apply, jnp.asarray(
      np.random.default_rng(1).normal(size=(16 * 16 * 3, 4)) * 0.05, jnp.float32))


def test_perturbation_runs_the_classifier_in_bfloat16_only_under_the_noise():
  images = np.random.default_rng(2).random((2, 16, 16, 3), np.float32)
  labels = np.zeros((2, 16, 16), np.int32)
  config = PerturbConfig(steps=10, noise_samples=4, learning_rate=0.05, max_coalitions=4)
  dtypes = []
  low = perturb(_recording_classifier(dtypes), images, labels, jax.random.key(0),
                dataclasses.replace(config, precision="bfloat16"))
  # The clean prediction in float32, the noisy images in bfloat16.
  assert "float32" in dtypes and "bfloat16" in dtypes
  assert _float_dtypes(low) == {"float32"}
  high = perturb(_recording_classifier([]), images, labels, jax.random.key(0), config)
  np.testing.assert_array_equal(low.target, high.target)
  np.testing.assert_array_equal(low.probs, high.probs)
  np.testing.assert_allclose(low.w, high.w, atol=0.05)
  assert not np.array_equal(low.w, high.w)


@pytest.mark.parametrize("config_class", [CoalitionConfig, PerturbConfig])
def test_unknown_precision_raises(config_class):
  with pytest.raises(ValueError, match="precision"):
    config_class(precision="float16")


def test_extract_coalitions_in_bfloat16_gives_valid_labels():
  images = np.random.default_rng(3).random((1, 16, 16, 3), np.float32)
  result = extract_coalitions(images, jax.random.key(0),
                              dataclasses.replace(COALITIONS, precision="bfloat16"))
  labels = np.asarray(result.labels[0])
  np.testing.assert_array_equal(np.unique(labels), np.arange(int(result.num[0])))


@pytest.mark.parametrize("backend, expected", [
    ("cpu", "float32"), ("gpu", "bfloat16"), ("tpu", "bfloat16")])
def test_auto_precision_is_bfloat16_on_accelerators(monkeypatch, backend, expected):
  assert CoalitionConfig().precision == PerturbConfig().precision == "auto"
  monkeypatch.setattr(jax, "default_backend", lambda: backend)
  assert _precision.resolve_precision("auto") == expected
  assert _precision.resolve_precision("float32") == "float32"
  assert _precision.resolve_precision("bfloat16") == "bfloat16"
  dtypes = []
  classifier = _precision.classifier_in(_recording_classifier(dtypes), "auto")
  logits = classifier.apply_fn(classifier.params, jnp.ones((1, 16, 16, 3)))
  assert dtypes == [expected] and logits.dtype == jnp.float32
