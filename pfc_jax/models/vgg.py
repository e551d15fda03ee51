"""VGG16 (Simonyan and Zisserman, 2015) as torchvision builds it, in Flax Linen.

Input: NHWC float32 images already normalised (`Classifier.normalize`). Adaptive average pooling
to 7x7 before the classifier, as torchvision's `vgg16`, so that any input of 32 px or more gives
the same logits as torchvision; dropout is left out (inference only).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

# The 3x3 convolutions, block by block; a 2x2 max pool follows every block.
BLOCKS = (
    ("conv1_1", "conv1_2"),
    ("conv2_1", "conv2_2"),
    ("conv3_1", "conv3_2", "conv3_3"),
    ("conv4_1", "conv4_2", "conv4_3"),
    ("conv5_1", "conv5_2", "conv5_3"),
)
BLOCK_CHANNELS = (64, 128, 256, 512, 512)
CONV_NAMES = tuple(name for block in BLOCKS for name in block)
POOLED_SIZE = 7  # Side of the adaptive average pool before fc6.
MIN_SIZE = 32  # Five 2x2 max pools need at least 32 px.


def _pool_matrix(in_size: int, out_size: int) -> np.ndarray:
  """`[out_size, in_size] float32` averaging weights of PyTorch's adaptive average pooling.

  Output bin `i` averages inputs `floor(i * in / out)` to `ceil((i + 1) * in / out)` (exclusive),
  so bins repeat inputs when `in < out` and may overlap or differ in width otherwise.
  """
  weights = np.zeros((out_size, in_size), np.float32)
  for i in range(out_size):
    start = (i * in_size) // out_size
    end = -(-((i + 1) * in_size) // out_size)
    weights[i, start:end] = 1.0 / (end - start)
  return weights


def adaptive_avg_pool(x: jax.Array, size: int) -> jax.Array:
  """PyTorch's `adaptive_avg_pool2d`: `[B, H, W, C]` -> `[B, size, size, C]`, same dtype."""
  height, width = x.shape[1:3]
  if (height, width) == (size, size):
    return x
  return jnp.einsum("oh,bhwc,pw->bopc", _pool_matrix(height, size).astype(x.dtype), x,
                    _pool_matrix(width, size).astype(x.dtype))


def _max_pool(x: jax.Array) -> jax.Array:
  return nn.max_pool(x, (2, 2), strides=(2, 2))


class VGG16(nn.Module):
  """VGG16 with torchvision's layout; parameters named `conv1_1` ... `conv5_3`, `fc6`-`fc8`.

  Convolution kernels are HWIO `[3, 3, in, out]`; `fc6` is `[25088, 4096]` for the NHWC
  flatten of the 7x7x512 pooled map (row-major over height, width, channel).

  Example:
    >>> model = VGG16()
    >>> variables = pfc_jax.weights.load("vgg16")
    >>> logits = model.apply(variables, x)  # x: [B, 224, 224, 3] normalised
    >>> logits, acts = model.apply(variables, x, capture=("conv5_3",))
    >>> acts["conv5_3"].shape  # (B, 14, 14, 512), after ReLU

  Attributes:
    num_classes: Number of logits.
  """

  num_classes: int = 1000

  def setup(self):
    self.convs = {
        name: nn.Conv(channels, (3, 3), padding=1, name=name)
        for block, channels in zip(BLOCKS, BLOCK_CHANNELS) for name in block}
    self.fc6 = nn.Dense(4096)
    self.fc7 = nn.Dense(4096)
    self.fc8 = nn.Dense(self.num_classes)

  def _trunk(self, x: jax.Array, capture: tuple[str, ...]) -> tuple[jax.Array, dict]:
    """relu5_3 `[B, H/16, W/16, 512]` and the captured activations of `x [B, H, W, 3]`."""
    if x.ndim != 4 or x.shape[1] < MIN_SIZE or x.shape[2] < MIN_SIZE:
      raise ValueError(
          f"VGG16 input must be [B, H, W, 3] with H, W >= {MIN_SIZE}, got {tuple(x.shape)}.")
    unknown = sorted(set(capture) - set(CONV_NAMES))
    if unknown:
      raise ValueError(f"`capture` names unknown layers {unknown}; choose from {CONV_NAMES}.")
    activations = {}
    for index, block in enumerate(BLOCKS):
      if index:
        x = _max_pool(x)
      for name in block:
        x = nn.relu(self.convs[name](x))
        if name in capture:
          activations[name] = x
    return x, activations

  def features(self, x: jax.Array) -> jax.Array:
    """Activations of the last convolution, relu5_3 `[B, H/16, W/16, 512] float32`.

    Args:
      x: Normalised images `[B, H, W, 3] float32`, H and W >= 32 (224 px gives 14x14).
    """
    return self._trunk(x, ())[0]

  def head(self, features: jax.Array) -> jax.Array:
    """Logits `[B, num_classes]` from relu5_3 activations `[B, h, w, 512]`.

    Max pool, adaptive average pool to 7x7, flatten, then fc6, ReLU, fc7, ReLU, fc8.
    """
    x = adaptive_avg_pool(_max_pool(features), POOLED_SIZE)
    x = x.reshape(x.shape[0], -1)
    x = nn.relu(self.fc6(x))
    x = nn.relu(self.fc7(x))
    return self.fc8(x)

  def __call__(self, x: jax.Array, capture: tuple[str, ...] = ()):
    """Logits of normalised images.

    Args:
      x: Normalised images `[B, H, W, 3] float32`, H and W >= 32.
      capture: Names of convolutions (`CONV_NAMES`) whose activations, after ReLU, to return.

    Returns:
      logits `[B, num_classes] float32`; with `capture`, the pair `(logits, activations)`,
      `activations[name]` being `[B, h, w, C] float32`.
    """
    features, activations = self._trunk(x, tuple(capture))
    logits = self.head(features)
    return (logits, activations) if capture else logits
