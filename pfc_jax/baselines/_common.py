"""Helpers shared by the baselines and the metrics: target scores, map resizing, chunked passes.

Methods that need many forward passes per image (Score-CAM, Integrated Gradients, Occlusion,
RISE, deletion/insertion curves) split them into chunks of fixed size: each chunk is one jitted
call, driven from Python, and the chunks' outputs are summed. A compiled loop over the chunks
would run convolutions inside `lax.scan`, measured 16-28x slower on XLA:CPU (see `pfc_jax._loop`).
"""

from __future__ import annotations

import functools
import importlib
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from pfc_jax.classifier import Classifier, check_classifier


def target_probabilities(classifier: Classifier, images01: jax.Array, target: jax.Array) -> jax.Array:
  """Softmax probability of each image's target class.

  Args:
    classifier: The classifier.
    images01: `[N, H, W, 3] float32` RGB in [0, 1].
    target: `[N] int32` class indices.

  Returns:
    `[N] float32` probabilities.
  """
  probs = jax.nn.softmax(classifier.logits(images01).astype(jnp.float32), axis=-1)
  return jnp.take_along_axis(probs, target[:, None], axis=1)[:, 0]


def target_logits(classifier: Classifier, images01: jax.Array, target: jax.Array) -> jax.Array:
  """`[N] float32` logit of each image's target class for `images01 [N, H, W, 3]` in [0, 1]."""
  logits = classifier.logits(images01).astype(jnp.float32)
  return jnp.take_along_axis(logits, target[:, None], axis=1)[:, 0]


def resize_maps(maps: jax.Array, size: tuple[int, int]) -> jax.Array:
  """Bilinearly resizes `maps [B, h, w]` to `[B, *size] float32` (identity when sizes match)."""
  maps = maps.astype(jnp.float32)
  if tuple(maps.shape[1:]) == tuple(size):
    return maps
  return jax.image.resize(maps, (maps.shape[0], *size), method="bilinear")


def min_max_normalize(maps: jax.Array) -> jax.Array:
  """Per-map min-max normalisation of `maps [B, H, W]`: `(m - min) / (max - min + eps)`.

  `eps` is float32's smallest normal number, so every map whose values differ is scaled by its
  own range (the result does not depend on the map's scale) and a constant map, which ranks no
  pixel above another, becomes 0 everywhere: it keeps nothing. This is the usual convention
  (e.g. pytorch-grad-cam's `scale_cam_image`); for the Grad-CAM++ metrics a constant map then
  keeps none of the image, not all of it.

  Returns:
    `[B, H, W] float32` in [0, 1].
  """
  low = maps.min(axis=(1, 2), keepdims=True)
  span = maps.max(axis=(1, 2), keepdims=True) - low
  return (maps - low) / (span + np.finfo(np.float32).tiny)


