"""The perturbation objective against an independent transcription, and perturb's guarantees."""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import test_util

from compilations import count_compilations
from pfc_jax import Classifier
from pfc_jax.perturbation import (SWEEPABLE, PerturbConfig, gaussian_kernel, objective, perturb,
                                  static_part)

SIZE = 16


def _tiny_cnn(params, x):
  """[N, H, W, 3] -> logits [N, 4]: 3x3 conv, ReLU, global max, dense."""
  h = jax.lax.conv_general_dilated(x, params["conv"], (1, 1), "SAME",
                                   dimension_numbers=("NHWC", "HWIO", "NHWC"))
  return jax.nn.relu(h).max(axis=(1, 2)) @ params["dense"]


def _tiny_classifier(seed=0):
  rng = np.random.default_rng(seed)
  params = {"conv": jnp.asarray(rng.normal(size=(3, 3, 3, 6)), jnp.float32),
            "dense": jnp.asarray(0.1 * rng.normal(size=(6, 4)), jnp.float32)}
  return Classifier(_tiny_cnn, params)


_objective = jax.jit(objective, static_argnums=6)


def _linear(params, x):
  return x.reshape(x.shape[0], -1) @ params


# --- An independent numpy transcription of the authors' formulas (float64). ---

def _np_conv_same(plane, kernel):
  """2-D correlation of `plane [H, W]` with zero padding; kernels here are symmetric."""
  pad = kernel.shape[0] // 2
  padded = np.pad(plane, pad)
  h, w = plane.shape
  return sum(kernel[dy, dx] * padded[dy:dy + h, dx:dx + w]
             for dy in range(kernel.shape[0]) for dx in range(kernel.shape[1]))


