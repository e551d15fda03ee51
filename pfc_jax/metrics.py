"""Faithfulness, localisation and sanity metrics for saliency maps, batched, one value per image.

Every metric takes saliency `[B, h, w]` at any resolution: it is resized bilinearly to the
image (or mask) size and min-max normalised per image into the explanation map
`E = (s - min) / (max - min + eps)` in [0, 1] (`explanation_maps`). A constant map ranks no
pixel above another and becomes 0 everywhere: it keeps nothing. Metrics that need the model take
RGB images `[B, H, W, 3] float32` in [0, 1] and target classes `[B] int32`, and return
`[B] float32`; finite inputs give finite scores.

- `average_drop`, `increase_in_confidence` (Chattopadhay et al., Grad-CAM++, WACV 2018), with the
  normalisation and the value of masked-out pixels as options.
- `deletion_auc`, `insertion_auc` (Petsiuk et al., RISE, BMVC 2018); `rise_steps` gives RISE's
  own resolution of 224 pixels per step.
- `road` (Rong et al., "A Consistent and Efficient Evaluation Strategy for Attribution Methods",
  ICML 2022): remove and debias, with noisy linear imputation.
- `pointing_game` (Zhang et al., "Top-down Neural Attention by Excitation Backprop", ECCV 2016).
- `relevance_mass` (Arras et al., "CLEVR-XAI", Information Fusion 2022: relevance mass accuracy).
- `model_randomization` (Adebayo et al., "Sanity Checks for Saliency Maps", NeurIPS 2018), with
  `layer_order`, `randomize_layers` and `spearman`.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.extend.core as jex_core
import jax.numpy as jnp
import numpy as np

from pfc_jax._inputs import check_images
from pfc_jax.baselines import _common
from pfc_jax.classifier import Classifier

DELETION_STEPS = 32
STEPS_PER_PASS = 11
INSERTION_BLUR_SIGMA = 5.0
POINTING_TOLERANCE = 15.0
RISE_PIXELS_PER_STEP = 224
NORMALIZATIONS = ("minmax", "none")
MASKED_VALUES = ("black", "mean", "blur")
ROAD_FRACTIONS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
ROAD_NOISE_STD = 0.01
ROAD_TOLERANCE = 1e-5
# ROAD's imputation weights of the 8 neighbours: 1/6 direct, 1/12 diagonal (Rong et al., sec. 4).
_ROAD_WEIGHTS = np.array([[1, 2, 1], [2, 0, 2], [1, 2, 1]], np.float32) / 12
# Multigrid preconditioner of the imputation solver (`_multigrid`).
_COARSEST = 8
_SMOOTHING_SWEEPS = 2
_COARSEST_SWEEPS = 16
_JACOBI_DAMPING = 0.8


def explanation_maps(saliency: jax.Array, size: tuple[int, int],
                     normalization: str = "minmax") -> jax.Array:
  """The explanation map E: `saliency [B, h, w]` resized to `size`, normalised per map.

  Args:
    saliency: `[B, h, w]` saliency.
    size: `(H, W)` of the output.
    normalization: "minmax" (default): `(s - min) / (max - min + eps)`, so a constant map
      becomes 0 everywhere; "none": the resized map as produced.

  Returns:
    `[B, *size] float32`; in [0, 1] for "minmax".
  """
  maps = _common.resize_maps(saliency, size)
  return _common.min_max_normalize(maps) if normalization == "minmax" else maps


def _check_saliency(saliency, batch_size: int) -> jax.Array:
  saliency = jnp.asarray(saliency)
  if saliency.ndim != 3 or saliency.shape[0] != batch_size:
    raise ValueError(
        f"`saliency` must have shape [{batch_size}, h, w] (one map per image), got "
        f"{tuple(saliency.shape)}.")
  if not isinstance(saliency, jax.core.Tracer) and not np.isfinite(np.asarray(saliency)).all():
    raise ValueError("`saliency` contains NaN or infinite values.")
  return saliency.astype(jnp.float32)


def _check_inputs(classifier, images, saliency, target) -> tuple[jax.Array, jax.Array, jax.Array]:
  images = check_images(images)
  return (images, _check_saliency(saliency, images.shape[0]),
          _common.check_target(target, classifier, images))


def _check_choice(value: str, name: str, choices: tuple[str, ...]) -> str:
  if value not in choices:
    raise ValueError(f"`{name}` must be one of {choices}, got {value!r}.")
  return value


def _rgb(values: tuple[float, ...], classifier: Classifier) -> jax.Array:
  """Per-channel values given in the classifier's channel order, as `[3]` RGB."""
  return jnp.asarray(values[::-1] if classifier.bgr else values, jnp.float32)


