"""Each baseline finds the evidence of a hand-built classifier; call-shape and argument checks."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pfc_jax import Classifier, CoalitionConfig, baselines, metrics, models, weights
from pfc_jax.baselines import _common
from pfc_jax.baselines.integrated_gradients import _gradient_chunk
from pfc_jax.baselines.rise import random_masks
from pfc_jax.benchmarks import shapes

SIZE = 16
# Channel 0 detects red, channel 1 green: a 1x1 convolution, ReLU, then 2x2 average pooling.
COLOUR_DETECTORS = np.array([[1.0, -0.5], [-0.5, 1.0], [-0.5, -0.5]], np.float32)


def colour_features(params, x):
  """`[B, H/2, W/2, 2]` redness and greenness maps of normalised images `x [B, H, W, 3]`."""
  features = jax.nn.relu(x @ params["detectors"])
  batch, height, width, channels = features.shape
  return features.reshape(batch, height // 2, 2, width // 2, 2, channels).mean(axis=(2, 4))


def colour_head(params, features):
  """Logits `[B, 2]`: class 0 = mean redness, class 1 = mean greenness, times a scale."""
  return params["scale"] * features.mean(axis=(1, 2))


def colour_apply(params, x):
  return colour_head(params, colour_features(params, x))


def colour_classifier() -> Classifier:
  """Classifies an image as red (0) or green (1) by its total amount of that colour."""
  params = {"detectors": jnp.asarray(COLOUR_DETECTORS), "scale": jnp.float32(60.0)}
  return Classifier(colour_apply, params, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0),
                    features_fn=colour_features, head_fn=colour_head)


def colour_images(count: int = 2, seed: int = 0):
  """Grey textured images with a red 5x5 square (the class-0 evidence) and a green distractor.

  Returns:
    `(images [count, 16, 16, 3] float32, masks [count, 16, 16] bool)`, masks marking the red square.
  """
  rng = np.random.default_rng(seed)
  images = np.repeat(rng.uniform(0.3, 0.6, (count, SIZE, SIZE, 1)), 3, axis=-1).astype(np.float32)
  masks = np.zeros((count, SIZE, SIZE), bool)
  for i in range(count):
    red_y, red_x = rng.integers(0, SIZE - 5, 2)
    green_y, green_x = (red_y + 8) % (SIZE - 3), (red_x + 8) % (SIZE - 3)
    images[i, green_y:green_y + 3, green_x:green_x + 3] = [0.1, 0.9, 0.1]
    images[i, red_y:red_y + 5, red_x:red_x + 5] = [0.9, 0.1, 0.1]
    masks[i, red_y:red_y + 5, red_x:red_x + 5] = True
  return images, masks


FAST_CONFIGS = {
    "gradcam": None,
    "scorecam": baselines.ScoreCAMConfig(chunk_size=1),
    "integrated_gradients": baselines.IntegratedGradientsConfig(num_steps=16, chunk_size=8),
    "occlusion": baselines.OcclusionConfig(patch_size=4, stride=2, chunk_size=16),
    "rise": baselines.RISEConfig(num_masks=800, cells=4, chunk_size=200),
    "xrai": baselines.XRAIConfig(steps=8, batch_size=8),
    # Black fill: under lime's default (a segment's mean colour) the uniform red square never
    # changes when switched off.
    "lime": baselines.LIMEConfig(
        num_samples=100, hide_color=0.0,
        segmentation=baselines.QuickshiftConfig(kernel_size=2, max_dist=20)),
    "lime_coalitions": baselines.LIMEConfig(num_samples=100, hide_color=0.0,
                                            segmentation=CoalitionConfig.tiny()),
    # Fade, not blur: blurring keeps this linear colour detector's mean redness.
    "extremal_perturbation": baselines.ExtremalPerturbationConfig(
        step=2, sigma=3.0, max_iter=20, perturbation="fade"),
    "attention_rollout": None,
}
# Baselines on an optional extra's package: their tests here skip without it.
OPTIONAL_PACKAGES = {"xrai": ("saliency.core", "xrai"), "lime": ("lime.lime_image", "lime"),
                     "lime_coalitions": ("lime.lime_image", "lime")}


def run_baseline(name, *args):
  """`baselines.METHODS[name](*args, FAST_CONFIGS[name])`, skipped without its optional package."""
  if name in OPTIONAL_PACKAGES:
    module, extra = OPTIONAL_PACKAGES[name]
    pytest.importorskip(module, reason=f"optional extra [{extra}] not installed")
  return baselines.METHODS[name](*args, FAST_CONFIGS[name])


# Their segmentations cannot isolate a 5 px square on 16 px images (XRAI's regions are dilated
# by 5 px and add at least 50 px); tests/test_groupwise_baselines.py checks them at 64 px.
SEGMENT_METHODS = ("xrai", "lime", "lime_coalitions")
# The methods that apply to the colour classifier: all but attention rollout, which needs a
# transformer's attention weights (tests/test_vit.py runs it on the shapes ViT).
COLOUR_METHODS = sorted(name for name in baselines.METHODS
                        if baselines.applicable(name, colour_classifier()))


@pytest.mark.parametrize("name", sorted(set(COLOUR_METHODS) - set(SEGMENT_METHODS)))
def test_baseline_finds_the_evidence_region(name):
  classifier = colour_classifier()
  images, masks = colour_images()
  target = np.zeros(2, np.int32)
  saliency = run_baseline(name, classifier, images, target, jax.random.key(0))
  assert saliency.shape == (2, SIZE, SIZE) and saliency.dtype == jnp.float32
  np.testing.assert_array_equal(metrics.pointing_game(saliency, masks, tolerance=1.0), 1.0)
  area_share = masks.mean(axis=(1, 2))
  assert np.all(metrics.relevance_mass(saliency, masks) > 1.5 * area_share)


def test_the_green_class_moves_the_evidence():
  classifier = colour_classifier()
  images, red_masks = colour_images()
  saliency = baselines.gradcam(classifier, images, np.ones(2, np.int32))
  np.testing.assert_array_equal(metrics.pointing_game(saliency, red_masks, tolerance=0.0), 0.0)


def test_rise_gives_one_key_and_split_keys_the_same_maps():
  classifier = colour_classifier()
  images, _ = colour_images()
  config = baselines.RISEConfig(num_masks=30, chunk_size=16)
  key = jax.random.key(3)
  target = np.zeros(2, np.int32)
  one = baselines.rise(classifier, images, target, key, config)
  split = baselines.rise(classifier, images, target, jax.random.split(key, 2), config)
  other = baselines.rise(classifier, images, target, jax.random.key(4), config)
  np.testing.assert_allclose(one, split)
  assert not np.allclose(one, other)


def test_rise_masks_keep_the_requested_share():
  masks = jax.jit(random_masks, static_argnums=(0, 2, 3, 4))(
      baselines.RISEConfig(keep_probability=0.3), jax.random.key(0), 200, 20, 24)
  assert masks.shape == (200, 20, 24)
  assert float(masks.min()) >= 0.0 and float(masks.max()) <= 1.0
  assert abs(float(masks.mean()) - 0.3) < 0.05


# Chunk sizes documented as memory only: one, one that leaves a partial last chunk, and one
# above the total.
_CHUNKED = {
    "integrated_gradients": lambda c: baselines.IntegratedGradientsConfig(num_steps=7, chunk_size=c),
    "occlusion": lambda c: baselines.OcclusionConfig(patch_size=4, stride=3, chunk_size=c),
    "rise": lambda c: baselines.RISEConfig(num_masks=23, cells=4, chunk_size=c),
    "scorecam": lambda c: baselines.ScoreCAMConfig(chunk_size=c),
}


@pytest.mark.parametrize("name", sorted(_CHUNKED))
def test_chunk_size_does_not_change_results(name):
  """Same maps for every chunk size. Equal to float32 rounding, not bit for bit: the chunks'
  sums are added in another grouping, and XLA may round a forward pass of another batch size
  differently."""
  classifier = colour_classifier()
  images, _ = colour_images()
  target = np.zeros(2, np.int32)
  maps = [np.asarray(baselines.METHODS[name](classifier, images, target, jax.random.key(2),
                                             _CHUNKED[name](chunk_size)))
          for chunk_size in (1, 5, 64)]
  for other in maps[1:]:
    np.testing.assert_allclose(other, maps[0], rtol=1e-5, atol=1e-6 * np.abs(maps[0]).max())


def test_rise_on_a_shapes_image_does_not_depend_on_the_chunk_size():
  """The reported case: 200 masks in chunks of 50 or of 40 differed by up to 0.08."""
  classifier = models.classifier("shapes_cnn", weights.load("shapes_cnn"))
  images = shapes.generate(1, size=64, seed=1).images
  target = np.asarray(jnp.argmax(classifier.logits(images), axis=-1), np.int32)
  maps = [baselines.rise(classifier, images, target, jax.random.key(0),
                         baselines.RISEConfig(num_masks=200, chunk_size=chunk_size))
          for chunk_size in (50, 40)]
  np.testing.assert_allclose(maps[1], maps[0], rtol=1e-5, atol=1e-6)


def test_rise_masks_are_drawn_per_mask_index():
  config, key = baselines.RISEConfig(cells=3), jax.random.key(4)
  draw = jax.jit(random_masks, static_argnums=(0, 2, 3, 4))
  np.testing.assert_array_equal(draw(config, key, 4, 12, 12, 6), draw(config, key, 10, 12, 12)[6:])


def test_repeated_calls_do_not_recompile():
  classifier = colour_classifier()
  images, _ = colour_images()
  config = FAST_CONFIGS["integrated_gradients"]
  target = np.zeros(2, np.int32)
  baselines.integrated_gradients(classifier, images, target, None, config)
  jitted = _common._jit_chunk(_gradient_chunk)
  size = jitted._cache_size()
  baselines.integrated_gradients(colour_classifier(), images[::-1], target + 1, None, config)
  assert jitted._cache_size() == size


def test_class_activation_methods_need_a_feature_split():
  classifier = Classifier(colour_apply, colour_classifier().params, mean=(0, 0, 0), std=(1, 1, 1))
  images, _ = colour_images()
  for method in (baselines.gradcam, baselines.scorecam):
    with pytest.raises(ValueError, match="features_fn"):
      method(classifier, images, np.zeros(2, np.int32))


@pytest.mark.parametrize("make_config, match", [
    (lambda: baselines.OcclusionConfig(stride=0), "stride"),
    (lambda: baselines.OcclusionConfig(fill=2.0), "fill"),
    (lambda: baselines.RISEConfig(keep_probability=0.0), "keep_probability"),
    (lambda: baselines.IntegratedGradientsConfig(num_steps=0), "num_steps"),
    (lambda: baselines.ScoreCAMConfig(chunk_size=0), "chunk_size"),
    (lambda: baselines.OcclusionConfig(patch_size=2.5), "`patch_size` must be an integer"),
    (lambda: baselines.RISEConfig(cells=True), "`cells` must be an integer"),
    (lambda: baselines.OcclusionConfig(fill=float("nan")), "fill"),
])
def test_bad_configs_raise(make_config, match):
  with pytest.raises(ValueError, match=match):
    make_config()


def test_bad_arguments_raise():
  classifier = colour_classifier()
  images, _ = colour_images()
  with pytest.raises(ValueError, match="target"):
    baselines.gradcam(classifier, images, np.zeros(3, np.int32))
  with pytest.raises(ValueError, match="config"):
    baselines.occlusion(classifier, images, np.zeros(2, np.int32), None, baselines.RISEConfig())


def test_occlusion_stride_beyond_the_patch_raises():
  """64x64 image, 8 px patches every 16 px: 61% of the pixels would have no score (NaN)."""
  with pytest.raises(ValueError, match=r"`stride` \(16\) must not exceed `patch_size` \(8\)"):
    baselines.OcclusionConfig(patch_size=8, stride=16)
  baselines.OcclusionConfig(patch_size=8, stride=8)  # Touching patches cover every pixel.


@pytest.mark.parametrize("name", sorted(baselines.METHODS))
@pytest.mark.parametrize("target", [[2, 2], [-1, -1], [0, 5]])
def test_targets_outside_the_classes_raise(name, target):
  classifier = colour_classifier()  # Two classes.
  images, _ = colour_images()
  with pytest.raises(ValueError, match=r"`target` must lie in .*\[0, 2\)"):
    baselines.METHODS[name](classifier, images, np.array(target), jax.random.key(0), FAST_CONFIGS[name])


def _degenerate_images(case: str) -> np.ndarray:
  """Two images of side 8 (the smallest accepted) or 16 for each degenerate case."""
  if case == "constant":
    return np.full((2, SIZE, SIZE, 3), 0.5, np.float32)
  if case == "black":
    return np.zeros((2, SIZE, SIZE, 3), np.float32)
  if case == "white":
    return np.ones((2, SIZE, SIZE, 3), np.float32)
  if case == "one_pixel_object":
    images = np.zeros((2, SIZE, SIZE, 3), np.float32)
    images[:, 7, 9] = [1.0, 0.0, 0.0]
    return images
  if case == "smallest":
    return colour_images()[0][:, :8, :8]
  raise ValueError(case)


@pytest.mark.parametrize("name", COLOUR_METHODS)
@pytest.mark.parametrize("case", ["constant", "black", "white", "one_pixel_object", "smallest",
                                  "saturated_logits"])
def test_degenerate_inputs_give_finite_maps(name, case):
  classifier = colour_classifier()
  if case == "saturated_logits":  # Probabilities exactly 1 and 0 (underflow) in float32.
    classifier = Classifier(colour_apply, {**classifier.params, "scale": jnp.float32(1e6)},
                            mean=(0, 0, 0), std=(1, 1, 1), features_fn=colour_features,
                            head_fn=colour_head)
    images = colour_images()[0]
  else:
    images = _degenerate_images(case)
  for target in (np.zeros(2, np.int32), np.ones(2, np.int32)):
    saliency = np.asarray(run_baseline(name, classifier, images, target, jax.random.key(0)))
    assert saliency.shape == images.shape[:3]
    assert np.isfinite(saliency).all(), f"{name} on {case} images, target {target[0]}"
