"""Extremal Perturbations: its pieces against direct formulas, the call contract, and the whole
method against the authors' TorchRay on the same shapes_cnn weights (optional extra `reference`)."""

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pfc_jax import baselines, evaluation, metrics, models, weights
from pfc_jax.baselines import extremal
from pfc_jax.benchmarks import shapes
from test_baselines import FAST_CONFIGS, colour_classifier, colour_images

FAST = FAST_CONFIGS["extremal_perturbation"]


def _direct_smooth_max_mask(params, shape, step, sigma, coldness=20.0):
  """TorchRay's full mask, pixel by pixel: the smooth max over the (2r + 1)^2 parameters around
  each pixel of g(|u - p_i| / sigma) m_i, p_i = margin + step i, clamped to [0, 1]."""
  margin, padding = sigma, 1 + math.ceil(2 * sigma / step)
  radius = 1 + math.ceil(sigma / step)
  h_in, w_in = params.shape
  out = [step * (math.ceil(z / step) + 2 * padding - 2 * radius) - step + 1 for z in shape]
  mask = np.zeros(out)
  for uy in range(out[0]):
    for ux in range(out[1]):
      values = []
      for ky in range(2 * radius + 1):
        for kx in range(2 * radius + 1):
          iy, ix = uy // step + ky - padding, ux // step + kx - padding
          m = params[iy, ix] if 0 <= iy < h_in and 0 <= ix < w_in else 0.0
          z = math.hypot(uy - (margin + step * iy), ux - (margin + step * ix)) / sigma
          values.append(math.exp(-2 * max(z - 0.5, 0.0) ** 2) * m)
      values = np.array(values)
      weights_ = np.exp(coldness * (values - values.max()))
      mask[uy, ux] = (values * weights_).sum() / weights_.sum()
  return np.clip(mask, 0.0, 1.0)


def test_the_mask_generator_is_the_smooth_max_of_bumps():
  rng = np.random.default_rng(0)
  shape, step, sigma = (9, 11), 3, 4.0
  generator = extremal.mask_generator(shape, step, sigma)
  params = rng.uniform(size=(2, *generator.shape_in)).astype(np.float32)
  cropped, full = jax.jit(type(generator).generate)(generator, jnp.asarray(params))
  assert generator.shape_in == (3, 4) and cropped.shape == (2, *shape)
  for k in range(2):
    direct = _direct_smooth_max_mask(params[k], shape, step, sigma)
    np.testing.assert_allclose(full[k], direct, atol=1e-5)
    m = round(sigma)
    np.testing.assert_array_equal(cropped[k], full[k, m:m + shape[0], m:m + shape[1]])


def test_the_area_loss_is_the_sorted_mask_against_the_reference():
  rng = np.random.default_rng(1)
  masks = rng.uniform(size=(3, 7, 9)).astype(np.float32)
  areas = (0.05, 0.3, 0.5)
  expected = []
  for mask, area in zip(masks, areas):
    reference = np.concatenate([np.zeros(int(63 * (1 - area))), np.ones(63 - int(63 * (1 - area)))])
    expected.append(np.mean((np.sort(mask.ravel()) - reference) ** 2))
  np.testing.assert_allclose(extremal.area_loss(jnp.asarray(masks), areas), expected, rtol=1e-6)
  np.testing.assert_array_equal(extremal.area_reference(63, 0.3), np.sort(
      np.concatenate([np.zeros(44), np.ones(19)])))
  binary = np.zeros((1, 10, 10), np.float32)
  binary[0, :2] = 1.0  # Exactly 20% kept: no penalty.
  assert float(extremal.area_loss(jnp.asarray(binary), (0.2,))[0]) == 0.0


def test_the_pyramid_goes_from_most_perturbed_to_the_input():
  rng = np.random.default_rng(2)
  image = jnp.asarray(rng.normal(size=(12, 10, 3)).astype(np.float32))
  for kind in ("blur", "fade"):
    pyramid = extremal.perturbation_pyramid(image, 3, kind, max_blur=2.0)
    assert pyramid.shape == (3, 12, 10, 3)
    np.testing.assert_allclose(pyramid[-1], image, atol=1e-6)
    masks = jnp.asarray(np.stack([np.ones((12, 10)), np.zeros((12, 10)), np.full((12, 10), 0.25)]),
                        jnp.float32)
    perturbed = extremal.apply_perturbation(pyramid, masks)
    np.testing.assert_allclose(perturbed[0], image, atol=1e-6)
    np.testing.assert_allclose(perturbed[1], pyramid[0], atol=1e-6)
    np.testing.assert_allclose(perturbed[2], (pyramid[0] + pyramid[1]) / 2, atol=1e-6)
  np.testing.assert_allclose(extremal.perturbation_pyramid(image, 3, "fade")[1], image / 2)
  blur = extremal.gaussian_blur_matrix(40, 2.0)  # Rows sum to 1 away from the (zero) border.
  np.testing.assert_allclose(blur[8:-8].sum(axis=1), 1.0, rtol=1e-6)
  assert blur[0].sum() < 0.6 and blur[0, 9] == 0.0  # Taps reach ceil(4 sigma) = 8 pixels.


