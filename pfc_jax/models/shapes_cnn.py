"""A small VGG-style classifier for the synthetic shapes benchmark (`pfc_jax.benchmarks.shapes`).

Three blocks of two 3x3 convolutions (8, 16, 32 channels, ReLU), 2x2 max-pooling after the
first two, global max pooling and one dense layer: 18k parameters. Global max pooling (rather
than average) lets one small object decide the class whatever the clutter around it; with it
training leaves the chance-level plateau within a hundred steps. The project trains it with
`scripts/train_shapes.py` and ships the weights as `pfc_jax/assets/shapes_cnn.safetensors`
(flat keys such as `params/conv1_1/kernel`).

Variables: `params[name]['kernel'|'bias']` for `conv1_1, conv1_2, conv2_1, conv2_2, conv3_1,
conv3_2` (kernels HWIO) and `fc` (kernel `[widths[2], num_classes]`).
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

from pfc_jax.benchmarks.shapes import CLASS_NAMES

# Input normalisation: RGB in [0, 1] -> (x - MEAN) / STD, close to the benchmark's statistics.
MEAN = (0.5, 0.5, 0.5)
STD = (0.25, 0.25, 0.25)

_BLOCKS = (("conv1_1", "conv1_2"), ("conv2_1", "conv2_2"), ("conv3_1", "conv3_2"))


class ShapesCNN(nn.Module):
  """VGG-style CNN: conv-conv-pool, conv-conv-pool, conv-conv, global max pool, dense.

  Attributes:
    num_classes: Number of output logits.
    widths: Output channels of the three convolution blocks.
  """

  num_classes: int = len(CLASS_NAMES)
  widths: tuple[int, int, int] = (8, 16, 32)

  def setup(self):
    conv = [functools.partial(nn.Conv, width, (3, 3), padding="SAME") for width in self.widths]
    self.conv1_1, self.conv1_2 = conv[0](), conv[0]()
    self.conv2_1, self.conv2_2 = conv[1](), conv[1]()
    self.conv3_1, self.conv3_2 = conv[2](), conv[2]()
    self.fc = nn.Dense(self.num_classes)

  def features(self, x: jax.Array) -> jax.Array:
    """Last convolution's activations after ReLU.

    Args:
      x: `[B, H, W, 3] float32`, normalised with `MEAN` and `STD`; H and W divisible by 4.

    Returns:
      `[B, H / 4, W / 4, widths[2]] float32`.
    """
    for block, names in enumerate(_BLOCKS):
      if block:
        x = nn.max_pool(x, (2, 2), strides=(2, 2))
      for name in names:
        x = nn.relu(getattr(self, name)(x))
    return x

  def head(self, activations: jax.Array) -> jax.Array:
    """Logits `[B, num_classes]` from `features` activations `[B, h, w, K]`."""
    return self.fc(jnp.max(activations, axis=(1, 2)))

  def __call__(self, x: jax.Array) -> jax.Array:
    """Logits `[B, num_classes] float32` for normalised images `x [B, H, W, 3]`."""
    return self.head(self.features(x))
