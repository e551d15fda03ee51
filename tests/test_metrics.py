"""Metrics against independent numpy computations, and deletion/insertion on a known classifier."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.ndimage
import scipy.stats

import reference_numpy as ref
from pfc_jax import Classifier, metrics, models, weights
from pfc_jax.baselines import _common
from pfc_jax.benchmarks import shapes

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
  return (saliency - low) / (saliency.max(axis=(1, 2), keepdims=True) - low + 1e-30)


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


def test_explanation_maps_resize_low_resolution_and_map_constant_maps_to_zero():
  low = np.array([[[0.0, 1.0], [2.0, 3.0]], [[5.0, 5.0], [5.0, 5.0]]], np.float32)
  maps = np.asarray(metrics.explanation_maps(low, (4, 4)))
  assert maps.shape == (2, 4, 4)
  assert maps[0].min() == 0.0 and maps[0].max() == 1.0
  assert maps[0, 0, 0] < maps[0, 0, 3] < maps[0, 3, 3]
  np.testing.assert_array_equal(maps[1], 0.0)
  np.testing.assert_array_equal(metrics.explanation_maps(low, (4, 4), "none")[1], 5.0)
  # Scale-free: a map and the same map times 1e-20 give the same E.
  np.testing.assert_allclose(metrics.explanation_maps(low * 1e-20, (4, 4)), maps, rtol=1e-6)


def test_constant_map_keeps_nothing_on_the_shapes_benchmark():
  """Issue input: shapes_cnn, 8 images of shapes seed 1, an all-zero map scored AD 0 (best)."""
  classifier = models.classifier("shapes_cnn", weights.load("shapes_cnn"))
  images = shapes.generate(8, 64, seed=1).images
  target = np.asarray(jnp.argmax(classifier.logits(images), axis=-1), np.int32)
  drop = np.asarray(metrics.average_drop(classifier, images, np.zeros((8, 64, 64), np.float32), target))
  probs = lambda x: np.asarray(jax.nn.softmax(classifier.logits(x)))[np.arange(8), target]
  clean, black = probs(images), probs(np.zeros_like(images))
  np.testing.assert_allclose(drop, np.maximum(clean - black, 0) / clean, rtol=1e-5, atol=1e-6)
  assert drop.mean() > 0.3
  one_pixel = np.zeros((8, 64, 64), np.float32)
  one_pixel[:, 0, 0] = 1e-6
  # A constant map scores like a map that keeps a single pixel, not like the best map.
  np.testing.assert_allclose(drop, metrics.average_drop(classifier, images, one_pixel, target),
                             atol=0.01)


def _np_blur(images, sigma):
  return scipy.ndimage.gaussian_filter(images, (0, sigma, sigma, 0), mode="nearest", truncate=3.0)


@pytest.mark.parametrize("normalization", ["minmax", "none"])
@pytest.mark.parametrize("masked_value", ["black", "mean", "blur"])
def test_average_drop_options_match_numpy(normalization, masked_value):
  classifier = _linear_classifier()
  images, saliency, target = _inputs(batch=4)
  saliency = _np_minmax(saliency) if normalization == "none" else saliency
  maps = (_np_minmax(saliency) if normalization == "minmax" else saliency)[..., None]
  fill = {"black": np.zeros_like(images), "mean": np.broadcast_to(classifier.mean, images.shape),
          "blur": _np_blur(images, metrics.INSERTION_BLUR_SIGMA)}[masked_value]
  rows = np.arange(len(target))
  clean = _np_probs(classifier, images)[rows, target]
  explained = _np_probs(classifier, maps * images + (1 - maps) * fill)[rows, target]
  options = dict(normalization=normalization, masked_value=masked_value)
  np.testing.assert_allclose(metrics.average_drop(classifier, images, saliency, target, **options),
                             np.maximum(clean - explained, 0) / clean, rtol=1e-4, atol=1e-6)
  np.testing.assert_array_equal(
      metrics.increase_in_confidence(classifier, images, saliency, target, **options),
      explained > clean)


def test_average_drop_mean_colour_follows_the_channel_order():
  images, saliency, target = _inputs()
  rgb = _linear_classifier()
  bgr = Classifier(rgb.apply_fn, rgb.params, mean=(0.1, 0.5, 0.9), std=rgb.std, bgr=True)
  kept_nothing = metrics.confidences(bgr, images, np.zeros_like(saliency), target,
                                     masked_value="mean")[1]
  fill = lambda colour: np.broadcast_to(np.float32(colour), images.shape)
  np.testing.assert_allclose(
      kept_nothing, _common.target_probabilities(bgr, fill((0.9, 0.5, 0.1)), target), rtol=1e-5)
  assert not np.allclose(kept_nothing, _common.target_probabilities(bgr, fill(bgr.mean), target))


@pytest.mark.parametrize("options, match", [
    (dict(normalization="none"), "normalization='none'"),
    (dict(normalization="zscore"), "normalization"),
    (dict(masked_value="grey"), "masked_value"),
])
def test_average_drop_options_are_checked(options, match):
  images, saliency, target = _inputs()
  with pytest.raises(ValueError, match=match):
    metrics.average_drop(_linear_classifier(), images, saliency * 3, target, **options)


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


def _two_layer_apply(params, x):
  hidden = jax.nn.relu(x.reshape(x.shape[0], -1) @ params["a"]["kernel"] + params["a"]["bias"])
  return hidden @ params["b"]["kernel"] + params["b"]["bias"]


def test_randomize_layers_changes_only_chosen_layers():
  params = {"a": {"kernel": jnp.ones((3, 3)), "bias": jnp.zeros(3)},
            "b": {"kernel": jnp.arange(6.0).reshape(3, 2), "bias": jnp.arange(2.0)}}
  key = jax.random.key(0)
  example = jax.ShapeDtypeStruct((1, 3), jnp.float32)
  last = metrics.randomize_layers(params, key, 1, apply_fn=_two_layer_apply, example=example)
  np.testing.assert_array_equal(last["a"]["kernel"], params["a"]["kernel"])
  assert not np.allclose(last["b"]["kernel"], params["b"]["kernel"])
  named = metrics.randomize_layers(params, key, ["a"])
  np.testing.assert_array_equal(named["b"]["kernel"], params["b"]["kernel"])
  np.testing.assert_array_equal(named["a"]["bias"], 0.0)  # std 0: stays at zero
  with pytest.raises(ValueError, match="layers"):
    metrics.randomize_layers(params, key, ["missing"])
  with pytest.raises(ValueError, match="layers"):
    metrics.randomize_layers(params, key, 3, apply_fn=_two_layer_apply, example=example)
  with pytest.raises(ValueError, match="apply_fn"):
    metrics.randomize_layers(params, key, 1)


def _stem_then_head_apply(params, x):
  """Names sort against the order: `z_stem` runs first, `a_head` (inside a jit) last."""
  x = jax.nn.relu(x.reshape(x.shape[0], -1) @ params["z_stem"]["kernel"])
  x = jax.lax.scan(lambda h, w: (jnp.tanh(h @ w), None), x, params["m_blocks"]["kernel"])[0]
  return jax.jit(lambda p, h: h @ p["kernel"] + p["bias"])(params["a_head"], x)


def test_layer_order_follows_the_forward_pass_not_the_names():
  shapes = {"a_head": {"kernel": (4, 2), "bias": (2,)}, "m_blocks": {"kernel": (2, 4, 4)},
            "z_stem": {"kernel": (3, 4), "unused": (1,)}}
  rng = np.random.default_rng(0)
  params = jax.tree.map(lambda shape: jnp.asarray(rng.normal(size=shape), jnp.float32), shapes,
                        is_leaf=lambda x: isinstance(x, tuple))
  example = jax.ShapeDtypeStruct((1, 3), jnp.float32)
  assert metrics.layer_order(_stem_then_head_apply, params, example) == [
      ("z_stem",), ("m_blocks",), ("a_head",)]
  last = metrics.randomize_layers(params, jax.random.key(0), 1, apply_fn=_stem_then_head_apply,
                                  example=example)
  assert not np.allclose(last["a_head"]["kernel"], params["a_head"]["kernel"])
  for name in ("m_blocks", "z_stem"):
    np.testing.assert_array_equal(last[name]["kernel"], params[name]["kernel"])


def _flax_order(name, size):
  module = models.module(name)
  example = jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32)
  params = jax.eval_shape(module.init, jax.random.key(0), example)  # shapes only
  return [path[1] for path in metrics.layer_order(module.apply, params, example)], params


def test_layer_order_of_the_built_in_models():
  order, _ = _flax_order("vgg16", 32)
  assert order == [f"conv{b}_{i}" for b, n in zip(range(1, 6), (2, 2, 3, 3, 3))
                   for i in range(1, n + 1)] + ["fc6", "fc7", "fc8"]
  order, _ = _flax_order("shapes_cnn", 16)
  assert order == ["conv1_1", "conv1_2", "conv2_1", "conv2_2", "conv3_1", "conv3_2", "fc"]
  order, _ = _flax_order("squeezenet1_1", 17)
  assert order[0] == "conv1" and order[-1] == "conv10" and order[-2] == "fire9"


def test_randomizing_one_squeezenet_layer_changes_conv10_only():
  """Issue input: the alphabetical order randomised params/fire9/squeeze instead of conv10."""
  module = models.module("squeezenet1_1")
  rng = np.random.default_rng(0)
  variables = jax.tree.map(lambda leaf: rng.normal(size=leaf.shape).astype(np.float32),
                           jax.eval_shape(module.init, jax.random.key(0), jnp.zeros((1, 17, 17, 3))))
  classifier = Classifier(module.apply, variables)
  randomized = metrics.randomized_classifier(classifier, jax.random.key(1), np.zeros((2, 17, 17, 3)))
  before, after = (jax.tree_util.tree_flatten_with_path(v)[0] for v in (variables, randomized.params))
  changed = sorted({path[1].key for (path, old), (_, new) in zip(before, after)
                    if not np.array_equal(old, new)})
  assert changed == ["conv10"]


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



def _blob_ranks(height, width, centre):
  yy, xx = np.mgrid[:height, :width]
  distance = (yy - centre[0]) ** 2 + (xx - centre[1]) ** 2 + 1e-3 * (yy * width + xx)
  return np.argsort(np.argsort(distance.ravel())).reshape(height, width)


@pytest.mark.parametrize("height, width", [(12, 12), (20, 17), (33, 40)])
def test_linear_imputation_matches_scipy_spsolve(height, width):
  rng = np.random.default_rng(height)
  yy, xx = np.mgrid[:height, :width]
  image = (0.5 + 0.3 * np.sin(xx / 3.0)[..., None] * np.cos(yy / 4.0)[..., None]
           + 0.1 * rng.uniform(size=(height, width, 3))).astype(np.float32)
  blob = _blob_ranks(height, width, (height // 3, width // 2)) < 0.9 * height * width
  scattered = rng.uniform(size=(height, width)) < 0.5
  for removed in (blob, scattered):
    got = jax.jit(metrics.linear_imputation)(image, removed)
    want = ref.road_linear_imputation(image, removed)
    np.testing.assert_allclose(got, want, atol=1e-4)
    np.testing.assert_array_equal(np.asarray(got)[~removed], image[~removed])


def test_road_without_noise_matches_numpy():
  classifier = _linear_classifier()
  images, saliency, target = _inputs()
  fractions = (0.2, 0.5, 0.9)
  got = metrics.road(classifier, images, saliency, target, fractions=fractions, noise_std=0.0,
                     steps_per_pass=4)
  num_pixels = SIZE * SIZE
  want = {"morf": np.zeros((3, 3)), "lerf": np.zeros((3, 3))}
  for b in range(3):
    order = np.argsort(-saliency[b].ravel(), kind="stable")
    for f, fraction in enumerate(fractions):
      count = round(fraction * num_pixels)
      for name, chosen in (("morf", order[:count]), ("lerf", order[num_pixels - count:])):
        removed = np.zeros(num_pixels, bool)
        removed[chosen] = True
        imputed = ref.road_linear_imputation(images[b], removed.reshape(SIZE, SIZE))
        want[name][b, f] = _np_probs(classifier, imputed[None])[0, target[b]]
  np.testing.assert_allclose(got.fractions, fractions)
  np.testing.assert_allclose(got.morf, want["morf"], rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(got.lerf, want["lerf"], rtol=1e-4, atol=1e-5)


def test_road_noise_is_per_image_and_scaled_to_the_normalised_input():
  classifier = _linear_classifier()
  images, saliency, target = _inputs()
  keys = jax.random.split(jax.random.key(3), 3)
  noisy = metrics.road(classifier, images, saliency, target, keys)
  alone = metrics.road(classifier, images[1:2], saliency[1:2], target[1:2], keys[1:2])
  np.testing.assert_allclose(noisy.morf[1], alone.morf[0], rtol=1e-5)  # Batch does not matter.
  clean = metrics.road(classifier, images, saliency, target, keys, noise_std=0.0)
  difference = np.abs(np.asarray(noisy.morf) - np.asarray(clean.morf))
  assert 0 < difference.max() < 0.2
  with pytest.raises(ValueError, match="fractions"):
    metrics.road(classifier, images, saliency, target, fractions=(0.5, 1.0))
  with pytest.raises(ValueError, match="key"):
    metrics.road(classifier, images, saliency, target, np.zeros(2, np.uint32))


def test_road_ranks_an_informative_map_above_its_inverse():
  classifier = Classifier(_region_apply, {"scale": jnp.float32(12.0), "offset": jnp.float32(0.6)},
                          mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
  rng = np.random.default_rng(3)
  images = rng.uniform(0.0, 0.2, (2, SIZE, SIZE, 3)).astype(np.float32)
  images[:, REGION[0], REGION[1]] += 0.75
  true_map = np.zeros((2, SIZE, SIZE), np.float32)
  true_map[:, REGION[0], REGION[1]] = 1.0
  true_map += rng.uniform(0, 0.1, true_map.shape).astype(np.float32)
  target = np.zeros(2, np.int32)
  good = metrics.road(classifier, images, true_map, target)
  bad = metrics.road(classifier, images, -true_map, target)
  assert np.all(good.morf.mean(axis=1) < bad.morf.mean(axis=1) - 0.2)
  assert np.all(good.lerf.mean(axis=1) > bad.lerf.mean(axis=1) + 0.2)


_PASSES = {
    "deletion_auc": lambda c, i, s, t, n: metrics.deletion_auc(c, i, s, t, num_steps=9,
                                                               steps_per_pass=n),
    "insertion_auc": lambda c, i, s, t, n: metrics.insertion_auc(c, i, s, t, num_steps=9,
                                                                 steps_per_pass=n),
    "road": lambda c, i, s, t, n: metrics.road(c, i, s, t, jax.random.key(1),
                                               fractions=(0.1, 0.4, 0.7), steps_per_pass=n),
}


@pytest.mark.parametrize("name", sorted(_PASSES))
def test_steps_per_pass_does_not_change_scores(name):
  """`steps_per_pass` is memory only: the same scores, to float32 rounding (another batch size
  of the forward pass may round differently), for one point per pass, a partial last pass, and
  every point in one pass. ROAD's noise of point p comes from `fold_in(key_i, p)`."""
  classifier = _linear_classifier()
  images, saliency, target = _inputs()
  scores = [jax.tree.leaves(_PASSES[name](classifier, images, saliency, target, n))
            for n in (1, 4, 40)]
  for other in scores[1:]:
    for got, want in zip(other, scores[0]):
      np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_rise_steps():
  assert metrics.rise_steps(224, 224) == 224
  assert metrics.rise_steps(64, 64) == 19  # ceil(4096 / 224)
  with pytest.raises(ValueError, match="pixels_per_step"):
    metrics.rise_steps(8, 8, 0)


