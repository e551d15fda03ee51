"""Faithfulness and localisation metrics for saliency maps, batched, one value per image.

Every metric takes saliency `[B, h, w]` at any resolution: it is resized bilinearly to the
image (or mask) size and min-max normalised per image into the explanation map E in [0, 1]; a
constant map becomes all ones. Metrics that need the model take RGB images `[B, H, W, 3] float32`
in [0, 1] and target classes `[B] int32`, and return `[B] float32`:

- `average_drop`, `increase_in_confidence` (Chattopadhay et al., Grad-CAM++, WACV 2018).
- `deletion_auc`, `insertion_auc` (Petsiuk et al., RISE, BMVC 2018).
- `pointing_game` (Zhang et al., "Top-down Neural Attention by Excitation Backprop", ECCV 2016).
- `relevance_mass` (Arras et al., "CLEVR-XAI", Information Fusion 2022: relevance mass accuracy).
- `model_randomization` (Adebayo et al., "Sanity Checks for Saliency Maps", NeurIPS 2018).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from pfc_jax._inputs import check_images
from pfc_jax.baselines import _common
from pfc_jax.classifier import Classifier

DELETION_STEPS = 32
STEPS_PER_PASS = 11
INSERTION_BLUR_SIGMA = 5.0
POINTING_TOLERANCE = 15.0


def explanation_maps(saliency: jax.Array, size: tuple[int, int]) -> jax.Array:
  """The explanation map E: `saliency [B, h, w]` resized to `size` and min-max normalised.

  Returns:
    `[B, *size] float32` in [0, 1]; a constant map becomes all ones.
  """
  return _common.min_max_normalize(_common.resize_maps(saliency, size))


def _check_saliency(saliency, batch_size: int) -> jax.Array:
  saliency = jnp.asarray(saliency)
  if saliency.ndim != 3 or saliency.shape[0] != batch_size:
    raise ValueError(
        f"`saliency` must have shape [{batch_size}, h, w] (one map per image), got "
        f"{tuple(saliency.shape)}.")
  if not isinstance(saliency, jax.core.Tracer) and not np.isfinite(np.asarray(saliency)).all():
    raise ValueError("`saliency` contains NaN or infinite values.")
  return saliency.astype(jnp.float32)


def _check_inputs(images, saliency, target) -> tuple[jax.Array, jax.Array, jax.Array]:
  images = check_images(images)
  return (images, _check_saliency(saliency, images.shape[0]),
          _common.check_target(target, images.shape[0]))


@jax.jit
def _confidences(classifier: Classifier, images: jax.Array, saliency: jax.Array,
                 target: jax.Array) -> tuple[jax.Array, jax.Array]:
  maps = explanation_maps(saliency, images.shape[1:3])
  clean = _common.target_probabilities(classifier, images, target)
  explained = _common.target_probabilities(classifier, images * maps[..., None], target)
  return clean, explained


def confidences(classifier: Classifier, images: jax.Array, saliency: jax.Array,
                target: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Target probabilities `(Y, O)` on the image and on the image times its explanation map.

  E multiplies the raw RGB image in [0, 1] (masked-out pixels turn black); the classifier's own
  normalisation applies afterwards. The same convention holds for every method.

  Args:
    classifier: The classifier.
    images: `[B, H, W, 3] float32` RGB in [0, 1].
    saliency: `[B, h, w]` saliency.
    target: `[B] int32` explained classes.

  Returns:
    `(Y, O)`, each `[B] float32` softmax probabilities of the target.
  """
  return _confidences(classifier, *_check_inputs(images, saliency, target))


def average_drop(classifier: Classifier, images: jax.Array, saliency: jax.Array,
                 target: jax.Array) -> jax.Array:
  """Average Drop per image: `max(0, Y - O) / Y` (a fraction; x100 for the usual %).

  Y and O as in `confidences` (Grad-CAM++, eq. 20). Lower is better.

  Returns:
    `[B] float32` in [0, 1].
  """
  clean, explained = confidences(classifier, images, saliency, target)
  return jnp.maximum(clean - explained, 0.0) / clean


def increase_in_confidence(classifier: Classifier, images: jax.Array, saliency: jax.Array,
                           target: jax.Array) -> jax.Array:
  """Increase in Confidence per image: `[O > Y]` (mean x100 gives the usual %).

  Y and O as in `confidences` (Grad-CAM++, eq. 21). Higher is better.

  Returns:
    `[B] float32`, 1.0 where the explanation map alone raises the target probability, else 0.0.
  """
  clean, explained = confidences(classifier, images, saliency, target)
  return (explained > clean).astype(jnp.float32)


