"""The Feature Extraction Network (FEN) whose per-pixel argmax gives the feature coalitions.

Architecture of the PFC authors' code (arXiv 2408.13397; lineage: Kim, Kanezaki and Tanaka,
"Unsupervised Learning of Image Segmentation Based on Differentiable Feature Clustering",
IEEE TIP 2020): 3x3 convolutions, stride 1, no pooling, full resolution::

  conv1_1, ReLU, conv1_2, ReLU, bn1; conv2_1, ReLU, conv2_2, ReLU, bn2;
  conv3_1, ReLU, bn3; conv4_1, ReLU, bn4; conv5_1, ReLU, bn5; conv6 (1x1), bn6.

Every 3x3 convolution has the shape of the VGG16 layer of the same name (at `width=1`), so
VGG16's kernels can be copied in. The network runs on ONE image with a leading batch axis of 1:
training-mode BatchNorm over that one image normalises each channel by its own spatial mean and
(biased) variance, which is instance normalisation; there are no running statistics to keep.

Padding: each 3x3 convolution pads its input by one pixel, reflected (`PADDING`), where the
authors' code pads with zeros. With zeros, a pixel within seven of the image border sees the
padding through the seven stacked convolutions, and its features, hence its coalition, follow
its distance from the border rather than the image: the coalition maps come out framed by
stripes one or two FEN pixels wide along every border. On the first six of the shared ImageNet
photos at 64 px, with the "fast" coalition stage and two seeds, the outermost row or column of
labels agreed with the next one inwards at 33% of positions with zero padding and 95% with
reflection (87% for two neighbouring rows in the interior, with either padding).
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

# (name, VGG16 output channels) of the 3x3 convolutions, and after which of them a norm follows.
CONV_LAYERS = (("conv1_1", 64), ("conv1_2", 64), ("conv2_1", 128), ("conv2_2", 128),
               ("conv3_1", 256), ("conv4_1", 512), ("conv5_1", 512))
_NORM_AFTER = {"conv1_2": "bn1", "conv2_2": "bn2", "conv3_1": "bn3", "conv4_1": "bn4",
               "conv5_1": "bn5"}
_BN_EPSILON = 1e-5  # PyTorch's BatchNorm2d default.
PADDING = "REFLECT"  # Of the 3x3 convolutions; see the module docstring.


def conv_channels(width: float) -> tuple[int, ...]:
  """Output channels of the 3x3 convolutions at channel multiplier `width`."""
  return tuple(max(1, round(channels * width)) for _, channels in CONV_LAYERS)


class CoalitionNet(nn.Module):
  """The FEN: `backbone` (3x3 convolutions) then `head` (1x1 convolution and norm).

  Initialise it with `init_params` (PyTorch's defaults); Flax's own `init` gives other
  distributions.

  Attributes:
    num_channels: Output channels l, the most coalitions the argmax can give.
    width: Channel multiplier of the 3x3 convolutions (1.0: VGG16's shapes).
  """

  num_channels: int = 20
  width: float = 1.0

  def setup(self):
    channels = conv_channels(self.width)
    self.convs = [
        nn.Conv(out, (3, 3), padding=PADDING, name=name)
        for (name, _), out in zip(CONV_LAYERS, channels)]
    self.norms = {conv: nn.InstanceNorm(epsilon=_BN_EPSILON, use_fast_variance=False, name=bn)
                  for conv, bn in _NORM_AFTER.items()}
    self.conv6 = nn.Conv(self.num_channels, (1, 1))
    self.bn6 = nn.InstanceNorm(epsilon=_BN_EPSILON, use_fast_variance=False)

  def backbone(self, x: jax.Array) -> jax.Array:
    """Features `[1, H, W, C5] float32` of one image `x [1, H, W, 3] float32`."""
    for (name, _), conv in zip(CONV_LAYERS, self.convs):
      x = nn.relu(conv(x))
      if name in self.norms:
        x = self.norms[name](x)
    return x

  def head(self, features: jax.Array) -> jax.Array:
    """Coalition scores `[1, H, W, l] float32` from backbone features `[1, H, W, C5]`."""
    return self.bn6(self.conv6(features))

  def __call__(self, x: jax.Array) -> jax.Array:
    """Coalition scores `[1, H, W, l] float32` of one image `x [1, H, W, 3] float32`."""
    return self.head(self.backbone(x))


def batched_head(params: dict, features: jax.Array) -> jax.Array:
  """`CoalitionNet.head` of B images at once, each with its own head parameters.

  The 1x1 convolution is one batched matrix product: under `vmap`, per-image kernels make it a
  grouped convolution (`feature_group_count` = B), and its kernel gradient one too, which
  XLA:GPU runs slowly; a matrix product with a batch axis stays dense.

  Args:
    params: `{"conv6": {"kernel" [B, 1, 1, C5, l], "bias" [B, l]}, "bn6": {"scale", "bias"
      [B, l]}}`, the head parameters of B networks.
    features: `[B, 1, H, W, C5]` backbone features, each image's with its batch axis of 1.

  Returns:
    `[B, 1, H, W, l]` coalition scores, as `vmap` of `head` gives them up to float rounding.
  """
  conv = params["conv6"]
  x = (jnp.einsum("bnhwc,bcl->bnhwl", features, conv["kernel"][:, 0, 0])
       + conv["bias"][:, None, None, None])
  norm = nn.InstanceNorm(epsilon=_BN_EPSILON, use_fast_variance=False)
  return jax.vmap(lambda p, y: norm.apply({"params": p}, y))(params["bn6"], x)


def init_params(key: jax.Array, num_channels: int = 20, width: float = 1.0) -> dict:
  """PyTorch's default initialisation of the FEN's parameters, as the authors' code has it.

  Every convolution's kernel and bias are U(-1/sqrt(fan_in), 1/sqrt(fan_in)) (PyTorch's
  kaiming_uniform(a=sqrt(5)) and bias rule), every norm has scale 1 and bias 0. All values come
  from one uniform draw: one random-number kernel to compile instead of one per layer.

  Args:
    key: PRNG key.
    num_channels: The network's `num_channels`.
    width: The network's `width`.

  Returns:
    The `params` collection of `CoalitionNet(num_channels, width)`.
  """
  shapes = jax.eval_shape(CoalitionNet(num_channels, width).init, jax.random.key(0),
                          jnp.zeros((1, 8, 8, 3)))["params"]
  conv_sizes = [(name, layer["kernel"].size + layer["bias"].size)
                for name, layer in shapes.items() if "kernel" in layer]
  draws = jax.random.uniform(key, (sum(size for _, size in conv_sizes),), minval=-1.0, maxval=1.0)
  params = {name: {"scale": jnp.ones(layer["scale"].shape), "bias": jnp.zeros(layer["bias"].shape)}
            for name, layer in shapes.items() if "scale" in layer}
  offset = 0
  for name, size in conv_sizes:
    kernel_shape, bias_shape = shapes[name]["kernel"].shape, shapes[name]["bias"].shape
    bound = 1.0 / math.sqrt(math.prod(kernel_shape[:-1]))
    values = bound * draws[offset:offset + size]
    params[name] = {"kernel": values[:-bias_shape[0]].reshape(kernel_shape),
                    "bias": values[-bias_shape[0]:]}
    offset += size
  return params
