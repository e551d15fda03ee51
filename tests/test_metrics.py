"""Metrics against independent numpy computations, and deletion/insertion on a known classifier."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.ndimage
import scipy.stats

from pfc_jax import Classifier, metrics
from pfc_jax.baselines import _common

SIZE = 12
NUM_CLASSES = 3


def _linear_apply(params, x):
  return x.reshape(x.shape[0], -1) @ params["dense"]["kernel"] + params["dense"]["bias"]


def _linear_classifier(seed=0):
  rng = np.random.default_rng(seed)
  params = {"dense": {"kernel": rng.normal(0, 0.3, (SIZE * SIZE * 3, NUM_CLASSES)).astype(np.float32),
                      "bias": rng.normal(0, 0.1, NUM_CLASSES).astype(np.float32)}}
  return Classifier(_linear_apply, params, mean=(0.4, 0.5, 0.6), std=(0.2, 0.3, 0.25))


def _np_probs(classifier, images01):
  x = (images01 - np.array(classifier.mean)) / np.array(classifier.std)
  logits = x.reshape(len(x), -1) @ classifier.params["dense"]["kernel"] + classifier.params["dense"]["bias"]
  e = np.exp(logits - logits.max(axis=1, keepdims=True))
  return e / e.sum(axis=1, keepdims=True)


def _np_minmax(saliency):
  low = saliency.min(axis=(1, 2), keepdims=True)
  return (saliency - low) / (saliency.max(axis=(1, 2), keepdims=True) - low)


def _inputs(seed=1, batch=3):
  rng = np.random.default_rng(seed)
  images = rng.uniform(0, 1, (batch, SIZE, SIZE, 3)).astype(np.float32)
  saliency = rng.normal(size=(batch, SIZE, SIZE)).astype(np.float32)
  target = rng.integers(0, NUM_CLASSES, batch).astype(np.int32)
  return images, saliency, target


def test_average_drop_and_increase_in_confidence_match_numpy():
  classifier = _linear_classifier()
  images, saliency, target = _inputs()
  rows = np.arange(len(target))
  clean = _np_probs(classifier, images)[rows, target]
  explained = _np_probs(classifier, images * _np_minmax(saliency)[..., None])[rows, target]
  np.testing.assert_allclose(
      metrics.average_drop(classifier, images, saliency, target),
      np.maximum(clean - explained, 0) / clean, rtol=1e-4, atol=1e-6)
  np.testing.assert_array_equal(
      metrics.increase_in_confidence(classifier, images, saliency, target), explained > clean)


def test_explanation_maps_resize_low_resolution_and_keep_constant_maps_whole():
  low = np.array([[[0.0, 1.0], [2.0, 3.0]], [[5.0, 5.0], [5.0, 5.0]]], np.float32)
  maps = np.asarray(metrics.explanation_maps(low, (4, 4)))
  assert maps.shape == (2, 4, 4)
  assert maps[0].min() == 0.0 and maps[0].max() == 1.0
  assert maps[0, 0, 0] < maps[0, 0, 3] < maps[0, 3, 3]
  np.testing.assert_array_equal(maps[1], 1.0)


def _np_curve(classifier, images, saliency, target, insertion, num_steps, sigma):
  batch = len(images)
  step = int(np.ceil(SIZE * SIZE / num_steps))
  if insertion:
    start = scipy.ndimage.gaussian_filter(images, (0, sigma, sigma, 0), mode="nearest", truncate=3.0)
    end = images
  else:
    start, end = images, np.zeros_like(images)
  curves = np.zeros((batch, num_steps + 1))
  for b in range(batch):
    order = np.argsort(-saliency[b].ravel(), kind="stable")
    for k in range(num_steps + 1):
      mixed = start[b].reshape(-1, 3).copy()
      moved = order[:min(k * step, SIZE * SIZE)]
      mixed[moved] = end[b].reshape(-1, 3)[moved]
      curves[b, k] = _np_probs(classifier, mixed.reshape(1, SIZE, SIZE, 3))[0, target[b]]
  fractions = np.minimum(np.arange(num_steps + 1) * step, SIZE * SIZE) / (SIZE * SIZE)
  return np.trapezoid(curves, fractions, axis=1)


@pytest.mark.parametrize("insertion", [False, True])
def test_deletion_and_insertion_auc_match_numpy(insertion):
  classifier = _linear_classifier()
  images, saliency, target = _inputs()
  auc_fn = metrics.insertion_auc if insertion else metrics.deletion_auc
  got = auc_fn(classifier, images, saliency, target, num_steps=10, steps_per_pass=4, blur_sigma=1.0)
  want = _np_curve(classifier, images, saliency, target, insertion, num_steps=10, sigma=1.0)
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)


REGION = (slice(2, 6), slice(7, 11))


def _region_apply(params, x):
  """Class 0's logit is a scaled mean of one square region; class 1's is a constant."""
  evidence = params["scale"] * (x[:, REGION[0], REGION[1]].mean(axis=(1, 2, 3)) - params["offset"])
  return jnp.stack([evidence, jnp.zeros_like(evidence)], axis=1)


def test_deletion_and_insertion_rank_true_map_above_inverse():
  classifier = Classifier(_region_apply, {"scale": jnp.float32(12.0), "offset": jnp.float32(0.6)},
                          mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
  rng = np.random.default_rng(3)
  images = rng.uniform(0.0, 0.2, (2, SIZE, SIZE, 3)).astype(np.float32)
  images[:, REGION[0], REGION[1]] += 0.75  # A bright square that blurring dims.
  true_map = np.zeros((2, SIZE, SIZE), np.float32)
  true_map[:, REGION[0], REGION[1]] = 1.0
  true_map += rng.uniform(0, 0.1, true_map.shape).astype(np.float32)
  target = np.zeros(2, np.int32)
  options = dict(num_steps=12, blur_sigma=2.0)
  deletion_true = metrics.deletion_auc(classifier, images, true_map, target, **options)
  deletion_inverse = metrics.deletion_auc(classifier, images, -true_map, target, **options)
  insertion_true = metrics.insertion_auc(classifier, images, true_map, target, **options)
  insertion_inverse = metrics.insertion_auc(classifier, images, -true_map, target, **options)
  assert np.all(deletion_true < deletion_inverse - 0.2)
  assert np.all(insertion_true > insertion_inverse + 0.1)


def test_deletion_does_not_recompile_on_repeated_calls():
  classifier = _linear_classifier()
  images, saliency, target = _inputs()
  metrics.deletion_auc(classifier, images, saliency, target, num_steps=8)
  jitted = _common._jit_chunk(metrics._curve_chunk)
  size = jitted._cache_size()
  metrics.deletion_auc(_linear_classifier(seed=5), images, -saliency, target, num_steps=8)
  assert jitted._cache_size() == size


def _np_pointing(saliency, masks, tolerance):
  hits = []
  for s, m in zip(saliency, masks):
    py, px = np.unravel_index(np.argmax(s), s.shape)
    ys, xs = np.nonzero(m)
    hits.append(bool(len(ys)) and np.sqrt((ys - py) ** 2 + (xs - px) ** 2).min() <= tolerance)
  return np.array(hits, np.float32)


def test_pointing_game_and_relevance_mass_match_numpy():
  rng = np.random.default_rng(4)
  saliency = rng.uniform(size=(6, 20, 20)).astype(np.float32)
  masks = np.zeros((6, 20, 20), bool)
  for i, (y, x) in enumerate(rng.integers(0, 16, (6, 2))):
    masks[i, y:y + 4, x:x + 4] = True
  for tolerance in (0.0, 3.0, 8.0):
    np.testing.assert_array_equal(
        metrics.pointing_game(saliency, masks, tolerance), _np_pointing(saliency, masks, tolerance))
  maps = _np_minmax(saliency)
  np.testing.assert_allclose(metrics.relevance_mass(saliency, masks),
                             (maps * masks).sum(axis=(1, 2)) / maps.sum(axis=(1, 2)), rtol=1e-5)


def test_pointing_game_accepts_boxes():
  saliency = np.zeros((2, 40, 40), np.float32)
  saliency[:, 5, 5] = 1.0
  boxes = np.array([[18, 0, 30, 10], [25, 25, 35, 35]], np.int32)  # 13 px and 28 px away.
  np.testing.assert_array_equal(metrics.pointing_game(saliency, boxes), [1.0, 0.0])
  np.testing.assert_array_equal(metrics.pointing_game(saliency, boxes, tolerance=10), [0.0, 0.0])


def test_spearman_matches_scipy():
  rng = np.random.default_rng(5)
  first = rng.normal(size=(3, 5, 5)).astype(np.float32)
  second = (first + rng.normal(size=first.shape)).round(0).astype(np.float32)  # with ties
  want = [scipy.stats.spearmanr(a.ravel(), b.ravel()).statistic for a, b in zip(first, second)]
  np.testing.assert_allclose(metrics.spearman(first, second), want, rtol=1e-5)


def test_randomize_layers_changes_only_chosen_layers():
  params = {"a": {"kernel": jnp.ones((3, 3)), "bias": jnp.zeros(3)},
            "b": {"kernel": jnp.arange(6.0).reshape(2, 3), "bias": jnp.arange(3.0)}}
  key = jax.random.key(0)
  last = metrics.randomize_layers(params, key, 1)
  np.testing.assert_array_equal(last["a"]["kernel"], params["a"]["kernel"])
  assert not np.allclose(last["b"]["kernel"], params["b"]["kernel"])
  named = metrics.randomize_layers(params, key, ["a"])
  np.testing.assert_array_equal(named["b"]["kernel"], params["b"]["kernel"])
  np.testing.assert_array_equal(named["a"]["bias"], 0.0)  # std 0: stays at zero
  with pytest.raises(ValueError, match="layers"):
    metrics.randomize_layers(params, key, ["missing"])
  with pytest.raises(ValueError, match="layers"):
    metrics.randomize_layers(params, key, 3)


def test_model_randomization_separates_model_dependent_from_fixed_maps():
  classifier = _linear_classifier()
  images, _, target = _inputs()

  @jax.jit
  def gradient_map(clf, imgs, tgt, key):
    del key
    grads = jax.grad(lambda x: _common.target_logits(clf, x, tgt).sum())(imgs)
    return jnp.abs(grads).sum(-1)

  @jax.jit
  def image_map(clf, imgs, tgt, key):
    del clf, tgt, key
    return imgs.mean(-1)

  key = jax.random.key(1)
  np.testing.assert_allclose(metrics.model_randomization(image_map, classifier, images, target, key), 1.0,
                             rtol=1e-6)
  assert np.all(np.abs(metrics.model_randomization(gradient_map, classifier, images, target, key)) < 0.5)


@pytest.mark.parametrize("bad, match", [
    (dict(saliency=np.zeros((2, SIZE, SIZE))), "saliency"),
    (dict(saliency=np.full((3, SIZE, SIZE), np.nan)), "saliency"),
    (dict(target=np.zeros(3, np.float32)), "target"),
    (dict(images=np.full((3, SIZE, SIZE, 3), 2.0, np.float32)), "images"),
])
def test_bad_inputs_raise(bad, match):
  images, saliency, target = _inputs()
  args = dict(images=images, saliency=saliency, target=target) | bad
  with pytest.raises(ValueError, match=match):
    metrics.average_drop(_linear_classifier(), **args)


def test_masks_must_be_boolean():
  with pytest.raises(ValueError, match="masks"):
    metrics.relevance_mass(np.ones((1, 4, 4)), np.ones((1, 4, 4), np.float32))