def _masked_out(classifier: Classifier, images: jax.Array, masked_value: str) -> jax.Array:
  """What masked-out pixels show: black, the classifier's mean colour, or the blurred image."""
  if masked_value == "black":
    return jnp.zeros_like(images)
  if masked_value == "mean":
    return jnp.broadcast_to(_rgb(classifier.mean, classifier), images.shape)
  return _gaussian_blur(images, INSERTION_BLUR_SIGMA)


@functools.partial(jax.jit, static_argnames=("normalization", "masked_value"))
def _confidences(classifier: Classifier, images: jax.Array, saliency: jax.Array,
                 target: jax.Array, *, normalization: str, masked_value: str
                 ) -> tuple[jax.Array, jax.Array]:
  maps = explanation_maps(saliency, images.shape[1:3], normalization)[..., None]
  explained = maps * images + (1.0 - maps) * _masked_out(classifier, images, masked_value)
  clean = _common.target_probabilities(classifier, images, target)
  return clean, _common.target_probabilities(classifier, explained, target)


def confidences(classifier: Classifier, images: jax.Array, saliency: jax.Array,
                target: jax.Array, *, normalization: str = "minmax",
                masked_value: str = "black") -> tuple[jax.Array, jax.Array]:
  """Target probabilities `(Y, O)` on the image and on the image kept where E says.

  The explained image is `E * x + (1 - E) * m` for the raw RGB image x in [0, 1], with m the
  masked-out value; the classifier's own normalisation applies afterwards. The Grad-CAM++
  protocol (Chattopadhay et al., eq. 20-21) is the default: min-max E, black m (`E * x`).

  Args:
    classifier: The classifier.
    images: `[B, H, W, 3] float32` RGB in [0, 1].
    saliency: `[B, h, w]` saliency.
    target: `[B] int32` explained classes.
    normalization: "minmax" (default; see `explanation_maps`) or "none": the map as produced,
      which must then lie in [0, 1].
    masked_value: m: "black" (default, 0), "mean" (the classifier's mean colour, `mean` in RGB
      order, a grey for ImageNet models) or "blur" (the image blurred by a Gaussian of
      `INSERTION_BLUR_SIGMA` px, as the insertion curve starts from).

  Returns:
    `(Y, O)`, each `[B] float32` softmax probabilities of the target.

  Raises:
    ValueError: for an unknown option, a "none" map outside [0, 1], or bad inputs.
  """
  _check_choice(normalization, "normalization", NORMALIZATIONS)
  _check_choice(masked_value, "masked_value", MASKED_VALUES)
  images, saliency, target = _check_inputs(classifier, images, saliency, target)
  if normalization == "none" and not isinstance(saliency, jax.core.Tracer):
    low, high = float(saliency.min()), float(saliency.max())
    if low < 0.0 or high > 1.0:
      raise ValueError(
          f"`saliency` must lie in [0, 1] with normalization='none' (the map as produced), got "
          f"values in [{low:.4g}, {high:.4g}]; use normalization='minmax'.")
  return _confidences(classifier, images, saliency, target, normalization=normalization,
                      masked_value=masked_value)


def average_drop(classifier: Classifier, images: jax.Array, saliency: jax.Array,
                 target: jax.Array, **options: str) -> jax.Array:
  """Average Drop per image: `max(0, Y - O) / Y` (a fraction; x100 for the usual %).

  Y and O as in `confidences`, whose keyword `options` (`normalization`, `masked_value`) this
  takes (Grad-CAM++, eq. 20). Lower is better. A target probability that underflows to 0 drops
  by 0.

  Returns:
    `[B] float32` in [0, 1].
  """
  clean, explained = confidences(classifier, images, saliency, target, **options)
  return jnp.maximum(clean - explained, 0.0) / jnp.maximum(clean, np.finfo(np.float32).tiny)