def test_dampened_sgd_is_torch_sgd_with_dampening():
  optimizer = extremal.dampened_sgd(0.1, momentum=0.9, dampening=0.9)
  params = jnp.zeros(2)
  state = optimizer.init(params)
  grads = [np.array([1.0, -2.0]), np.array([0.5, 0.5]), np.array([-1.0, 3.0])]
  buffer, expected = None, np.zeros(2)
  for g in grads:
    updates, state = optimizer.update(jnp.asarray(g, jnp.float32), state)
    params = params + updates
    buffer = g if buffer is None else 0.9 * buffer + 0.1 * g
    expected = expected - 0.1 * buffer
  np.testing.assert_allclose(params, expected, rtol=1e-6)


@pytest.mark.parametrize("variant, reward", [
    ("preserve", "simple"), ("delete", "simple"), ("dual", "simple"), ("preserve", "contrastive")])
def test_each_variant_finds_the_red_square(variant, reward):
  images, masks = colour_images()
  config = extremal.ExtremalPerturbationConfig(
      step=2, sigma=3.0, max_iter=20, perturbation="fade", variant=variant, reward=reward)
  result = extremal.extremal_masks(colour_classifier(), images, np.zeros(2, np.int32), config)
  assert result.masks.shape == (2, 1, 16, 16) and result.rewards.shape == (2, 20, 1)
  saliency = result.masks[:, 0]
  np.testing.assert_array_equal(metrics.pointing_game(saliency, masks, tolerance=1.0), 1.0)
  assert np.all(metrics.relevance_mass(saliency, masks) > 3 * masks.mean(axis=(1, 2)))
  # The area constraint hardens: the penalty's weight grows, the mask approaches its area.
  assert np.all(result.penalties[:, -1] < result.penalties[:, 0])


def test_several_areas_grow_and_their_smoothed_sum_is_the_saliency():
  images, _ = colour_images()
  config = extremal.ExtremalPerturbationConfig(step=2, sigma=3.0, max_iter=20,
                                               perturbation="fade", areas=(0.05, 0.3))
  classifier, target = colour_classifier(), np.zeros(2, np.int32)
  masks = np.asarray(extremal.extremal_masks(classifier, images, target, config).masks)
  kept = masks.mean(axis=(2, 3))
  assert np.all(kept[:, 0] < kept[:, 1])
  saliency = extremal.extremal_perturbation(classifier, images, target, None, dataclasses.replace(
      config, smooth=0.1))
  assert saliency.shape == (2, 16, 16) and saliency.dtype == jnp.float32
  # smooth 0.1 of 16 px: sigma 1.6 px, taps out to 7 px, zero padding (TorchRay's imsmooth).
  blur = extremal.gaussian_blur_matrix(16, 1.6)
  np.testing.assert_allclose(saliency, blur @ masks.sum(axis=1) @ blur.T, atol=1e-5)


def test_image_alone_and_in_a_batch_agree_and_jit_changes_nothing():
  classifier = colour_classifier()
  images, _ = colour_images(2, seed=4)
  target = np.array([0, 1], np.int32)
  config = extremal.ExtremalPerturbationConfig(step=2, sigma=3.0, max_iter=3, perturbation="fade")
  batch = baselines.extremal_perturbation(classifier, images, target, None, config)
  alone = baselines.extremal_perturbation(classifier, images[1:2], target[1:2], None, config)
  np.testing.assert_array_equal(batch[1], alone[0])
  jitted = jax.jit(functools.partial(baselines.extremal_perturbation, key=None, config=config))
  np.testing.assert_allclose(jitted(classifier, images, target), batch, atol=1e-6)
  vmapped = baselines.extremal_perturbation(
      classifier, images, target, None, extremal.ExtremalPerturbationConfig(
          step=2, sigma=3.0, max_iter=3, perturbation="fade", batching="vmap"))
  # All masks start equal up to float rounding, which the "vmap" layout changes; the sort of the
  # area constraint breaks those near-ties, so the first step already differs (by 0.02 here).
  np.testing.assert_allclose(vmapped, batch, atol=0.1)