def _gaussian_blur(images: jax.Array, sigma: float) -> jax.Array:
  """Separable Gaussian blur of `images [B, H, W, 3]`, radius 3 sigma, edge padding."""
  radius = max(1, int(np.ceil(3 * sigma)))
  taps = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2)
  taps = jnp.asarray(taps / taps.sum(), jnp.float32)
  padded = jnp.pad(images, ((0, 0), (radius, radius), (radius, radius), (0, 0)), mode="edge")
  kernel_h = jnp.tile(taps[:, None, None, None], (1, 1, 1, 3))
  kernel_w = jnp.tile(taps[None, :, None, None], (1, 1, 1, 3))
  conv = functools.partial(
      jax.lax.conv_general_dilated, window_strides=(1, 1), padding="VALID",
      dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=3)
  return conv(conv(padded, kernel_h), kernel_w)


@functools.partial(jax.jit, static_argnums=(0, 1))
def _curve_endpoints(insertion: bool, blur_sigma: float, images: jax.Array,
                     saliency: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Start and end images of the curve, and each pixel's rank in descending saliency order."""
  batch, height, width, _ = images.shape
  maps = explanation_maps(saliency, (height, width)).reshape(batch, -1)
  order = jnp.argsort(-maps, axis=1, stable=True)
  ranks = jax.vmap(lambda o: jnp.zeros_like(o).at[o].set(jnp.arange(o.shape[0], dtype=o.dtype)))(order)
  if insertion:
    return _gaussian_blur(images, blur_sigma), images, ranks.reshape(batch, height, width)
  return images, jnp.zeros_like(images), ranks.reshape(batch, height, width)


def _pixels_moved(num_steps: int, num_pixels: int, points: jax.Array) -> jax.Array:
  """Pixels moved by curve point `points` (`ceil(num_pixels / num_steps)` per step)."""
  return jnp.minimum(points * -(-num_pixels // num_steps), num_pixels)


def _curve_chunk(static: tuple[int, int], chunk: jax.Array, classifier: Classifier, start: jax.Array,
                 end: jax.Array, ranks: jax.Array, target: jax.Array) -> jax.Array:
  num_steps, steps_per_pass = static
  batch, height, width, _ = start.shape
  points, valid = _common.chunk_indices(chunk, steps_per_pass, num_steps + 1)
  moved = ranks[:, None] < _pixels_moved(num_steps, height * width, points)[None, :, None, None]
  mixed = jnp.where(moved[..., None], end[:, None], start[:, None])
  probs = _common.target_probabilities(
      classifier, mixed.reshape(-1, height, width, 3), jnp.repeat(target, steps_per_pass))
  probs = jnp.where(valid[None], probs.reshape(batch, steps_per_pass), 0.0)
  return jnp.zeros((batch, num_steps + 1), jnp.float32).at[:, points].add(probs)


def probability_curve(classifier: Classifier, images: jax.Array, saliency: jax.Array,
                      target: jax.Array, *, insertion: bool, num_steps: int = DELETION_STEPS,
                      steps_per_pass: int = STEPS_PER_PASS,
                      blur_sigma: float = INSERTION_BLUR_SIGMA) -> tuple[jax.Array, jax.Array]:
  """The RISE deletion or insertion curve: target probability as pixels move in saliency order.

  Pixels are taken in descending order of E (ties by raster order), `ceil(H * W / num_steps)`
  per step, giving `num_steps + 1` points from none to all moved. Deletion sets the moved pixels
  of the raw image to 0 (black); insertion starts from the image blurred by a Gaussian of
  `blur_sigma` pixels (edge padding) and copies the moved pixels back from the image.

  Args:
    classifier: The classifier.
    images: `[B, H, W, 3] float32` RGB in [0, 1].
    saliency: `[B, h, w]` saliency.
    target: `[B] int32` explained classes.
    insertion: Insertion curve if True, else deletion.
    num_steps: Number of steps; default 32.
    steps_per_pass: Curve points per image per forward pass (memory only); default 11.
    blur_sigma: Standard deviation of the insertion blur in pixels; default 5.0.

  Returns:
    `(fractions [num_steps + 1] float32, probabilities [B, num_steps + 1] float32)`.
  """
  if num_steps < 1 or steps_per_pass < 1 or blur_sigma <= 0:
    raise ValueError(
        "`num_steps` and `steps_per_pass` must be >= 1 and `blur_sigma` > 0, got "
        f"{num_steps}, {steps_per_pass} and {blur_sigma}.")
  images, saliency, target = _check_inputs(images, saliency, target)
  start, end, ranks = _curve_endpoints(bool(insertion), float(blur_sigma), images, saliency)
  static = (num_steps, steps_per_pass)
  probs = _common.sum_over_chunks(
      _curve_chunk, static, _common.num_chunks(num_steps + 1, steps_per_pass),
      classifier, start, end, ranks, target)
  num_pixels = images.shape[1] * images.shape[2]
  fractions = _pixels_moved(num_steps, num_pixels, jnp.arange(num_steps + 1)) / num_pixels
  return fractions.astype(jnp.float32), probs


def deletion_auc(classifier: Classifier, images: jax.Array, saliency: jax.Array, target: jax.Array,
                 **curve_options) -> jax.Array:
  """Area under the deletion curve (trapezoid over the fraction of pixels deleted). Lower is better.

  See `probability_curve` (`insertion=False`) for the protocol and `curve_options`.

  Returns:
    `[B] float32` in [0, 1].
  """
  fractions, probs = probability_curve(
      classifier, images, saliency, target, insertion=False, **curve_options)
  return jnp.trapezoid(probs, fractions, axis=1)


def insertion_auc(classifier: Classifier, images: jax.Array, saliency: jax.Array, target: jax.Array,
                  **curve_options) -> jax.Array:
  """Area under the insertion curve (trapezoid over the fraction of pixels inserted). Higher is better.

  See `probability_curve` (`insertion=True`) for the protocol and `curve_options`.

  Returns:
    `[B] float32` in [0, 1].
  """
  fractions, probs = probability_curve(
      classifier, images, saliency, target, insertion=True, **curve_options)
  return jnp.trapezoid(probs, fractions, axis=1)


def boxes_to_masks(boxes, size: tuple[int, int]) -> jax.Array:
  """`[B, 4]` integer boxes `(y0, x0, y1, x1)`, ends exclusive -> `[B, *size] bool` masks."""
  boxes = jnp.asarray(boxes)
  rows = jnp.arange(size[0])[None, :, None]
  cols = jnp.arange(size[1])[None, None, :]
  y0, x0, y1, x1 = (boxes[:, i, None, None] for i in range(4))
  return (rows >= y0) & (rows < y1) & (cols >= x0) & (cols < x1)


def _check_masks(masks, batch_size: int) -> jax.Array:
  masks = jnp.asarray(masks)
  if masks.ndim != 3 or masks.shape[0] != batch_size or masks.dtype != jnp.bool_:
    raise ValueError(
        f"`masks` must be [{batch_size}, H, W] bool (one object mask per image), got shape "
        f"{tuple(masks.shape)} and dtype {masks.dtype}.")
  return masks


@jax.jit
def _pointing_hits(saliency: jax.Array, masks: jax.Array, tolerance: jax.Array) -> jax.Array:
  batch, height, width = masks.shape
  maps = explanation_maps(saliency, (height, width)).reshape(batch, -1)
  peak_y, peak_x = jnp.divmod(jnp.argmax(maps, axis=1), width)
  rows = jnp.arange(height)[None, :, None] - peak_y[:, None, None]
  cols = jnp.arange(width)[None, None, :] - peak_x[:, None, None]
  near = rows ** 2 + cols ** 2 <= tolerance ** 2
  return jnp.any(near & masks, axis=(1, 2)).astype(jnp.float32)


def pointing_game(saliency: jax.Array, ground_truth: jax.Array,
                  tolerance: float = POINTING_TOLERANCE) -> jax.Array:
  """Pointing game: a hit when the saliency maximum lies within `tolerance` px of the object.

  Args:
    saliency: `[B, h, w]` saliency; resized to the mask size (the first maximum in raster order
      counts).
    ground_truth: Object masks `[B, H, W] bool`, or boxes `[B, 4]` int `(y0, x0, y1, x1)` (ends
      exclusive) in the pixel coordinates of `saliency`.
    tolerance: Euclidean distance in pixels; default 15 (Zhang et al.).

  Returns:
    `[B] float32`, 1.0 for a hit, else 0.0 (always 0.0 for an empty mask).
  """
  ground_truth = jnp.asarray(ground_truth)
  batch = ground_truth.shape[0] if ground_truth.ndim else 0
  saliency = _check_saliency(saliency, batch)
  if ground_truth.ndim == 2:
    if ground_truth.shape != (batch, 4) or not jnp.issubdtype(ground_truth.dtype, jnp.integer):
      raise ValueError(f"`ground_truth` boxes must be [{batch}, 4] integers, got shape "
                       f"{tuple(ground_truth.shape)} and dtype {ground_truth.dtype}.")
    ground_truth = boxes_to_masks(ground_truth, saliency.shape[1:])
  return _pointing_hits(saliency, _check_masks(ground_truth, batch), jnp.float32(tolerance))


@jax.jit
def _relevance_mass(saliency: jax.Array, masks: jax.Array) -> jax.Array:
  maps = explanation_maps(saliency, masks.shape[1:])
  return (maps * masks).sum(axis=(1, 2)) / maps.sum(axis=(1, 2))


def relevance_mass(saliency: jax.Array, masks: jax.Array) -> jax.Array:
  """Relevance mass accuracy: the share of the explanation map E that falls inside the object.

  Args:
    saliency: `[B, h, w]` saliency; resized to the mask size.
    masks: `[B, H, W] bool` object masks.

  Returns:
    `[B] float32` in [0, 1]: `sum(E * mask) / sum(E)`. A constant map scores the object's area share.
  """
  saliency = _check_saliency(saliency, jnp.shape(masks)[0] if jnp.ndim(masks) else 0)
  return _relevance_mass(saliency, _check_masks(masks, saliency.shape[0]))


def randomize_layers(params, key: jax.Array, layers: int | Sequence[str] = 1):
  """Re-draws the chosen layers' parameters from N(0, std(leaf)^2), leaf by leaf.

  Args:
    params: A parameter pytree.
    key: PRNG key.
    layers: An int k: the last k layers in the tree's order, a layer being the leaves that share
      a parent (e.g. a Flax module's `kernel` and `bias`); or layer names: every leaf with one of
      them in its path.

  Returns:
    A pytree like `params` with those leaves replaced.

  Raises:
    ValueError: if `layers` selects nothing or more layers than exist.
  """
  leaves_with_paths, treedef = jax.tree_util.tree_flatten_with_path(params)
  paths = [tuple(str(getattr(p, "key", getattr(p, "name", getattr(p, "idx", p)))) for p in path)
           for path, _ in leaves_with_paths]
  if isinstance(layers, int):
    parents = list(dict.fromkeys(path[:-1] for path in paths))
    if not 1 <= layers <= len(parents):
      raise ValueError(f"`layers` must be between 1 and {len(parents)}, got {layers}.")
    chosen = [path[:-1] in parents[-layers:] for path in paths]
  else:
    names = set(layers)
    chosen = [bool(names.intersection(path)) for path in paths]
    if not any(chosen):
      raise ValueError(f"`layers` {sorted(names)} match no parameter; paths are e.g. {paths[-1]}.")
  sizes = [int(np.size(leaf)) if pick else 0 for (_, leaf), pick in zip(leaves_with_paths, chosen)]
  noise = jnp.split(jax.random.normal(key, (sum(sizes),)), np.cumsum(sizes)[:-1])
  leaves = [
      (draw.reshape(jnp.shape(leaf)) * jnp.std(leaf)).astype(jnp.result_type(leaf)) if pick else leaf
      for draw, (_, leaf), pick in zip(noise, leaves_with_paths, chosen)]
  return jax.tree_util.tree_unflatten(treedef, leaves)


@jax.jit
def spearman(first: jax.Array, second: jax.Array) -> jax.Array:
  """Spearman rank correlation per image of two maps `[B, H, W]` (average ranks for ties).

  Returns:
    `[B] float32`; NaN where either map is constant.
  """
  def correlation(a, b):
    ra = jax.scipy.stats.rankdata(a.ravel())
    rb = jax.scipy.stats.rankdata(b.ravel())
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return (ra * rb).sum() / jnp.sqrt((ra ** 2).sum() * (rb ** 2).sum())

  return jax.vmap(correlation)(first.astype(jnp.float32), second.astype(jnp.float32))


def model_randomization(method_fn: Callable, classifier: Classifier, images: jax.Array,
                        target: jax.Array, key: jax.Array,
                        layers: int | Sequence[str] = 1) -> jax.Array:
  """Model-randomisation sanity check: how much a method's maps survive randomising the model.

  Runs `method_fn(classifier, images, target, key) -> [B, H, W]` on the classifier and on a copy
  whose chosen layers are re-drawn at random (`randomize_layers`), with the same method key, and
  compares the two maps. A faithful method should give low correlation (Adebayo et al. 2018).

  Args:
    method_fn: A saliency method with the baselines' call shape (config bound).
    classifier: The classifier.
    images: `[B, H, W, 3] float32` RGB in [0, 1].
    target: `[B] int32` explained classes (kept for the randomised model).
    key: PRNG key.
    layers: See `randomize_layers`; default 1 (the last layer).

  Returns:
    `[B] float32` Spearman rank correlation between the two maps.
  """
  params_key, method_key = jax.random.split(key)
  randomized = dataclasses.replace(
      classifier, params=randomize_layers(classifier.params, params_key, layers))
  before = method_fn(classifier, images, target, method_key)
  after = method_fn(randomized, images, target, method_key)
  return spearman(before, after)
