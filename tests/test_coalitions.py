"""Tests of the feature coalitions (pfc_jax.coalitions, pfc_jax.models.coalition_net)."""

import contextlib
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pfc_jax import coalitions
from pfc_jax.coalitions import CoalitionConfig, extract_coalitions
from pfc_jax.models import coalition_net

# Frozen backbone at half resolution (for 16 px images): cheap to compile and to run. The trained
# backbone at full resolution has its own test.
FROZEN = CoalitionConfig.tiny(train_backbone=False, resolution=8, max_steps=12,
                              learning_rate=0.5, batching="sequential", driver="python")


def _quadrants(size: int = 16, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
  """Four textured regions: image `[size, size, 3]` float32 in [0, 1] and region ids `[size, size]`."""
  rng = np.random.default_rng(seed)
  rows, cols = np.mgrid[:size, :size]
  regions = (rows >= size // 2) * 2 + (cols >= size // 2)
  colors = np.array([[0.9, 0.1, 0.1], [0.1, 0.8, 0.2], [0.1, 0.2, 0.9], [0.9, 0.9, 0.2]])
  stripes = 0.1 * np.sin(np.where(regions % 2, rows, cols) * 2.0)[..., None]
  image = colors[regions] + stripes + 0.03 * rng.standard_normal((size, size, 3))
  return np.clip(image, 0, 1).astype(np.float32), regions


def _batch(size: int = 16) -> np.ndarray:
  return np.stack([_quadrants(size, seed)[0] for seed in range(2)])


def _vgg_params(seed: int = 0) -> dict:
  rng = np.random.default_rng(seed)
  layers, in_channels = {}, 3
  for name, out_channels in coalition_net.CONV_LAYERS:
    scale = 1.0 / np.sqrt(9 * in_channels)
    layers[name] = {
        "kernel": rng.uniform(-scale, scale, (3, 3, in_channels, out_channels)).astype(np.float32),
        "bias": rng.uniform(-scale, scale, (out_channels,)).astype(np.float32)}
    in_channels = out_channels
  return {"params": layers}


@contextlib.contextmanager
def _count_traces():
  traces = []
  listener = lambda name, *_, **__: traces.append(name) if name.endswith("trace_duration") else None
  jax.monitoring.register_event_duration_secs_listener(listener)
  try:
    yield traces
  finally:
    jax.monitoring.unregister_event_duration_listener(listener)


def test_relabel_numbers_labels_in_use_by_value():
  labels = jnp.array([[5, 2], [5, 7]], jnp.int32)
  relabelled, num = jax.jit(coalitions.relabel, static_argnums=1)(labels, 8)
  np.testing.assert_array_equal(relabelled, [[1, 0], [1, 2]])
  assert int(num) == 3


def test_init_params_match_pytorch_defaults():
  params = jax.jit(coalition_net.init_params, static_argnums=(1, 2))(jax.random.key(0), 6, 0.5)
  kernel = np.asarray(params["conv2_1"]["kernel"])  # 3x3, 32 -> 64 at width 0.5.
  assert kernel.shape == (3, 3, 32, 64)
  bound = 1.0 / np.sqrt(9 * 32)
  assert np.abs(kernel).max() <= bound and np.abs(kernel).max() > 0.95 * bound
  assert abs(kernel.std() - bound / np.sqrt(3)) < 0.05 * bound  # Uniform's std.
  np.testing.assert_array_equal(params["bn6"]["scale"], np.ones(6))
  np.testing.assert_array_equal(params["bn6"]["bias"], np.zeros(6))


def test_labels_are_contiguous_and_respect_k_and_l():
  result = extract_coalitions(_batch(), jax.random.key(2), FROZEN)
  assert result.labels.shape == (2, 16, 16) and result.labels.dtype == jnp.int32
  for labels, num in zip(np.asarray(result.labels), np.asarray(result.num)):
    assert 1 <= num <= FROZEN.min_coalitions < FROZEN.num_channels
    np.testing.assert_array_equal(np.unique(labels), np.arange(num))
  # Each image stopped on its own once at most k labels remained, before max_steps.
  steps = np.asarray(result.steps)
  assert np.all(steps < FROZEN.max_steps) and steps[0] != steps[1]


def test_early_stop_is_per_image():
  images = jnp.asarray(_batch())
  states = jax.vmap(lambda image, key: coalitions._prepare(FROZEN, image, key, None))(
      images, jax.random.split(jax.random.key(0), 2))
  states = states._replace(done=jnp.array([True, False]))
  stepped, _ = jax.jit(jax.vmap(lambda state: coalitions._image_step(FROZEN, state)))(states)
  np.testing.assert_array_equal(stepped.steps, [0, 1])
  kernels = stepped.params["conv6"]["kernel"], states.params["conv6"]["kernel"]
  np.testing.assert_array_equal(kernels[0][0], kernels[1][0])  # The done image stays put,
  assert not np.allclose(kernels[0][1], kernels[1][1])  # the other one trains.


def test_textured_regions_give_coalitions_that_follow_them():
  config = CoalitionConfig.tiny(num_channels=6, max_steps=40, width=0.25, learning_rate=0.05,
                                batching="sequential", driver="python")
  image, regions = _quadrants(16)
  labels = np.asarray(extract_coalitions(image[None], jax.random.key(3), config).labels[0])
  # Purity: each coalition lies (almost) inside one region.
  majority = sum(np.bincount(regions[labels == label]).max() for label in np.unique(labels))
  assert majority / labels.size > 0.8  # Random labels: about 0.3.


def test_key_contract_and_batch_independence():
  images = _batch()
  key = jax.random.key(7)
  one_key = extract_coalitions(images, key, FROZEN)
  keys = jax.random.split(key, 2)
  many_keys = extract_coalitions(images, keys, FROZEN)
  alone = extract_coalitions(images[1:], keys[1:], FROZEN)
  np.testing.assert_array_equal(one_key.labels, many_keys.labels)
  np.testing.assert_array_equal(alone.labels[0], one_key.labels[1])
  np.testing.assert_array_equal(alone.steps[0], one_key.steps[1])
  other = extract_coalitions(images, jax.random.key(8), FROZEN)
  assert not np.array_equal(other.labels, one_key.labels)


@pytest.mark.parametrize("batching, driver", [("vmap", "python"), ("sequential", "compiled")])
def test_batching_and_driver_give_the_same_labels(batching, driver):
  images = _batch()
  reference = extract_coalitions(images, jax.random.key(1), FROZEN)
  config = dataclasses.replace(FROZEN, batching=batching, driver=driver)
  result = extract_coalitions(images, jax.random.key(1), config)
  assert np.mean(np.asarray(result.labels) == np.asarray(reference.labels)) > 0.98
  np.testing.assert_array_equal(result.steps, reference.steps)


def test_image_training_functions_reproduce_extract_coalitions():
  images = _batch()
  keys = jax.random.split(jax.random.key(3), 2)
  expected = extract_coalitions(images, keys, FROZEN)
  training = coalitions.image_training(FROZEN)
  state = training.init(images[1], keys[1])
  while not training.done(state) and int(state.steps) < FROZEN.max_steps:
    state = training.step(state)
  labels, num = training.finish(state, images.shape[1:3])
  np.testing.assert_array_equal(labels, expected.labels[1])
  assert int(num) == int(expected.num[1]) and int(state.steps) == int(expected.steps[1])
  with pytest.raises(ValueError, match="vgg_params"):
    coalitions.image_training(dataclasses.replace(FROZEN, init="vgg16", width=1.0))


def test_reduced_resolution_upsamples_labels_to_input_size():
  labels = np.asarray(extract_coalitions(_batch(16), jax.random.key(0), FROZEN).labels)
  assert labels.shape == (2, 16, 16)
  # FROZEN runs at 8 px: nearest-neighbour upsampling by 2 gives one label per 2x2 block.
  np.testing.assert_array_equal(labels, np.repeat(np.repeat(labels[:, ::2, ::2], 2, 1), 2, 2))


def test_repeated_calls_do_not_retrace():
  images = _batch()
  extract_coalitions(images, jax.random.key(0), FROZEN)
  with _count_traces() as traces:
    extract_coalitions(images, jax.random.key(1), FROZEN)
  assert not traces


def test_vgg16_init_copies_the_convolutions():
  config = CoalitionConfig.tiny(init="vgg16", width=1.0, train_backbone=False)
  image = jnp.asarray(_quadrants(8)[0])
  features = lambda key, vgg: jax.jit(coalitions._prepare, static_argnums=0)(
      config, image, key, coalitions._vgg_convs(vgg)).inputs
  vgg = _vgg_params(0)
  # Frozen backbone features depend on VGG16's kernels only, not on the per-image key.
  np.testing.assert_allclose(features(jax.random.key(0), vgg), features(jax.random.key(1), vgg),
                             rtol=1e-5, atol=1e-5)
  assert not np.allclose(features(jax.random.key(0), vgg), features(jax.random.key(0),
                                                                      _vgg_params(1)))
  result = extract_coalitions(image[None], jax.random.key(0), config, vgg_params=vgg)
  assert result.labels.shape == (1, 8, 8)


@pytest.mark.parametrize("images, message", [
    (np.zeros((16, 16, 3), np.float32), "images"),
    (np.zeros((1, 6, 16, 3), np.float32), "images"),
    (np.full((1, 16, 16, 3), 1.5, np.float32), "images"),
    (np.full((1, 16, 16, 3), np.nan, np.float32), "images"),
    (np.zeros((1, 16, 16, 3), np.uint8), "images"),
])
def test_bad_images_raise(images, message):
  with pytest.raises(ValueError, match=message):
    extract_coalitions(images, jax.random.key(0), FROZEN)


def test_bad_key_and_vgg_params_raise():
  images = _batch()
  with pytest.raises(ValueError, match="key"):
    extract_coalitions(images, jax.random.split(jax.random.key(0), 3), FROZEN)
  vgg_config = CoalitionConfig.tiny(init="vgg16", width=1.0)
  with pytest.raises(ValueError, match="vgg_params"):
    extract_coalitions(images, jax.random.key(0), vgg_config)
  bad = _vgg_params()
  bad["params"]["conv3_1"]["kernel"] = np.zeros((3, 3, 128, 128), np.float32)
  with pytest.raises(ValueError, match="vgg_params.*conv3_1"):
    extract_coalitions(images, jax.random.key(0), vgg_config, vgg_params=bad)


@pytest.mark.parametrize("overrides, field", [
    ({"min_coalitions": 0}, "min_coalitions"),
    ({"init": "imagenet"}, "init"),
    ({"init": "vgg16", "width": 0.5}, "width"),
    ({"resolution": 4}, "resolution"),
    ({"batching": "pmap"}, "batching"),
    ({"batching": "map", "driver": "python"}, "driver"),
    ({"precision": "float16"}, "precision"),
    ({"driver": "scan"}, "driver"),
])
def test_bad_config_raises(overrides, field):
  with pytest.raises(ValueError, match=field):
    CoalitionConfig(**overrides)


def test_config_refuses_a_compute_batch_that_no_layout_reads():
  with pytest.raises(ValueError, match="`compute_batch` = 2 has no effect under batching 'map'"):
    CoalitionConfig(batching="map", compute_batch=2)
  assert CoalitionConfig(batching="dense", compute_batch=2).compute_batch == 2
