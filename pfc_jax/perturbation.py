"""Step 2 of PFC: coalition-guided noise perturbation (METHOD.md section 2, arXiv 2408.13397).

A non-negative noise scale `w [H, W, 3]` in the classifier's normalised input space is grown
with Adam while the noisy images `x + eps * w`, `eps ~ N(0, 1)`, must keep the clean image's
class on top. Where the classifier tolerates much noise, the pixels do not matter:
saliency = 1 - mean over channels of w.

`objective` is the loss of one image and one set of noise samples; `perturb` optimises it for
a batch of images, one independent problem per image, vmapped.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax

from pfc_jax import _inputs
from pfc_jax import _loop
from pfc_jax.classifier import Classifier

Consistency = Literal["published", "coalition", "off"]
_CONSISTENCIES = ("published", "coalition", "off")
# Keeps the Gaussian-weighted coalition mean finite far from a coalition, where the
# weighted mask is zero; inside a coalition the weight is at least G's centre (0.159 for sigma 1).
_COALITION_EPS = 1e-6


@dataclasses.dataclass(frozen=True)
class PerturbConfig:
  """Settings of the perturbation; defaults are the authors' demo values.

  Attributes:
    mask_weight: lambda_r, weight of the mask term -mean(w). Default 0.1.
    confidence_weight: mu, weight of the logit hinge that keeps the target class on top.
      Default 100.0.
    consistency_weight: v, weight of the consistency term. Default 1.0.
    smoothness_weight: c, weight of the Laplacian smoothness term (off in the demo). Default 0.0.
    consistency: Which consistency term: "published" (the paper's formula, which does not
      depend on the coalitions, see `objective`), "coalition" (Gaussian-weighted deviation of w
      from its mean inside each coalition) or "off" (term is zero; the ablation).
      Default "published".
    sigma: Standard deviation of the Gaussian, in pixels. Default 1.0.
    kernel_size: Side of the (odd, square) Gaussian kernel. Default 5.
    noise_samples: S, noise samples drawn per step. Default 16.
    noise_chunk: Evaluate the S samples in chunks of this many, accumulating gradients
      (must divide S); same result up to float error, activation memory divided by about
      S / chunk (VGG16, 224 px, S = 16: 3.2 GB per image unchunked, 0.8 GB with chunks of 4;
      `scripts/memory_vgg16.py`). The chunks run in a `lax.scan`; on XLA:CPU, where memory is
      rarely short, that loop makes convolutions much slower. None evaluates all S at once.
      Default None.
    steps: Adam steps. Default 500.
    learning_rate: Adam learning rate. Default 1e-2.
    max_w: w is clipped to [0, max_w] after every step. Default 1.0.
    max_coalitions: Static upper bound on coalition labels: labels must lie in
      [0, max_coalitions). Default 20, the coalition network's channel count.
    driver: Loop driver, see `pfc_jax._loop.resolve_driver`: "auto" (Python step loop on
      CPU, one compiled loop elsewhere), "compiled" or "python". Same results. Default "auto".
  """

  mask_weight: float = 0.1
  confidence_weight: float = 100.0
  consistency_weight: float = 1.0
  smoothness_weight: float = 0.0
  consistency: Consistency = "published"
  sigma: float = 1.0
  kernel_size: int = 5
  noise_samples: int = 16
  noise_chunk: int | None = None
  steps: int = 500
  learning_rate: float = 1e-2
  max_w: float = 1.0
  max_coalitions: int = 20
  driver: _loop.Driver = "auto"

  def __post_init__(self):
    if self.consistency not in _CONSISTENCIES:
      raise ValueError(f"`consistency` must be one of {_CONSISTENCIES}, got {self.consistency!r}.")
    for name in ("noise_samples", "steps", "max_coalitions"):
      if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
        raise ValueError(f"`{name}` must be a positive int, got {getattr(self, name)!r}.")
    if not isinstance(self.kernel_size, int) or self.kernel_size < 1 or self.kernel_size % 2 == 0:
      raise ValueError(f"`kernel_size` must be a positive odd int, got {self.kernel_size!r}.")
    for name in ("sigma", "learning_rate", "max_w"):
      if not getattr(self, name) > 0:
        raise ValueError(f"`{name}` must be positive, got {getattr(self, name)!r}.")
    if self.noise_chunk is not None and (
        not isinstance(self.noise_chunk, int) or self.noise_chunk < 1
        or self.noise_samples % self.noise_chunk):
      raise ValueError(
          f"`noise_chunk` must be None or a positive divisor of noise_samples="
          f"{self.noise_samples}, got {self.noise_chunk!r}.")
    _loop.check_driver(self.driver)


class Perturbation(NamedTuple):
  """Result of `perturb` for a batch of B images.

  Attributes:
    w: `[B, H, W, 3] float32` optimised noise scale in [0, max_w].
    saliency: `[B, H, W] float32` 1 - mean over channels of w (not normalised).
    target: `[B] int32` class explained: argmax of the logits on the clean image.
    probs: `[B] float32` softmax probability of `target` on the clean image.
    losses: `[B, steps] float32` objective at each step (before that step's update).
  """

  w: jax.Array
  saliency: jax.Array
  target: jax.Array
  probs: jax.Array
  losses: jax.Array


def _gaussian_factor(size: int, sigma: float) -> np.ndarray:
  """`[size]` 1-D factor g of the paper's Gaussian: G = outer(g, g)."""
  offsets = np.arange(size) - size // 2
  return np.exp(-offsets**2 / (2 * sigma**2)) / (math.sqrt(2 * math.pi) * sigma)


def gaussian_kernel(size: int, sigma: float) -> np.ndarray:
  """The paper's unnormalised Gaussian `(1 / (2 pi sigma^2)) exp(-d^2 / (2 sigma^2))`.

  Returns:
    `[size, size] float32`; for size 5 and sigma 1 it sums to 0.9818, not 1.
  """
  factor = _gaussian_factor(size, sigma)
  return np.outer(factor, factor).astype(np.float32)


_LAPLACIAN = np.array([[0, 1, 0], [1, -4, 1], [0, 1, 0]], np.float32)


def _filter_channels(x: jax.Array, kernel: np.ndarray) -> jax.Array:
  """Convolves every channel of `x [H, W, K]` with `kernel [kh, kw]` (odd sides), zero padding.

  A sum of shifted copies rather than a grouped convolution: XLA fuses it into one elementwise
  pass, which on CPU is several times faster than a depthwise convolution with K groups.
  The kernels used here are symmetric, so correlation and convolution agree.
  """
  pad_h, pad_w = kernel.shape[0] // 2, kernel.shape[1] // 2
  height, width = x.shape[:2]
  padded = jnp.pad(x, ((pad_h, pad_h), (pad_w, pad_w), (0, 0)))
  return sum(float(kernel[dy, dx]) * padded[dy:dy + height, dx:dx + width]
             for dy in range(kernel.shape[0]) for dx in range(kernel.shape[1]) if kernel[dy, dx])


def _gaussian_filter(x: jax.Array, config: PerturbConfig) -> jax.Array:
  """`x [H, W, K]` convolved per channel with `gaussian_kernel`, zero padding, as two 1-D passes
  (the Gaussian is separable; with zero padding the result is the same)."""
  factor = _gaussian_factor(config.kernel_size, config.sigma)
  return _filter_channels(_filter_channels(x, factor[:, None]), factor[None, :])


def _published_consistency(w, masks, config):
  """-sum_i mean_hw |G * (sum_channels w C_i)|, transcribed from the authors' code.

  Since w >= 0 and G >= 0 the absolute value is inert, and since convolution is linear and the
  masks partition the image, sum_i G * (w C_i) = G * w: the value does not depend on the masks.
  """
  per_coalition = w.sum(-1, keepdims=True) * masks  # [H, W, K]
  return -jnp.abs(_gaussian_filter(per_coalition, config)).mean(axis=(0, 1)).sum()


def _coalition_consistency(w, masks, config):
  """sum_i mean(C_i (w - m_i)^2), m_i = G * (w C_i) / (G * C_i + eps), per colour channel."""
  height, width, channels = w.shape
  num = masks.shape[-1]
  masked_w = w[..., :, None] * masks[..., None, :]  # [H, W, 3, K]
  weighted_sum = _gaussian_filter(masked_w.reshape(height, width, channels * num), config)
  weight = _gaussian_filter(masks, config)  # [H, W, K]
  local_mean = (weighted_sum.reshape(height, width, channels, num)
                / (weight[..., None, :] + _COALITION_EPS))
  deviation = masks[..., None, :] * (w[..., None] - local_mean) ** 2
  return deviation.mean(axis=(0, 1, 2)).sum()


def _smoothness(w, masks):
  """sum_i mean((Laplacian(w) C_i)^2), 4-neighbour Laplacian per channel, zero padding."""
  laplacian = _filter_channels(w, _LAPLACIAN)  # [H, W, 3]
  return ((laplacian[..., None] * masks[..., None, :]) ** 2).mean(axis=(0, 1, 2)).sum()


def objective(w: jax.Array, x: jax.Array, noise: jax.Array, labels: jax.Array, target,
              classifier: Classifier, config: PerturbConfig = PerturbConfig()
              ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """PFC's perturbation loss for one image (METHOD.md section 2).

  Terms, unweighted:
    mask: -mean(w) (the paper's -||p||_1, as a mean).
    confidence: mean over samples s and classes j of relu(f_j(x + eps_s w) - f_t(x + eps_s w)),
      on logits (zero for j = t).
    consistency: "published": -sum_i mean_hw |G * (sum_c w C_i)|, G the unnormalised
      `kernel_size` Gaussian with zero padding. Because w >= 0, G >= 0 and the coalitions
      C_i partition the image, it equals -mean(G * sum_c w): it does NOT depend on the
      coalitions, and acts as a second reward on noise size. "coalition":
      sum_i mean(C_i (w - m_i)^2) with m_i = G * (w C_i) / (G * C_i + eps), the
      Gaussian-weighted mean of w inside coalition i; it penalises variation of w within a
      coalition and none across borders. "off": 0.
    smoothness: sum_i mean((Laplacian(w) C_i)^2), which also reduces to mean(Laplacian(w)^2).

  Pure and differentiable in `w`, `x`, `noise` and the classifier's params.

  Args:
    w: `[H, W, 3] float32` noise scale.
    x: `[H, W, 3] float32` image in the classifier's normalised input space.
    noise: `[S, H, W, 3] float32` standard normal samples.
    labels: `[H, W] int32` coalition labels in [0, config.max_coalitions); larger values
      belong to no coalition.
    target: int or `[] int32` class to keep on top.
    classifier: Its `__call__` maps normalised `[S, H, W, 3]` images to logits `[S, C]`.
    config: Weights and the consistency variant.

  Returns:
    `(total, terms)`: `total [] float32` = sum over terms of weight * term (terms of weight 0
    left out); `terms` maps "mask", "confidence", "consistency", "smoothness" to `[] float32`
    unweighted values.
  """
  logits = classifier(x[None] + noise * w[None])  # [S, C]
  target_logit = jnp.take(logits, target, axis=-1)[:, None]
  masks = jax.nn.one_hot(labels, config.max_coalitions, dtype=w.dtype)  # [H, W, K]
  if config.consistency == "published":
    consistency = _published_consistency(w, masks, config)
  elif config.consistency == "coalition":
    consistency = _coalition_consistency(w, masks, config)
  else:
    consistency = jnp.zeros((), w.dtype)
  terms = {
      "mask": -w.mean(),
      "confidence": jax.nn.relu(logits - target_logit).mean(),
      "consistency": consistency,
      "smoothness": _smoothness(w, masks),
  }
  # Terms with weight 0 are left out of the sum, so that XLA drops their computation (and its
  # gradient) from a step that only needs the total.
  weights = {name: getattr(config, f"{name}_weight") for name in terms}
  total = sum(weights[name] * value for name, value in terms.items() if weights[name])
  return jnp.asarray(total, w.dtype), terms


_value_and_grad = jax.value_and_grad(objective, has_aux=True)


def _loss_and_grad(w, x, noise, labels, target, classifier, config):
  """Objective and its gradient in w for one image; the S samples in chunks if configured.

  The samples only enter through a mean, so the mean over equal chunks of the chunk
  objectives is the full objective, and likewise its gradient.
  """
  chunk = config.noise_chunk or config.noise_samples
  if chunk == config.noise_samples:
    (total, _), grad = _value_and_grad(w, x, noise, labels, target, classifier, config)
    return total, grad
  chunks = noise.reshape(config.noise_samples // chunk, chunk, *noise.shape[1:])

  def accumulate(sums, noise_chunk):
    (total, _), grad = _value_and_grad(w, x, noise_chunk, labels, target, classifier, config)
    return (sums[0] + total, sums[1] + grad), None

  (total, grad), _ = lax.scan(accumulate, (jnp.zeros((), w.dtype), jnp.zeros_like(w)), chunks)
  return total / chunks.shape[0], grad / chunks.shape[0]


class _State(NamedTuple):
  """Loop carry of `perturb`; every array has a leading `[B]` image axis except the step."""

  classifier: Classifier
  x: jax.Array  # [B, H, W, 3] normalised images
  labels: jax.Array  # [B, H, W] int32
  target: jax.Array  # [B] int32
  keys: jax.Array  # [B] PRNG keys
  w: jax.Array  # [B, H, W, 3]
  opt_state: optax.OptState
  step: jax.Array  # [] int32


def _optimizer(config: PerturbConfig) -> optax.GradientTransformation:
  return optax.adam(config.learning_rate)


def _step(config: PerturbConfig, state: _State) -> tuple[_State, jax.Array]:
  """One Adam step for every image; returns the new state and the objectives `[B]`."""
  optimizer = _optimizer(config)

  def per_image(w, x, labels, target, key, opt_state):
    noise = jax.random.normal(
        jax.random.fold_in(key, state.step), (config.noise_samples, *x.shape), x.dtype)
    total, grad = _loss_and_grad(w, x, noise, labels, target, state.classifier, config)
    updates, opt_state = optimizer.update(grad, opt_state, w)
    w = jnp.clip(optax.apply_updates(w, updates), 0.0, config.max_w)
    return w, opt_state, total

  w, opt_state, totals = jax.vmap(per_image)(
      state.w, state.x, state.labels, state.target, state.keys, state.opt_state)
  return state._replace(w=w, opt_state=opt_state, step=state.step + 1), totals


@jax.jit
def _clean_prediction(classifier: Classifier, x: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Target class `[B] int32` and its softmax probability `[B] float32` on clean images."""
  probs = jax.nn.softmax(classifier(x), axis=-1)
  target = jnp.argmax(probs, axis=-1).astype(jnp.int32)
  return target, jnp.take_along_axis(probs, target[:, None], axis=-1)[:, 0]


@jax.jit(static_argnums=0)
def _initial_state(config: PerturbConfig, classifier: Classifier, images: jax.Array,
                   labels: jax.Array, keys: jax.Array) -> tuple[_State, jax.Array]:
  """The state before the first step, and the target's clean probability `[B]`."""
  x = classifier.normalize(images)
  target, probs = _clean_prediction(classifier, x)
  w = jnp.zeros_like(x)
  state = _State(classifier, x, labels, target, keys, w, jax.vmap(_optimizer(config).init)(w),
                 jnp.zeros((), jnp.int32))
  return state, probs


def _check_labels(labels, images_shape, max_coalitions: int) -> jax.Array:
  """Validates labels `[B, H, W]` (their range only when concrete) and returns them as int32."""
  if not hasattr(labels, "shape") or not hasattr(labels, "dtype"):
    labels = np.asarray(labels)
  if tuple(labels.shape) != tuple(images_shape[:3]):
    raise ValueError(
        f"`labels` must have shape [B, H, W] = {tuple(images_shape[:3])}, got {tuple(labels.shape)}.")
  if not jnp.issubdtype(labels.dtype, jnp.integer):
    raise ValueError(f"`labels` must be integer coalition labels, got dtype {labels.dtype}.")
  if isinstance(labels, jax.core.Tracer):
    return labels.astype(jnp.int32)
  values = np.asarray(labels)
  if values.size and (values.min() < 0 or values.max() >= max_coalitions):
    raise ValueError(
        f"`labels` must lie in [0, max_coalitions={max_coalitions}), got values in "
        f"[{values.min()}, {values.max()}]; raise PerturbConfig.max_coalitions.")
  return jnp.asarray(labels, jnp.int32)


def perturb(classifier: Classifier, images, labels, key,
            config: PerturbConfig = PerturbConfig()) -> Perturbation:
  """Optimises PFC's noise scale w for each image, independently (vmapped).

  Per step and image: S noise samples from the image's key folded with the step index (so the
  result depends neither on the loop driver nor on `noise_chunk`), the objective's gradient in
  w, one Adam update, then w clipped to [0, max_w]. w starts at 0.

  Args:
    classifier: The model explained; its `normalize` maps the images to its input space, where
      w and the noise live.
    images: `[B, H, W, 3] float32` RGB in [0, 1].
    labels: `[B, H, W] int` coalition labels in [0, config.max_coalitions).
    key: One PRNG key (split into B per-image keys) or `[B]` keys.
    config: Perturbation settings.

  Returns:
    A `Perturbation` with w, saliency, target, probs and the per-step losses.

  Raises:
    ValueError: for malformed images, labels, key or config.

  Example:
    >>> result = perturb(classifier, images, coalitions.labels, jax.random.key(0))
    >>> result.saliency.shape  # [B, H, W]
  """
  if not isinstance(config, PerturbConfig):
    raise ValueError(f"`config` must be a PerturbConfig, got {type(config).__name__}.")
  images = _inputs.check_images(images)
  labels = _check_labels(labels, images.shape, config.max_coalitions)
  keys = _inputs.per_image_keys(key, images.shape[0])
  state, probs = _initial_state(config, classifier, images, labels, keys)
  state, losses = _loop.run_loop(_step, config, state, config.steps, driver=config.driver)
  return Perturbation(
      w=state.w, saliency=1.0 - state.w.mean(axis=-1), target=state.target, probs=probs,
      losses=losses.T)
