"""SqueezeNet 1.1 (Iandola et al., 2016) as torchvision's `squeezenet1_1`, in Flax Linen.

Input: NHWC float32 images already normalised (`Classifier.normalize`). Ceil-mode 3x3 max pools,
Fire modules, a 1x1 convolution classifier with ReLU and a global average pool; dropout is left
out (inference only). Any input of 17 px or more works; 224 px gives a 13x13 last feature map.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

# (name, squeeze channels, expand channels per branch) of the Fire modules; torchvision's
# `features.{3,4,6,7,9,10,11,12}`. A ceil-mode max pool precedes fire2, fire4 and fire6.
FIRES = (("fire2", 16, 64), ("fire3", 16, 64), ("fire4", 32, 128), ("fire5", 32, 128),
         ("fire6", 48, 192), ("fire7", 48, 192), ("fire8", 64, 256), ("fire9", 64, 256))
_POOL_BEFORE = ("fire2", "fire4", "fire6")
LAYER_NAMES = ("conv1",) + tuple(name for name, _, _ in FIRES) + ("conv10",)
MIN_SIZE = 17


def max_pool_ceil(x: jax.Array, window: int = 3, stride: int = 2) -> jax.Array:
  """PyTorch's `max_pool2d(ceil_mode=True)` without padding: `[B, H, W, C]` -> `[B, h, w, C]`.

  `h = ceil((H - window) / stride) + 1`, less one when the last window would start past the
  input; the part of a window that hangs over the edge is ignored.
  """

  def extra(size):
    out = math.ceil((size - window) / stride) + 1
    if (out - 1) * stride >= size:
      out -= 1
    return (out - 1) * stride + window - size

  padding = tuple((0, extra(size)) for size in x.shape[1:3])
  return nn.max_pool(x, (window, window), strides=(stride, stride), padding=padding)


class Fire(nn.Module):
  """Squeeze 1x1 convolution, then expand 1x1 and 3x3 branches concatenated (1x1 first).

  Attributes:
    squeeze: Channels of the squeeze convolution.
    expand: Channels of each expand branch; the output has `2 * expand` channels.
  """

  squeeze: int
  expand: int

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """`[B, H, W, C] float32` -> `[B, H, W, 2 * expand] float32`."""
    x = nn.relu(nn.Conv(self.squeeze, (1, 1), name="squeeze")(x))
    return jnp.concatenate([
        nn.relu(nn.Conv(self.expand, (1, 1), name="expand1x1")(x)),
        nn.relu(nn.Conv(self.expand, (3, 3), padding=1, name="expand3x3")(x)),
    ], axis=-1)


class SqueezeNet1_1(nn.Module):  # pylint: disable=invalid-name (torchvision's name)
  """torchvision's `squeezenet1_1`; parameters named `conv1`, `fire2` ... `fire9`, `conv10`.

  Each Fire module holds `squeeze`, `expand1x1` and `expand3x3` convolutions; kernels are HWIO.

  Example:
    >>> variables = pfc_jax.weights.load("squeezenet1_1", "squeezenet1_1.safetensors")
    >>> logits, acts = SqueezeNet1_1().apply(variables, x, capture=("fire9",))
    >>> acts["fire9"].shape  # (B, 13, 13, 512) at 224 px

  Attributes:
    num_classes: Number of logits.
  """

  num_classes: int = 1000

  def setup(self):
    self.conv1 = nn.Conv(64, (3, 3), strides=(2, 2), padding="VALID")
    self.fires = {name: Fire(squeeze, expand, name=name) for name, squeeze, expand in FIRES}
    self.conv10 = nn.Conv(self.num_classes, (1, 1))

  def _trunk(self, x: jax.Array, capture: tuple[str, ...]) -> tuple[jax.Array, dict]:
    """fire9's output `[B, h, w, 512]` and the captured activations of `x [B, H, W, 3]`."""
    if x.ndim != 4 or x.shape[1] < MIN_SIZE or x.shape[2] < MIN_SIZE:
      raise ValueError(
          f"SqueezeNet1_1 input must be [B, H, W, 3] with H, W >= {MIN_SIZE}, got "
          f"{tuple(x.shape)}.")
    unknown = sorted(set(capture) - set(LAYER_NAMES))
    if unknown:
      raise ValueError(f"`capture` names unknown layers {unknown}; choose from {LAYER_NAMES}.")
    x = nn.relu(self.conv1(x))
    activations = {"conv1": x}
    for name, _, _ in FIRES:
      if name in _POOL_BEFORE:
        x = max_pool_ceil(x)
      x = self.fires[name](x)
      activations[name] = x
    return x, {name: activations[name] for name in capture if name in activations}

  def features(self, x: jax.Array) -> jax.Array:
    """Output of the last Fire module, `[B, h, w, 512] float32` (13x13 at 224 px).

    Args:
      x: Normalised images `[B, H, W, 3] float32`, H and W >= 17.
    """
    return self._trunk(x, ())[0]

  def _class_maps(self, features: jax.Array) -> jax.Array:
    return nn.relu(self.conv10(features))

  def head(self, features: jax.Array) -> jax.Array:
    """Logits `[B, num_classes]` from fire9's output `[B, h, w, 512]`: conv10, ReLU, mean."""
    return jnp.mean(self._class_maps(features), axis=(1, 2))

  def __call__(self, x: jax.Array, capture: tuple[str, ...] = ()):
    """Logits of normalised images.

    Args:
      x: Normalised images `[B, H, W, 3] float32`, H and W >= 17.
      capture: Names of layers (`LAYER_NAMES`: `conv1`, `fire2`-`fire9`, `conv10`) whose
        activations, after ReLU, to return.

    Returns:
      logits `[B, num_classes] float32`; with `capture`, the pair `(logits, activations)`,
      `activations[name]` being `[B, h, w, C] float32`.
    """
    capture = tuple(capture)
    features, activations = self._trunk(x, capture)
    class_maps = self._class_maps(features)
    if "conv10" in capture:
      activations["conv10"] = class_maps
    logits = jnp.mean(class_maps, axis=(1, 2))
    return (logits, activations) if capture else logits