def test_spearman_of_constant_maps_is_defined():
  constant, ramp = np.ones((1, 4, 4), np.float32), np.arange(16.0, dtype=np.float32).reshape(1, 4, 4)
  np.testing.assert_array_equal(metrics.spearman(constant, 2 * constant), [1.0])
  np.testing.assert_array_equal(metrics.spearman(constant, ramp), [0.0])
  np.testing.assert_allclose(metrics.spearman(ramp, -ramp), [-1.0], rtol=1e-6)


def _pooled_apply(params, x):
  """Any input size: logits from the mean colour, scaled (saturating when the scale is large)."""
  return params["scale"] * (x.mean(axis=(1, 2)) @ params["kernel"])


def _pooled_classifier(scale):
  kernel = np.array([[1.0, -1.0, 0.0], [0.0, 1.0, -1.0], [-1.0, 0.0, 1.0]], np.float32)
  return Classifier(_pooled_apply, {"scale": jnp.float32(scale), "kernel": jnp.asarray(kernel)},
                    mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))


def _degenerate_metrics(classifier, images, saliency, target, masks):
  options = dict(num_steps=3, steps_per_pass=2)
  road = metrics.road(classifier, images, saliency, target, fractions=(0.1, 0.9))
  return {
      **{f"average_drop_{m}": metrics.average_drop(classifier, images, saliency, target, masked_value=m)
         for m in metrics.MASKED_VALUES},
      "average_drop_none": metrics.average_drop(classifier, images, np.clip(saliency, 0, 1), target,
                                                normalization="none"),
      "increase_in_confidence": metrics.increase_in_confidence(classifier, images, saliency, target),
      "deletion_auc": metrics.deletion_auc(classifier, images, saliency, target, **options),
      "insertion_auc": metrics.insertion_auc(classifier, images, saliency, target, **options),
      "road_morf": road.morf, "road_lerf": road.lerf,
      "pointing_game": metrics.pointing_game(saliency, masks),
      "relevance_mass": metrics.relevance_mass(saliency, masks),
      "spearman": metrics.spearman(saliency, saliency[::-1]),
  }


