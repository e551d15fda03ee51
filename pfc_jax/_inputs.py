"""Argument checks and the per-image PRNG key contract shared by every batched entry point."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def _check_rgb(images, name: str, min_size: int, batched: bool):
  """The checks of `check_images` (batched) and `check_image`; returns `images` unconverted."""
  if not hasattr(images, "shape") or not hasattr(images, "dtype"):
    images = np.asarray(images)
  rank, layout = (4, "[B, H, W, 3]") if batched else (3, "[H, W, 3]")
  if images.ndim != rank or images.shape[-1] != 3:
    raise ValueError(f"`{name}` must have shape {layout}, got {tuple(images.shape)}.")
  height, width = images.shape[-3:-1]
  if height < min_size or width < min_size:
    raise ValueError(
        f"`{name}` must be at least {min_size}x{min_size} pixels, got {height}x{width}.")
  if not jnp.issubdtype(images.dtype, jnp.floating):
    raise ValueError(
        f"`{name}` must be floating point RGB in [0, 1], got dtype {images.dtype}; "
        "divide uint8 images by 255.")
  if not isinstance(images, jax.core.Tracer):
    values = np.asarray(images)
    if np.isnan(values).any():
      raise ValueError(f"`{name}` contains NaN.")
    if values.size and (values.min() < 0.0 or values.max() > 1.0):
      hint = "; divide 0-255 images by 255" if values.max() > 1.0 else ""
      raise ValueError(
          f"`{name}` must lie in [0, 1], got values in [{values.min():.4g}, {values.max():.4g}]"
          f"{hint}.")
  return images


def check_images(images, name: str = "images", min_size: int = 8) -> jax.Array:
  """Validates RGB images `[B, H, W, 3]` float in [0, 1] and returns them as float32.

  The one check of every public function that takes images (`check_image` for one image).
  Value checks (range, NaN) run only on concrete arrays; under `jax.jit` only shapes and dtypes
  are checked.

  Raises:
    ValueError: naming `name` and what is wrong (rank, channels, size below `min_size`, dtype,
      NaN or values outside [0, 1]).
  """
  return jnp.asarray(_check_rgb(images, name, min_size, batched=True), jnp.float32)


def check_image(image, name: str = "image01", min_size: int = 1) -> np.ndarray:
  """`check_images` for one RGB image `[H, W, 3]` float in [0, 1]; returns it as a float32
  NumPy array (for `pfc_jax.viz`, which draws with NumPy).

  Raises:
    ValueError: as `check_images`.
  """
  return np.asarray(_check_rgb(image, name, min_size, batched=False), np.float32)


def per_image_keys(key, batch_size: int, name: str = "key") -> jax.Array:
  """One PRNG key per image: `split(key, B)` for a single key, or the given `[B]` keys.

  Accepts new-style typed keys (`jax.random.key`) and raw `uint32[2]` keys; returns the same
  flavour. Calling with one key or with `jax.random.split(key, B)` gives identical keys.
  """
  key = jnp.asarray(key) if not isinstance(key, jax.Array) else key
  typed = jnp.issubdtype(key.dtype, jax.dtypes.prng_key)
  single_ndim = 0 if typed else 1
  if key.ndim == single_ndim:
    return jax.random.split(key, batch_size)
  if key.ndim == single_ndim + 1 and key.shape[0] == batch_size:
    return key
  raise ValueError(
      f"`{name}` must be one PRNG key or {batch_size} keys (one per image), got shape "
      f"{tuple(key.shape)} and dtype {key.dtype}.")