def num_chunks(total: int, chunk_size: int) -> int:
  """How many chunks of `chunk_size` cover `total` items."""
  return -(-total // chunk_size)


def chunk_indices(chunk: jax.Array, chunk_size: int, total: int) -> tuple[jax.Array, jax.Array]:
  """Item indices `[chunk_size] int32` of chunk `chunk` (clipped to `total - 1`) and their validity."""
  index = chunk * chunk_size + jnp.arange(chunk_size, dtype=jnp.int32)
  return jnp.minimum(index, total - 1), index < total


@functools.cache
def _jit_chunk(chunk_fn: Callable) -> Callable:
  return jax.jit(chunk_fn, static_argnums=0)


def sum_over_chunks(chunk_fn: Callable, static: Any, count: int, *args: Any) -> Any:
  """Sums `chunk_fn(static, chunk, *args)` over `chunk = 0 .. count - 1`.

  Args:
    chunk_fn: A module-level function; `static` (hashable) is bound at compile time, so every
      chunk and every later call with the same shapes reuses one compilation.
    static: Hashable settings, usually a frozen config.
    count: Number of chunks.
    *args: Array arguments (pytrees), the same for every chunk.

  Returns:
    The sum of the chunks' outputs (a pytree of arrays).
  """
  jitted = _jit_chunk(chunk_fn)
  total = None
  for chunk in range(count):
    out = jitted(static, np.int32(chunk), *args)
    total = out if total is None else jax.tree.map(jnp.add, total, out)
  return total


def check_target(target: Any, classifier: Classifier, images: jax.Array) -> jax.Array:
  """Checks the classifier contract (`classifier.check_classifier`), then validates `target` as
  one class index in [0, C) per image and returns it as `[B] int32`.

  Args:
    target: `[B]` integer class indices.
    classifier: The classifier; C is the length of its logits.
    images: `[B, H, W, 3]` images the targets belong to.

  Value checks run only on concrete arrays; under `jax.jit` only shapes and dtypes are checked.

  Raises:
    ValueError: if the classifier breaks its contract, or `target` is not integer, not of shape
      `[B]`, or outside [0, C).

  Warns:
    UserWarning: the classifier's outputs look like probabilities (`check_classifier`).
  """
  count = check_classifier(classifier, images)
  batch_size = images.shape[0]
  target = target if isinstance(target, jax.core.Tracer) else np.asarray(target)
  if target.shape != (batch_size,) or not jnp.issubdtype(target.dtype, jnp.integer):
    raise ValueError(
        f"`target` must be {batch_size} integer class indices (one per image), got shape "
        f"{tuple(target.shape)} and dtype {target.dtype}.")
  if not isinstance(target, jax.core.Tracer) and batch_size:
    if target.min() < 0 or target.max() >= count:
      raise ValueError(
          f"`target` must lie in the classifier's class range [0, {count}), got values in "
          f"[{target.min()}, {target.max()}].")
  return jnp.asarray(target, jnp.int32)


def check_positive_ints(config: Any, *names: str) -> None:
  """Raises ValueError naming the first of `config`'s fields `names` that is not an int >= 1."""
  for name in names:
    value = getattr(config, name)
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
      raise ValueError(f"`{name}` must be an integer >= 1, got {value!r}.")


def check_config(config: Any, config_type: type) -> Any:
  """`config_type()` for `None`, else `config` after checking its type.

  Raises:
    ValueError: if `config` is neither `None` nor a `config_type`.
  """
  if config is None:
    return config_type()
  if not isinstance(config, config_type):
    raise ValueError(f"`config` must be a {config_type.__name__}, got {type(config).__name__}.")
  return config


def import_optional(module: str, method: str, extra: str) -> Any:
  """Imports `module`, a package of the optional extra `extra` that `method` runs on.

  Raises:
    ImportError: naming the extra to install, when `module` (or a package it needs) is missing.
  """
  try:
    return importlib.import_module(module)
  except ImportError as error:
    raise ImportError(
        f"`{method}` needs the optional package {module.split('.')[0]!r} ({error}); install it "
        f"with `pip install 'pfc-jax[{extra}]'`.") from error


def call_padded(fn: Callable, batch: np.ndarray, size: int, *args: Any) -> np.ndarray:
  """`fn(*args, items)` for every `size` items of a host batch, the last chunk padded to `size`.

  Packages that drive the model from host code (XRAI's, LIME's) hand over batches of varying
  length; padding each to `size` items (repeats of the last one) lets a jitted `fn` compile once.

  Args:
    fn: `fn(*args, items [size, ...] float32) -> [size, ...]`, usually jitted.
    batch: `[N, ...]` items, N >= 1.
    size: Items per call of `fn`.
    *args: Leading arguments of `fn` (e.g. the classifier).

  Returns:
    `[N, ...]` numpy array, the outputs of the N items.
  """
  batch = np.asarray(batch, np.float32)
  outputs = []
  for start in range(0, len(batch), size):
    items = batch[start:start + size]
    padded = np.concatenate([items, np.repeat(items[-1:], size - len(items), axis=0)])
    outputs.append(np.asarray(fn(*args, padded))[:len(items)])
  return np.concatenate(outputs)