def increase_in_confidence(classifier: Classifier, images: jax.Array, saliency: jax.Array,
                           target: jax.Array, **options: str) -> jax.Array:
  """Increase in Confidence per image: `[O > Y]` (mean x100 gives the usual %).

  Y and O as in `confidences`, whose keyword `options` this takes (Grad-CAM++, eq. 21).
  Higher is better.

  Returns:
    `[B] float32`, 1.0 where the explained image raises the target probability, else 0.0.
  """
  clean, explained = confidences(classifier, images, saliency, target, **options)
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


def _descending_ranks(saliency: jax.Array, size: tuple[int, int]) -> jax.Array:
  """`[B, H, W] int32`: each pixel's rank in descending order of E, ties in raster order."""
  maps = explanation_maps(saliency, size).reshape(saliency.shape[0], -1)
  order = jnp.argsort(-maps, axis=1, stable=True)
  ranks = jax.vmap(lambda o: jnp.zeros_like(o).at[o].set(jnp.arange(o.shape[0], dtype=o.dtype)))(order)
  return ranks.reshape(saliency.shape[0], *size)


@functools.partial(jax.jit, static_argnums=(0, 1))
def _curve_endpoints(insertion: bool, blur_sigma: float, images: jax.Array,
                     saliency: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Start and end images of the curve, and each pixel's rank in descending saliency order."""
  ranks = _descending_ranks(saliency, images.shape[1:3])
  if insertion:
    return _gaussian_blur(images, blur_sigma), images, ranks
  return images, jnp.zeros_like(images), ranks


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


def rise_steps(height: int, width: int, pixels_per_step: int = RISE_PIXELS_PER_STEP) -> int:
  """Curve steps that move `pixels_per_step` pixels each: `ceil(H * W / pixels_per_step)`.

  RISE (Petsiuk et al., sec. 4.1) moves 224 pixels per step on 224 px images (224 steps); the
  default 32 steps move 1568 there, so a curve cannot fall below about `p(x) / 64`.
  """
  if pixels_per_step < 1:
    raise ValueError(f"`pixels_per_step` must be >= 1, got {pixels_per_step}.")
  return -(-height * width // pixels_per_step)


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
    num_steps: Number of steps; default 32 (`rise_steps(H, W)` for RISE's 224 px per step).
    steps_per_pass: Curve points per image per forward pass (memory only); default 11.
    blur_sigma: Standard deviation of the insertion blur in pixels; default 5.0.

  Returns:
    `(fractions [num_steps + 1] float32, probabilities [B, num_steps + 1] float32)`.
  """
  if num_steps < 1 or steps_per_pass < 1 or blur_sigma <= 0:
    raise ValueError(
        "`num_steps` and `steps_per_pass` must be >= 1 and `blur_sigma` > 0, got "
        f"{num_steps}, {steps_per_pass} and {blur_sigma}.")
  images, saliency, target = _check_inputs(classifier, images, saliency, target)
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


def _neighbour_sum(x: jax.Array) -> jax.Array:
  """`[H, W, C]`: each pixel's sum of its 8 neighbours weighted by ROAD's weights (0 outside).

  The weights are `(outer([1, 2, 1], [1, 2, 1]) - 4 * centre) / 12`, so two shifted [1, 2, 1]
  sums do it: on XLA:CPU much faster than the same stencil as a grouped convolution.
  """
  padded = jnp.pad(x, ((1, 1), (1, 1), (0, 0)))
  rows = padded[:-2] + 2.0 * padded[1:-1] + padded[2:]
  return (rows[:, :-2] + 2.0 * rows[:, 1:-1] + rows[:, 2:] - 4.0 * x) / 12.0


def _masked_laplacian(removed: jax.Array) -> tuple[Callable, jax.Array]:
  """`(A, diag(A))` of the imputation system on the whole grid, for `removed [H, W, 1]` in {0, 1}.

  On removed pixels `A v = D v - W v` (D the in-bounds neighbour weight, W the weighted sum
  of removed neighbours); on kept pixels `A` is the identity. Symmetric positive definite when
  any pixel is kept, and block diagonal, so kept pixels never feed the removed ones.
  """
  kept = 1.0 - removed
  degree = _neighbour_sum(jnp.ones_like(removed))
  apply = lambda v: removed * (degree * v - _neighbour_sum(removed * v)) + kept * v
  return apply, removed * degree + kept


def _upsample2(x: jax.Array, axis: int) -> jax.Array:
  """Bilinear 2x upsampling along `axis` (pixel centres at half-pixel offsets, edges clamped)."""
  size = x.shape[axis]
  padded = jnp.concatenate([jax.lax.slice_in_dim(x, 0, 1, axis=axis), x,
                            jax.lax.slice_in_dim(x, size - 1, size, axis=axis)], axis=axis)
  before = jax.lax.slice_in_dim(padded, 0, size, axis=axis)
  after = jax.lax.slice_in_dim(padded, 2, size + 2, axis=axis)
  pair = jnp.stack([0.75 * x + 0.25 * before, 0.75 * x + 0.25 * after], axis=axis + 1)
  return pair.reshape(*x.shape[:axis], 2 * size, *x.shape[axis + 1:])


def _multigrid(removed: jax.Array, channels: int) -> Callable[[jax.Array], jax.Array]:
  """A symmetric multigrid V-cycle approximating the inverse of `_masked_laplacian(removed)`.

  Each level halves the grid (a 2x2 block stays removed when all its pixels are removed);
  damped Jacobi smoothing before and after the coarse correction, bilinear prolongation masked
  to the removed pixels and its transpose as restriction, so that the cycle is a symmetric
  positive definite preconditioner for conjugate gradients (Briggs et al., "A Multigrid
  Tutorial", 2000, ch. 3; Tatebe 1993, multigrid-preconditioned CG).
  """
  apply, diag = _masked_laplacian(removed)
  height, width = removed.shape[:2]
  coarse = None
  if min(height, width) >= 2 * _COARSEST:
    pad = ((0, height % 2), (0, width % 2), (0, 0))
    blocks = jnp.pad(removed, pad).reshape((height + 1) // 2, 2, (width + 1) // 2, 2, 1)
    coarse_removed = blocks.min(axis=(1, 3))
    coarse_shape = (*coarse_removed.shape[:2], channels)
    prolong = lambda e: removed * _upsample2(_upsample2(e, 0), 1)[:height, :width]
    # The transpose's example fixes the dtype of its cotangents: the grid's own (float32 also
    # under `jax_enable_x64`, where a bare `jnp.zeros` would be float64).
    zeros = jnp.zeros(coarse_shape, removed.dtype)
    (restrict,) = (lambda r: jax.linear_transpose(prolong, zeros)(r)[0],)
    coarse = (_multigrid(coarse_removed, channels), prolong, restrict)
  sweeps = _SMOOTHING_SWEEPS if coarse else _COARSEST_SWEEPS

  def cycle(residual: jax.Array) -> jax.Array:
    smooth = lambda _, e: e + _JACOBI_DAMPING * (residual - apply(e)) / diag
    e = jax.lax.fori_loop(1, sweeps, smooth, _JACOBI_DAMPING * residual / diag)
    if coarse:
      solve, prolong, restrict = coarse
      e = e + prolong(solve(restrict(residual - apply(e))))
    return jax.lax.fori_loop(0, sweeps, smooth, e)

  return cycle


def _impute(image: jax.Array, kept: jax.Array, tolerance: float) -> jax.Array:
  removed = 1.0 - kept.astype(image.dtype)
  apply, _ = _masked_laplacian(removed)
  rhs = removed * _neighbour_sum(image * (1.0 - removed))
  solution, _ = jax.scipy.sparse.linalg.cg(
      apply, rhs, tol=tolerance, maxiter=image.shape[0] * image.shape[1],
      M=_multigrid(removed, image.shape[-1]))
  return (1.0 - removed) * image + removed * solution


def linear_imputation(image: jax.Array, removed: jax.Array,
                      tolerance: float = ROAD_TOLERANCE) -> jax.Array:
  """ROAD's linear imputation of one image (Rong et al., ICML 2022, sec. 4).

  Every removed pixel becomes the weighted mean of its in-bounds 8 neighbours (weights 1/6
  direct, 1/12 diagonal, renormalised at the border), removed neighbours included: one sparse
  linear system over all removed pixels at once, as the reference code solves with `spsolve`.
  Its matrix is symmetric positive definite whenever a pixel is kept; here conjugate gradients
  on 3x3 stencils solve it, started from the solution at half resolution, until the residual
  is below `tolerance` times the right-hand side.

  Args:
    image: `[H, W, C] float32`.
    removed: `[H, W] bool`, True where a pixel is imputed; at least one pixel must be kept.
    tolerance: Relative residual at which the solver stops; default 1e-5.

  Returns:
    `[H, W, C] float32`: `image` where kept, the imputed values where removed.
  """
  return _impute(image, ~removed[..., None], tolerance)


class ROADCurves(NamedTuple):
  """ROAD's target probabilities at each removal fraction, per image.

  Attributes:
    fractions: `[F] float32` fractions of pixels removed.
    morf: `[B, F] float32`, most relevant removed first; lower is better.
    lerf: `[B, F] float32`, least relevant removed first; higher is better.
  """
  fractions: jax.Array
  morf: jax.Array
  lerf: jax.Array


def _road_chunk(static: tuple[tuple[int, ...], float, int], chunk: jax.Array,
                classifier: Classifier, images: jax.Array, ranks: jax.Array, target: jax.Array,
                keys: jax.Array) -> jax.Array:
  counts, noise_std, steps_per_pass = static
  batch, height, width, _ = images.shape
  num_points = 2 * len(counts)  # MoRF points first, then LeRF.
  points, valid = _common.chunk_indices(chunk, steps_per_pass, num_points)
  removing = jnp.asarray(counts * 2, jnp.int32)[points][None, :, None, None]
  lerf = (points >= len(counts))[None, :, None, None]
  removed = jnp.where(lerf, ranks[:, None] >= height * width - removing, ranks[:, None] < removing)
  imputed = jax.vmap(jax.vmap(linear_imputation, in_axes=(None, 0)))(images, removed)
  point_keys = jax.vmap(lambda k: jax.vmap(lambda p: jax.random.fold_in(k, p))(points))(keys)
  noise = jax.vmap(jax.vmap(lambda k: jax.random.normal(k, (height, width, 3), jnp.float32)))(
      point_keys)  # float32 draws: the same noise under `jax_enable_x64`.
  # Noise of `noise_std` in the classifier's normalised input, as the reference code adds it.
  noise = noise * noise_std * _rgb(classifier.std, classifier)
  imputed = imputed + removed[..., None] * noise
  probs = _common.target_probabilities(
      classifier, imputed.reshape(-1, height, width, 3), jnp.repeat(target, steps_per_pass))
  probs = jnp.where(valid[None], probs.reshape(batch, steps_per_pass), 0.0)
  return jnp.zeros((batch, num_points), jnp.float32).at[:, points].add(probs)


_ranks = jax.jit(_descending_ranks, static_argnums=1)


def road(classifier: Classifier, images: jax.Array, saliency: jax.Array, target: jax.Array,
         key: jax.Array | None = None, *, fractions: Sequence[float] = ROAD_FRACTIONS,
         noise_std: float = ROAD_NOISE_STD, steps_per_pass: int = STEPS_PER_PASS) -> ROADCurves:
  """ROAD: remove and debias (Rong et al., "A Consistent and Efficient Evaluation Strategy for
  Attribution Methods", ICML 2022).

  At each fraction p, the `min(round(p * H * W), H * W - 1)` most relevant (MoRF) or least
  relevant (LeRF) pixels of E are removed and replaced by noisy linear imputation: the
  `linear_imputation` of the raw RGB image plus Gaussian noise of standard deviation
  `noise_std` in the classifier's normalised input (`noise_std * std` per RGB channel), as
  their code does (`NoisyLinearImputer(noise=0.01)`). Imputing from the neighbours, rather than
  painting pixels black, leaves the shape of the removed set hard to read from the image, so
  the score measures the removed information, not the removal pattern. MoRF takes pixels in
  descending order of E with ties in raster order; LeRF takes that order reversed. The score of
  an order is the mean target probability over the fractions.

  Args:
    classifier: The classifier.
    images: `[B, H, W, 3] float32` RGB in [0, 1].
    saliency: `[B, h, w]` saliency.
    target: `[B] int32` explained classes.
    key: PRNG key of the noise: one key, split over the images, or `[B]` keys, one per image
      (then an image's noise does not depend on its batch); default `jax.random.key(0)`.
    fractions: Removal fractions in (0, 1); default 0.1, 0.2, ..., 0.9 (the paper's).
    noise_std: Imputation noise in the normalised input; default 0.01, 0 for none.
    steps_per_pass: Imputed images per image per forward pass (memory only); default 11.

  Returns:
    `ROADCurves(fractions [F], morf [B, F], lerf [B, F])` target probabilities.

  Raises:
    ValueError: for fractions outside (0, 1), a negative `noise_std`, bad keys or inputs.
  """
  fractions = tuple(float(f) for f in fractions)
  if (not fractions or not all(0.0 < f < 1.0 for f in fractions) or noise_std < 0
      or steps_per_pass < 1):
    raise ValueError(
        "`fractions` must be non-empty and in (0, 1), `noise_std` >= 0 and `steps_per_pass` >= 1, "
        f"got {fractions}, {noise_std} and {steps_per_pass}.")
  images, saliency, target = _check_inputs(classifier, images, saliency, target)
  batch, height, width, _ = images.shape
  key = jax.random.key(0) if key is None else key
  dtype = getattr(key, "dtype", None)
  if (dtype is None or not jnp.issubdtype(dtype, jax.dtypes.prng_key)
      or key.shape not in ((), (batch,))):
    raise ValueError(
        f"`key` must be one typed PRNG key (`jax.random.key`) or {batch} of them, got "
        f"{getattr(key, 'dtype', type(key))} of shape {getattr(key, 'shape', ())}.")
  keys = jax.random.split(key, batch) if key.shape == () else key
  num_pixels = height * width
  counts = tuple(min(round(f * num_pixels), num_pixels - 1) for f in fractions)
  ranks = _ranks(saliency, (height, width))
  probs = _common.sum_over_chunks(
      _road_chunk, (counts, float(noise_std), steps_per_pass),
      _common.num_chunks(2 * len(counts), steps_per_pass), classifier, images, ranks, target, keys)
  return ROADCurves(jnp.asarray(fractions, jnp.float32), probs[:, :len(counts)],
                    probs[:, len(counts):])


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
  return (jnp.any(near & masks, axis=(1, 2)) & (maps.max(axis=1) > 0)).astype(jnp.float32)


def pointing_game(saliency: jax.Array, ground_truth: jax.Array,
                  tolerance: float = POINTING_TOLERANCE) -> jax.Array:
  """Pointing game: a hit when the saliency maximum lies within `tolerance` px of the object.

  Args:
    saliency: `[B, h, w]` saliency; resized to the mask size (the first maximum in raster order
      counts; a constant map has no maximum and misses).
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
  total = maps.sum(axis=(1, 2))
  return (maps * masks).sum(axis=(1, 2)) / jnp.where(total > 0, total, 1.0)


def relevance_mass(saliency: jax.Array, masks: jax.Array) -> jax.Array:
  """Relevance mass accuracy: the share of the explanation map E that falls inside the object.

  Args:
    saliency: `[B, h, w]` saliency; resized to the mask size.
    masks: `[B, H, W] bool` object masks.

  Returns:
    `[B] float32` in [0, 1]: `sum(E * mask) / sum(E)`; 0 for a constant map (E is 0).
  """
  saliency = _check_saliency(saliency, jnp.shape(masks)[0] if jnp.ndim(masks) else 0)
  return _relevance_mass(saliency, _check_masks(masks, saliency.shape[0]))


def _path_names(path) -> tuple[str, ...]:
  return tuple(str(getattr(p, "key", getattr(p, "name", getattr(p, "idx", p)))) for p in path)



def _record_reads(jaxpr, leaf_of: dict, order: list[int]) -> None:
  """Appends to `order` the leaves of `leaf_of` (jaxpr variable -> leaf) in order of first read."""
  for eqn in jaxpr.eqns:
    read = [leaf_of[v] for v in eqn.invars if isinstance(v, jex_core.Var) and v in leaf_of]
    if not read:
      continue
    for sub in jex_core.jaxprs_in_params(eqn.params):
      # Inner jaxprs take the equation's last operands (pjit, scan, remat, custom_jvp: all of
      # them; cond: all but the branch index; while's body: all but the condition's constants).
      skipped = len(eqn.invars) - len(sub.invars)
      operands = eqn.invars[skipped:] if skipped >= 0 else []
      _record_reads(sub, {inner: leaf_of[outer] for inner, outer in zip(sub.invars, operands)
                          if isinstance(outer, jex_core.Var) and outer in leaf_of}, order)
    order.extend(leaf for leaf in read if leaf not in order)


def layer_order(apply_fn: Callable[[Any, jax.Array], jax.Array], params: Any,
                example: Any) -> list[tuple[str, ...]]:
  """The classifier's layers in the order its forward pass first reads their parameters.

  A layer is the leaves of `params` that share a parent path (e.g. a Flax module's `kernel` and
  `bias`). The order comes from tracing `apply_fn(params, example)` (`jax.make_jaxpr`, no
  computation): a layer's place is the first operation that reads one of its leaves, inner
  jaxprs (jit, scan, remat, cond) included. So the last layer is the one nearest the output,
  whatever the parameter names; parallel branches come in the order the code calls them, and
  leaves the forward pass never reads come first.

  Args:
    apply_fn: `apply_fn(params, x) -> logits`, e.g. `Classifier.apply_fn`.
    params: Its parameter pytree (arrays or `jax.ShapeDtypeStruct` values).
    example: An input of the right shape (array or `jax.ShapeDtypeStruct`), e.g. normalised
      images `[1, H, W, 3]`.

  Returns:
    Parent paths (tuples of names), from the input to the output.
  """
  closed = jax.make_jaxpr(apply_fn)(params, example)
  leaves = jax.tree_util.tree_flatten_with_path(params)[0]
  leaf_vars = closed.jaxpr.invars[:len(leaves)]
  order: list[int] = []
  _record_reads(closed.jaxpr, {v: i for i, v in enumerate(leaf_vars)}, order)
  unread = [i for i in range(len(leaves)) if i not in order]
  return list(dict.fromkeys(_path_names(leaves[i][0])[:-1] for i in unread + order))


def randomize_layers(params, key: jax.Array, layers: int | Sequence[str] = 1, *,
                     apply_fn: Callable[[Any, jax.Array], jax.Array] | None = None,
                     example: Any = None):
  """Re-draws the chosen layers' parameters from N(0, std(leaf)^2), leaf by leaf.

  Cascading randomisation (Adebayo et al. 2018, sec. 3.1) randomises the last k layers counted
  from the output; `layer_order` gives the model's own order, not the alphabetical one of the
  pytree (which puts SqueezeNet's `fire9` after `conv10`).

  Args:
    params: A parameter pytree.
    key: PRNG key.
    layers: An int k: the last k layers of `layer_order(apply_fn, params, example)`; or layer
      names: every leaf with one of them in its path.
    apply_fn: The forward pass `apply_fn(params, x) -> logits`; needed when `layers` is an int.
    example: An input of `apply_fn` (array or `jax.ShapeDtypeStruct`); needed with `apply_fn`.

  Returns:
    A pytree like `params` with those leaves replaced.

  Raises:
    ValueError: if `layers` selects nothing or more layers than exist, or is an int without
      `apply_fn` and `example`.
  """
  leaves_with_paths, treedef = jax.tree_util.tree_flatten_with_path(params)
  paths = [_path_names(path) for path, _ in leaves_with_paths]
  if isinstance(layers, int):
    if apply_fn is None or example is None:
      raise ValueError(
          "`layers` as a count needs `apply_fn` and `example`, to count layers in the order of "
          "the forward pass (the pytree's own order is alphabetical).")
    parents = layer_order(apply_fn, params, example)
    if not 1 <= layers <= len(parents):
      raise ValueError(f"`layers` must be between 1 and {len(parents)}, got {layers}.")
    chosen = [path[:-1] in parents[-layers:] for path in paths]
  else:
    names = set(layers)
    chosen = [bool(names.intersection(path)) for path in paths]
    if not any(chosen):
      raise ValueError(f"`layers` {sorted(names)} match no parameter; paths are e.g. {paths[-1]}.")
  sizes = [int(np.size(leaf)) if pick else 0 for (_, leaf), pick in zip(leaves_with_paths, chosen)]
  # float32 draws: the same parameters under `jax_enable_x64`.
  noise = jnp.split(jax.random.normal(key, (sum(sizes),), jnp.float32), np.cumsum(sizes)[:-1])
  leaves = [
      (draw.reshape(jnp.shape(leaf)) * jnp.std(leaf)).astype(jnp.result_type(leaf)) if pick else leaf
      for draw, (_, leaf), pick in zip(noise, leaves_with_paths, chosen)]
  return jax.tree_util.tree_unflatten(treedef, leaves)


def randomized_classifier(classifier: Classifier, key: jax.Array, images: jax.Array,
                          layers: int | Sequence[str] = 1) -> Classifier:
  """`classifier` with its last `layers` layers (or the named ones) re-drawn (`randomize_layers`).

  Args:
    classifier: The classifier.
    key: PRNG key.
    images: `[B, H, W, 3]` RGB images it will see; only their shape is read (for `layer_order`).
    layers: See `randomize_layers`; default 1 (the layer nearest the output).
  """
  example = jax.ShapeDtypeStruct((1, *jnp.shape(images)[1:]), jnp.float32)
  return dataclasses.replace(classifier, params=randomize_layers(
      classifier.params, key, layers, apply_fn=classifier.apply_fn, example=example))


@jax.jit
def spearman(first: jax.Array, second: jax.Array) -> jax.Array:
  """Spearman rank correlation per image of two maps `[B, H, W]` (average ranks for ties).

  Returns:
    `[B] float32` in [-1, 1]; where a map is constant its ranks carry no order: 1.0 when both
    are constant (the rankings are identical), 0.0 when one is.
  """
  def correlation(a, b):
    ra = jax.scipy.stats.rankdata(a.ravel())
    rb = jax.scipy.stats.rankdata(b.ravel())
    ra, rb = ra - ra.mean(), rb - rb.mean()
    norm = jnp.sqrt((ra ** 2).sum() * (rb ** 2).sum())
    both_constant = jnp.all(ra == 0) & jnp.all(rb == 0)
    return jnp.where(norm > 0, (ra * rb).sum() / jnp.where(norm > 0, norm, 1.0),
                     both_constant.astype(jnp.float32))

  # rankdata's ranks are float64 under `jax_enable_x64`; the correlation is float32 either way.
  return jax.vmap(correlation)(first.astype(jnp.float32), second.astype(jnp.float32)).astype(
      jnp.float32)


def model_randomization(method_fn: Callable, classifier: Classifier, images: jax.Array,
                        target: jax.Array, key: jax.Array,
                        layers: int | Sequence[str] = 1) -> jax.Array:
  """Model-randomisation sanity check: how much a method's maps survive randomising the model.

  Runs `method_fn(classifier, images, target, key) -> [B, H, W]` on the classifier and on a copy
  whose chosen layers are re-drawn at random (`randomized_classifier`), with the same method
  key, and compares the two maps. A faithful method should give low correlation (Adebayo et al.
  2018).

  Args:
    method_fn: A saliency method with the baselines' call shape (config bound).
    classifier: The classifier.
    images: `[B, H, W, 3] float32` RGB in [0, 1].
    target: `[B] int32` explained classes (kept for the randomised model).
    key: PRNG key.
    layers: See `randomize_layers`; default 1 (the layer nearest the output).

  Returns:
    `[B] float32` Spearman rank correlation between the two maps (`spearman`).
  """
  params_key, method_key = jax.random.split(key)
  randomized = randomized_classifier(classifier, params_key, images, layers)
  before = method_fn(classifier, images, target, method_key)
  after = method_fn(randomized, images, target, method_key)
  return spearman(before, after)
