"""A small Vision Transformer for the synthetic shapes benchmark (`pfc_jax.benchmarks.shapes`).

Dosovitskiy et al., "An Image is Worth 16x16 Words", ICLR 2021, at the benchmark's scale: an
8x8 grid of patch tokens on 64 px images, learned position embeddings, `depth` pre-norm blocks
(LayerNorm, multi-head self-attention, residual; LayerNorm, GELU MLP, residual), a final
LayerNorm, global max pooling over the tokens and one dense layer.

The patch embedding is a convolutional stem (Xiao et al., "Early Convolutions Help Transformers
See Better", NeurIPS 2021; the hybrid of Dosovitskiy et al., sec. 3.1): three 4x4 convolutions of
stride 2 padded by 1 (ReLU) and a linear projection, so that token (i, j) reads its 8x8 patch
and a 7 px margin around it, a 22 px receptive field centred on the patch (the grid that
Grad-CAM and attention rollout upsample); beyond that, attention is the only path between
patches. Why a stem: with the linear 8x8 patch embedding of the original ViT, training on this
benchmark was far slower in trials (a CPU budget of minutes did not come near 0.97 test
accuracy); the stem is what Xiao et al. found to make ViTs train fast and stably.

Global max pooling rather than a class token or the mean of the tokens: the logits are a
function of the patch tokens alone, so `features` (the last block's patch tokens on the patch
grid) and `head` split the network exactly, as Grad-CAM and Score-CAM need
(`head(features(x)) == apply(x)`; a class token would sit outside the grid). Max rather than
mean, as for `shapes_cnn`: the one class object, a few tokens of the 64, decides the class
whatever the clutter; through the mean of LayerNorm-ed tokens its signal is diluted by the
others (the mean learned more slowly in trials). Attention rollout reads the mean of the patch
tokens' rows (`AttentionRolloutConfig(prefix_tokens=0)`, the default): the flow into every
token, among which the max pooling chooses per channel.

The project trains it with `scripts/train_shapes_vit.py` and ships the weights as
`pfc_jax/assets/shapes_vit.safetensors` (flat keys such as `params/block_0/qkv/kernel`).

Variables: `params['stem_{i}']` (4x4 convolutions, kernels HWIO), `params['patch_embed']`
(kernel `[stem_widths[-1], width]`), `params['position_embedding'] [image_size / patch,
image_size / patch, width]`, `params['block_{i}']` with `norm_attention`, `qkv` (kernel
`[width, 3 * width]`), `attention_out`, `norm_mlp`, `mlp_in`, `mlp_out`; `params['norm']` and
`params['fc']` (kernel `[width, num_classes]`).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from pfc_jax.benchmarks.shapes import CLASS_NAMES
from pfc_jax.models.shapes_cnn import MEAN, STD  # The same input normalisation as the CNN.

__all__ = ["MEAN", "STD", "ShapesViT"]


class _Block(nn.Module):
  """One pre-norm transformer block; returns the new tokens and its attention weights."""

  width: int
  heads: int
  mlp_ratio: int

  @nn.compact
  def __call__(self, tokens: jax.Array) -> tuple[jax.Array, jax.Array]:
    """`tokens [B, N, width]` -> `(tokens [B, N, width], attention [B, heads, N, N])`."""
    batch, num, _ = tokens.shape
    head_width = self.width // self.heads
    qkv = nn.Dense(3 * self.width, name="qkv")(nn.LayerNorm(name="norm_attention")(tokens))
    query, key, value = jnp.split(qkv.reshape(batch, num, 3, self.heads, head_width), 3, axis=2)
    query, key, value = (t[:, :, 0] for t in (query, key, value))  # [B, N, heads, head_width]
    logits = jnp.einsum("bqhd,bkhd->bhqk", query, key) / jnp.sqrt(head_width).astype(qkv.dtype)
    attention = jax.nn.softmax(logits, axis=-1)
    mixed = jnp.einsum("bhqk,bkhd->bqhd", attention, value).reshape(batch, num, self.width)
    tokens = tokens + nn.Dense(self.width, name="attention_out")(mixed)
    hidden = nn.gelu(nn.Dense(self.mlp_ratio * self.width, name="mlp_in")(
        nn.LayerNorm(name="norm_mlp")(tokens)))
    return tokens + nn.Dense(self.width, name="mlp_out")(hidden), attention


class ShapesViT(nn.Module):
  """Vision Transformer: convolutional stem, pre-norm blocks, LayerNorm, max over tokens, dense.

  Attributes:
    num_classes: Number of output logits.
    image_size: Side in pixels of the training images; it sets the position embeddings' grid
      (`image_size / patch` squared), which other image sizes resample bilinearly (as ViT does
      when fine-tuning at another resolution).
    stem_widths: Output channels of the stem's stride-2 convolutions; their number sets the
      patch side, `patch = 2 ** len(stem_widths)` pixels (images' sides must be multiples of it).
    width: Token width.
    depth: Number of transformer blocks.
    heads: Attention heads per block; must divide `width`.
    mlp_ratio: Hidden width of each block's MLP, as a multiple of `width`.
  """

  num_classes: int = len(CLASS_NAMES)
  image_size: int = 64
  stem_widths: tuple[int, ...] = (16, 32, 64)
  width: int = 64
  depth: int = 4
  heads: int = 4
  mlp_ratio: int = 2

  @property
  def patch(self) -> int:
    """Side of the square patch that each token stands for, in pixels."""
    return 2 ** len(self.stem_widths)

  def setup(self):
    if self.width % self.heads:
      raise ValueError(f"`heads` ({self.heads}) must divide `width` ({self.width}).")
    self.stem = [nn.Conv(channels, (4, 4), strides=2, padding=((1, 1), (1, 1)),
                         name=f"stem_{i}") for i, channels in enumerate(self.stem_widths)]
    self.patch_embed = nn.Dense(self.width)
    grid = self.image_size // self.patch
    self.position_embedding = self.param("position_embedding", nn.initializers.normal(0.02),
                                         (grid, grid, self.width))
    self.blocks = [_Block(self.width, self.heads, self.mlp_ratio, name=f"block_{i}")
                   for i in range(self.depth)]
    self.norm = nn.LayerNorm()
    self.fc = nn.Dense(self.num_classes)

  def _encode(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """`(tokens [B, h, w, width], attention [B, depth, heads, h * w, h * w])` of images `x`."""
    batch, height, width, _ = x.shape
    if height % self.patch or width % self.patch:
      raise ValueError(f"Image sides must be multiples of the patch size {self.patch}, got "
                       f"{height}x{width}.")
    grid = (height // self.patch, width // self.patch)
    position = self.position_embedding
    if position.shape[:2] != grid:
      position = jax.image.resize(position, (*grid, self.width), method="bilinear")
    for conv in self.stem:
      x = nn.relu(conv(x))
    tokens = (self.patch_embed(x) + position.astype(x.dtype)).reshape(batch, -1, self.width)
    attention = []
    for block in self.blocks:
      tokens, weights = block(tokens)
      attention.append(weights)
    return tokens.reshape(batch, *grid, self.width), jnp.stack(attention, axis=1)

  def features(self, x: jax.Array) -> jax.Array:
    """The last block's patch tokens on the patch grid.

    Args:
      x: `[B, H, W, 3] float32`, normalised with `MEAN` and `STD`; H and W multiples of `patch`.

    Returns:
      `[B, H / patch, W / patch, width] float32`.
    """
    return self._encode(x)[0]

  def head(self, tokens: jax.Array) -> jax.Array:
    """Logits `[B, num_classes]` from `features` tokens `[B, h, w, width]`."""
    return self.fc(jnp.max(self.norm(tokens), axis=(1, 2)))

  def attention(self, x: jax.Array) -> jax.Array:
    """Every block's attention weights, for attention rollout.

    Args:
      x: `[B, H, W, 3] float32`, normalised with `MEAN` and `STD`.

    Returns:
      `[B, depth, heads, N, N] float32`, N = (H / patch) * (W / patch) patch tokens in row-major
      grid order, rows summing to 1 (`[b, l, h, i, j]`: how much token i reads token j).
    """
    return self._encode(x)[1]

  def __call__(self, x: jax.Array) -> jax.Array:
    """Logits `[B, num_classes] float32` for normalised images `x [B, H, W, 3]`."""
    return self.head(self.features(x))