def _np_gaussian(size, sigma):
  g = np.zeros((size, size))
  for i in range(size):
    for j in range(size):
      d2 = (i - size // 2) ** 2 + (j - size // 2) ** 2
      g[i, j] = math.exp(-d2 / (2 * sigma**2)) / (2 * math.pi * sigma**2)
  return g


def _np_softmax(logits):
  e = np.exp(logits - logits.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


def _np_terms(w, logits, labels, target, num, variant, sigma=1.0, size=5, deleted_logits=None):
  """Unweighted terms of METHOD.md section 2 for one image, loop by loop; the deletion term
  from the logits under the complementary noise, when given."""
  g = _np_gaussian(size, sigma)
  masks = [(labels == i).astype(np.float64) for i in range(num)]
  confidence = np.mean(np.maximum(0.0, logits - logits[:, [target]]))
  if variant == "published":
    consistency = -sum(np.mean(np.abs(_np_conv_same((w * m[..., None]).sum(-1), g))) for m in masks)
  else:
    consistency = 0.0
    for m in masks:
      weight = _np_conv_same(m, g)
      for c in range(3):
        local_mean = _np_conv_same(w[..., c] * m, g) / (weight + 1e-6)
        consistency += np.sum(m * (w[..., c] - local_mean) ** 2) / w.size
  laplacian = np.array([[0, 1, 0], [1, -4, 1], [0, 1, 0]], np.float64)
  lap = np.stack([_np_conv_same(w[..., c], laplacian) for c in range(3)], -1)
  smoothness = sum(np.mean((lap * m[..., None]) ** 2) for m in masks)
  deletion = 0.0 if deleted_logits is None else np.mean(_np_softmax(deleted_logits)[:, target])
  return {"mask": -w.mean(), "confidence": confidence, "consistency": consistency,
          "smoothness": smoothness, "deletion": deletion}


@pytest.mark.parametrize("variant", ["published", "coalition"])
def test_objective_matches_numpy_transcription(variant):
  rng = np.random.default_rng(1)
  num_classes, samples, num = 5, 3, 4
  weights = rng.normal(size=(SIZE * SIZE * 3, num_classes)) * 0.05
  classifier = Classifier(_linear, jnp.asarray(weights, jnp.float32))
  w = rng.uniform(0, 1, size=(SIZE, SIZE, 3))
  x = rng.normal(size=(SIZE, SIZE, 3))
  noise = rng.normal(size=(samples, SIZE, SIZE, 3))
  labels = rng.integers(0, num, size=(SIZE, SIZE))
  noisy = (x[None] + noise * w[None]).reshape(samples, -1)
  target = int(np.argsort((noisy @ weights).mean(0))[1])  # one that other classes overtake
  config = PerturbConfig(consistency=variant, smoothness_weight=0.5, deletion_weight=2.0,
                         max_w=1.5, max_coalitions=6)
  total, terms = _objective(
      *(jnp.asarray(a, jnp.float32) for a in (w, x, noise)), jnp.asarray(labels, jnp.int32),
      target, classifier, config)
  deleted = (x[None] + noise * (1.5 - w[None])).reshape(samples, -1)
  expected = _np_terms(w, noisy @ weights, labels, target, num, variant,
                       deleted_logits=deleted @ weights)
  assert expected["confidence"] > 0 and expected["smoothness"] > 0
  for name, value in expected.items():
    np.testing.assert_allclose(terms[name], value, rtol=1e-5, err_msg=name)
  weighted = (0.1 * expected["mask"] + 100 * expected["confidence"] + expected["consistency"]
              + 0.5 * expected["smoothness"] + 2.0 * expected["deletion"])
  np.testing.assert_allclose(total, weighted, rtol=1e-5)


def test_gaussian_is_the_unnormalised_paper_kernel():
  np.testing.assert_allclose(gaussian_kernel(5, 1.0), _np_gaussian(5, 1.0), rtol=1e-6)
  np.testing.assert_allclose(gaussian_kernel(5, 1.0).sum(), 0.9818, atol=1e-4)


def _consistency(w, labels, variant):
  config = PerturbConfig(consistency=variant, max_coalitions=8)
  noise = jnp.zeros((1, *w.shape))
  _, terms = _objective(w, jnp.zeros_like(w), noise, labels, 0, _tiny_classifier(), config)
  return float(terms["consistency"])


def test_published_consistency_ignores_the_partition():
  """w >= 0 and G >= 0 make |.| inert, and the masks partition the image, so by linearity
  sum_i G * (w C_i) = G * w: any partition (or none) gives the same value."""
  rng = np.random.default_rng(2)
  w = jnp.asarray(rng.uniform(0, 1, size=(SIZE, SIZE, 3)), jnp.float32)
  random_labels = jnp.asarray(rng.integers(0, 8, size=(SIZE, SIZE)), jnp.int32)
  stripes = jnp.broadcast_to(jnp.arange(SIZE) // 4, (SIZE, SIZE)).astype(jnp.int32)
  one = jnp.zeros((SIZE, SIZE), jnp.int32)
  values = [_consistency(w, labels, "published") for labels in (random_labels, stripes, one)]
  np.testing.assert_allclose(values, values[0], rtol=1e-5)
  assert values[0] < 0


def test_coalition_consistency_follows_the_partition():
  rng = np.random.default_rng(3)
  stripes = jnp.broadcast_to(jnp.arange(SIZE) // 4, (SIZE, SIZE)).astype(jnp.int32)
  per_coalition = jnp.asarray(rng.uniform(0, 1, size=(4, 3)), jnp.float32)
  piecewise_constant = per_coalition[stripes]
  assert abs(_consistency(piecewise_constant, stripes, "coalition")) < 1e-6
  assert _consistency(piecewise_constant, stripes.T, "coalition") > 1e-3
  w = jnp.asarray(rng.uniform(0, 1, size=(SIZE, SIZE, 3)), jnp.float32)
  assert not np.isclose(_consistency(w, stripes, "coalition"), _consistency(w, stripes.T, "coalition"))


def test_objective_is_differentiable_in_its_arrays():
  rng = np.random.default_rng(4)
  labels = jnp.asarray(rng.integers(0, 3, size=(8, 8)), jnp.int32)
  config = PerturbConfig(consistency="coalition", smoothness_weight=1.0)
  with jax.enable_x64():
    w = jnp.asarray(rng.uniform(0.2, 0.8, size=(8, 8, 3)))
    x = jnp.asarray(rng.normal(size=(8, 8, 3)))
    noise = jnp.asarray(rng.normal(size=(2, 8, 8, 3)))
    params = jax.tree.map(lambda p: jnp.asarray(p, jnp.float64), _tiny_classifier().params)
    f = jax.jit(lambda w, x, noise, params: objective(
        w, x, noise, labels, 1, Classifier(_tiny_cnn, params), config)[0])
    test_util.check_grads(f, (w, x, noise, params), order=1, modes=["rev"], eps=1e-4)


def _square_apply(params, x):
  """Class 0 holds while the energy of x inside the square stays below 0.1; class 1 is fixed.
  Both logits are shifted by 1, which the objective (differences, softmax) ignores, so that the
  clean logits [2, 1] do not look like probabilities."""
  energy = (x**2 * params).sum(axis=(1, 2, 3)) / (3 * params.sum())
  return jnp.stack([2.0 - 10.0 * energy, jnp.ones_like(energy)], axis=-1)


def test_saliency_is_high_only_where_the_classifier_looks():
  size = 24
  square = np.zeros((size, size, 1), np.float32)
  square[6:14, 8:16] = 1.0
  classifier = Classifier(_square_apply, jnp.asarray(square), mean=(0.5,) * 3, std=(1.0,) * 3)
  images = jnp.full((1, size, size, 3), 0.5)
  labels = jnp.zeros((1, size, size), jnp.int32)
  config = PerturbConfig(steps=60, noise_samples=8, learning_rate=0.05)
  result = perturb(classifier, images, labels, jax.random.key(0), config)
  saliency = np.asarray(result.saliency[0])
  inside = square[..., 0] > 0
  assert int(result.target[0]) == 0
  assert saliency[inside].mean() > 0.5, saliency[inside].mean()
  assert saliency[~inside].mean() < 0.1, saliency[~inside].mean()
  assert result.losses.shape == (1, 60) and float(result.losses[0, -1]) < float(result.losses[0, 1])


def _either_square_apply(params, x):
  """Class 0 holds while either of two squares (masks `params [2, H, W, 1]`) stays clean; logits
  shifted by 1 as `_square_apply`'s."""
  energy = (x[None] ** 2 * params[:, None]).sum(axis=(2, 3, 4)) / (3 * params.sum(axis=(1, 2, 3)))[:, None]
  return jnp.stack([2.0 - 10.0 * energy.min(axis=0), jnp.ones(x.shape[:1])], axis=-1)


@pytest.mark.parametrize("deletion_weight", [0.0, 10.0])
def test_the_deletion_term_marks_redundant_evidence(deletion_weight):
  # Keeping one square clean suffices for class 0: the preservation game keeps the small one
  # and noises the large one; the deletion game fails while either is left out of the map.
  size = 24
  squares = np.zeros((2, size, size, 1), np.float32)
  squares[0, 4:8, 4:8] = squares[1, 12:22, 12:22] = 1.0
  classifier = Classifier(_either_square_apply, jnp.asarray(squares), mean=(0.5,) * 3,
                          std=(1.0,) * 3)
  images = jnp.full((1, size, size, 3), 0.5)
  labels = jnp.zeros((1, size, size), jnp.int32)
  config = PerturbConfig(steps=300, noise_samples=8, learning_rate=0.05,
                         deletion_weight=deletion_weight)
  saliency = np.asarray(perturb(classifier, images, labels, jax.random.key(0), config).saliency[0])
  small, large = (saliency[squares[k, ..., 0] > 0].mean() for k in range(2))
  background = saliency[squares.sum(0)[..., 0] == 0].mean()
  assert background < 0.1, background
  assert small > 0.5, small
  if deletion_weight:
    assert large > 0.5, large
  else:
    assert large < 0.3, large


def _np_min_max(maps):
  low = maps.min(axis=(1, 2), keepdims=True)
  span = maps.max(axis=(1, 2), keepdims=True) - low
  return np.where(span > 0, (maps - low) / np.where(span > 0, span, 1.0), 0.0)


def test_with_preservation_game_averages_the_normalised_maps_of_both_games():
  images, labels = _batch(seed=3)
  dual = dataclasses.replace(CONFIG, deletion_weight=3.0)
  both = perturb(_tiny_classifier(), images, labels, jax.random.key(4),
                 dataclasses.replace(dual, with_preservation_game=True))
  runs = [perturb(_tiny_classifier(), images, labels, jax.random.key(4), config)
          for config in (dual, CONFIG)]  # CONFIG: the same objective without the deletion term
  assert not np.allclose(runs[0].saliency, runs[1].saliency)
  np.testing.assert_allclose(
      both.saliency, (_np_min_max(np.asarray(runs[0].saliency))
                      + _np_min_max(np.asarray(runs[1].saliency))) / 2, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(both.w, (runs[0].w + runs[1].w) / 2, rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(both.target, runs[0].target)
  assert both.saliency.min() >= 0 and both.saliency.max() <= 1
  with pytest.raises(ValueError, match="with_preservation_game` needs `deletion_weight"):
    dataclasses.replace(CONFIG, with_preservation_game=True)
  with pytest.raises(ValueError, match="with_preservation_game` must be a bool"):
    dataclasses.replace(dual, with_preservation_game=1)


def test_sweep_members_with_preservation_game_equal_single_runs():
  from pfc_jax.perturbation import perturb_sweep
  images, labels = _batch(seed=8)
  base = dataclasses.replace(CONFIG, deletion_weight=1.0, with_preservation_game=True)
  settings = {"deletion_weight": [1.0, 10.0], "mask_weight": [0.1, 1.0]}
  swept = perturb_sweep(_tiny_classifier(), images, labels, jax.random.key(2), base, settings)
  for k in range(2):
    single = perturb(_tiny_classifier(), images, labels, jax.random.key(2),
                     dataclasses.replace(base, **{f: v[k] for f, v in settings.items()}))
    np.testing.assert_allclose(swept.saliency[k], single.saliency, rtol=1e-5, atol=1e-5)
  assert not np.allclose(swept.saliency[0], swept.saliency[1])


@pytest.mark.parametrize("schedule", ["constant", "cosine"])
def test_learning_rate_schedule(schedule):
  # With the mask term alone the gradient is a constant, so each Adam step moves w by exactly
  # the step's learning rate: w after N steps is the sum of the schedule's rates.
  steps, rate = 6, 0.3
  config = PerturbConfig(steps=steps, learning_rate=rate, schedule=schedule, mask_weight=1.0,
                         confidence_weight=0.0, consistency="off", max_w=100.0, noise_samples=2)
  images, labels = _batch()
  w = perturb(_tiny_classifier(), images, labels, jax.random.key(0), config).w
  factors = (np.ones(steps) if schedule == "constant"
             else 0.5 * (1 + np.cos(np.pi * np.arange(steps) / steps)))
  np.testing.assert_allclose(w, np.full(w.shape, rate * factors.sum()), rtol=1e-4)


def test_correlated_noise_is_white_noise_blurred_to_unit_variance():
  from pfc_jax.perturbation import sample_noise
  key, shape = jax.random.key(3), (12, 10, 3)
  np.testing.assert_array_equal(sample_noise(PerturbConfig(noise_samples=2), key, shape),
                                jax.random.normal(key, (2, *shape)))
  sigma, radius = 1.5, 3
  noise = np.asarray(sample_noise(PerturbConfig(noise_samples=2, noise_sigma=sigma), key, shape))
  white = np.asarray(jax.random.normal(key, (2, 12 + 2 * radius, 10 + 2 * radius, 3)), np.float64)
  g = np.exp(-np.arange(-radius, radius + 1) ** 2 / (2 * sigma**2))
  kernel = np.outer(g, g) / (g**2).sum()  # sum of squares 1: unit variance
  expected = np.zeros((2, 12, 10, 3))
  for dy in range(2 * radius + 1):
    for dx in range(2 * radius + 1):
      expected += kernel[dy, dx] * white[:, dy:dy + 12, dx:dx + 10]
  np.testing.assert_allclose(noise, expected, rtol=1e-5, atol=1e-5)
  many = np.asarray(sample_noise(PerturbConfig(noise_samples=256, noise_sigma=sigma), key, shape))
  assert abs(many.std() - 1.0) < 0.03, many.std()
  with pytest.raises(ValueError, match="noise_sigma"):
    PerturbConfig(noise_sigma=-1.0)


def test_noise_std_scales_the_noise_and_zero_leaves_the_blur_alone():
  from pfc_jax.perturbation import sample_noise
  key, shape = jax.random.key(4), (12, 10, 3)
  for sigma in (0.0, 1.5):
    unit = sample_noise(PerturbConfig(noise_samples=2, noise_sigma=sigma), key, shape)
    np.testing.assert_allclose(
        sample_noise(PerturbConfig(noise_samples=2, noise_sigma=sigma, noise_std=0.3), key, shape),
        0.3 * np.asarray(unit), rtol=1e-6)
  assert not np.any(sample_noise(PerturbConfig(noise_std=0.0, blur_sigma=2.0), key, shape))
  # Without noise the run is deterministic: S = 1 gives S = 4's w, and w differs from a noisy run.
  images, labels = _batch()
  config = PerturbConfig(steps=4, learning_rate=0.3, max_w=2.0, blur_sigma=2.0, noise_std=0.0,
                         confidence="log_softmax", parameterization="lowres", lowres_stride=4)
  one = perturb(_tiny_classifier(), images, labels, jax.random.key(0),
                dataclasses.replace(config, noise_samples=1))
  four = perturb(_tiny_classifier(), images, labels, jax.random.key(1),
                 dataclasses.replace(config, noise_samples=4))
  np.testing.assert_allclose(one.w, four.w, rtol=1e-5, atol=1e-6)
  noisy = perturb(_tiny_classifier(), images, labels, jax.random.key(0),
                  dataclasses.replace(config, noise_std=1.0))
  assert not np.allclose(one.w, noisy.w, atol=1e-3)
  for bad in (-0.1, float("nan"), "1"):
    with pytest.raises(ValueError, match="`noise_std` must be >= 0"):
      PerturbConfig(noise_std=bad)
  with pytest.raises(ValueError, match="needs `blur_sigma` or `blur_fraction` > 0"):
    PerturbConfig(noise_std=0.0)


def _numpy_local_mean(plane: np.ndarray, sigma: float) -> np.ndarray:
  """Gaussian-weighted mean over the window (truncated at 2 sigma) inside the image, loop by loop."""
  radius = math.ceil(2 * sigma)
  g = np.exp(-np.arange(-radius, radius + 1) ** 2 / (2 * sigma**2))
  height, width = plane.shape
  expected = np.zeros_like(plane, np.float64)
  for y in range(height):
    for x in range(width):
      total = weight = 0.0
      for dy in range(-radius, radius + 1):
        for dx in range(-radius, radius + 1):
          if 0 <= y + dy < height and 0 <= x + dx < width:
            total += g[dy + radius] * g[dx + radius] * plane[y + dy, x + dx]
            weight += g[dy + radius] * g[dx + radius]
      expected[y, x] = total / weight
  return expected


def test_saliency_smoothing_is_the_local_mean_inside_the_image():
  from pfc_jax.perturbation import smooth_saliency
  saliency = np.random.default_rng(4).uniform(size=(9, 11)).astype(np.float32)
  np.testing.assert_allclose(smooth_saliency(jnp.asarray(saliency), 1.5),
                             _numpy_local_mean(saliency, 1.5), rtol=1e-5)
  np.testing.assert_array_equal(smooth_saliency(jnp.asarray(saliency), 0.0), saliency)
  for bad in (-1.0, "4"):
    with pytest.raises(ValueError, match="saliency_sigma"):
      PerturbConfig(saliency_sigma=bad)
    with pytest.raises(ValueError, match="sigma"):
      smooth_saliency(jnp.asarray(saliency), bad)


def test_blur_operator_moves_the_image_towards_its_blur_by_w_over_max_w():
  """With `blur_sigma`, the objective is the additive-noise objective of the image moved towards
  its blurred copy (a loop-by-loop numpy blur) by w / max_w at each pixel."""
  rng = np.random.default_rng(6)
  x = rng.normal(size=(SIZE, SIZE, 3)).astype(np.float32)
  w = rng.uniform(0, 2, size=(SIZE, SIZE, 3)).astype(np.float32)
  noise = rng.normal(size=(4, SIZE, SIZE, 3)).astype(np.float32)
  labels = np.arange(SIZE * SIZE).reshape(SIZE, SIZE) % 3
  config = PerturbConfig(max_w=2.0, confidence="log_softmax", consistency="coalition")
  blurred = np.stack([_numpy_local_mean(x[..., c], 1.5) for c in range(3)], axis=-1)
  moved = (x + w / 2.0 * (blurred - x)).astype(np.float32)
  classifier = _tiny_classifier()
  total, terms = objective(jnp.asarray(w), jnp.asarray(x), jnp.asarray(noise), labels, 1,
                           classifier, dataclasses.replace(config, blur_sigma=1.5))
  reference, reference_terms = objective(jnp.asarray(w), jnp.asarray(moved), jnp.asarray(noise),
                                         labels, 1, classifier, config)
  np.testing.assert_allclose(total, reference, rtol=1e-5)
  np.testing.assert_allclose(terms["confidence"], reference_terms["confidence"], rtol=1e-5)
  unblurred, _ = objective(jnp.asarray(w), jnp.asarray(x), jnp.asarray(noise), labels, 1,
                           classifier, config)
  assert abs(float(unblurred) - float(total)) > 1e-4
  for bad in (-1.0, float("inf"), float("nan"), True, "2", None):
    with pytest.raises(ValueError, match="`blur_sigma` must be >= 0 \\(a finite number\\)"):
      PerturbConfig(blur_sigma=bad)
  for name in ("max_w", "learning_rate", "sigma", "mask_weight"):
    for bad in ("1", None, float("inf")):
      with pytest.raises(ValueError, match=f"`{name}` must be"):
        PerturbConfig(**{name: bad})


def test_saliency_sigma_smooths_the_readout_not_w():
  from pfc_jax.perturbation import smooth_saliency
  images, labels = _batch()
  plain, smooth = (perturb(_tiny_classifier(), images, labels, jax.random.key(5),
                           dataclasses.replace(CONFIG, saliency_sigma=sigma))
                   for sigma in (0.0, 2.0))
  np.testing.assert_array_equal(plain.w, smooth.w)
  np.testing.assert_allclose(smooth.saliency,
                             jax.vmap(smooth_saliency, (0, None))(plain.saliency, 2.0), rtol=1e-6)
  assert not np.allclose(smooth.saliency, plain.saliency)


def _batch(seed=0, batch=2):
  rng = np.random.default_rng(seed)
  images = jnp.asarray(rng.uniform(size=(batch, SIZE, SIZE, 3)), jnp.float32)
  labels = jnp.asarray(rng.integers(0, 3, size=(batch, SIZE, SIZE)), jnp.int32)
  return images, labels


# Shared by the tests below so that they share compilations. A large step and max_w make the
# confidence term active, so the noise (and hence the key and the chunking) matters.
CONFIG = PerturbConfig(steps=3, noise_samples=4, consistency="coalition", learning_rate=0.5,
                       max_w=5.0)


def test_chunked_noise_equals_the_plain_evaluation():
  images, labels = _batch()
  plain, chunked = (perturb(_tiny_classifier(), images, labels, jax.random.key(1), config)
                    for config in (CONFIG, dataclasses.replace(CONFIG, noise_chunk=2)))
  np.testing.assert_allclose(chunked.w, plain.w, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(chunked.losses, plain.losses, rtol=1e-5, atol=1e-6)
  assert not np.allclose(plain.losses[0], plain.losses[1])


def test_images_are_independent_of_their_batch_and_driver():
  images, labels = _batch(seed=5)
  keys = jax.random.split(jax.random.key(7), 2)
  together = perturb(_tiny_classifier(), images, labels, keys, CONFIG)
  alone = perturb(_tiny_classifier(), images[1:], labels[1:], keys[1:], CONFIG)
  np.testing.assert_allclose(alone.w[0], together.w[1], rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(alone.losses[0], together.losses[1], rtol=1e-5)
  compiled = perturb(_tiny_classifier(), images, labels, jax.random.key(7),
                     dataclasses.replace(CONFIG, driver="compiled"))
  np.testing.assert_allclose(compiled.w, together.w, rtol=1e-5, atol=1e-6)
  other_key = perturb(_tiny_classifier(), images, labels, jax.random.key(8), CONFIG)
  assert not np.allclose(other_key.w, together.w)


def test_does_not_recompile_for_new_images_or_params():
  traces = []

  def counting_cnn(params, x):
    traces.append(1)
    return _tiny_cnn(params, x)

  for seed in range(2):
    images, labels = _batch(seed)
    classifier = Classifier(counting_cnn, _tiny_classifier(seed).params)
    perturb(classifier, images, labels, jax.random.key(seed), CONFIG)
    if seed == 0:
      first = len(traces)
  assert first > 0 and len(traces) == first


def test_new_values_of_every_sweepable_field_compile_nothing():
  """The `Hyperparameters` reach the compiled programs traced: a new value of any of them reuses
  the compilation (`static_part`), and still takes effect."""
  images, labels = _batch()
  base = dataclasses.replace(CONFIG, smoothness_weight=0.5, deletion_weight=1.0,
                             with_preservation_game=True)  # Every term, both games.
  first = perturb(_tiny_classifier(), images, labels, jax.random.key(1), base)
  for name in SWEEPABLE:
    value = 0.5 if name == "max_w" else 0.3 * getattr(base, name) + 0.05
    changed = dataclasses.replace(base, **{name: value})
    with count_compilations() as compiled:
      result = jax.block_until_ready(
          perturb(_tiny_classifier(), images, labels, jax.random.key(1), changed))
    assert not compiled, name
    assert static_part(changed) == static_part(base)
    assert not np.allclose(result.losses, first.losses), name
    if name == "max_w":
      assert float(result.w.max()) <= changed.max_w + 1e-6 < float(first.w.max())
  # A weight that becomes 0 drops its term: another program, as documented.
  assert static_part(dataclasses.replace(base, smoothness_weight=0.0)) != static_part(base)


def test_rejects_bad_arguments():
  images, labels = _batch()
  classifier = _tiny_classifier()
  with pytest.raises(ValueError, match="labels"):
    perturb(classifier, images, labels[:, :-1], jax.random.key(0), PerturbConfig(steps=1))
  with pytest.raises(ValueError, match="max_coalitions"):
    perturb(classifier, images, labels + 30, jax.random.key(0), PerturbConfig(steps=1))
  with pytest.raises(ValueError, match="noise_chunk"):
    PerturbConfig(noise_samples=16, noise_chunk=5)
  with pytest.raises(ValueError, match="consistency"):
    PerturbConfig(consistency="paper")
  with pytest.raises(ValueError, match="schedule"):
    PerturbConfig(schedule="linear")
  for name in ("mask_weight", "confidence_weight", "deletion_weight"):
    for value in (-0.1, float("nan")):
      with pytest.raises(ValueError, match=f"`{name}` must be >= 0"):
        PerturbConfig(**{name: value})


def test_region_noise_is_constant_on_each_connected_region():
  images, _ = _batch(seed=2)
  stripes = np.broadcast_to(np.arange(SIZE) // 4 % 2, (SIZE, SIZE)).astype(np.int32)
  labels = jnp.asarray(np.stack([stripes, stripes.T]))  # 4 regions of 2 coalitions each
  config = dataclasses.replace(CONFIG, parameterization="region", max_regions=8)
  result = perturb(_tiny_classifier(), images, labels, jax.random.key(3), config)
  for image in range(2):
    saliency = np.asarray(result.saliency[image])
    label_map = np.asarray(labels[image])
    for band in range(4):
      region = (np.arange(SIZE) // 4 == band)
      values = saliency[:, region] if image == 0 else saliency[region, :]
      assert np.ptp(values) < 1e-6
    # Two regions of one coalition are not tied together.
    first = saliency[:, :4] if image == 0 else saliency[:4]
    third = saliency[:, 8:12] if image == 0 else saliency[8:12]
    assert label_map.ravel()[0] == label_map[8 if image else 0, 0 if image else 8]
    assert abs(first.mean() - third.mean()) > 1e-4
  assert float(result.w.max()) > 0


def test_lowres_noise_is_the_bilinear_upsampling_of_a_coarse_grid():
  from pfc_jax.perturbation import noise_scale, parameter_shape
  config = dataclasses.replace(CONFIG, parameterization="lowres", lowres_stride=4)
  assert parameter_shape(config, SIZE, SIZE + 1) == (SIZE // 4, -(-(SIZE + 1) // 4), 3)
  coarse = np.random.default_rng(0).uniform(size=(4, 4, 3)).astype(np.float32)
  w = np.asarray(noise_scale(config, jnp.asarray(coarse), (SIZE, SIZE)))
  # Half-pixel-centred bilinear upsampling by 4, edges clamped, in numpy.
  source = np.clip((np.arange(SIZE) + 0.5) / 4 - 0.5, 0, 3)
  low = np.minimum(np.floor(source).astype(int), 2)
  frac = source - low
  rows = coarse[low] * (1 - frac)[:, None, None] + coarse[low + 1] * frac[:, None, None]
  expected = rows[:, low] * (1 - frac)[None, :, None] + rows[:, low + 1] * frac[None, :, None]
  np.testing.assert_allclose(w, expected, rtol=1e-5, atol=1e-6)
  images, labels = _batch(seed=3)
  result = perturb(_tiny_classifier(), images, labels, jax.random.key(4), config)
  rows = np.abs(np.diff(np.asarray(result.w), axis=1)).max()
  assert 0 < rows <= 5.0 / 4 + 1e-5  # Neighbours differ by at most a quarter of max_w.


def test_sweep_members_equal_single_runs_with_one_compilation():
  from pfc_jax.perturbation import perturb_sweep
  traces = []

  def counting_cnn(params, x):
    traces.append(1)
    return _tiny_cnn(params, x)

  classifier = Classifier(counting_cnn, _tiny_classifier().params)
  images, labels = _batch(seed=6)
  base = dataclasses.replace(CONFIG, smoothness_weight=0.0)
  settings = {"mask_weight": [0.1, 1.0, 0.3], "smoothness_weight": [0.0, 0.5, 2.0],
              "sigma": [1.0, 2.0, 0.5], "learning_rate": [0.5, 0.1, 0.2], "max_w": [5.0, 1.0, 2.0],
              "confidence_weight": [100.0, 10.0, 1.0], "consistency_weight": [1.0, 0.0, 3.0],
              "deletion_weight": [0.0, 1.0, 0.5]}
  swept = perturb_sweep(classifier, images, labels, jax.random.key(2), base, settings)
  assert swept.w.shape == (3, 2, SIZE, SIZE, 3) and swept.losses.shape == (3, 2, 3)
  compiled_once = len(traces)
  other = {k: v[::-1] for k, v in settings.items()}
  perturb_sweep(classifier, images, labels, jax.random.key(2), base, other)
  assert len(traces) == compiled_once
  for k in range(3):
    single = perturb(classifier, images, labels, jax.random.key(2),
                     dataclasses.replace(base, **{f: v[k] for f, v in settings.items()}))
    np.testing.assert_allclose(swept.w[k], single.w, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(swept.losses[k], single.losses, rtol=1e-5, atol=1e-5)
  assert not np.allclose(swept.w[0], swept.w[1])


def test_sweep_rejects_bad_settings():
  from pfc_jax.perturbation import perturb_sweep
  images, labels = _batch()
  for settings, match in (({}, "at least one"), ({"steps": [1, 2]}, "cannot be swept"),
                          ({"sigma": [1.0], "max_w": [1.0, 2.0]}, "same number"),
                          ({"learning_rate": [0.1, -1.0]}, "positive"),
                          ({"mask_weight": [0.1, -0.1]}, ">= 0"),
                          ({"max_w": [float("nan")]}, "finite"),
                          ({"confidence_weight": [1.0, float("inf")]}, "finite")):
    with pytest.raises(ValueError, match=match):
      perturb_sweep(_tiny_classifier(), images, labels, jax.random.key(0), CONFIG, settings)


def test_coalition_smoothing_is_a_normalised_convolution_inside_each_coalition():
  from pfc_jax.perturbation import coalition_smoothing
  rng = np.random.default_rng(5)
  field = rng.uniform(size=(12, 10, 2)).astype(np.float32)
  labels = np.zeros((12, 10), np.int32)
  labels[:, 6:] = 1
  labels[3:7, 1:4] = 2
  sigma = 1.5
  got = np.asarray(coalition_smoothing(jnp.asarray(field), jnp.asarray(labels), 4, sigma))
  # Direct sum over the truncated (radius 3) Gaussian window, restricted to the own coalition.
  radius = 3
  expected = np.zeros_like(field)
  for y in range(12):
    for x in range(10):
      num, den = np.zeros(2), 0.0
      for dy in range(-radius, radius + 1):
        for dx in range(-radius, radius + 1):
          q = (y + dy, x + dx)
          if 0 <= q[0] < 12 and 0 <= q[1] < 10 and labels[q] == labels[y, x]:
            g = np.exp(-(dy**2 + dx**2) / (2 * sigma**2))
            num += g * field[q]
            den += g
      expected[y, x] = num / den
  np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
  # A constant field inside a coalition stays constant, whatever the neighbours hold.
  step = np.where(labels[..., None] == 1, 3.0, 0.5).astype(np.float32) * np.ones((1, 1, 2))
  np.testing.assert_allclose(
      coalition_smoothing(jnp.asarray(step, jnp.float32), jnp.asarray(labels), 4, sigma), step,
      rtol=1e-6)


def test_guided_noise_follows_coalition_borders():
  config = dataclasses.replace(CONFIG, parameterization="guided", lowres_stride=4)
  images, labels = _batch(seed=3)
  result = perturb(_tiny_classifier(), images, labels, jax.random.key(4), config)
  w = np.asarray(result.w)
  assert float(w.min()) >= 0 and float(w.max()) <= config.max_w + 1e-5 and w.max() > 0
  same = np.asarray(labels)[:, :, 1:] == np.asarray(labels)[:, :, :-1]
  jumps = np.abs(np.diff(w, axis=2)).max(-1)
  # Inside a coalition neighbours are smoothed; the larger jumps sit on coalition borders.
  assert jumps[same].max() <= 5.0 / 4 + 1e-5


def test_blur_fraction_is_that_fraction_of_the_shorter_side_in_pixels():
  """`blur_fraction` f gives the objective of `blur_sigma` = f * min(H, W) on a non-square image
  (here 1.5 px of a 12 x 16 image), with or without noise; `blur_pixels` says which."""
  rng = np.random.default_rng(7)
  x = rng.normal(size=(12, 16, 3)).astype(np.float32)
  w = rng.uniform(0, 1, size=(12, 16, 3)).astype(np.float32)
  noise = rng.normal(size=(2, 12, 16, 3)).astype(np.float32)
  labels = np.arange(12 * 16).reshape(12, 16) % 3
  classifier = _tiny_classifier()
  for noise_std in (0.0, 1.0):
    base = PerturbConfig(confidence="log_softmax", consistency="coalition", noise_std=noise_std,
                         blur_sigma=1.5)
    relative = dataclasses.replace(base, blur_sigma=0.0, blur_fraction=0.125)
    assert (base.blur_pixels(12, 16), relative.blur_pixels(12, 16)) == (1.5, 1.5)
    assert relative.blur_pixels(64, 32) == 4.0
    got, _ = objective(jnp.asarray(w), jnp.asarray(x), jnp.asarray(noise), labels, 1, classifier,
                       relative)
    expected, _ = objective(jnp.asarray(w), jnp.asarray(x), jnp.asarray(noise), labels, 1,
                            classifier, base)
    wider, _ = objective(jnp.asarray(w), jnp.asarray(x), jnp.asarray(noise), labels, 1,
                         classifier, dataclasses.replace(relative, blur_fraction=0.25))
    np.testing.assert_allclose(got, expected, rtol=1e-6)
    assert abs(float(wider) - float(got)) > 1e-4
  assert PerturbConfig().blur_pixels(224, 224) == 0.0
  with pytest.raises(ValueError, match="At most one of `blur_sigma` .* and `blur_fraction`"):
    PerturbConfig(blur_sigma=10.0, blur_fraction=0.08)
  for bad in (-0.1, float("nan"), "0.1"):
    with pytest.raises(ValueError, match="`blur_fraction` must be >= 0"):
      PerturbConfig(blur_fraction=bad)
  with pytest.raises(ValueError, match="`blur_fraction` is a fraction of the image side"):
    PerturbConfig(blur_fraction=8.0)
  # A vanishing blur leaves the image as it is (no NaN from the Gaussian's underflow).
  tiny, _ = objective(jnp.asarray(w), jnp.asarray(x), jnp.asarray(noise), labels, 1, classifier,
                      PerturbConfig(confidence="log_softmax", blur_fraction=1e-200))
  none, _ = objective(jnp.asarray(w), jnp.asarray(x), jnp.asarray(noise), labels, 1, classifier,
                      PerturbConfig(confidence="log_softmax"))
  np.testing.assert_allclose(tiny, none, rtol=1e-6)


@pytest.mark.parametrize("settings, field", [
    (dict(max_regions=8), "max_regions"),
    (dict(parameterization="guided", max_regions=8), "max_regions"),
    (dict(lowres_stride=4), "lowres_stride"),
    (dict(parameterization="region", lowres_stride=4), "lowres_stride"),
    (dict(noise_std=0.0, blur_sigma=2.0, noise_sigma=1.0), "noise_sigma"),
    (dict(consistency="off", sigma=2.0), "sigma"),
    (dict(consistency="off", kernel_size=3), "kernel_size"),
    (dict(batching="sequential", compute_batch=2), "compute_batch"),
    (dict(batching="map", compute_batch=2), "compute_batch")])
def test_config_refuses_a_setting_that_nothing_reads(settings, field):
  with pytest.raises(ValueError, match=f"`{field}` .* has no effect"):
    PerturbConfig(**settings)


@pytest.mark.parametrize("settings", [
    dict(parameterization="region", max_regions=8), dict(parameterization="lowres", lowres_stride=4),
    dict(parameterization="guided", lowres_stride=4), dict(noise_sigma=1.0),
    dict(consistency="coalition", sigma=2.0, kernel_size=3), dict(batching="dense", compute_batch=2),
    dict(batching="auto", compute_batch=2), dict(consistency="off", lowres_stride=8)])
def test_config_accepts_each_setting_where_it_is_read(settings):
  assert all(getattr(PerturbConfig(**settings), k) == v for k, v in settings.items())