def test_repeated_calls_do_not_recompile():
  classifier = colour_classifier()
  images, _ = colour_images()
  config = extremal.ExtremalPerturbationConfig(step=2, sigma=3.0, max_iter=2)
  baselines.extremal_perturbation(classifier, images, np.zeros(2, np.int32), None, config)
  jitted = extremal._loop.jit_step(extremal._loop._paired_step(extremal._STAGE.step))
  size = jitted._cache_size()
  baselines.extremal_perturbation(classifier, images[::-1], np.ones(2, np.int32), None, config)
  assert jitted._cache_size() == size


@pytest.mark.parametrize("overrides, match", [
    (dict(areas=()), "areas"),
    (dict(areas=(0.1, 1.0)), "areas"),
    (dict(areas="big"), "areas"),
    (dict(num_levels=1), "num_levels"),
    (dict(step=0), "step"),
    (dict(step=2.5), "`step` must be an integer"),
    (dict(sigma=0.0), "sigma"),
    (dict(max_iter=0), "max_iter"),
    (dict(learning_rate=float("nan")), "learning_rate"),
    (dict(momentum=1.0), "momentum"),
    (dict(area_weight=-1.0), "area_weight"),
    (dict(area_weight_growth=0.9), "area_weight_growth"),
    (dict(smooth=-0.1), "smooth"),
    (dict(jitter="yes"), "jitter"),
    (dict(variant="both"), "variant"),
    (dict(perturbation="noise"), "perturbation"),
    (dict(reward="softmax"), "reward"),
    (dict(batching="map", driver="python"), "batching"),
])
def test_bad_configs_raise(overrides, match):
  with pytest.raises(ValueError, match=match):
    extremal.ExtremalPerturbationConfig(**overrides)


def test_a_single_area_number_and_a_list_become_a_tuple():
  assert extremal.ExtremalPerturbationConfig(areas=0.2).areas == (0.2,)
  config = extremal.ExtremalPerturbationConfig(areas=[0.1, 0.2])
  assert config.areas == (0.1, 0.2) and hash(config)


def test_the_tiny_preset_evaluates_it():
  images, masks = colour_images()
  config = evaluation.EvaluationConfig(methods=("extremal_perturbation",), preset="tiny",
                                       batch_size=2, protocols=("drop",))
  report = evaluation.evaluate(colour_classifier(), images, config, masks=masks, progress=False)
  scores = report["methods"]["extremal_perturbation"]
  assert 0.0 <= scores["pointing_game"] <= 100.0 and 0.0 <= scores["relevance_mass"] <= 1.0
  assert evaluation.TINY_BASELINES["extremal_perturbation"].max_iter < 10


# --- Against the reference implementation ------------------------------------------------------

def _torch_shapes_cnn(torch, variables):
  """pfc-jax's shapes_cnn in PyTorch (NCHW, OIHW kernels) with the same weights."""
  params = variables["params"]
  names = ("conv1_1", "conv1_2", "conv2_1", "conv2_2", "conv3_1", "conv3_2")

  class ShapesCNN(torch.nn.Module):
    def __init__(self):
      super().__init__()
      self.convs = torch.nn.ModuleList()
      for name in names:
        kernel = np.asarray(params[name]["kernel"])
        conv = torch.nn.Conv2d(kernel.shape[2], kernel.shape[3], 3, padding=1)
        conv.weight.data = torch.tensor(kernel.transpose(3, 2, 0, 1).copy())
        conv.bias.data = torch.tensor(np.asarray(params[name]["bias"]))
        self.convs.append(conv)
      kernel = np.asarray(params["fc"]["kernel"])
      self.fc = torch.nn.Linear(*kernel.shape)
      self.fc.weight.data = torch.tensor(kernel.T.copy())
      self.fc.bias.data = torch.tensor(np.asarray(params["fc"]["bias"]))

    def forward(self, x):
      for i, conv in enumerate(self.convs):
        if i in (2, 4):
          x = torch.nn.functional.max_pool2d(x, 2)
        x = torch.relu(conv(x))
      return self.fc(x.amax(dim=(2, 3)))

  return ShapesCNN().eval()


