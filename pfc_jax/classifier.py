"""The classifier contract: one pytree that the whole pipeline takes."""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclasses.dataclass(frozen=True)
class Classifier:
  """An image classifier with its input normalisation.

  A pytree: `params` are its leaves; `apply_fn`, `mean`, `std` and `bgr` are static, so a
  Classifier passes through `jax.jit` and `jax.vmap` as an argument and equal static parts
  share one compilation. Keep `apply_fn` the same object across calls (a module-level function
  or `models.classifier`'s cached one) to avoid recompiling.

  Attributes:
    apply_fn: `apply_fn(params, x) -> logits [B, C]` for normalised NHWC images `x [B, H, W, 3]`.
    params: The classifier's variables (any pytree of arrays).
    mean: Per-channel mean subtracted after scaling, in the model's channel order.
    std: Per-channel standard deviation divided by, in the model's channel order.
    bgr: Whether the model expects BGR channel order (Caffe-converted weights such as Keras').
    features_fn: Optional `features_fn(params, x) -> activations [B, h, w, K]` of the layer that
      class-activation methods (Grad-CAM, Score-CAM) read, usually the last convolution.
    head_fn: Optional `head_fn(params, activations) -> logits [B, C]`, the rest of the network,
      so that `head_fn(params, features_fn(params, x)) == apply_fn(params, x)`.

  Users always feed RGB in [0, 1]; `normalize` applies the model's own convention.
  """

  apply_fn: Callable[[Any, jax.Array], jax.Array]
  params: Any
  mean: tuple[float, ...] = IMAGENET_MEAN
  std: tuple[float, ...] = IMAGENET_STD
  bgr: bool = False
  features_fn: Callable[[Any, jax.Array], jax.Array] | None = None
  head_fn: Callable[[Any, jax.Array], jax.Array] | None = None

  def __post_init__(self):
    object.__setattr__(self, "mean", tuple(float(v) for v in self.mean))
    object.__setattr__(self, "std", tuple(float(v) for v in self.std))
    object.__setattr__(self, "bgr", bool(self.bgr))

  def normalize(self, images01: jax.Array) -> jax.Array:
    """RGB `[..., H, W, 3]` in [0, 1] -> the model's normalised input, same shape."""
    x = images01[..., ::-1] if self.bgr else images01
    return (x - jnp.asarray(self.mean, x.dtype)) / jnp.asarray(self.std, x.dtype)

  def __call__(self, x: jax.Array) -> jax.Array:
    """Logits `[B, C]` for already normalised images `x [B, H, W, 3]`."""
    return self.apply_fn(self.params, x)

  def logits(self, images01: jax.Array) -> jax.Array:
    """Logits `[B, C]` for RGB images `[B, H, W, 3]` in [0, 1]."""
    return self.apply_fn(self.params, self.normalize(images01))


jax.tree_util.register_dataclass(
    Classifier, data_fields=["params"], meta_fields=["apply_fn", "mean", "std", "bgr", "features_fn", "head_fn"])
