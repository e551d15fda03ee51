"""Classifier.from_nnx / from_linen / from_equinox: the model's own logits, gradients, one
compilation, evaluation mode, and explanations equal to those of a hand-written apply_fn."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from pfc_jax import Classifier, baselines, explain
from pfc_jax.explain import ExplainConfig

MEAN, STD = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
SIZE = 16


class NNXNet(nnx.Module):
  """Conv, BatchNorm, ReLU, global max pool, Dropout, dense: 3 classes."""

  def __init__(self, rngs: nnx.Rngs):
    self.conv = nnx.Conv(3, 4, (3, 3), rngs=rngs)
    self.norm = nnx.BatchNorm(4, rngs=rngs)
    self.drop = nnx.Dropout(0.5, rngs=rngs)
    self.fc = nnx.Linear(4, 3, rngs=rngs)

  def features(self, x):
    return nnx.relu(self.norm(self.conv(x)))

  def head(self, activations):
    return self.fc(self.drop(activations.max(axis=(1, 2))))

  def __call__(self, x):
    return self.head(self.features(x))


class LinenNet(nn.Module):
  """The same network in Linen, its mode chosen by a `train` argument."""

  def setup(self):
    self.conv = nn.Conv(4, (3, 3))
    self.norm = nn.BatchNorm()
    self.drop = nn.Dropout(0.5)
    self.fc = nn.Dense(3)

  def features(self, x, train: bool = True):
    return nn.relu(self.norm(self.conv(x), use_running_average=not train))

  def head(self, activations, train: bool = True):
    return self.fc(self.drop(activations.max(axis=(1, 2)), deterministic=not train))

  def __call__(self, x, train: bool = True):
    return self.head(self.features(x, train), train)


def _nnx_model(seed):
  model = NNXNet(nnx.Rngs(seed))
  model.norm.mean[...] = jnp.full((4,), 0.3)  # Running statistics unlike a batch's.
  model.norm.var[...] = jnp.full((4,), 2.0)
  return model


def _linen_variables(seed):
  variables = LinenNet().init(jax.random.key(seed), jnp.zeros((1, SIZE, SIZE, 3)), train=False)
  return {**variables, "batch_stats": jax.tree.map(lambda v: v + 0.5, variables["batch_stats"])}


@functools.cache
def _equinox_class():
  """The Equinox network's class, defined once (equinox is optional)."""
  import equinox as eqx  # pylint: disable=import-outside-toplevel

  class EquinoxNet(eqx.Module):
    """Per-image, channels-first: conv, ReLU, global max pool, Dropout, dense."""

    conv: eqx.nn.Conv2d
    drop: eqx.nn.Dropout
    fc: eqx.nn.Linear

    def __init__(self, key):
      conv_key, fc_key = jax.random.split(key)
      self.conv = eqx.nn.Conv2d(3, 4, 3, padding=1, key=conv_key)
      self.drop = eqx.nn.Dropout(0.5)  # Needs a key unless in inference mode.
      self.fc = eqx.nn.Linear(4, 3, key=fc_key)

    def features(self, x):  # [3, H, W] -> [4, H, W]
      return jax.nn.relu(self.conv(x))

    def head(self, activations):
      return self.fc(self.drop(activations.max(axis=(1, 2))))

    def __call__(self, x):
      return self.head(self.features(x))

  return EquinoxNet


def _equinox_model(seed):
  pytest.importorskip("equinox", reason="Classifier.from_equinox needs equinox")
  return _equinox_class()(jax.random.key(seed))


def _adapted(api: str, seed: int = 0) -> Classifier:
  """The adapter's Classifier of model `seed` of `api`, with its CAM layer."""
  split = dict(mean=MEAN, std=STD, features="features", head="head")
  if api == "nnx":
    return Classifier.from_nnx(_nnx_model(seed), **split)
  if api == "linen":
    return Classifier.from_linen(LinenNet(), _linen_variables(seed), call_kwargs={"train": False},
                                 **split)
  return Classifier.from_equinox(_equinox_model(seed), **split)


def _hand_written(api: str, seed: int = 0) -> Classifier:
  """The same model wrapped by hand, as a user would without the adapters."""
  if api == "nnx":
    model = _nnx_model(seed)
    model.eval()
    graphdef, state = nnx.split(model)
    return Classifier(lambda s, x: nnx.merge(graphdef, s)(x), state, mean=MEAN, std=STD,
                      features_fn=lambda s, x: nnx.merge(graphdef, s).features(x),
                      head_fn=lambda s, a: nnx.merge(graphdef, s).head(a))
  if api == "linen":
    module = LinenNet()
    return Classifier(
        lambda v, x: module.apply(v, x, train=False), _linen_variables(seed), mean=MEAN, std=STD,
        features_fn=lambda v, x: module.apply(v, x, False, method="features"),
        head_fn=lambda v, a: module.apply(v, a, False, method="head"))
  import equinox as eqx  # pylint: disable=import-outside-toplevel
  params, static = eqx.partition(eqx.nn.inference_mode(_equinox_model(seed)), eqx.is_array)

  def per_image(method):
    def fn(p, x):
      model = eqx.combine(p, static)
      out = jax.vmap(getattr(model, method))(jnp.moveaxis(x, -1, 1))
      return jnp.moveaxis(out, 1, -1) if method == "features" else out
    return fn

  return Classifier(
      lambda p, x: jax.vmap(eqx.combine(p, static))(jnp.moveaxis(x, -1, 1)), params, mean=MEAN,
      std=STD, features_fn=per_image("features"),
      head_fn=lambda p, a: jax.vmap(eqx.combine(p, static).head)(jnp.moveaxis(a, -1, 1)))