@pytest.mark.parametrize("map_kind", ["constant", "zero", "one_hot", "tiny", "one_pixel_wide"])
@pytest.mark.parametrize("scale", [1.0, 1e4, -1e4])  # ordinary, saturated, underflowing target
def test_metrics_stay_finite_on_degenerate_inputs(map_kind, scale):
  size = 8  # The smallest image `check_images` takes.
  rng = np.random.default_rng(0)
  # Constant black, constant white and random images.
  images = np.stack([np.zeros((size, size, 3)), np.ones((size, size, 3)),
                     rng.uniform(size=(size, size, 3))]).astype(np.float32)
  saliency = {"constant": np.full((3, size, size), 3.0), "zero": np.zeros((3, size, size)),
              "one_hot": np.eye(size * size)[[5, 60, 0]].reshape(3, size, size),
              "tiny": np.eye(size * size)[[0, 1, 2]].reshape(3, size, size) * 1e-38,
              "one_pixel_wide": rng.normal(size=(3, 1, 1))}[map_kind].astype(np.float32)
  masks = np.zeros((3, size, size), bool)
  masks[0, 3, 4] = masks[2, 0, 0] = True  # 1-pixel objects, and an empty mask.
  classifier = _pooled_classifier(scale)
  target = np.array([0, 2, 1], np.int32)
  for name, value in _degenerate_metrics(classifier, images, saliency, target, masks).items():
    value = np.asarray(value)
    assert np.isfinite(value).all(), (name, value)
    if name != "spearman":
      assert (value >= 0).all() and (value <= 1).all(), (name, value)
