"""Attention rollout (Abnar and Zuidema, "Quantifying Attention Flow in Transformers", ACL 2020)."""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Literal

import jax
import jax.numpy as jnp

from pfc_jax._inputs import check_images
from pfc_jax.baselines import _common
from pfc_jax.classifier import Classifier

HeadFusion = Literal["mean", "max", "min"]
_HEAD_FUSIONS = ("mean", "max", "min")


@dataclasses.dataclass(frozen=True)
class AttentionRolloutConfig:
  """Attention rollout settings.

  Attributes:
    head_fusion: How each block's heads are combined: "mean" (the paper's), or "max" / "min"
      over the heads (variants of the widely used `vit-explain` code). Default "mean".
    prefix_tokens: Tokens before the patch tokens in the attention maps (1 for a class token,
      more with register tokens). With prefix tokens the map is the first token's row of the
      rollout (the class token's, as in the paper); without, the mean of the patch tokens'
      rows (the flow into a globally pooled output). Default 0.
  """
  head_fusion: HeadFusion = "mean"
  prefix_tokens: int = 0

  def __post_init__(self):
    if self.head_fusion not in _HEAD_FUSIONS:
      raise ValueError(f"`head_fusion` must be one of {_HEAD_FUSIONS}, got {self.head_fusion!r}.")
    if isinstance(self.prefix_tokens, bool) or not isinstance(self.prefix_tokens, int) \
        or self.prefix_tokens < 0:
      raise ValueError(f"`prefix_tokens` must be an integer >= 0, got {self.prefix_tokens!r}.")


def patch_grid(num_patches: int, height: int, width: int) -> tuple[int, int]:
  """The `(h, w)` patch grid of `num_patches` tokens over an `height x width` image.

  Raises:
    ValueError: if no grid of the image's aspect ratio has `num_patches` cells.
  """
  rows = max(1, round(math.sqrt(num_patches * height / width)))
  if rows * (num_patches // rows) != num_patches or abs(
      height / rows - width / (num_patches // rows)) > 1:
    raise ValueError(f"{num_patches} patch tokens make no grid over a {height}x{width} image; "
                     "set AttentionRolloutConfig.prefix_tokens to the tokens before the patches.")
  return rows, num_patches // rows


def rollout(attention: jax.Array, head_fusion: HeadFusion = "mean") -> jax.Array:
  """The attention rollout of one image's blocks (Abnar and Zuidema 2020, eq. 1 with sec. 3).

  Each block's heads are fused, the residual connection is added as the identity
  (A = 0.5 W + 0.5 I), rows are renormalised to sum to 1, and the blocks are multiplied from
  the first to the last: R = A_L ... A_2 A_1.

  Args:
    attention: `[L, heads, N, N] float32` attention weights, rows summing to 1.
    head_fusion: "mean", "max" or "min" over the heads.

  Returns:
    `[N, N] float32`: `R[i, j]` is how much of output token i flows from input token j.
  """
  fused = getattr(jnp, head_fusion)(attention, axis=1)  # [L, N, N]
  num = fused.shape[-1]
  mixed = 0.5 * fused + 0.5 * jnp.eye(num, dtype=fused.dtype)
  mixed = mixed / mixed.sum(axis=-1, keepdims=True)
  return functools.reduce(lambda total, block: block @ total, mixed[1:], mixed[0])


@functools.partial(jax.jit, static_argnums=0)
def _attention_rollout(config: AttentionRolloutConfig, classifier: Classifier,
                       images: jax.Array) -> jax.Array:
  attention = classifier.attention_fn(classifier.params, classifier.normalize(images))
  flows = jax.vmap(lambda a: rollout(a.astype(jnp.float32), config.head_fusion))(attention)
  prefix = config.prefix_tokens
  if prefix:
    relevance = flows[:, 0, prefix:]  # The class token's row.
  else:
    relevance = flows.mean(axis=1)  # [B, N]: the flow into the mean of the tokens.
  grid = patch_grid(relevance.shape[-1], *images.shape[1:3])
  return _common.resize_maps(relevance.reshape(-1, *grid), images.shape[1:3])


def check_attention(classifier: Classifier, method: str) -> None:
  """Raises ValueError unless `classifier` has `attention_fn`, which `method` needs."""
  if classifier.attention_fn is None:
    raise ValueError(
        f"`classifier` has no attention_fn; {method} needs every block's attention weights, so it "
        "explains transformers only (use models.classifier('shapes_vit', ...), or pass "
        "`attention=` to Classifier.from_nnx / from_linen / from_equinox).")


def attention_rollout(classifier: Classifier, images: jax.Array, target: jax.Array,
                      key: jax.Array | None = None,
                      config: AttentionRolloutConfig | None = None) -> jax.Array:
  """Attention rollout saliency: how much each patch's input token flows into the output.

  Abnar and Zuidema 2020: the attention weights of every block, each with the identity added
  for the residual connection, multiplied through the depth (`rollout`); the row of the token
  that the classifier reads (see `AttentionRolloutConfig.prefix_tokens`) over the patch
  tokens, on the patch grid, upsampled bilinearly to the image. The map does not depend on the
  class: rollout follows the attention, which is the same whatever class is explained.

  Args:
    classifier: Needs `attention_fn` (`[B, L, heads, N, N]` weights for normalised images).
    images: `[B, H, W, 3] float32` RGB in [0, 1].
    target: `[B] int32` classes to explain; only checked (the map is class-agnostic).
    key: Unused (rollout is deterministic); kept for the common call shape.
    config: `AttentionRolloutConfig`.

  Returns:
    `[B, H, W] float32` saliency, >= 0.

  Raises:
    ValueError: on bad images, on a `target` outside the classifier's classes [0, C), if the
      classifier lacks `attention_fn` (checked in this order), or when the patch tokens make no
      grid over the image.
  """
  del key
  config = _common.check_config(config, AttentionRolloutConfig)
  images = check_images(images)
  _common.check_target(target, classifier, images)
  check_attention(classifier, "attention rollout")
  return _attention_rollout(config, classifier, images)