def _own_logits(api: str, x: jax.Array, seed: int = 0) -> jax.Array:
  """The model's own call in evaluation mode on normalised NHWC images `x`."""
  if api == "nnx":
    model = _nnx_model(seed)
    model.eval()
    return model(x)
  if api == "linen":
    return LinenNet().apply(_linen_variables(seed), x, train=False)
  import equinox as eqx  # pylint: disable=import-outside-toplevel
  return jax.vmap(eqx.nn.inference_mode(_equinox_model(seed)))(jnp.moveaxis(x, -1, 1))


def _images(count: int = 2, seed: int = 0) -> np.ndarray:
  return np.random.default_rng(seed).uniform(size=(count, SIZE, SIZE, 3)).astype(np.float32)


APIS = ("nnx", "linen", "equinox")


@pytest.mark.parametrize("api", APIS)
def test_logits_equal_the_models_own_call(api):
  classifier = _adapted(api)
  images = _images()
  logits = jax.jit(lambda c, x: c.logits(x))(classifier, images)
  assert logits.shape == (2, 3)
  np.testing.assert_allclose(logits, _own_logits(api, classifier.normalize(images)), rtol=1e-5,
                             atol=1e-6)
  features = classifier.features_fn(classifier.params, classifier.normalize(images))
  assert features.shape == (2, SIZE, SIZE, 4)
  np.testing.assert_allclose(classifier.head_fn(classifier.params, features), logits, rtol=1e-5,
                             atol=1e-6)


def test_nnx_adapter_runs_in_evaluation_mode_and_leaves_the_module_as_it_is():
  model = _nnx_model(0)
  classifier = Classifier.from_nnx(model, mean=MEAN, std=STD)
  x = classifier.normalize(_images())
  np.testing.assert_array_equal(classifier(x), classifier(x))  # Dropout off.
  assert not model.drop.deterministic and not model.norm.use_running_average
  for leaf, own in zip(jax.tree.leaves(classifier.params), jax.tree.leaves(nnx.state(model))):
    assert leaf is own  # The module's arrays, not copies.
  assert not np.allclose(classifier(x), model(x))  # Training mode: batch statistics, dropout.


@pytest.mark.parametrize("api", APIS)
def test_gradients_flow_to_parameters_and_pixels(api):
  classifier = _adapted(api)
  images = jnp.asarray(_images())

  def target_logit(params, images):
    return Classifier(classifier.apply_fn, params, MEAN, STD).logits(images)[:, 0].sum()

  param_grads, pixel_grads = jax.grad(target_logit, argnums=(0, 1), allow_int=True)(
      classifier.params, images)
  floating = [g for g in jax.tree.leaves(param_grads) if jnp.issubdtype(g.dtype, jnp.floating)]
  assert floating and all(np.isfinite(g).all() for g in floating)
  assert sum(float(jnp.abs(g).sum()) for g in floating) > 0
  assert float(jnp.abs(pixel_grads).sum()) > 0


@pytest.mark.parametrize("api", APIS)
def test_models_of_one_structure_share_one_compilation(api):
  traces = []

  @jax.jit
  def logits(classifier, images):
    traces.append(1)
    return classifier.logits(images)

  first, second = _adapted(api, seed=0), _adapted(api, seed=1)
  assert first.apply_fn is second.apply_fn and first.features_fn is second.features_fn
  images = _images()
  out_first, out_second = logits(first, images), logits(second, images)
  assert len(traces) == 1
  assert not np.allclose(out_first, out_second)


@pytest.mark.parametrize("api", APIS)
def test_explanations_equal_those_of_a_hand_written_apply_fn(api):
  images = _images(count=1, seed=3)
  key = jax.random.key(5)
  config = ExplainConfig.preset("tiny")
  adapted = jax.device_get(explain(_adapted(api), images, key, config))
  by_hand = jax.device_get(explain(_hand_written(api), images, key, config))
  np.testing.assert_array_equal(adapted.target, by_hand.target)
  np.testing.assert_allclose(adapted.saliency, by_hand.saliency, rtol=1e-5, atol=1e-5)
  target = np.asarray(adapted.target)
  np.testing.assert_allclose(baselines.gradcam(_adapted(api), images, target),
                             baselines.gradcam(_hand_written(api), images, target), rtol=1e-5,
                             atol=1e-6)


def test_equinox_adapter_takes_batched_channels_last_models_too():
  eqx = pytest.importorskip("equinox", reason="Classifier.from_equinox needs equinox")

  class MeanColour(eqx.Module):
    """Batched, channels-last: logits = mean colour @ weight."""

    weight: jax.Array

    def __call__(self, x):  # [B, H, W, 3] -> [B, 2]
      return x.mean(axis=(1, 2)) @ self.weight

  model = MeanColour(jnp.arange(6.0).reshape(3, 2))
  classifier = Classifier.from_equinox(model, batched=True, channels_first=False)
  x = jnp.asarray(_images())
  np.testing.assert_allclose(classifier(x), model(x), rtol=1e-6)


def test_bad_adapter_arguments_are_named():
  with pytest.raises(ValueError, match="`features` and `head` go together"):
    Classifier.from_nnx(_nnx_model(0), features="features")
  with pytest.raises(ValueError, match="`head` must be a method name of NNXNet"):
    Classifier.from_nnx(_nnx_model(0), features="features", head="no_such_method")
  with pytest.raises(ValueError, match="flax.nnx.Module"):
    Classifier.from_nnx(LinenNet())
  with pytest.raises(ValueError, match="flax.linen.Module"):
    Classifier.from_linen(_nnx_model(0), {})
  with pytest.raises(ValueError, match="`call_kwargs` values must be hashable"):
    Classifier.from_linen(LinenNet(), _linen_variables(0), call_kwargs={"train": [False]})