@pytest.fixture(scope="module")
def reference():
  torch = pytest.importorskip("torch", reason="the TorchRay comparison needs torch (extra `reference`)")
  torchray = pytest.importorskip("torchray.attribution.extremal_perturbation",
                                 reason="the TorchRay comparison needs torchray (extra `reference`)")
  torch.set_num_threads(1)
  variables = weights.load("shapes_cnn")
  classifier = models.classifier("shapes_cnn", variables)
  images = np.asarray(shapes.generate(2, 64, seed=1).images)
  target = np.asarray(classifier.logits(images).argmax(-1))
  normalised = np.asarray(classifier.normalize(images)).transpose(0, 3, 1, 2)  # NCHW, as TorchRay.
  net = _torch_shapes_cnn(torch, variables)
  with torch.no_grad():
    np.testing.assert_allclose(net(torch.tensor(normalised)).numpy(), classifier.logits(images),
                               atol=1e-4)
  return torch, torchray, net, classifier, images, target, normalised


@pytest.mark.filterwarnings("ignore:torch.meshgrid")
def test_the_pieces_match_torchray(reference):
  torch, torchray, _, _, _, _, normalised = reference
  pyramid = torchray.Perturbation(torch.tensor(normalised[:1]), num_levels=8)
  ours = extremal.perturbation_pyramid(jnp.asarray(normalised[0].transpose(1, 2, 0)), 8)
  np.testing.assert_allclose(ours, pyramid.pyramid.numpy().transpose(0, 2, 3, 1), atol=1e-5)
  rng = np.random.default_rng(0)
  masks = rng.uniform(size=(2, 64, 64)).astype(np.float32)
  np.testing.assert_allclose(
      extremal.apply_perturbation(ours, jnp.asarray(masks)),
      pyramid.apply(torch.tensor(masks[:, None])).numpy().transpose(0, 2, 3, 1), atol=1e-5)
  theirs = torchray.MaskGenerator((64, 64), 7, 21)
  generator = extremal.mask_generator((64, 64), 7, 21.0)
  assert tuple(theirs.shape_in) == generator.shape_in
  assert tuple(theirs.shape_out) == generator.shape_out
  params = rng.uniform(size=(2, *generator.shape_in)).astype(np.float32)
  cropped, full = theirs.generate(torch.tensor(params[:, None]))
  ours_cropped, ours_full = generator.generate(jnp.asarray(params))
  np.testing.assert_allclose(ours_full, full.numpy()[:, 0], atol=1e-5)
  np.testing.assert_allclose(ours_cropped, cropped.numpy()[:, 0], atol=1e-5)


def _spearman(a, b):
  rank = lambda x: np.argsort(np.argsort(x.ravel(), kind="stable"), kind="stable")
  return np.corrcoef(rank(a), rank(b))[0, 1]


@pytest.mark.filterwarnings("ignore:torch.meshgrid")
@pytest.mark.parametrize("variant", ["preserve", "delete", "dual"])
def test_the_masks_match_torchray(reference, variant):
  """TorchRay's defaults (blur, 8 levels, step 7, sigma 21, jitter, lr 0.01, momentum 0.9,
  weight 300 x 1.0035^t) at two areas; only max_iter is short.

  Measured (64 px shapes, shapes_cnn, 3 images): after 10 steps the masks differ by at most
  4e-4; after 30 by at most 0.04, with Spearman >= 0.9999 (preserve) and >= 0.997 (dual). Both start from the
  all-ones mask, whose sorted values tie across the area reference's boundary; which tied pixel
  is pushed down depends on the sort's tie order (torch's is not specified), a 0.2% difference
  in the first gradient. The deletion game, through this network's global max pool, amplifies
  such differences fastest (Spearman 0.94 after 30 steps), so it is compared after 10.
  """
  torch, torchray, net, classifier, images, target, normalised = reference
  steps = 10 if variant == "delete" else 20
  areas = (0.05, 0.2)
  config = extremal.ExtremalPerturbationConfig(max_iter=steps, areas=areas, variant=variant)
  ours = np.asarray(extremal.extremal_masks(classifier, images, target, config).masks)
  for i in range(len(images)):
    theirs, _ = torchray.extremal_perturbation(
        net, torch.tensor(normalised[i:i + 1]), int(target[i]), areas=list(areas),
        max_iter=steps, variant=variant)
    theirs = theirs.numpy()[:, 0]
    if variant == "delete":
      np.testing.assert_allclose(ours[i], theirs, atol=0.01)
    else:
      np.testing.assert_allclose(ours[i], theirs, atol=0.2)
      for k in range(len(areas)):
        assert _spearman(ours[i, k], theirs[k]) >= 0.99
