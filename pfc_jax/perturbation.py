"""Step 2 of PFC: coalition-guided noise perturbation (METHOD.md section 2, arXiv 2408.13397).

A non-negative noise scale `w [H, W, 3]` in the classifier's normalised input space is grown
with Adam while the noisy images `x + eps * w`, `eps ~ N(0, 1)`, must keep the clean image's
class on top. Where the classifier tolerates much noise, the pixels do not matter:
saliency = 1 - mean over channels of w.

`objective` is the loss of one image and one set of noise samples; `perturb` optimises it for
a batch of images, one independent problem per image (`batching` chooses how the images are
laid out); `perturb_sweep` does the same under K objective settings at once (one compilation,
K x B problems).

How w is parameterised (`PerturbConfig.parameterization`) decides how the coalitions reach the
saliency map:

- "pixel": a free value per pixel and channel, as published. Each pixel is judged alone, so the
  map reproduces every pixel-level quirk of the classifier, such as the 4-pixel grid that
  SqueezeNet's stride-2 layers leave (every 4th row and column about half as salient).
- "region": region-tied noise. Each coalition is split into its connected regions
  (`pfc_jax.regions`, computed under jit), and w holds one value per region and channel: the
  saliency is constant on each region, following coalition borders (the paper's figure shows
  such filled silhouettes). A region spans many stride cells, so the grid cannot appear.
- "lowres": smooth noise. w lives on a grid `lowres_stride` times coarser than the image and is
  upsampled bilinearly, as the smooth masks of Extremal Perturbations (Fong, Patrick and
  Vedaldi, ICCV 2019); a period of 4 pixels is finer than the upsampled grid can represent
  (stride 8 and above), so the stride grid is gone, and objects come out as smooth blobs. The
  coalitions then enter only through the consistency term.
- "guided": coalition-guided smooth noise. The "lowres" field is smoothed inside each
  coalition only: at a pixel of coalition i, w is the Gaussian-weighted mean of the upsampled
  field over the nearby pixels of coalition i (normalised convolution, Knutsson and Westin,
  CVPR 1993, with the coalition map as the guide, as a cross-bilateral filter with a binary
  range kernel). w stays smooth inside a coalition and may jump at its border, so the saliency's
  edges are the coalitions' edges: the coalitions shape the map.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import numbers
from typing import Literal, Mapping, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax

from pfc_jax import _inputs
from pfc_jax import _loop
from pfc_jax import _precision
from pfc_jax import regions as regions_lib
from pfc_jax.baselines._common import min_max_normalize
from pfc_jax.classifier import Classifier, check_classifier

Consistency = Literal["published", "coalition", "off"]
_CONSISTENCIES = ("published", "coalition", "off")
Parameterization = Literal["pixel", "region", "lowres", "guided"]
_PARAMETERIZATIONS = ("pixel", "region", "lowres", "guided")
Confidence = Literal["hinge", "log_softmax"]
_CONFIDENCES = ("hinge", "log_softmax")
Schedule = Literal["constant", "cosine"]
_SCHEDULES = ("constant", "cosine")
# Keeps the Gaussian-weighted coalition mean finite far from a coalition, where the
# weighted mask is zero; inside a coalition the weight is at least G's centre (0.159 for sigma 1).
_COALITION_EPS = 1e-6
# What batching "auto" picks on GPU and TPU: every step's noisy images, of every image and both
# games, in one classifier batch. Not yet measured against "map" on an accelerator.
_ACCELERATOR_LAYOUT = "dense"


@dataclasses.dataclass(frozen=True)
class PerturbConfig:
  """Settings of the perturbation; the defaults are the authors' demo values (the "paper" preset).

  One flat class, its fields in five groups, as below and in the source. A field that only one
  choice of its group reads (`max_regions` for "region", `lowres_stride` for "lowres" and
  "guided", `noise_sigma` for noise, `sigma` and `kernel_size` for a consistency term,
  `compute_batch` for the dense layout) is refused, with a message, when set away from its
  default under another choice, so that no setting is silently ignored.

  Perturbation operator:
    noise_std: Standard deviation of eps, so the noise at a pixel has standard deviation
      `noise_std * w`. 1 as published; 0 leaves the blur as the only perturbation,
      x + (w / max_w)(b - x) (Meaningful Perturbations, Fong and Vedaldi, ICCV 2017, on PFC's
      coalition-shaped w): the objective is then deterministic and `noise_samples = 1`
      computes it exactly. 0 needs a blur (`blur_sigma` or `blur_fraction` > 0). Default 1.0.
    noise_sigma: Spatial correlation of eps, in pixels: 0 draws eps i.i.d. per pixel (as
      published); s > 0 convolves i.i.d. normal samples with a Gaussian of standard deviation
      s (truncated at 2 s) and rescales them to unit variance, so that eps stays N(0, 1) at
      each pixel but varies smoothly. Needs noise (`noise_std` > 0). Default 0.0.
    noise_samples: S, noise samples drawn per step. Default 16.
    blur_sigma: s > 0 adds the blur: the perturbed image is x + (w / max_w)(b - x) + eps w,
      with b the image blurred by a Gaussian of standard deviation s pixels (truncated at 2 s,
      normalised at the border), so that as w grows a pixel is also replaced by its blurred
      neighbourhood, as the removal metrics replace it (ROAD's imputation, Rong et al., ICML
      2022; the insertion metric's blurred start, Petsiuk et al., BMVC 2018). 0: additive
      noise only, x + eps w, as published. Not in the paper. Default 0.0.
    blur_fraction: The same blur with its standard deviation given as a fraction of the image's
      shorter side, `blur_fraction * min(H, W)` pixels (0.08: 17.9 px at 224 px, 5.1 px at
      64 px). At most 1; at most one of `blur_sigma` and `blur_fraction` is > 0. Not in the
      paper. Default 0.0.
    max_w: w is clipped to [0, max_w] after every step. Default 1.0.

  Mask:
    parameterization: How w is parameterised (see the module docstring): "pixel" (one value
      per pixel and channel, as published), "region" (one value per connected coalition region
      and channel), "lowres" (a coarse grid upsampled bilinearly) or "guided" ("lowres"
      smoothed inside each coalition). Default "pixel".
    max_regions: "region" only: the largest `max_regions` connected regions of the coalitions
      get their own value; the smaller regions of a coalition share one. Default 64.
    lowres_stride: "lowres" and "guided" only: w's grid is
      `ceil(H / lowres_stride) x ceil(W / lowres_stride)`; "guided" smooths with a Gaussian of
      standard deviation `lowres_stride / 2` pixels (`2 * lowres_stride + 1` taps). Default 8.
    max_coalitions: Static upper bound on coalition labels: labels must lie in
      [0, max_coalitions). Default 20, the coalition network's channel count.
    saliency_sigma: Smoothing of the saliency read out of w, in pixels: 0 reads
      `1 - mean over channels of w` as it is; s > 0 takes its Gaussian-weighted local mean
      (`smooth_saliency`), so that the most relevant pixels form compact regions, as the
      removal metrics remove them; w itself is not smoothed (docs/faithfulness.md, "History":
      8 px did not hold on held-out photos). Default 0.0.

  Objective:
    confidence: The confidence term: "hinge" (the paper's mean of relu(f_j - f_t) on logits,
      zero while the target stays on top) or "log_softmax" (-log softmax(f)_t, the target's
      cross-entropy, which ranks the perturbation's harm before the class flips, as the
      preservation game of Fong and Vedaldi, ICCV 2017). Default "hinge".
    confidence_weight: mu, weight of the confidence term. Default 100.0.
    mask_weight: lambda_r, weight of the mask term -mean(w). Default 0.1.
    consistency: Which consistency term: "published" (the paper's formula, which does not
      depend on the coalitions, see `objective`), "coalition" (Gaussian-weighted deviation of w
      from its mean inside each coalition) or "off" (term is zero; the ablation).
      Default "published".
    consistency_weight: v, weight of the consistency term. Default 1.0.
    sigma: Standard deviation of the consistency term's Gaussian G, in pixels. Default 1.0.
    kernel_size: Side of the (odd, square) Gaussian kernel of the consistency term. Default 5.
    smoothness_weight: c, weight of the Laplacian smoothness term (off in the demo).
      Default 0.0.
    deletion_weight: Weight of the deletion term (the deletion game, see `objective`): the
      target's probability under the complementary perturbation `max_w - w`, large where w is
      small. Not in the paper; nonzero doubles the classifier's batch per step. Default 0.0.
    with_preservation_game: Also optimise w without the deletion term (the preservation game
      alone, on the same coalitions, keys and settings) and return the mean of the two runs'
      min-max normalised saliency maps. The preservation game marks evidence that suffices to
      keep the class; the dual game (with the deletion term) also marks evidence whose
      removal destroys the class, which the most-relevant-first removal metrics reward, but on
      images where no removal of the object destroys the class it may mark background. On the
      tuning data the mean kept the dual game's gain on ROAD MoRF and the preservation game's
      pointing game (docs/faithfulness.md, "History"). Needs `deletion_weight` > 0. Not in the
      paper (the two games are Fong and Vedaldi's, ICCV 2017). Default False.

  Optimiser:
    steps: Adam steps. Default 500.
    learning_rate: Adam learning rate (the initial one under a decaying `schedule`).
      Default 1e-2.
    schedule: The learning rate over the steps: "constant" (as published) or "cosine"
      (decays towards 0, `optax.cosine_decay_schedule`; Loshchilov and Hutter, ICLR 2017), so
      that the final steps average out the noise samples' gradient noise. Default "constant".

  Execution:
    batching: Image layout, see `pfc_jax._loop`: "sequential" (one image after another),
      "map" (one compiled `lax.map` over the images of one image's compiled loop), "vmap" (the
      noise samples of all images in one dense batch per step), "dense" (the images in compute
      batches of `compute_batch`, each step ONE classifier call on every image's perturbed
      images, of both games with `with_preservation_game`) or "auto" (sequential on CPU, dense
      elsewhere). Under "sequential" and "map", and under "dense" for a given
      `compute_batch` with one game, an image's result does not depend on its batch, to
      float32 equality; under "dense" with both games in one program and under "vmap", up to
      float rounding (`pfc_jax._loop`). Default "auto".
    compute_batch: "dense" (or "auto" on an accelerator) only: images per compiled step, so
      each step classifies `compute_batch x noise_samples x (1 + with deletion term +
      with_preservation_game)` perturbed images; a short last batch is padded (repeating its
      last image) and the padding dropped. None picks the largest power of two up to 64 whose
      step XLA estimates to fit in 80% of the device's memory and in 8 GB, and 4 where the
      backend reports no memory limit (CPU) (`pfc_jax._loop.default_compute_batch`). A value
      estimated not to fit raises a ValueError before running. Default None.
    driver: Loop driver, see `pfc_jax._loop.resolve_driver`: "auto" (Python step loop on CPU,
      one compiled loop elsewhere), "compiled" or "python". Same results. Default "auto".
    noise_chunk: Evaluate the S samples in chunks of this many, accumulating gradients (must
      divide S); same result up to float error, activation memory divided by about S / chunk
      (VGG16, 224 px, S = 16: 3.2 GB per image unchunked, 0.8 GB with chunks of 4;
      `scripts/memory_vgg16.py`). The chunks run in a `lax.scan`, which on XLA:CPU makes
      convolutions much slower. None evaluates all S at once. Default None.
    precision: "float32", "bfloat16" (the classifier under the perturbation computes in
      bfloat16 while w, the Adam state, the objective and its gradient stay float32) or
      "auto" (bfloat16 on GPU/TPU, float32 on CPU). The clean prediction (target, probs) is
      always float32 (`pfc_jax._precision`). Default "auto".
  """

  # Perturbation operator.
  noise_std: float = 1.0
  noise_sigma: float = 0.0
  noise_samples: int = 16
  blur_sigma: float = 0.0
  blur_fraction: float = 0.0
  max_w: float = 1.0
  # Mask.
  parameterization: Parameterization = "pixel"
  max_regions: int = 64
  lowres_stride: int = 8
  max_coalitions: int = 20
  saliency_sigma: float = 0.0
  # Objective.
  confidence: Confidence = "hinge"
  confidence_weight: float = 100.0
  mask_weight: float = 0.1
  consistency: Consistency = "published"
  consistency_weight: float = 1.0
  sigma: float = 1.0
  kernel_size: int = 5
  smoothness_weight: float = 0.0
  deletion_weight: float = 0.0
  with_preservation_game: bool = False
  # Optimiser.
  steps: int = 500
  learning_rate: float = 1e-2
  schedule: Schedule = "constant"
  # Execution.
  batching: _loop.Batching = "auto"
  compute_batch: int | None = None
  driver: _loop.Driver = "auto"
  noise_chunk: int | None = None
  precision: _precision.Precision = "auto"

  def __post_init__(self):
    if self.consistency not in _CONSISTENCIES:
      raise ValueError(f"`consistency` must be one of {_CONSISTENCIES}, got {self.consistency!r}.")
    if self.confidence not in _CONFIDENCES:
      raise ValueError(f"`confidence` must be one of {_CONFIDENCES}, got {self.confidence!r}.")
    if self.schedule not in _SCHEDULES:
      raise ValueError(f"`schedule` must be one of {_SCHEDULES}, got {self.schedule!r}.")
    if self.parameterization not in _PARAMETERIZATIONS:
      raise ValueError(f"`parameterization` must be one of {_PARAMETERIZATIONS}, got "
                       f"{self.parameterization!r}.")
    for name in ("noise_samples", "steps", "max_coalitions", "max_regions", "lowres_stride"):
      if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
        raise ValueError(f"`{name}` must be a positive int, got {getattr(self, name)!r}.")
    if not isinstance(self.kernel_size, int) or self.kernel_size < 1 or self.kernel_size % 2 == 0:
      raise ValueError(f"`kernel_size` must be a positive odd int, got {self.kernel_size!r}.")
    at_least_zero = [f"{name}_weight" for name in _TERMS] + [
        "noise_sigma", "noise_std", "blur_sigma", "blur_fraction", "saliency_sigma"]
    for name in at_least_zero + ["sigma", "learning_rate", "max_w"]:
      value = getattr(self, name)
      positive = name not in at_least_zero
      if not (_is_finite_number(value) and (value > 0 if positive else value >= 0)):
        raise ValueError(f"`{name}` must be {'positive' if positive else '>= 0'} (a finite "
                         f"number), got {value!r}.")
    if self.blur_fraction > 1:
      raise ValueError(f"`blur_fraction` is a fraction of the image side, at most 1, got "
                       f"{self.blur_fraction!r}.")
    if self.blur_sigma and self.blur_fraction:
      raise ValueError(f"At most one of `blur_sigma` ({self.blur_sigma!r}) and `blur_fraction` "
                       f"({self.blur_fraction!r}) may be > 0: both set the blur's scale.")
    if not isinstance(self.with_preservation_game, bool):
      raise ValueError(f"`with_preservation_game` must be a bool, got "
                       f"{self.with_preservation_game!r}.")
    if self.with_preservation_game and not self.deletion_weight:
      raise ValueError("`with_preservation_game` needs `deletion_weight` > 0: without the "
                       "deletion term both runs would be the preservation game.")
    if self.noise_std == 0 and not (self.blur_sigma or self.blur_fraction):
      raise ValueError("`noise_std` = 0 needs `blur_sigma` or `blur_fraction` > 0: otherwise "
                       "nothing is perturbed.")
    if self.noise_chunk is not None and (
        not isinstance(self.noise_chunk, int) or self.noise_chunk < 1
        or self.noise_samples % self.noise_chunk):
      raise ValueError(
          f"`noise_chunk` must be None or a positive divisor of noise_samples="
          f"{self.noise_samples}, got {self.noise_chunk!r}.")
    _loop.check_batching(self.batching, self.driver, self.compute_batch)
    _precision.check_precision(self.precision)
    self._refuse_unread_settings()

  def _refuse_unread_settings(self):
    """Raises a ValueError for a field set away from its default where nothing reads it."""
    unread = {
        "max_regions": (self.parameterization != "region",
                        f"parameterization {self.parameterization!r} (only \"region\" reads it)"),
        "lowres_stride": (self.parameterization not in ("lowres", "guided"),
                          f"parameterization {self.parameterization!r} (only \"lowres\" and "
                          "\"guided\" read it)"),
        "noise_sigma": (self.noise_std == 0, "noise_std 0 (no noise to correlate)"),
        "sigma": (self.consistency == "off", "consistency \"off\""),
        "kernel_size": (self.consistency == "off", "consistency \"off\""),
    }
    defaults = {field.name: field.default for field in dataclasses.fields(self)}
    for name, (ignored, reason) in unread.items():
      if ignored and getattr(self, name) != defaults[name]:
        raise ValueError(f"`{name}` = {getattr(self, name)!r} has no effect under {reason}; "
                         f"leave it at its default {defaults[name]!r}.")

  def layout(self) -> _loop.Layout:
    """The image layout `batching` resolves to on the default backend ("auto": "sequential"
    on CPU, "dense" on GPU and TPU)."""
    return _loop.resolve_batching(self.batching, accelerator=_ACCELERATOR_LAYOUT)

  def blur_pixels(self, height: int, width: int) -> float:
    """The blur's standard deviation in pixels for an image of `height x width` pixels (0: no
    blur): `blur_sigma`, or `blur_fraction * min(height, width)`."""
    return float(self.blur_sigma or self.blur_fraction * min(height, width))


def _is_finite_number(value) -> bool:
  """A finite real number (numpy scalars too), not a bool."""
  return (isinstance(value, numbers.Real) and not isinstance(value, bool)
          and math.isfinite(value))


class Hyperparameters(NamedTuple):
  """The objective's numeric settings as arrays: traced values, so that changing them (or
  sweeping over them with `perturb_sweep`) reuses one compilation. Each field is a `[] float32`
  (or `[B]` inside `perturb`), named and documented as in `PerturbConfig`."""

  mask_weight: jax.Array
  confidence_weight: jax.Array
  consistency_weight: jax.Array
  smoothness_weight: jax.Array
  deletion_weight: jax.Array
  sigma: jax.Array
  max_w: jax.Array
  learning_rate: jax.Array

  @classmethod
  def from_config(cls, config: PerturbConfig) -> Hyperparameters:
    return cls(*(jnp.float32(getattr(config, name)) for name in cls._fields))


SWEEPABLE = Hyperparameters._fields
_TERMS = ("mask", "confidence", "consistency", "smoothness", "deletion")


class Perturbation(NamedTuple):
  """Result of `perturb` for a batch of B images (`perturb_sweep`: `[K, B, ...]` arrays).

  Attributes:
    w: `[B, H, W, 3] float32` optimised noise scale in [0, max_w] (with
      `PerturbConfig.with_preservation_game`: the mean of the two games' w).
    saliency: `[B, H, W] float32` 1 - mean over channels of w (not normalised), smoothed
      when `PerturbConfig.saliency_sigma` > 0 (with `with_preservation_game`: the mean of the
      two games' maps, each min-max normalised, so in [0, 1]).
    target: `[B] int32` class explained: argmax of the logits on the clean image.
    probs: `[B] float32` softmax probability of `target` on the clean image.
    losses: `[B, steps] float32` objective at each step (before that step's update; with
      `with_preservation_game`, the mean of the two games' objectives).
  """

  w: jax.Array
  saliency: jax.Array
  target: jax.Array
  probs: jax.Array
  losses: jax.Array


def _gaussian_factor(size: int, sigma):
  """`[size]` 1-D factor g of the paper's Gaussian, G = outer(g, g); `sigma` may be traced."""
  offsets = np.arange(size) - size // 2
  return jnp.exp(-offsets**2 / (2 * sigma**2)) / (math.sqrt(2 * math.pi) * sigma)


def gaussian_kernel(size: int, sigma: float) -> np.ndarray:
  """The paper's unnormalised Gaussian `(1 / (2 pi sigma^2)) exp(-d^2 / (2 sigma^2))`.

  Returns:
    `[size, size] float32`; for size 5 and sigma 1 it sums to 0.9818, not 1.
  """
  factor = np.asarray(_gaussian_factor(size, np.float64(sigma)))
  return np.outer(factor, factor).astype(np.float32)


_LAPLACIAN = np.array([[0, 1, 0], [1, -4, 1], [0, 1, 0]], np.float32)


def _filter_channels(x: jax.Array, kernel) -> jax.Array:
  """Convolves every channel of `x [H, W, K]` with `kernel [kh, kw]` (odd sides), zero padding.

  A sum of shifted copies rather than a grouped convolution: XLA fuses it into one elementwise
  pass, which on CPU is several times faster than a depthwise convolution with K groups.
  The kernels used here are symmetric, so correlation and convolution agree. Zero taps of a
  numpy kernel are skipped; a jax kernel may be traced.
  """
  pad_h, pad_w = kernel.shape[0] // 2, kernel.shape[1] // 2
  height, width = x.shape[:2]
  padded = jnp.pad(x, ((pad_h, pad_h), (pad_w, pad_w), (0, 0)))
  taps = [(dy, dx) for dy in range(kernel.shape[0]) for dx in range(kernel.shape[1])
          if not (isinstance(kernel, np.ndarray) and kernel[dy, dx] == 0)]
  return sum(kernel[dy, dx] * padded[dy:dy + height, dx:dx + width] for dy, dx in taps)


def _separable_filter(x: jax.Array, factor) -> jax.Array:
  """`x [H, W, K]` convolved per channel with `outer(factor, factor)`, zero padding, as two 1-D
  passes (with zero padding the result is the same as one 2-D pass)."""
  return _filter_channels(_filter_channels(x, factor[:, None]), factor[None, :])


def _gaussian_filter(x: jax.Array, size: int, sigma) -> jax.Array:
  """`x [H, W, K]` convolved per channel with `gaussian_kernel(size, sigma)`, zero padding."""
  return _separable_filter(x, _gaussian_factor(size, sigma))


def _perturbed(x, noise, max_w, blur_sigma, w):
  """The S perturbed images `[S, H, W, 3]` of `x [H, W, 3]` under noise scale `w [H, W, 3]`:
  x + eps w, moved towards the image blurred over `blur_sigma` pixels by w / max_w when
  `blur_sigma` > 0 (see `PerturbConfig.blur_sigma`)."""
  if blur_sigma:
    x = x + (w / max_w) * (_local_mean(x, blur_sigma) - x)
  return x[None] + noise * w[None]


def perturbed_images(x: jax.Array, noise: jax.Array, w: jax.Array, max_w: float = 1.0,
                     blur_sigma: float = 0.0) -> jax.Array:
  """PFC's perturbation operator, for objectives built from these pieces (`objective` uses it).

  Args:
    x: `[H, W, 3] float32` image in the classifier's normalised input space.
    noise: `[S, H, W, 3] float32` samples eps (`sample_noise`).
    w: `[H, W, 3] float32` noise scale in [0, max_w] (`noise_scale`).
    max_w: The largest w (`PerturbConfig.max_w`); w / max_w is the blur's share.
    blur_sigma: The blur's standard deviation in pixels, 0 for none
      (`PerturbConfig.blur_pixels`).

  Returns:
    `[S, H, W, 3] float32`: x + eps w, moved towards the blurred image by w / max_w when
    `blur_sigma` > 0 (see `PerturbConfig.blur_sigma`).
  """
  return _perturbed(x, noise, max_w, blur_sigma, w)


def _local_mean(x: jax.Array, sigma: float) -> jax.Array:
  """`x [H, W, K]`'s Gaussian-weighted local mean per channel: standard deviation `sigma`
  pixels, truncated at 2 sigma, normalised by the weight inside the image."""
  factor = _truncated_gaussian(sigma).astype(np.float32)
  total = _separable_filter(jnp.concatenate([x, jnp.ones_like(x[..., :1])], axis=-1), factor)
  return total[..., :-1] / total[..., -1:]


def _published_consistency(w, masks, size, sigma):
  """-sum_i mean_hw |G * (sum_channels w C_i)|, transcribed from the authors' code.

  Since w >= 0 and G >= 0 the absolute value is inert, and since convolution is linear and the
  masks partition the image, sum_i G * (w C_i) = G * w: the value does not depend on the masks.
  """
  per_coalition = w.sum(-1, keepdims=True) * masks  # [H, W, K]
  return -jnp.abs(_gaussian_filter(per_coalition, size, sigma)).mean(axis=(0, 1)).sum()


def _coalition_consistency(w, masks, size, sigma):
  """sum_i mean(C_i (w - m_i)^2), m_i = G * (w C_i) / (G * C_i + eps), per colour channel."""
  height, width, channels = w.shape
  num = masks.shape[-1]
  masked_w = w[..., :, None] * masks[..., None, :]  # [H, W, 3, K]
  weighted_sum = _gaussian_filter(masked_w.reshape(height, width, channels * num), size, sigma)
  weight = _gaussian_filter(masks, size, sigma)  # [H, W, K]
  local_mean = (weighted_sum.reshape(height, width, channels, num)
                / (weight[..., None, :] + _COALITION_EPS))
  deviation = masks[..., None, :] * (w[..., None] - local_mean) ** 2
  return deviation.mean(axis=(0, 1, 2)).sum()


def _smoothness(w, masks):
  """sum_i mean((Laplacian(w) C_i)^2), 4-neighbour Laplacian per channel, zero padding."""
  laplacian = _filter_channels(w, _LAPLACIAN)  # [H, W, 3]
  return ((laplacian[..., None] * masks[..., None, :]) ** 2).mean(axis=(0, 1, 2)).sum()


def objective(w: jax.Array, x: jax.Array, noise: jax.Array, labels: jax.Array, target,
              classifier: Classifier, config: PerturbConfig = PerturbConfig(),
              hyperparameters: Hyperparameters | None = None
              ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """PFC's perturbation loss for one image (METHOD.md section 2).

  Terms, unweighted:
    - mask: -mean(w) (the paper's `-||p||_1`, as a mean).
    - confidence: "hinge": mean over samples s and classes j of
      relu(f_j(x + eps_s w) - f_t(x + eps_s w)), on logits (zero for j = t). "log_softmax":
      mean over samples of -log softmax(f(x + eps_s w))_t.
    - consistency: "published": `-sum_i mean_hw |G * (sum_c w C_i)|`, G the unnormalised
      `kernel_size` Gaussian with zero padding. Because w >= 0, G >= 0 and the coalitions
      C_i partition the image, it equals -mean(G * sum_c w): it does NOT depend on the
      coalitions, and acts as a second reward on noise size. "coalition":
      sum_i mean(C_i (w - m_i)^2) with m_i = G * (w C_i) / (G * C_i + eps), the
      Gaussian-weighted mean of w inside coalition i; it penalises variation of w within a
      coalition and none across borders. "off": 0.
    - smoothness: sum_i mean((Laplacian(w) C_i)^2), which also reduces to mean(Laplacian(w)^2).
    - deletion: mean over samples of softmax(f(x + eps_s (max_w - w)))_t, the target's
      probability when the noise falls where w is small: the deletion game of Fong and Vedaldi
      (ICCV 2017), played on the same w as the preservation game (the "dual" objective of
      Extremal Perturbations, Fong, Patrick and Vedaldi, ICCV 2019). The preservation terms
      alone leave redundant evidence noised (keeping one of two cues suffices); this term
      fails unless every cue is marked salient, which the most-relevant-first removal curves
      (deletion, ROAD MoRF) reward. Evaluated (a second batch of S classifier calls on the
      same eps) only when `config.deletion_weight` is nonzero; 0 otherwise.

  Pure and differentiable in `w`, `x`, `noise`, the classifier's params and the
  hyperparameters.

  Args:
    w: `[H, W, 3] float32` noise scale.
    x: `[H, W, 3] float32` image in the classifier's normalised input space.
    noise: `[S, H, W, 3] float32` standard normal samples.
    labels: `[H, W] int32` coalition labels in [0, config.max_coalitions); larger values
      belong to no coalition.
    target: int or `[] int32` class to keep on top.
    classifier: Its `__call__` maps normalised `[S, H, W, 3]` images to logits `[S, C]`.
    config: The consistency variant, and which terms exist: a term whose weight in `config` is
      0 is left out (so that XLA drops its computation).
    hyperparameters: The weights and sigma as (possibly traced) arrays; default: `config`'s.

  Returns:
    `(total, terms)`: `total [] float32` = sum over the terms kept of weight * term;
    `terms` maps "mask", "confidence", "consistency", "smoothness", "deletion" to `[] float32`
    unweighted values.
  """
  hyper = Hyperparameters.from_config(config) if hyperparameters is None else hyperparameters
  logits = classifier(_classifier_inputs(w, x, noise, config, hyper))
  return _objective_terms(w, logits, labels, target, config, hyper)


def _classifier_inputs(w, x, noise, config: PerturbConfig, hyper: Hyperparameters) -> jax.Array:
  """The noisy images `objective` classifies for one image: `[S, H, W, 3]` under w, then
  (with the deletion term) `[S, H, W, 3]` under `max_w - w`."""
  perturbed = functools.partial(_perturbed, x, noise, hyper.max_w,
                                config.blur_pixels(*x.shape[:2]))
  preserved = perturbed(w)  # [S, H, W, 3]
  if config.deletion_weight:
    return jnp.concatenate([preserved, perturbed(hyper.max_w - w)])
  return preserved


def _objective_terms(w, logits, labels, target, config: PerturbConfig, hyper: Hyperparameters):
  """`objective`'s `(total, terms)` from the logits of `_classifier_inputs`."""
  deletion = jnp.zeros((), w.dtype)
  if config.deletion_weight:
    logits, deleted_logits = jnp.split(logits, 2)
    deletion = jnp.take(jax.nn.softmax(deleted_logits, axis=-1), target, axis=-1).mean()
  if config.confidence == "hinge":
    confidence = jax.nn.relu(logits - jnp.take(logits, target, axis=-1)[:, None]).mean()
  else:
    confidence = -jnp.take(jax.nn.log_softmax(logits, axis=-1), target, axis=-1).mean()
  masks = jax.nn.one_hot(labels, config.max_coalitions, dtype=w.dtype)  # [H, W, K]
  if config.consistency == "published":
    consistency = _published_consistency(w, masks, config.kernel_size, hyper.sigma)
  elif config.consistency == "coalition":
    consistency = _coalition_consistency(w, masks, config.kernel_size, hyper.sigma)
  else:
    consistency = jnp.zeros((), w.dtype)
  terms = {
      "mask": -w.mean(),
      "confidence": confidence,
      "consistency": consistency,
      "smoothness": _smoothness(w, masks),
      "deletion": deletion,
  }
  total = sum(getattr(hyper, f"{name}_weight") * terms[name] for name in _TERMS
              if getattr(config, f"{name}_weight"))
  return jnp.asarray(total, w.dtype), terms


def parameter_shape(config: PerturbConfig, height: int, width: int) -> tuple[int, ...]:
  """Shape of the optimised parameters theta of one `height x width` image.

  "pixel": `[H, W, 3]`; "region": `[max_regions + max_coalitions, 3]`; "lowres" and
  "guided": `[ceil(H / lowres_stride), ceil(W / lowres_stride), 3]`.
  """
  if config.parameterization == "region":
    return (config.max_regions + config.max_coalitions, 3)
  if config.parameterization in ("lowres", "guided"):
    return (-(-height // config.lowres_stride), -(-width // config.lowres_stride), 3)
  return (height, width, 3)


def _truncated_gaussian(sigma: float) -> np.ndarray:
  """`[2 r + 1] float64` unnormalised 1-D Gaussian exp(-d^2 / (2 sigma^2)), r = round(2 sigma)
  (at least 1): the window of `coalition_smoothing`, `smooth_saliency` and correlated noise."""
  radius = max(1, int(round(2 * sigma)))
  with np.errstate(over="ignore"):  # A tiny sigma leaves the centre tap alone, not NaN.
    return np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2)


def coalition_smoothing(field: jax.Array, labels: jax.Array, num_coalitions: int,
                        sigma: float) -> jax.Array:
  """Smooths `field [H, W, C]` inside each coalition only (normalised convolution).

  At a pixel p of coalition i the result is sum_q G(p - q) C_i(q) field(q) / sum_q G(p - q)
  C_i(q), G a Gaussian of standard deviation `sigma` pixels truncated at 2 sigma (Knutsson and
  Westin, CVPR 1993): a convex combination of the field's values in coalition i, so it stays in
  the field's range, and no value crosses a coalition border.

  Args:
    field: `[H, W, C] float32`.
    labels: `[H, W] int32` coalition labels; labels outside [0, num_coalitions) keep the
      field's own value.
    num_coalitions: Static number of coalition labels.
    sigma: Gaussian standard deviation in pixels (static).

  Returns:
    `[H, W, C] float32`.
  """
  height, width, channels = field.shape
  factor = _truncated_gaussian(sigma)
  factor = (factor / factor.sum()).astype(np.float32)
  masks = jax.nn.one_hot(labels, num_coalitions, dtype=field.dtype)  # [H, W, K]
  weighted = _separable_filter((field[..., :, None] * masks[..., None, :]).reshape(
      height, width, channels * num_coalitions), factor).reshape(
          height, width, channels, num_coalitions)
  weight = _separable_filter(masks, factor)  # [H, W, K], > 0 at every pixel of coalition k
  own = jnp.take_along_axis(weighted, jnp.clip(labels, 0, num_coalitions - 1)[:, :, None, None],
                            axis=-1)[..., 0]
  own_weight = jnp.take_along_axis(weight, jnp.clip(labels, 0, num_coalitions - 1)[:, :, None],
                                   axis=-1)
  inside = ((labels >= 0) & (labels < num_coalitions))[..., None]
  return jnp.where(inside, own / jnp.where(inside, own_weight, 1.0), field)


def noise_scale(config: PerturbConfig, theta: jax.Array, size: tuple[int, int],
                regions: jax.Array | None = None, labels: jax.Array | None = None) -> jax.Array:
  """w `[H, W, 3]` from the parameters theta of one image (see `parameter_shape`).

  Args:
    config: Selects the parameterization.
    theta: One image's parameters, in [0, max_w].
    size: `(H, W)`.
    regions: `[H, W] int32` region numbers of `pfc_jax.regions.region_ids`; "region" only.
    labels: `[H, W] int32` coalition labels; "guided" only.

  Returns:
    `[H, W, 3]` noise scale, in [0, max_w] when theta is (bilinear upsampling and the
    coalition smoothing are convex combinations).
  """
  if config.parameterization == "region":
    return theta[regions]
  if config.parameterization in ("lowres", "guided"):
    field = jax.image.resize(theta, (*size, theta.shape[-1]), "linear")
    if config.parameterization == "guided":
      field = coalition_smoothing(field, labels, config.max_coalitions, config.lowres_stride / 2)
    return field
  return theta


def _loss_and_grad(theta, regions, x, noise, labels, target, classifier, config, hyper):
  """Objective and its gradient in theta for one image; the S samples in chunks if configured.

  The samples only enter through a mean, so the mean over equal chunks of the chunk
  objectives is the full objective, and likewise its gradient.
  """
  classifier = _precision.classifier_in(classifier, config.precision)

  def loss(theta, noise):
    w = noise_scale(config, theta, x.shape[:2], regions, labels)
    return objective(w, x, noise, labels, target, classifier, config, hyper)[0]

  return _in_noise_chunks(jax.value_and_grad(loss), theta, noise, config)


def _in_noise_chunks(value_and_grad, params, noise, config: PerturbConfig, axis: int = 0):
  """`value_and_grad(params, noise)`, or with `config.noise_chunk` the mean over chunks of that
  many samples (the sample axis `axis` of every noise array split) of its values and gradients,
  accumulated in a `lax.scan`."""
  chunk = config.noise_chunk or config.noise_samples
  if chunk == config.noise_samples:
    return value_and_grad(params, noise)
  num_chunks = config.noise_samples // chunk
  chunks = jax.tree.map(lambda n: jnp.moveaxis(n.reshape(
      *n.shape[:axis], num_chunks, chunk, *n.shape[axis + 1:]), axis, 0), noise)

  def accumulate(sums, noise_chunk):
    return jax.tree.map(jnp.add, sums, value_and_grad(params, noise_chunk)), None

  zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), jax.eval_shape(
      value_and_grad, params, jax.tree.map(lambda c: c[0], chunks)))
  sums, _ = lax.scan(accumulate, zeros, chunks)
  return jax.tree.map(lambda x: x / num_chunks, sums)


class _State(NamedTuple):
  """Loop carry of one image (leading `[B]` axes under batching "vmap")."""

  x: jax.Array  # [H, W, 3] normalised image
  labels: jax.Array  # [H, W] int32
  regions: jax.Array | None  # [H, W] int32 region numbers ("region" only)
  target: jax.Array  # [] int32
  probs: jax.Array  # [] float32, the target's softmax probability on the clean image
  key: jax.Array  # PRNG key
  hyper: Hyperparameters  # [] each
  theta: jax.Array  # parameter_shape
  opt_state: optax.OptState
  step: jax.Array  # [] int32


def _optimizer(config: PerturbConfig, learning_rate) -> optax.GradientTransformation:
  if config.schedule == "cosine":
    learning_rate = optax.cosine_decay_schedule(learning_rate, config.steps)
  return optax.adam(learning_rate)


def _initial_state(config: PerturbConfig, classifier: Classifier, inputs) -> _State:
  """The state of one image before the first step; `inputs` are `(image [H, W, 3], labels
  [H, W], key, hyper)`. The clean prediction is float32 whatever `config.precision`."""
  image, labels, key, hyper = inputs
  x = classifier.normalize(image)
  probs = jax.nn.softmax(classifier(x[None])[0])
  target = jnp.argmax(probs).astype(jnp.int32)
  regions = None
  if config.parameterization == "region":
    regions = regions_lib.region_ids(labels, config.max_regions, config.max_coalitions)
  theta = jnp.zeros(parameter_shape(config, *x.shape[:2]), x.dtype)
  return _State(x, labels, regions, target, probs[target], key, hyper, theta,
                _optimizer(config, 0.0).init(theta), jnp.zeros((), jnp.int32))  # init ignores the rate


def sample_noise(config: PerturbConfig, key: jax.Array, shape: tuple[int, int, int]) -> jax.Array:
  """The S noise samples eps of one step: `[noise_samples, *shape] float32`,
  N(0, noise_std^2) at each pixel, spatially correlated when `config.noise_sigma > 0` (see
  `PerturbConfig`)."""
  if not config.noise_std:
    return jnp.zeros((config.noise_samples, *shape))
  return config.noise_std * _unit_noise(config, key, shape)


def _unit_noise(config: PerturbConfig, key: jax.Array, shape: tuple[int, int, int]) -> jax.Array:
  if not config.noise_sigma:
    return jax.random.normal(key, (config.noise_samples, *shape))
  factor = _truncated_gaussian(config.noise_sigma)
  factor = (factor / np.sqrt((factor**2).sum())).astype(np.float32)  # unit variance per axis
  radius = len(factor) // 2
  height, width, channels = shape
  white = jax.random.normal(
      key, (config.noise_samples, height + 2 * radius, width + 2 * radius, channels))
  # Blurred over the padded field, then cropped: no output pixel sees the zero padding.
  planes = jnp.moveaxis(white, 0, 2).reshape(height + 2 * radius, width + 2 * radius, -1)
  blurred = _separable_filter(planes, factor)[radius:radius + height, radius:radius + width]
  return jnp.moveaxis(blurred.reshape(height, width, config.noise_samples, channels), 2, 0)


def _step_noise(config: PerturbConfig, state: _State) -> jax.Array:
  """The noise samples `[S, H, W, 3]` of one image's next step: its key folded with the step."""
  return sample_noise(config, jax.random.fold_in(state.key, state.step), state.x.shape)


def _apply_gradient(config: PerturbConfig, state: _State, grad: jax.Array) -> _State:
  """One image's Adam update with gradient `grad`, theta then clipped to [0, max_w]."""
  updates, opt_state = _optimizer(config, state.hyper.learning_rate).update(
      grad, state.opt_state, state.theta)
  theta = jnp.clip(optax.apply_updates(state.theta, updates), 0.0, state.hyper.max_w)
  return state._replace(theta=theta, opt_state=opt_state, step=state.step + 1)


def _step(config: PerturbConfig, classifier: Classifier, state: _State) -> tuple[_State, jax.Array]:
  """One Adam step of one image; returns the new state and the objective `[]`."""
  total, grad = _loss_and_grad(state.theta, state.regions, state.x, _step_noise(config, state),
                               state.labels, state.target, classifier, config, state.hyper)
  return _apply_gradient(config, state, grad), total


def smooth_saliency(saliency: jax.Array, sigma: float) -> jax.Array:
  """The Gaussian-weighted local mean of `saliency [H, W]` (`PerturbConfig.saliency_sigma`).

  sum_q G(p - q) s(q) / sum_q G(p - q) over the pixels q inside the image, G a Gaussian of
  standard deviation `sigma` pixels truncated at 2 sigma: a convex combination of the map's
  values, so it stays in their range, and the image border does not darken the map. `sigma`
  0 returns the map unchanged.

  Returns:
    `[H, W] float32`.

  Raises:
    ValueError: for a negative or non-numeric `sigma`.
  """
  if not (_is_finite_number(sigma) and sigma >= 0):
    raise ValueError(f"`sigma` must be a finite number >= 0 (pixels), got {sigma!r}.")
  if not sigma:
    return saliency
  return _local_mean(saliency[..., None], sigma)[..., 0]


def saliency_map(w: jax.Array, saliency_sigma: float = 0.0) -> jax.Array:
  """PFC's saliency of one image, `[H, W] float32`: 1 - mean over channels of `w [H, W, 3]`,
  smoothed by `smooth_saliency` when `saliency_sigma` > 0 (`PerturbConfig.saliency_sigma`)."""
  return smooth_saliency(1.0 - w.mean(axis=-1), saliency_sigma)


def _final_noise_scale(config: PerturbConfig, classifier: Classifier, state: _State):
  """`(w [H, W, 3], saliency [H, W], target [], probs [])` of one image."""
  del classifier
  w = noise_scale(config, state.theta, state.x.shape[:2], state.regions, state.labels)
  return w, saliency_map(w, config.saliency_sigma), state.target, state.probs


# One image's perturbation for `pfc_jax._loop.run_images`: inputs `(image, labels, key,
# hyper)`, shared the classifier.
_STAGE = _loop.Stage(_initial_state, _step, _final_noise_scale)


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


def static_part(config: PerturbConfig) -> PerturbConfig:
  """The part of `config` that the compiled programs depend on: `config` with every
  `SWEEPABLE` value replaced by a placeholder, since those reach the programs as traced
  `Hyperparameters` (a loss weight keeps only whether it is 0, which decides whether its term
  exists), and with the layout and driver, which choose programs rather than enter them, at
  "auto" (and no `compute_batch`). Configs that differ only in those values share one
  compilation."""
  placeholders = {name: float(bool(getattr(config, name))) if name.endswith("_weight") else 1.0
                  for name in SWEEPABLE}
  return dataclasses.replace(config, batching="auto", driver="auto", compute_batch=None,
                             **placeholders)


def _games(config: PerturbConfig) -> tuple[PerturbConfig, ...]:
  """The games `config` plays, as static settings (`static_part`): its own objective, then with
  `with_preservation_game` the preservation game (no deletion term)."""
  config = static_part(config)
  if not config.with_preservation_game:
    return (config,)
  return config, dataclasses.replace(config, deletion_weight=0.0, with_preservation_game=False)


def _games_prepare(games, classifier, inputs) -> tuple[_State, ...]:
  """One image's state in every game: the same start, the deletion weight zero after the
  first game, as `_run` gives the preservation game."""
  state = _initial_state(games[0], classifier, inputs)
  preservation = state._replace(hyper=state.hyper._replace(
      deletion_weight=jnp.zeros_like(state.hyper.deletion_weight)))
  return (state,) + (preservation,) * (len(games) - 1)


def _games_step(games, classifier, states):
  """One Adam step of one image in every game, one game after another."""
  stepped = [_step(game, classifier, state) for game, state in zip(games, states)]
  return tuple(state for state, _ in stepped), tuple(total for _, total in stepped)


def _games_finish(games, classifier, states):
  return tuple(_final_noise_scale(game, classifier, state) for game, state in zip(games, states))


def _game_inputs(config: PerturbConfig, states: _State, theta, noise):
  """`(w [B, H, W, 3], noisy images [B, N, H, W, 3])` of a compute batch in one game."""
  size = states.x.shape[1:3]
  w = jax.vmap(lambda t, r, l: noise_scale(config, t, size, r, l))(
      theta, states.regions, states.labels)
  images = jax.vmap(lambda *a: _classifier_inputs(*a[:3], config, a[3]))(
      w, states.x, noise, states.hyper)
  return w, images


def _games_dense_step(games, classifier, states):
  """One Adam step of every image of a compute batch in every game (states `[B, ...]`), the
  noisy images of all of them (`B x S x (1 + deletion term)` per game) in ONE classifier
  batch. The loss is the sum of the per-image objectives, so each image's gradient is its own
  objective's; Adam is elementwise. Same arithmetic per image as `_games_step` up to float
  rounding. Returns the new states and each game's objectives `[B]`."""
  classifier = _precision.classifier_in(classifier, games[0].precision)
  noises = tuple(jax.vmap(functools.partial(_step_noise, game))(state)
                 for game, state in zip(games, states))

  def loss(thetas, noises):
    played = [_game_inputs(*args) for args in zip(games, states, thetas, noises)]
    logits = classifier(jnp.concatenate(
        [images.reshape(-1, *images.shape[2:]) for _, images in played]))
    totals, start = [], 0
    for game, state, (w, images) in zip(games, states, played):
      count = images.shape[0] * images.shape[1]
      game_logits = logits[start:start + count].reshape(*images.shape[:2], -1)
      start += count
      totals.append(jax.vmap(lambda *a, game=game: _objective_terms(*a[:4], game, a[4])[0])(
          w, game_logits, state.labels, state.target, state.hyper))
    return sum(total.sum() for total in totals), tuple(totals)

  thetas = tuple(state.theta for state in states)
  (_, totals), grads = _in_noise_chunks(
      jax.value_and_grad(loss, has_aux=True), thetas, noises, games[0], axis=1)
  states = tuple(jax.vmap(functools.partial(_apply_gradient, game))(state, grad)
                 for game, state, grad in zip(games, states, grads))
  return states, totals


# Every game of one image (`_games`) for the "dense" layout: inputs as `_STAGE`'s; the carry,
# the per-step objectives and the outputs are tuples over the games.
_GAMES_STAGE = _loop.Stage(_games_prepare, _games_step, _games_finish,
                           dense_step=_games_dense_step)


def _two_games(dual: Perturbation, preservation: Perturbation) -> Perturbation:
  """The mean of the dual and the preservation game (`PerturbConfig.with_preservation_game`)."""
  return dual._replace(
      w=(dual.w + preservation.w) / 2,
      saliency=(min_max_normalize(dual.saliency) + min_max_normalize(preservation.saliency)) / 2,
      losses=(dual.losses + preservation.losses) / 2)


def _run_dense(classifier, images, labels, keys, config, hyper) -> Perturbation:
  """Every game of every image in the "dense" layout; `hyper` holds `[B]` arrays."""
  outputs, losses = _loop.run_images(
      _GAMES_STAGE, _games(config), classifier, (images, labels, keys, hyper), config.steps,
      batching="dense", driver=config.driver, compute_batch=config.compute_batch,
      compute_batch_option="PerturbConfig.compute_batch")
  games = [Perturbation(*output, losses=loss) for output, loss in zip(outputs, losses)]
  return games[0] if len(games) == 1 else _two_games(*games)


def _run_game(classifier, images, labels, keys, config, hyper) -> Perturbation:
  """Optimises every image of the batch in `config.batching`'s layout; `hyper` holds `[B]`
  arrays."""
  static = static_part(config)  # One compilation for every layout, driver and traced value.
  (w, saliency, target, probs), losses = _loop.run_images(
      _STAGE, static, classifier, (images, labels, keys, hyper), config.steps,
      batching=config.batching, driver=config.driver, accelerator=_ACCELERATOR_LAYOUT)
  return Perturbation(w=w, saliency=saliency, target=target, probs=probs, losses=losses)


def _run(classifier, images, labels, keys, config, hyper) -> Perturbation:
  """`_run_game`, and with `config.with_preservation_game` the mean of the dual and the
  preservation game (`PerturbConfig.with_preservation_game`); under "dense" both games in one
  program (`_run_dense`)."""
  if config.layout() == "dense":
    return _run_dense(classifier, images, labels, keys, config, hyper)
  dual = _run_game(classifier, images, labels, keys, config, hyper)
  if not config.with_preservation_game:
    return dual
  preservation = _run_game(
      classifier, images, labels, keys,
      dataclasses.replace(config, deletion_weight=0.0, with_preservation_game=False),
      hyper._replace(deletion_weight=jnp.zeros_like(hyper.deletion_weight)))
  return _two_games(dual, preservation)


def _check_common(classifier, images, labels, key, config):
  if not isinstance(config, PerturbConfig):
    raise ValueError(f"`config` must be a PerturbConfig, got {type(config).__name__}.")
  images = _inputs.check_images(images)
  check_classifier(classifier, images)
  labels = _check_labels(labels, images.shape, config.max_coalitions)
  return images, labels, _inputs.per_image_keys(key, images.shape[0])


def perturb(classifier: Classifier, images, labels, key,
            config: PerturbConfig = PerturbConfig()) -> Perturbation:
  """Optimises PFC's noise scale w for each image, independently (see `batching`).

  Per step and image: S noise samples from the image's key folded with the step index (so the
  result depends neither on the loop driver nor on `noise_chunk`), the objective's gradient in
  the parameters theta of w (`config.parameterization`), one Adam update, then theta clipped to
  [0, max_w]. theta starts at 0.

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
    ValueError: for malformed images, labels, key or config, or a classifier whose `apply_fn`
      does not return logits `[B, C]` (`pfc_jax.classifier.check_classifier`).

  Example:
    >>> result = perturb(classifier, images, coalitions.labels, jax.random.key(0))
    >>> result.saliency.shape  # [B, H, W]
  """
  images, labels, keys = _check_common(classifier, images, labels, key, config)
  hyper = jax.tree.map(lambda v: jnp.full(images.shape[:1], v),
                       Hyperparameters.from_config(config))
  return _run(classifier, images, labels, keys, config, hyper)


def sweep_settings(settings: Mapping[str, Sequence[float]]) -> int:
  """Validates a sweep's `{field: K values}` and returns K.

  Raises:
    ValueError: for an empty sweep, a field outside `SWEEPABLE`, value lists of unequal length,
      values that are not finite numbers, or non-positive values where the field must be
      positive.
  """
  if not settings:
    raise ValueError(f"`settings` must name at least one of {SWEEPABLE}.")
  unknown = sorted(set(settings) - set(SWEEPABLE))
  if unknown:
    raise ValueError(f"`settings` fields {unknown} cannot be swept; choose from {SWEEPABLE}.")
  lengths = {name: len(values) for name, values in settings.items()}
  if len(set(lengths.values())) != 1 or 0 in lengths.values():
    raise ValueError(f"`settings` must give the same number (>= 1) of values per field, got {lengths}.")
  for name, values in settings.items():
    if not all(_is_finite_number(v) for v in values):
      raise ValueError(f"`settings[{name!r}]` must be finite numbers, got {list(values)}.")
  for name in ("sigma", "max_w", "learning_rate"):
    if name in settings and not all(v > 0 for v in settings[name]):
      raise ValueError(f"`settings[{name!r}]` must be positive, got {list(settings[name])}.")
  for name in settings:
    if name.endswith("_weight") and not all(v >= 0 for v in settings[name]):
      raise ValueError(f"`settings[{name!r}]` must be >= 0, got {list(settings[name])}.")
  return next(iter(lengths.values()))


def perturb_sweep(classifier: Classifier, images, labels, key, config: PerturbConfig,
                  settings: Mapping[str, Sequence[float]]) -> Perturbation:
  """`perturb` under K objective settings at once: one compilation, K x B per-image problems.

  Setting k is `config` with `field = settings[field][k]` for every swept field; the swept
  values are traced arrays (`Hyperparameters`), not static config fields, so any K values of
  any `SWEEPABLE` fields cost one compilation. Member k equals
  `perturb(classifier, images, labels, key, replace(config, **setting k))`: image i keeps its
  key in every member, and each problem runs the same per-image program (to float32 equality,
  except under `batching="vmap"`, where the larger batch may change the last bits).

  A loss term whose weight is 0 in `config` is still computed when its weight is swept.

  Args:
    classifier, images, labels, key: As for `perturb`.
    config: The base settings (structure: parameterization, consistency variant, steps, S).
    settings: `{field: [K values]}` for fields in `SWEEPABLE` (`mask_weight`,
      `confidence_weight`, `consistency_weight`, `smoothness_weight`, `deletion_weight`,
      `sigma`, `max_w`, `learning_rate`).

  Returns:
    A `Perturbation` whose arrays have leading `[K, B]` axes.

  Raises:
    ValueError: for malformed inputs or settings.
  """
  images, labels, keys = _check_common(classifier, images, labels, key, config)
  num = sweep_settings(settings)
  batch = images.shape[0]
  base = Hyperparameters.from_config(config)
  hyper = Hyperparameters(*(
      jnp.repeat(jnp.asarray(settings[name], jnp.float32), batch) if name in settings
      else jnp.full(num * batch, value) for name, value in zip(SWEEPABLE, base)))
  static = dataclasses.replace(
      config, **{name: 1.0 for name in settings if name.endswith("_weight")})
  tile = lambda a: jnp.concatenate([a] * num)
  result = _run(classifier, tile(images), tile(labels), tile(keys), static, hyper)
  return jax.tree.map(lambda a: a.reshape(num, batch, *a.shape[1:]), result)
