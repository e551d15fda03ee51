"""Extremal Perturbations (Fong, Patrick and Vedaldi, "Understanding Deep Networks via Extremal
Perturbations and Smooth Masks", ICCV 2019), after the authors' TorchRay implementation
(`torchray.attribution.extremal_perturbation`, version 1.0.0.2).

For each requested area a, EP looks for the smooth mask m of area a whose perturbed image keeps
the target score highest (the preservation game; the deletion game deletes it, the dual game
does both):

  m_a = argmax_m  Phi(m (x) x)  -  lambda_t R_a(m),   R_a(m) = mean_i (vecsort(m)_i - r_a,i)^2,

where m (x) x blends each pixel between the image and its most blurred version by m
(`perturbation_pyramid`, `apply_perturbation`), m is the smooth max of Gaussian-like bumps
placed every `step` pixels (`MaskGenerator`), and r_a is the sorted binary mask of area a: a
fraction 1 - a of zeros, then ones (`area_loss`). lambda_t grows geometrically with the
iteration, so the area constraint hardens as the optimisation (SGD with momentum,
`dampened_sgd`) proceeds. The pieces are public so that research code can combine them.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from pfc_jax import _loop
from pfc_jax._inputs import check_images
from pfc_jax.baselines import _common
from pfc_jax.classifier import Classifier

Perturbation = Literal["blur", "fade"]
Variant = Literal["preserve", "delete", "dual"]
Reward = Literal["simple", "contrastive"]
PERTURBATIONS = ("blur", "fade")
VARIANTS = ("preserve", "delete", "dual")
REWARDS = ("simple", "contrastive")
# The areas of the paper's pointing-game runs on PASCAL VOC (TorchRay's attribution benchmark).
PAPER_AREAS = (0.025, 0.05, 0.1, 0.2)


@dataclasses.dataclass(frozen=True)
class ExtremalPerturbationConfig:
  """Extremal Perturbation settings; defaults are TorchRay's `extremal_perturbation`.

  Attributes:
    areas: Target areas a, fractions of the image in (0, 1); one mask is optimised per area and
      the saliency map is their sum (as TorchRay's pointing-game benchmark sums its four masks).
      Default `(0.1,)`, TorchRay's default (the paper's benchmark uses `PAPER_AREAS`).
    perturbation: `"blur"`: Gaussian blur pyramid (default); `"fade"`: the input scaled towards
      0, which in the normalised input the classifier sees is the dataset mean colour.
    num_levels: L, levels of the perturbation pyramid between the maximal perturbation and the
      clean input; default 8.
    max_blur: Standard deviation in pixels of the most blurred level; default 20.
    step: Spacing in pixels of the mask's parameter grid; default 7.
    sigma: Radius scale in pixels of each parameter's bump; default 21 (= 3 step).
    max_iter: Optimisation steps per image; default 800.
    learning_rate: SGD learning rate; default 0.01.
    momentum: SGD momentum, with dampening equal to it as in TorchRay (see `dampened_sgd`);
      default 0.9.
    area_weight: lambda_0, weight of the area constraint at the first step; default 300.
    area_weight_growth: Factor applied to the weight after each step (lambda_t = lambda_0
      growth^t); default 1.0035 (x16.4 after 800 steps).
    jitter: Flip the perturbed input horizontally at every even step (TorchRay's `jitter`, which
      is deterministic: it needs no key); default True.
    variant: `"preserve"` (default): the mask keeps what raises the target; `"delete"`: deleting
      the mask lowers it; `"dual"`: both, rewarding the difference.
    reward: `"simple"` (default): the target logit; `"contrastive"`: the target logit minus the
      largest other logit.
    smooth: Gaussian blur of each final mask, standard deviation `smooth * min(H, W)` pixels
      with zero padding (TorchRay's `smooth`; its pointing-game benchmark uses 0.09); default 0.
    batching: Image layout of `pfc_jax._loop.run_images`; default "auto".
    driver: Step loop driver of `pfc_jax._loop.run_loop`; default "auto" (a Python loop of one
      jitted step on CPU, a compiled loop elsewhere).

  TorchRay's `resize` is not needed: the masks come out at the input's size. The mask
  generator's coldness (20) and clamping to [0, 1] are TorchRay's fixed choices.

  Raises:
    ValueError: naming the first setting that is out of range.
  """

  areas: tuple[float, ...] = (0.1,)
  perturbation: Perturbation = "blur"
  num_levels: int = 8
  max_blur: float = 20.0
  step: int = 7
  sigma: float = 21.0
  max_iter: int = 800
  learning_rate: float = 0.01
  momentum: float = 0.9
  area_weight: float = 300.0
  area_weight_growth: float = 1.0035
  jitter: bool = True
  variant: Variant = "preserve"
  reward: Reward = "simple"
  smooth: float = 0.0
  batching: _loop.Batching = "auto"
  driver: _loop.Driver = "auto"

  def __post_init__(self):
    areas = (self.areas,) if isinstance(self.areas, (int, float)) else self.areas
    try:
      areas = tuple(float(a) for a in areas)
    except (TypeError, ValueError):
      raise ValueError(f"`areas` must be numbers in (0, 1), got {self.areas!r}.") from None
    if not areas or not all(0.0 < a < 1.0 for a in areas):
      raise ValueError(f"`areas` must be one or more numbers in (0, 1), got {self.areas!r}.")
    object.__setattr__(self, "areas", areas)
    _common.check_positive_ints(self, "step", "max_iter")
    if isinstance(self.num_levels, bool) or not isinstance(self.num_levels, int) or self.num_levels < 2:
      raise ValueError(f"`num_levels` must be an integer >= 2, got {self.num_levels!r}.")
    for name in ("max_blur", "sigma", "learning_rate", "area_weight"):
      _check_number(self, name, lambda v: v > 0, "> 0")
    _check_number(self, "momentum", lambda v: 0 <= v < 1, "in [0, 1)")
    _check_number(self, "area_weight_growth", lambda v: v >= 1, ">= 1")
    _check_number(self, "smooth", lambda v: v >= 0, ">= 0")
    _check_choice(self, "perturbation", PERTURBATIONS)
    _check_choice(self, "variant", VARIANTS)
    _check_choice(self, "reward", REWARDS)
    if not isinstance(self.jitter, bool):
      raise ValueError(f"`jitter` must be True or False, got {self.jitter!r}.")
    _loop.check_batching(self.batching, self.driver)


def _check_number(config: Any, name: str, valid, text: str) -> None:
  value = getattr(config, name)
  if isinstance(value, bool) or not isinstance(value, (int, float, np.number)) or not (
      math.isfinite(value) and valid(value)):
    raise ValueError(f"`{name}` must be a finite number {text}, got {value!r}.")


def _check_choice(config: Any, name: str, choices: tuple[str, ...]) -> None:
  if getattr(config, name) not in choices:
    raise ValueError(f"`{name}` must be one of {choices}, got {getattr(config, name)!r}.")


# --- Perturbation ------------------------------------------------------------------------------

def gaussian_blur_matrix(size: int, sigma: float) -> np.ndarray:
  """The `[size, size] float32` matrix G of TorchRay's 1-D Gaussian smoothing (`imsmooth`):
  taps exp(-i^2 / (2 sigma^2)) for |i| <= ceil(4 sigma), normalised to sum 1, zero padding, so
  that `G @ v` blurs `v [size]`. sigma 0 gives the identity."""
  radius = math.ceil(4 * sigma)
  offsets = np.arange(-radius, radius + 1, dtype=np.float32)
  taps = np.exp(-(offsets / np.float32(np.sqrt(2.0) * sigma + np.finfo(np.float32).eps)) ** 2)
  taps /= taps.sum()
  index = np.arange(size)
  delta = index[None, :] - index[:, None]
  return np.where(np.abs(delta) <= radius, taps[np.clip(delta + radius, 0, 2 * radius)],
                  0.0).astype(np.float32)


def gaussian_smooth(x: jax.Array, sigma: float) -> jax.Array:
  """TorchRay's `imsmooth` of `x [..., H, W, K]`: separable Gaussian of standard deviation `sigma`
  pixels truncated at 4 sigma, zero padding (the border fades towards 0).

  Returns:
    `[..., H, W, K] float32`; `x` itself for sigma 0.
  """
  if not sigma:
    return x
  rows = jnp.asarray(gaussian_blur_matrix(x.shape[-3], sigma))
  cols = jnp.asarray(gaussian_blur_matrix(x.shape[-2], sigma))
  highest = jax.lax.Precision.HIGHEST
  x = jnp.einsum("ah,...hwk->...awk", rows, x, precision=highest)
  return jnp.einsum("bw,...awk->...abk", cols, x, precision=highest)


def perturbation_pyramid(x: jax.Array, num_levels: int = 8, kind: Perturbation = "blur",
                         max_blur: float = 20.0) -> jax.Array:
  """The L increasingly perturbed copies of one image (TorchRay's `Perturbation`).

  Level l = 0 .. L-1 has s_l = l / (L - 1): for `"blur"` the image blurred by
  `gaussian_smooth` with sigma (1 - s_l) max_blur, for `"fade"` the image times s_l. Level 0 is
  the most perturbed, level L-1 the image itself.

  Args:
    x: `[H, W, C] float32`, the tensor to perturb (here the classifier's normalised input).
    num_levels: L >= 2.
    kind: `"blur"` or `"fade"`.
    max_blur: Standard deviation in pixels of level 0's blur.

  Returns:
    `[L, H, W, C] float32`.
  """
  levels = np.linspace(0.0, 1.0, num_levels, dtype=np.float32)
  if kind == "fade":
    return jnp.asarray(levels)[:, None, None, None] * x[None]
  return jnp.stack([gaussian_smooth(x, float((1 - s) * np.float32(max_blur))) for s in levels])


def apply_perturbation(pyramid: jax.Array, masks: jax.Array) -> jax.Array:
  """Blends each pixel between pyramid levels by the mask (TorchRay's `Perturbation.apply`).

  At a pixel with mask value m the output is the pyramid linearly interpolated at level
  m (L - 1): m = 1 keeps the input, m = 0 takes the most perturbed level.

  Args:
    pyramid: `[L, H, W, C]` from `perturbation_pyramid`.
    masks: `[K, H, W]` in [0, 1].

  Returns:
    `[K, H, W, C] float32`, one perturbed input per mask.
  """
  num_levels = pyramid.shape[0]
  scaled = masks * (num_levels - 1)
  level = jnp.floor(scaled)
  frac = (scaled - level)[..., None]
  level = jax.lax.stop_gradient(level).astype(jnp.int32)
  rows, cols = jnp.arange(masks.shape[1])[:, None], jnp.arange(masks.shape[2])[None, :]
  lower = pyramid[level, rows, cols]
  upper = pyramid[jnp.minimum(level + 1, num_levels - 1), rows, cols]
  return (1 - frac) * lower + frac * upper


# --- Mask generator ----------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class MaskGenerator:
  """Smooth masks from a coarse parameter grid (TorchRay's `MaskGenerator`, paper section 3.3).

  A `[h, w]` grid of parameters m_i in [0, 1], spaced `step` pixels apart, makes a mask on the
  image plus a margin of `sigma` pixels on each side:

    m(u) = smax_i g(|u - u_i| / sigma) m_i,   g(z) = exp(-2 max(z - 1/2, 0)^2),

  over the (2 radius + 1)^2 parameters nearest to u, where smax_i a_i = sum_i a_i softmax(T a)_i
  with coldness T = 20, clamped to [0, 1]. Build it with `mask_generator`; it is a pytree (the
  weights are its leaf), so it passes through `jax.jit`.

  Attributes:
    weight: `[*shape_out, (2 radius + 1)^2] float32`, g at every output pixel for each of its
      neighbouring parameters (row-major over the neighbourhood; the neighbourhood axis last,
      which XLA:CPU reduces over more than 10x faster than a leading one).
    shape: `(H, W)`, the image size.
    step: Parameter spacing in pixels.
    sigma: Bump radius scale in pixels; also the margin.
    coldness: T of the smooth max.
  """

  weight: jax.Array
  shape: tuple[int, int]
  step: int
  sigma: float
  coldness: float = 20.0

  @property
  def margin(self) -> int:
    """Pixels of margin on each side of the full mask: round(sigma)."""
    return round(self.sigma)

  @property
  def padding(self) -> int:
    """Zero parameters padded around the grid: 1 + ceil(2 sigma / step)."""
    return 1 + math.ceil((self.sigma + self.sigma) / self.step)

  @property
  def radius(self) -> int:
    """Neighbourhood radius in parameters: 1 + ceil(sigma / step)."""
    return 1 + math.ceil(self.sigma / self.step)

  @property
  def shape_in(self) -> tuple[int, int]:
    """`(h, w)` of the parameter grid: ceil(H / step), ceil(W / step)."""
    return tuple(math.ceil(z / self.step) for z in self.shape)

  @property
  def shape_mid(self) -> tuple[int, int]:
    """Parameter cells covered by the full mask."""
    return tuple(z + 2 * self.padding - 2 * self.radius for z in self.shape_in)

  @property
  def shape_out(self) -> tuple[int, int]:
    """`(Ho, Wo)` of the full mask, image and margins: step * shape_mid - step + 1."""
    return tuple(self.step * z - self.step + 1 for z in self.shape_mid)

  def generate(self, params: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The masks of `params [K, h, w]` (`shape_in`).

    Returns:
      `(cropped [K, H, W], full [K, Ho, Wo])` float32 in [0, 1]: the mask on the image, and the
      same with its margins (`shape_out`), which the area constraint reads.
    """
    width = 2 * self.radius + 1
    (mid_h, mid_w), (out_h, out_w) = self.shape_mid, self.shape_out
    padded = jnp.pad(params, ((0, 0), (self.padding,) * 2, (self.padding,) * 2))
    neighbours = jnp.stack([padded[:, ky:ky + mid_h, kx:kx + mid_w]
                            for ky in range(width) for kx in range(width)], axis=-1)
    cells = jnp.repeat(jnp.repeat(neighbours, self.step, axis=1), self.step, axis=2)
    bumps = self.weight * cells[:, :out_h, :out_w]
    # The smooth max sum_k a_k softmax(T a)_k, its two sums over the neighbourhood as products
    # with a vector of ones: XLA:CPU runs them as matrix-vector products, a third of the step's
    # time faster than reductions over a minor axis of 81 (measured at 224 px).
    ones = jnp.ones(bumps.shape[-1], bumps.dtype)
    highest = jax.lax.Precision.HIGHEST
    powers = jnp.exp(self.coldness * (bumps - jax.lax.stop_gradient(bumps.max(-1, keepdims=True))))
    pooled = (jnp.dot(bumps * powers, ones, precision=highest)
              / jnp.dot(powers, ones, precision=highest))
    # TorchRay's clamp: the gradient passes wherever 0 <= value <= 1, bounds included.
    full = jnp.where(pooled < 0, 0.0, jnp.where(pooled > 1, 1.0, pooled))
    m = self.margin
    return full[:, m:m + self.shape[0], m:m + self.shape[1]], full


jax.tree_util.register_dataclass(
    MaskGenerator, data_fields=["weight"], meta_fields=["shape", "step", "sigma", "coldness"])


@functools.lru_cache(maxsize=8)
def mask_generator(shape: tuple[int, int], step: int = 7, sigma: float = 21.0,
                   coldness: float = 20.0) -> MaskGenerator:
  """The `MaskGenerator` for `(H, W)` images, its weights computed once (cached).

  Parameter i sits at pixel sigma + step i of the full mask (about step i of the image); output
  pixel u sees parameters u // step + k - padding for k in [0, 2 radius] (zero outside the grid).

  Args:
    shape: `(H, W)` of the image.
    step: Parameter spacing in pixels, an integer >= 1.
    sigma: Bump radius scale in pixels, > 0.
    coldness: T of the smooth max.
  """
  shape = tuple(int(z) for z in shape)
  geometry = MaskGenerator(jnp.zeros(()), shape, int(step), float(sigma), float(coldness))
  width, margin, padding = 2 * geometry.radius + 1, geometry.sigma, geometry.padding
  uy, ux = (np.arange(z, dtype=np.float32) for z in geometry.shape_out)
  k = np.arange(width, dtype=np.float32)
  iy = (uy[None, :] // step + k[:, None] - padding)  # [width, Ho]: parameter row per offset.
  ix = (ux[None, :] // step + k[:, None] - padding)
  dy = uy[None, :] - (margin + step * iy)
  dx = ux[None, :] - (margin + step * ix)
  delta = np.sqrt(dy.T[:, None, :, None] ** 2 + dx.T[None, :, None, :] ** 2)  # [Ho, Wo, ky, kx]
  weight = np.exp(-2 * np.maximum(delta / np.float32(sigma) - 0.5, 0) ** 2).astype(np.float32)
  return dataclasses.replace(geometry, weight=jnp.asarray(weight.reshape(*delta.shape[:2], -1)))


# --- Area constraint, reward, optimiser --------------------------------------------------------

def area_reference(num_pixels: int, area: float) -> np.ndarray:
  """r_a: `[num_pixels] float32`, int(num_pixels (1 - area)) zeros followed by ones (the sorted
  values of a binary mask of area `area`)."""
  reference = np.ones(num_pixels, np.float32)
  reference[:int(num_pixels * (1 - area))] = 0.0
  return reference


def area_loss(masks: jax.Array, areas: tuple[float, ...]) -> jax.Array:
  """Area constraint R_a(m) = mean_i (vecsort(m)_i - r_a,i)^2 of each mask (paper eq. 5, a mean
  rather than a sum as in TorchRay).

  Args:
    masks: `[K, ...]` masks in [0, 1] (TorchRay uses the full masks, margins included).
    areas: K target areas in (0, 1), one per mask.

  Returns:
    `[K] float32`, 0 for a binary mask of exactly the target area.
  """
  flat = masks.reshape(masks.shape[0], -1)
  num_pixels = flat.shape[1]
  zeros = jnp.asarray([int(num_pixels * (1 - a)) for a in areas], jnp.int32)
  reference = (jnp.arange(num_pixels)[None, :] >= zeros[:, None]).astype(flat.dtype)
  return jnp.mean((jnp.sort(flat, axis=1) - reference) ** 2, axis=1)


class DampenedTraceState(NamedTuple):
  """The momentum buffer of `dampened_sgd` and the number of updates so far."""

  trace: Any
  count: jax.Array


def dampened_sgd(learning_rate: float, momentum: float = 0.9,
                 dampening: float = 0.9) -> optax.GradientTransformation:
  """`torch.optim.SGD(lr, momentum, dampening)` as an optax transformation.

  b_1 = g_1, b_t = momentum b_{t-1} + (1 - dampening) g_t, update = -learning_rate b_t.
  optax's `sgd` has no dampening; TorchRay sets dampening = momentum, which makes b an
  exponential moving average of the gradients that starts at the first gradient.
  """
  def init(params):
    return DampenedTraceState(jax.tree.map(jnp.zeros_like, params), jnp.zeros((), jnp.int32))

  def update(updates, state, params=None):
    del params
    first = state.count == 0
    trace = jax.tree.map(lambda g, b: jnp.where(first, g, momentum * b + (1 - dampening) * g),
                         updates, state.trace)
    return trace, DampenedTraceState(trace, state.count + 1)

  return optax.chain(optax.GradientTransformation(init, update),
                     optax.scale_by_learning_rate(learning_rate))


def _optimizer(config: ExtremalPerturbationConfig) -> optax.GradientTransformation:
  return dampened_sgd(config.learning_rate, config.momentum, config.momentum)


def reward(logits: jax.Array, target: jax.Array, kind: Reward = "simple") -> jax.Array:
  """Phi per perturbed input: the target logit (`"simple"`), or the target logit minus the
  largest other logit (`"contrastive"`), of `logits [N, C]`; returns `[N] float32`."""
  logits = logits.astype(jnp.float32)
  score = logits[:, target]
  if kind == "contrastive":
    others = jnp.where(jnp.arange(logits.shape[1]) == target, -jnp.inf, logits)
    score = score - others.max(axis=1)
  return score


# --- One image's optimisation ------------------------------------------------------------------

class _State(NamedTuple):
  pyramid: jax.Array  # [L, H, W, 3]
  target: jax.Array  # [] int32
  params: jax.Array  # [K, h, w] mask parameters in [0, 1]
  opt_state: optax.OptState
  masks: jax.Array  # [K, H, W], the masks of the last step
  step: jax.Array  # [] int32


def _prepare(config: ExtremalPerturbationConfig, shared, inputs) -> _State:
  classifier, generator = shared
  image, target = inputs
  pyramid = perturbation_pyramid(classifier.normalize(image), config.num_levels,
                                 config.perturbation, config.max_blur)
  params = jnp.ones((len(config.areas), *generator.shape_in), jnp.float32)
  return _State(pyramid, target, params, _optimizer(config).init(params),
                jnp.zeros((len(config.areas), *image.shape[:2]), jnp.float32),
                jnp.zeros((), jnp.int32))


def _energy(params, config: ExtremalPerturbationConfig, classifier: Classifier,
            generator: MaskGenerator, state: _State):
  """-(sum over areas of reward - lambda_t R_a) and `(masks, rewards [K], penalties [K])`."""
  masks, full = generator.generate(params)
  if config.variant == "preserve":
    kept = masks
  elif config.variant == "delete":
    kept = 1 - masks
  else:
    kept = jnp.concatenate([masks, 1 - masks])
  x = apply_perturbation(state.pyramid, kept)
  if config.jitter:
    x = jnp.where(state.step % 2 == 0, x[:, :, ::-1], x)
  scores = reward(classifier(x), state.target, config.reward)
  count = len(config.areas)
  if config.variant == "delete":
    scores = -scores
  elif config.variant == "dual":
    scores = scores[:count] - scores[count:]
  weight = config.area_weight * jnp.float32(config.area_weight_growth) ** state.step
  penalties = weight * area_loss(full, config.areas)
  return -(scores - penalties).sum(), (masks, scores, penalties)


def _step(config: ExtremalPerturbationConfig, shared, state: _State):
  """One SGD step of one image; emits `(rewards [K], penalties [K])` (TorchRay's `hist`)."""
  classifier, generator = shared
  grads, (masks, scores, penalties) = jax.grad(_energy, has_aux=True)(
      state.params, config, classifier, generator, state)
  updates, opt_state = _optimizer(config).update(grads, state.opt_state)
  params = jnp.clip(optax.apply_updates(state.params, updates), 0.0, 1.0)
  return state._replace(params=params, opt_state=opt_state, masks=masks,
                        step=state.step + 1), (scores, penalties)


def _finish(config: ExtremalPerturbationConfig, shared, state: _State) -> jax.Array:
  """The last step's masks `[K, H, W]`, smoothed when `config.smooth` > 0."""
  del shared
  sigma = config.smooth * min(state.masks.shape[1:])
  return gaussian_smooth(state.masks[..., None], sigma)[..., 0]


# One image's optimisation for `pfc_jax._loop.run_images`: inputs `(image, target)`, shared
# `(classifier, mask generator)`.
_STAGE = _loop.Stage(_prepare, _step, _finish)


class ExtremalMasks(NamedTuple):
  """The per-area results of `extremal_masks`.

  Attributes:
    masks: `[B, K, H, W] float32` in [0, 1], one mask per area of `config.areas`: those of the
      last step (as TorchRay returns), smoothed when `config.smooth` > 0.
    rewards: `[B, max_iter, K] float32`, the reward Phi at each step.
    penalties: `[B, max_iter, K] float32`, lambda_t R_a(m) at each step (TorchRay's `hist`
      holds the rewards and minus these).
  """

  masks: jax.Array
  rewards: jax.Array
  penalties: jax.Array


def extremal_masks(classifier: Classifier, images: jax.Array, target: jax.Array,
                   config: ExtremalPerturbationConfig | None = None) -> ExtremalMasks:
  """Extremal perturbation masks, one per area, and the energy history, of every image.

  As TorchRay, the perturbation is applied to the classifier's normalised input
  (`classifier.normalize(images)`), which the classifier then reads directly: blur pads with 0
  there, i.e. with the dataset mean colour, and fade fades to the mean colour. Each image is
  optimised alone (in the layout `config.batching`), so its masks do not depend on the batch.

  Args:
    classifier: The classifier.
    images: `[B, H, W, 3] float32` RGB in [0, 1].
    target: `[B] int32` classes to explain.
    config: `ExtremalPerturbationConfig`.

  Returns:
    `ExtremalMasks`.

  Raises:
    ValueError: on bad images, a `target` outside the classifier's classes [0, C), or a
      config that is not an `ExtremalPerturbationConfig`.
  """
  config = _common.check_config(config, ExtremalPerturbationConfig)
  images = check_images(images)
  target = _common.check_target(target, classifier, images)
  generator = mask_generator(images.shape[1:3], config.step, config.sigma)
  static = dataclasses.replace(config, batching="auto", driver="auto")  # One compilation for all.
  masks, (rewards, penalties) = _loop.run_images(
      _STAGE, static, (classifier, generator), (images, target), config.max_iter,
      batching=config.batching, driver=config.driver)
  return ExtremalMasks(masks, rewards, penalties)


def extremal_perturbation(classifier: Classifier, images: jax.Array, target: jax.Array,
                          key: jax.Array | None = None,
                          config: ExtremalPerturbationConfig | None = None) -> jax.Array:
  """Extremal Perturbation saliency: the sum of the masks of `config.areas` (`extremal_masks`).

  Fong et al., eq. 7 with the paper's smooth masks (section 3.3); for several areas the masks
  are summed, as TorchRay's pointing-game benchmark does, so pixels kept even by the smallest
  area rank highest. With one area (the default) the map is that mask.

  Args:
    classifier: The classifier.
    images: `[B, H, W, 3] float32` RGB in [0, 1].
    target: `[B] int32` classes to explain.
    key: Unused (TorchRay's jitter is deterministic); kept for the common call shape.
    config: `ExtremalPerturbationConfig`.

  Returns:
    `[B, H, W] float32` saliency in [0, K] for K areas.

  Raises:
    ValueError: as `extremal_masks`.
  """
  del key
  return extremal_masks(classifier, images, target, config).masks.sum(axis=1)
